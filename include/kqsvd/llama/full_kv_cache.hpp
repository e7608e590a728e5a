// kqsvd/llama/full_kv_cache.hpp -- the exact, uncompressed float KV cache: the reference every
// compressed cache is measured against.
//
// It stores rotated keys and values, n x n_kv_heads*head_dim per layer, as an inference engine does,
// so bytes() = 2 * n_layers * tokens * n_kv_heads * head_dim * sizeof(float).
//
//   kqsvd::llama::FullKvCache cache(model.attention_shape());
//   cache.reserve(model.config().seq_len);   // optional: no reallocation while decoding
//   auto logits = model.forward(tokens, cache);
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

#include "kqsvd/detail/validation.hpp"
#include "kqsvd/llama/kv_cache.hpp"
#include "kqsvd/llama/row_matrix.hpp"
#include "kqsvd/rope.hpp"

namespace kqsvd::llama {

class FullKvCache : public KvCache {
 public:
  explicit FullKvCache(const AttentionShape& shape)
      : KvCache(shape),
        rope_(shape.rotary_embedding()),
        keys_(static_cast<std::size_t>(shape.n_layers)),
        values_(static_cast<std::size_t>(shape.n_layers)),
        tokens_(static_cast<std::size_t>(shape.n_layers), 0) {}

  // Allocates room for `tokens` tokens per layer up front.
  void reserve(Index tokens) {
    if (tokens < 0) {
      kqsvd::detail::throw_invalid("kqsvd::llama::FullKvCache::reserve", "tokens",
                                   "must be >= 0, got " + std::to_string(tokens));
    }
    for (std::size_t l = 0; l < keys_.size(); ++l) grow(l, tokens);
  }

  // Tokens held by `layer`.
  Index tokens(Index layer) const { return tokens_[checked_layer("kqsvd::llama::FullKvCache::tokens", layer)]; }

  // A view of the first rows of a matrix (row-major, so contiguous).
  using ConstRows = Eigen::Block<const RowMatrix, Eigen::Dynamic, Eigen::Dynamic, true>;

  // The cached rotated keys and the values of `layer`, tokens x n_kv_heads*head_dim.
  ConstRows keys(Index layer) const {
    const std::size_t l = checked_layer("kqsvd::llama::FullKvCache::keys", layer);
    return keys_[l].topRows(tokens_[l]);
  }
  ConstRows values(Index layer) const {
    const std::size_t l = checked_layer("kqsvd::llama::FullKvCache::values", layer);
    return values_[l].topRows(tokens_[l]);
  }

  std::size_t bytes() const override {
    std::size_t total = 0;
    for (const Index n : tokens_) total += 2 * static_cast<std::size_t>(n * shape().kv_width()) * sizeof(float);
    return total;
  }

 protected:
  void do_append(Index layer, const Eigen::Ref<const RowMatrix>& keys, const Eigen::Ref<const RowMatrix>& values,
                 Index first_position) override {
    const auto l = static_cast<std::size_t>(layer);
    const Index n = tokens_[l];
    const Index t = keys.rows();
    grow(l, n + t);
    const Index d = shape().head_dim;
    keys_[l].middleRows(n, t) = keys;
    values_[l].middleRows(n, t) = values;
    for (Index h = 0; h < shape().n_kv_heads; ++h) rope_.rotate(keys_[l].block(n, h * d, t, d), first_position);
    tokens_[l] = n + t;
  }

  RowMatrix do_attend(Index layer, const Eigen::Ref<const RowMatrix>& queries, Index first_position) override {
    const auto l = static_cast<std::size_t>(layer);
    return detail::causal_attention(shape(), queries, first_position, keys_[l].topRows(tokens_[l]),
                                    values_[l].topRows(tokens_[l]));
  }

  void do_reset() override { std::fill(tokens_.begin(), tokens_.end(), Index(0)); }

 private:
  // Capacity doubles so that token-by-token decoding copies O(n) floats in total, not O(n^2).
  void grow(std::size_t layer, Index needed) {
    RowMatrix& keys = keys_[layer];
    if (keys.rows() >= needed) return;
    const Index capacity = std::max<Index>({needed, 2 * keys.rows(), Index(16)});
    keys.conservativeResize(capacity, shape().kv_width());
    values_[layer].conservativeResize(capacity, shape().kv_width());
  }

  RotaryEmbedding rope_;
  std::vector<RowMatrix> keys_;    // per layer, capacity x kv_width; rows [0, tokens) are live
  std::vector<RowMatrix> values_;  // per layer, same shape
  std::vector<Index> tokens_;      // per layer
};

}  // namespace kqsvd::llama
