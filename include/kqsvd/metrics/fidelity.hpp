// kqsvd/metrics/fidelity.hpp -- the paper's seven fidelity metrics: relative Frobenius errors on held-out data.
//
// For one KV head, its keys K and values V (n x d), the queries Q_j of the g query heads it serves and
// their output-projection slices W_j (hidden x d), with A, B the key projection and A_v, B_v the value
// projection:
//   keys          K            vs  K A B^T
//   queries       Q_j          vs  Q_j B A^T
//   values        V            vs  V A_v B_v^T
//   scores        Q_j K^T      vs  (Q_j B)(K A)^T                (all pairs, the KQ-SVD objective)
//   value_output  V W_j^T      vs  V A_v B_v^T W_j^T
//   softmax       P_j          vs  P^_j    causal softmax of the scores scaled by 1/sqrt(d)
//   output        P_j V W_j^T  vs  P^_j V A_v B_v^T W_j^T          (after the output projection)
// With FidelityOptions::latent_format the latents K A and V A_v are stored in that format first (int4,
// q8_0, ...), so the metrics measure the cache as it would hold them.
// Squared errors and squared references are summed over query heads, sequences, heads and layers
// before dividing, so an aggregate is the relative error of everything it covers. Computed in double.
//
//   kqsvd::FidelityTotals layer;
//   for (each sequence, each kv head h)
//     layer += kqsvd::measure_head_fidelity(key_proj, value_proj, K, V, group_queries, group_output_weight);
//   double qk = layer.relative_error(kqsvd::FidelityMetric::scores);
#pragma once

#include <Eigen/Core>

#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <string>

#include "kqsvd/core/storage_format.hpp"
#include "kqsvd/kernels/reference_attention.hpp"
#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/solvers/low_rank_projection.hpp"
#include "kqsvd/core/rope.hpp"

namespace kqsvd {

enum class FidelityMetric { keys, queries, values, scores, value_output, softmax, output };

inline constexpr std::array<FidelityMetric, 7> all_fidelity_metrics = {
    FidelityMetric::keys,         FidelityMetric::queries, FidelityMetric::values, FidelityMetric::scores,
    FidelityMetric::value_output, FidelityMetric::softmax, FidelityMetric::output};

// Short names, as in the JSON keys "err_k", "err_q", ... of the command-line tool.
inline const char* to_string(FidelityMetric metric) {
  switch (metric) {
    case FidelityMetric::keys: return "k";
    case FidelityMetric::queries: return "q";
    case FidelityMetric::values: return "v";
    case FidelityMetric::scores: return "qk";
    case FidelityMetric::value_output: return "vo";
    case FidelityMetric::softmax: return "softmax";
    case FidelityMetric::output: return "out";
  }
  return "unknown";
}

class FidelityTotals {
 public:
  void add(FidelityMetric metric, double error_squared, double reference_squared) {
    constexpr const char* where = "kqsvd::FidelityTotals::add";
    if (!(error_squared >= 0.0) || !std::isfinite(error_squared)) {
      detail::throw_invalid(where, "error_squared", "must be finite and >= 0, got " + std::to_string(error_squared));
    }
    if (!(reference_squared >= 0.0) || !std::isfinite(reference_squared)) {
      detail::throw_invalid(where, "reference_squared",
                            "must be finite and >= 0, got " + std::to_string(reference_squared));
    }
    error_squared_[index(metric)] += error_squared;
    reference_squared_[index(metric)] += reference_squared;
  }

  FidelityTotals& operator+=(const FidelityTotals& other) {
    for (std::size_t i = 0; i < error_squared_.size(); ++i) {
      error_squared_[i] += other.error_squared_[i];
      reference_squared_[i] += other.reference_squared_[i];
    }
    return *this;
  }

  double error_squared(FidelityMetric metric) const { return error_squared_[index(metric)]; }
  double reference_squared(FidelityMetric metric) const { return reference_squared_[index(metric)]; }

  // ||error|| / ||reference||: 0 when both are zero (nothing to approximate, nothing lost), +infinity
  // when only the reference is zero.
  double relative_error(FidelityMetric metric) const {
    const double error = error_squared(metric);
    const double reference = reference_squared(metric);
    if (reference == 0.0) return error == 0.0 ? 0.0 : std::numeric_limits<double>::infinity();
    return std::sqrt(error / reference);
  }

 private:
  static std::size_t index(FidelityMetric metric) { return static_cast<std::size_t>(metric); }

