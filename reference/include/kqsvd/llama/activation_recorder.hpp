// kqsvd/llama/activation_recorder.hpp -- capturing the queries, keys and values the forward pass computes.
//
// Transformer::forward() takes an optional ActivationObserver and, for every layer of every block it
// processes, hands it an AttentionActivations: the block's queries and keys before and after RoPE, its
// values and its attention output, all with tokens as rows and heads as column blocks of head_dim.
// Calibration derives from ActivationObserver to stream what it needs (e.g. Gram matrices);
// ActivationRecorder simply keeps copies of everything.
//
//   kqsvd::llama::ActivationRecorder recorder;
//   kqsvd::llama::FullKvCache cache(model.shape(), model.rotary_embedding());
//   model.forward(tokens, cache, &recorder);
//   const auto& layer0 = recorder.blocks(0).front();
//   layer0.keys.middleCols(h * head_dim, head_dim);    // KV head h, post-RoPE, tokens x head_dim
#pragma once

#include <Eigen/Core>

#include <cstddef>
#include <string>
#include <vector>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/matrix.hpp"

namespace kqsvd::llama {

// One layer, one block of T tokens at positions first_position .. first_position + T - 1.
struct AttentionActivations {
  Eigen::Index layer = 0;
  Eigen::Index first_position = 0;
  RowMatrix<float> queries;           // T x n_heads*head_dim, after RoPE (what attention scores with)
  RowMatrix<float> queries_pre_rope;  // T x n_heads*head_dim
  RowMatrix<float> keys;              // T x n_kv_heads*head_dim, after RoPE
  RowMatrix<float> keys_pre_rope;     // T x n_kv_heads*head_dim
  RowMatrix<float> values;            // T x n_kv_heads*head_dim
  RowMatrix<float> attention_output;  // T x n_heads*head_dim, heads' outputs before the output projection wo
};

class ActivationObserver {
 public:
  virtual ~ActivationObserver() = default;
  // Called once per layer per forward() call, in layer order, after the layer's attention.
  virtual void observe(const AttentionActivations& activations) = 0;

 protected:
  ActivationObserver() = default;
  ActivationObserver(const ActivationObserver&) = default;
  ActivationObserver& operator=(const ActivationObserver&) = default;
};

// Keeps every observed block, per layer, in the order processed.
class ActivationRecorder : public ActivationObserver {
 public:
  void observe(const AttentionActivations& activations) override {
    const auto layer = static_cast<std::size_t>(activations.layer);
    if (layer >= layers_.size()) layers_.resize(layer + 1);
    layers_[layer].push_back(activations);
  }

  // Layers observed so far (the model's n_layers once anything was recorded).
  Eigen::Index layers() const { return static_cast<Eigen::Index>(layers_.size()); }

  const std::vector<AttentionActivations>& blocks(Eigen::Index layer) const {
    if (layer < 0 || layer >= layers()) {
      detail::throw_invalid(
          "kqsvd::llama::ActivationRecorder::blocks", "layer",
          "is " + std::to_string(layer) + ", but " + std::to_string(layers()) + " layers were recorded");
    }
    return layers_[static_cast<std::size_t>(layer)];
  }

  void clear() { layers_.clear(); }

 private:
  std::vector<std::vector<AttentionActivations>> layers_;
};

}  // namespace kqsvd::llama
