// kqsvd/llama/full_kv_cache.hpp -- the uncompressed KV cache: every token's rotated key and value rows,
// per layer and KV head a kqsvd::HeadCache of full rows. In float32 (the default) it is the exact
// reference every compressed cache is measured against; in another StorageFormat it is a quantized
// full cache (llama.cpp's q8_0 or q4_0, fp8, ...). `arithmetic` is how a decode step (up to 16 queries
// of a KV head's group at one position) multiplies 4- and 2-bit codes: kernels/decode_arithmetic.hpp;
// prefill blocks always compute in float.
//
// bytes() = layers x kv_heads x tokens x 2 x StorageFormat::bytes_per_row(head_dim): 2 x layers x
// tokens x kv_heads x head_dim x 4 in float32.
//
//   kqsvd::llama::FullKvCache cache(model.shape(), model.rotary_embedding());
//   kqsvd::llama::FullKvCache q4(model.shape(), model.rotary_embedding(), kqsvd::StorageFormat::parse("q4_0"));
//   kqsvd::llama::FullKvCache fast(model.shape(), model.rotary_embedding(), kqsvd::StorageFormat::parse("q4_0"),
//                                  kqsvd::DecodeArithmetic::int8_dot_products);
//   cache.reserve(model.config().seq_len);   // optional: no reallocation while decoding
//   auto logits = model.forward(tokens, cache);
#pragma once

#include <Eigen/Core>

#include <cstddef>
#include <string>
#include <vector>

#include "kqsvd/cache/head_cache.hpp"
#include "kqsvd/core/storage_format.hpp"
#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/core/rope.hpp"
#include "kqsvd/kernels/decode_arithmetic.hpp"
#include "kqsvd/kernels/decode_attention.hpp"
#include "kqsvd/kernels/partial_attention.hpp"
#include "kqsvd/llama/kv_cache.hpp"

namespace kqsvd::llama {

class FullKvCache : public KvCache {
 public:
  FullKvCache(const ModelShape& shape, const RotaryEmbedding& rope, StorageFormat format = StorageFormat(),
              DecodeArithmetic arithmetic = DecodeArithmetic::float32)
      : KvCache(shape, rope), arithmetic_(arithmetic) {
    heads_.assign(static_cast<std::size_t>(shape.layers * shape.kv_heads),
                  HeadCache(shape.head_dim, shape.head_dim, format));
  }

  const StorageFormat& format() const { return heads_.front().format(); }
  DecodeArithmetic decode_arithmetic() const { return arithmetic_; }

  // Allocates room for `tokens` tokens per layer up front.
  void reserve(Index tokens) {
    for (HeadCache& head : heads_) head.reserve(tokens);
  }

  // The rows of one KV head of one layer (rotated keys and values).
  const HeadCache& head(Index layer, Index kv_head) const {
    constexpr const char* where = "kqsvd::llama::FullKvCache::head";
    shape().require_layer(where, layer);
    shape().require_kv_head(where, kv_head);
    return heads_[static_cast<std::size_t>(layer * shape().kv_heads + kv_head)];
  }

  std::size_t bytes() const override {
    std::size_t total = 0;
    for (const HeadCache& head : heads_) total += head.bytes();
    return total;
  }

 protected:
  void do_append(Index layer, const Eigen::Ref<const RowMatrix<float>>& keys, const Eigen::Ref<const RowMatrix<float>>& values,
                 Index first_position) override {
    const Index d = shape().head_dim;
    RowMatrix<float> rotated = keys;
    for (Index h = 0; h < shape().kv_heads; ++h) rotary_embedding().rotate(rotated.middleCols(h * d, d), first_position);
    for (Index h = 0; h < shape().kv_heads; ++h) {
      slot(layer, h).append(rotated.middleCols(h * d, d), values.middleCols(h * d, d));
    }
  }

  RowMatrix<float> do_attend(Index layer, const Eigen::Ref<const RowMatrix<float>>& queries, Index first_position) override {
    const float scale = detail::score_scale(shape().head_dim);
    const VisibleRows visible = detail::group_rows(shape().group_size(), VisibleRows::causal(queries.rows(), first_position));
    RowMatrix<float> output(queries.rows(), shape().query_width());
    for (Index h = 0; h < shape().kv_heads; ++h) {
      const RowMatrix<float> stacked = detail::group_queries(shape(), queries, h, scale);
      detail::scatter_group(shape(), partial_attention(stacked, visible, slot(layer, h), arithmetic_).result(), h, output);
    }
    return output;
  }

  void do_reset() override {
    for (HeadCache& head : heads_) head.clear();
  }

 private:
  HeadCache& slot(Index layer, Index kv_head) { return heads_[static_cast<std::size_t>(layer * shape().kv_heads + kv_head)]; }

  std::vector<HeadCache> heads_;  // [layer * kv_heads + kv_head]
  DecodeArithmetic arithmetic_;
};

}  // namespace kqsvd::llama