  std::array<double, 7> error_squared_{};
  std::array<double, 7> reference_squared_{};
};

struct FidelityOptions {
  // Non-null for pre-RoPE projections: keys and queries are given un-rotated, scores compare rotated
  // queries against rotated (reconstructed) keys, the sequence starting at first_position.
  const RotaryEmbedding* pre_rope = nullptr;
  Eigen::Index first_position = 0;
  // When set, the key latents K A and value latents V A_v are stored in this format before anything is
  // reconstructed from them (kqsvd::round_trip), so every metric but err_q includes its rounding. Unset:
  // latents kept exact (in double). The ranks must be widths the format can hold.
  std::optional<StorageFormat> latent_format;
};

// One sequence of one KV head. keys, values: n x d. group_queries: (g n) x d, the n rows of each of the
// group's g query heads stacked head by head. group_output_weight: hidden x (g d), the columns of
// o_proj.weight that read those heads, in the same order.
template <typename Scalar, typename DerivedK, typename DerivedV, typename DerivedQ, typename DerivedW>
FidelityTotals measure_head_fidelity(const LowRankProjection<Scalar>& key_projection,
                                     const LowRankProjection<Scalar>& value_projection,
                                     const Eigen::MatrixBase<DerivedK>& keys, const Eigen::MatrixBase<DerivedV>& values,
                                     const Eigen::MatrixBase<DerivedQ>& group_queries,
                                     const Eigen::MatrixBase<DerivedW>& group_output_weight,
                                     const FidelityOptions& options = {}) {
  using Index = Eigen::Index;
  using Matrix = Eigen::MatrixXd;
  constexpr const char* where = "kqsvd::measure_head_fidelity";
  const Index d = key_projection.dimension();
  const Index n = keys.rows();
  if (value_projection.dimension() != d) {
    detail::throw_invalid(where, "value_projection", "has dimension " + std::to_string(value_projection.dimension()) +
                                                         ", the key projection " + std::to_string(d));
  }
  detail::require_columns(where, "keys", keys.cols(), d);
  detail::require_columns(where, "values", values.cols(), d);
  detail::require_columns(where, "group_queries", group_queries.cols(), d);
  if (n == 0) detail::throw_invalid(where, "keys", "is empty");
  if (values.rows() != n) {
    detail::throw_invalid(where, "values", "has " + std::to_string(values.rows()) + " rows, keys have " + std::to_string(n));
  }
  if (group_queries.rows() % n != 0 || group_queries.rows() == 0) {
    detail::throw_invalid(where, "group_queries",
                          "has " + std::to_string(group_queries.rows()) + " rows, not a positive multiple of the " +
                              std::to_string(n) + " tokens");
  }
  const Index group = group_queries.rows() / n;
  if (group_output_weight.cols() != group * d) {
    detail::throw_invalid(where, "group_output_weight",
                          "has " + std::to_string(group_output_weight.cols()) + " columns, expected " +
                              std::to_string(group * d) + " (" + std::to_string(group) + " query heads x " +
                              std::to_string(d) + ")");
  }
  if (options.pre_rope != nullptr && options.pre_rope->head_dim() != d) {
    detail::throw_invalid(where, "options.pre_rope", "rotates head_dim " + std::to_string(options.pre_rope->head_dim()) +
                                                         ", the projections have " + std::to_string(d));
  }
  detail::require_finite(where, "keys", keys);
  detail::require_finite(where, "values", values);
  detail::require_finite(where, "group_queries", group_queries);
  detail::require_finite(where, "group_output_weight", group_output_weight);

  const Matrix a = key_projection.encoder().template cast<double>();
  const Matrix b = key_projection.decoder().template cast<double>();
  const Matrix av = value_projection.encoder().template cast<double>();
  const Matrix bv = value_projection.decoder().template cast<double>();
  const Matrix k = keys.template cast<double>();
  const Matrix v = values.template cast<double>();

  FidelityTotals totals;
  const auto accumulate = [&totals](FidelityMetric metric, const Matrix& reference, const Matrix& approximation) {
    totals.add(metric, (reference - approximation).squaredNorm(), reference.squaredNorm());
  };

  Matrix key_latents = k * a;
  Matrix value_latents = v * av;
  if (options.latent_format) {
    key_latents = round_trip(*options.latent_format, key_latents).template cast<double>();
    value_latents = round_trip(*options.latent_format, value_latents).template cast<double>();
  }
  const Matrix keys_back = key_latents * b.transpose();
  const Matrix values_back = value_latents * bv.transpose();
  accumulate(FidelityMetric::keys, k, keys_back);
  accumulate(FidelityMetric::values, v, values_back);

  // The keys the scores see: as given (post-RoPE), or rotated after reconstruction (pre-RoPE).
  Matrix scored_keys = k, scored_keys_back = keys_back;
  if (options.pre_rope != nullptr) {
    options.pre_rope->rotate(scored_keys, options.first_position);
    options.pre_rope->rotate(scored_keys_back, options.first_position);
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  for (Index j = 0; j < group; ++j) {
    const Matrix q = group_queries.middleRows(j * n, n).template cast<double>();
    const Matrix w = group_output_weight.middleCols(j * d, d).template cast<double>();
    accumulate(FidelityMetric::queries, q, (q * b) * a.transpose());

    Matrix scored_queries = q;
    if (options.pre_rope != nullptr) options.pre_rope->rotate(scored_queries, options.first_position);
    const Matrix scores = scored_queries * scored_keys.transpose();
    const Matrix scores_back = options.pre_rope != nullptr ? Matrix(scored_queries * scored_keys_back.transpose())
                                                           : Matrix((q * b) * key_latents.transpose());
    accumulate(FidelityMetric::scores, scores, scores_back);

    const Matrix value_output = v * w.transpose();
    accumulate(FidelityMetric::value_output, value_output, values_back * w.transpose());

    const Matrix weights = causal_softmax(scores * scale, 0);
    const Matrix weights_back = causal_softmax(scores_back * scale, 0);
    accumulate(FidelityMetric::softmax, weights, weights_back);
    accumulate(FidelityMetric::output, weights * value_output, weights_back * (values_back * w.transpose()));
  }
  return totals;
}

}  // namespace kqsvd
