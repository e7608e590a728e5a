// kqsvd/llama/transformer.hpp -- the Llama-architecture forward pass (llama2.c run.c), in float with Eigen.
//
// RMSNorm (eps 1e-5), attention with adjacent-pair RoPE (theta 10000) and grouped-query attention
// (query head h reads KV head h / (n_heads / n_kv_heads)), SwiGLU feed-forward, tied or separate
// classifier. forward() takes a block of T new tokens -- a whole prompt (prefill) or one token
// (decode) -- as a T x dim matrix through every layer and returns T x vocab_size logits; row i
// predicts the token after tokens[i]. Keys and values live in a KvCache chosen by the caller, which
// also fixes the positions: the block starts at cache.next_position(0).
//
//   kqsvd::llama::Transformer model(kqsvd::llama::Checkpoint::load("stories260K.bin"));
//   kqsvd::llama::FullKvCache cache(model.shape(), model.rotary_embedding());
//   kqsvd::RowMatrix<float> logits = model.forward(prompt, cache);          // prefill
//   logits = model.forward({next_token}, cache);                            // one more token
//
// Pass an ActivationObserver (e.g. an ActivationRecorder) to capture each layer's queries, keys and
// values. Built on it: likelihood.hpp (mean next-token NLL) and generation.hpp (greedy decoding).
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/error.hpp"
#include "kqsvd/llama/activation_recorder.hpp"
#include "kqsvd/llama/checkpoint.hpp"
#include "kqsvd/llama/full_kv_cache.hpp"  // the exact cache, which most callers pass
#include "kqsvd/llama/kv_cache.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/core/model_shape.hpp"
#include "kqsvd/core/rope.hpp"

namespace kqsvd::llama {

// Constants of the llama2.c architecture that its file format does not store.
constexpr float rms_norm_epsilon = 1e-5f;
constexpr double rope_theta = 10000.0;

}  // namespace kqsvd::llama

namespace kqsvd::detail {

// Each row (token) scaled to unit root-mean-square, then by `gain` per column.
inline RowMatrix<float> rms_norm(const RowMatrix<float>& x, const Eigen::VectorXf& gain) {
  const Eigen::ArrayXf inverse_rms =
      ((x.rowwise().squaredNorm() / static_cast<float>(x.cols())).array() + llama::rms_norm_epsilon).rsqrt();
  return (x.array().colwise() * inverse_rms).rowwise() * gain.transpose().array();
}

// Rotates every head (column block of head_dim) of `rows` by the rows' positions.
inline void rotate_heads(RowMatrix<float>& rows, const RotaryEmbedding& rope, Eigen::Index first_position) {
  const Eigen::Index d = rope.head_dim();
  for (Eigen::Index h = 0; h < rows.cols() / d; ++h) rope.rotate(rows.middleCols(h * d, d), first_position);
}

}  // namespace kqsvd::detail

namespace kqsvd::llama {

class Transformer {
 public:
  using Index = Eigen::Index;

  explicit Transformer(Checkpoint checkpoint)
      : checkpoint_(std::move(checkpoint)),
        shape_{checkpoint_.config().n_layers, checkpoint_.config().n_heads, checkpoint_.config().n_kv_heads,
               checkpoint_.config().head_dim()},
        rope_(shape_.head_dim, rope_theta, RopeStyle::adjacent_pairs) {}

  const Checkpoint& checkpoint() const { return checkpoint_; }
  const Config& config() const { return checkpoint_.config(); }
  // What a KvCache for this model is constructed with.
  const ModelShape& shape() const { return shape_; }
  const RotaryEmbedding& rotary_embedding() const { return rope_; }

  // Runs `tokens` at positions cache.next_position(0), ... through the model, appending their keys and
  // values to `cache`; returns tokens.size() x vocab_size logits. Positions may exceed seq_len (RoPE
  // extrapolates) but the model was trained only up to it. If this throws midway, reset the cache.
  RowMatrix<float> forward(const std::vector<int>& tokens, KvCache& cache, ActivationObserver* observer = nullptr) const {
    constexpr const char* where = "kqsvd::llama::Transformer::forward";
    const Config& config = checkpoint_.config();
    if (tokens.empty()) detail::throw_invalid(where, "tokens", "is empty");
    if (cache.shape() != shape_) {
      detail::throw_invalid(where, "cache",
                            "was built for " + to_string(cache.shape()) + ", but the model has " + to_string(shape_));
    }
    if (cache.rotary_embedding().theta() != rope_.theta() || cache.rotary_embedding().style() != rope_.style()) {
      detail::throw_invalid(where, "cache", "rotates with another RoPE theta or style than the model");
    }
    const auto T = static_cast<Index>(tokens.size());
    RowMatrix<float> x(T, config.dim);
    for (Index i = 0; i < T; ++i) {
      const int token = tokens[static_cast<std::size_t>(i)];
      if (token < 0 || token >= config.vocab_size) {
        detail::throw_invalid(where, "tokens",
                                     "has id " + std::to_string(token) + " at index " + std::to_string(i) +
                                         ", expected ids in [0, " + std::to_string(config.vocab_size) + ")");
      }
      x.row(i) = checkpoint_.token_embedding().row(token);
    }

    const Index first_position = cache.next_position(0);
    for (Index l = 0; l < config.n_layers; ++l) {
      const LayerWeights& w = checkpoint_.layer(l);
      const RowMatrix<float> attention_input = detail::rms_norm(x, w.attention_norm);
      RowMatrix<float> queries = attention_input * w.wq.transpose();
      RowMatrix<float> keys = attention_input * w.wk.transpose();
      RowMatrix<float> values = attention_input * w.wv.transpose();

      AttentionActivations activations;
      if (observer != nullptr) {
        activations.layer = l;
        activations.first_position = first_position;
        activations.queries_pre_rope = queries;
        activations.keys_pre_rope = keys;
      }
      detail::rotate_heads(queries, rope_, first_position);
      cache.append(l, keys, values, first_position);
      RowMatrix<float> attention = cache.attend(l, queries, first_position);
      x.noalias() += attention * w.wo.transpose();

      if (observer != nullptr) {
        detail::rotate_heads(keys, rope_, first_position);
        activations.queries = std::move(queries);
        activations.keys = std::move(keys);
        activations.values = std::move(values);
        activations.attention_output = std::move(attention);
        observer->observe(activations);
      }

      const RowMatrix<float> ffn_input = detail::rms_norm(x, w.ffn_norm);
      const RowMatrix<float> gate = ffn_input * w.w1.transpose();
      const RowMatrix<float> up = ffn_input * w.w3.transpose();
      // SwiGLU: silu(gate) * up.
      const RowMatrix<float> hidden = (gate.array() / (1.0f + (-gate.array()).exp()) * up.array()).matrix();
      x.noalias() += hidden * w.w2.transpose();
    }
    return detail::rms_norm(x, checkpoint_.final_norm()) * checkpoint_.classifier().transpose();
  }

 private:
  Checkpoint checkpoint_;
  ModelShape shape_;
  RotaryEmbedding rope_;
};

}  // namespace kqsvd::llama
