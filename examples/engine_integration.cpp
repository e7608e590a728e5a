// engine_integration -- what an inference engine does with kqsvd, for one KV head: accumulate calibration
// Grams while the model runs, fit the KQ-SVD projection once, then keep only float16 latents in the
// cache and run decode steps on them. Checked here against exact attention on the full keys and values.
//
//   build/examples/engine_integration        # prints the relative error of the compressed decode steps
//
// Rows are tokens everywhere; the random "activations" below stand in for a model's keys, queries and
// values of one head (in an engine: post-RoPE, as the model scores them).
#include <kqsvd/kqsvd.hpp>

#include <cmath>
#include <cstdio>

int main() {
  const Eigen::Index d = 64, rank = 16, calibration_tokens = 4096, context = 1000;

  // Activations with the structure real heads have: energy in a few directions (a decaying spectrum),
  // queries sharp enough that attention is neither uniform nor one-hot.
  const Eigen::VectorXf spectrum = Eigen::VectorXf::LinSpaced(d, 0.0f, 1.0f).unaryExpr([](float x) { return std::exp(-6.0f * x); });
  const Eigen::MatrixXf mixing = spectrum.asDiagonal() * Eigen::MatrixXf::Random(d, d);
  const auto activations = [&](Eigen::Index tokens, float scale) {
    return Eigen::MatrixXf(scale * Eigen::MatrixXf::Random(tokens, d) * mixing);
  };

  // 1. Calibration: d x d Grams, streamed block by block (any number of tokens, O(d^2) memory).
  kqsvd::GramAccumulator key_gram(d), query_gram(d), value_gram(d);
  for (Eigen::Index first = 0; first < calibration_tokens; first += 512) {
    key_gram.add(activations(512, 1.0f));
    query_gram.add(activations(512, 4.0f));
    value_gram.add(activations(512, 1.0f));
  }

  // 2. Fit once: KQ-SVD for keys (optimal for Q K^T), for values against the head's output projection.
  const Eigen::MatrixXf output_weight = Eigen::MatrixXf::Random(4 * d, d);  // o_proj columns of this head
  const kqsvd::RankSelection keep = kqsvd::RankSelection::fixed(rank);
  const auto key_proj = kqsvd::fit_projection<float>(kqsvd::Method::kq_svd, key_gram, query_gram, keep);
  const auto value_proj = kqsvd::fit_value_projection<float>(
      kqsvd::Method::kq_svd, value_gram, kqsvd::output_projection_gram(output_weight, d, 0, 1), keep);
  std::printf("rank %ld of %ld; predicted relative errors: Q K^T %.4f, V W^T %.4f\n", static_cast<long>(rank),
              static_cast<long>(d), key_proj.predicted_relative_error(), value_proj.predicted_relative_error());

  // 3. Serving: the cache holds float16 latents K A and V A_v (2 x 16 numbers per token, not 2 x 64).
  kqsvd::HeadCache cache(key_proj, value_proj, kqsvd::StorageFormat::parse("f16"));
  cache.reserve(context);
  const kqsvd::RowMatrix<float> keys = activations(context, 1.0f), values = activations(context, 1.0f);
  const kqsvd::RowMatrix<float> queries = activations(context, 4.0f);
  cache.append(key_proj, value_proj, keys.topRows(context - 4), values.topRows(context - 4));  // the prompt

  double worst = 0.0;
  for (Eigen::Index t = context - 4; t < context; ++t) {  // four decode steps
    cache.append(key_proj, value_proj, keys.middleRows(t, 1), values.middleRows(t, 1));
    const Eigen::RowVectorXf step = kqsvd::decode_attention(key_proj, value_proj, queries.row(t), cache);
    // The same step on the exact cache, by the reference attention (in double).
    const Eigen::MatrixXd exact =
        kqsvd::causal_attention(queries.row(t).cast<double>(), keys.topRows(t + 1).cast<double>(),
                                values.topRows(t + 1).cast<double>());
    // What the model uses of a head's output: its product with the head's output projection.
    const Eigen::VectorXd used = output_weight.cast<double>() * exact.row(0).transpose();
    const double error = (output_weight.cast<double>() * step.transpose().cast<double>() - used).norm() / used.norm();
    worst = std::max(worst, error);
    std::printf("decode step %ld: relative error of the head's output after o_proj %.4f\n", static_cast<long>(t), error);
  }
  std::printf("cache: %zu bytes for %ld tokens (a float16 full cache: %ld)\n", cache.bytes(),
              static_cast<long>(cache.size()), static_cast<long>(cache.size() * 2 * d * 2));
  // The check an engine's test would make: the output is about as close as the projections predict
  // (here V W^T's error dominates: 16 of 64 value directions keep about 95 % of its energy).
  return worst < 1.5 * (key_proj.predicted_relative_error() + value_proj.predicted_relative_error()) ? 0 : 1;
}
