// kqsvd/llama/kv_cache.hpp -- the interface between the forward pass and whatever stores keys and values.
//
// The transformer never touches cached keys or values itself. Per layer and per block of T new tokens
// it hands the cache
//   append(layer, keys, values, first_position)  -- UN-rotated keys and values, T x kv_heads*head_dim,
//                                                   of the tokens at first_position, first_position+1, ...
//   attend(layer, queries, first_position)        -- ROTATED queries, T x query_heads*head_dim, same
//                                                   positions; returns the causal attention output
// so that the cache decides what to store and how to score:
//   * an exact cache rotates the keys and keeps them (FullKvCache, which can also store them quantized);
//   * a post-RoPE compressed cache rotates, then stores latents k A, and scores (q B)(k A)^T;
//   * a pre-RoPE compressed cache stores latents of the un-rotated keys, and at attend() reconstructs
//     k A B^T, rotates it by its position (rotary_embedding()) and scores with the rotated query;
//   * any of them may keep the most recent W tokens exact.
// Query row i (position first_position + i) attends to every cached position <= first_position + i.
// Heads are column blocks of width head_dim; query head h reads KV head h / shape().group_size(). The
// library's kernels (kqsvd/kernels/) do the attention, reading the per-head caches in place.
//
// Implementing a cache: derive from KvCache, pass the shape and the rotary embedding to its constructor
// and override do_append, do_attend, do_reset and bytes(). The public functions validate shapes and
// positions first (positions must arrive contiguously from 0 in every layer), so overrides can rely on
// them.
//
//   kqsvd::llama::FullKvCache cache(model.shape(), model.rotary_embedding());
//   auto logits = model.forward(prompt, cache);   // prefill
//   auto next = model.forward({token}, cache);    // decode, position = prompt.size()
//   cache.bytes();                                // what the cache holds
//   cache.reset();                                // a new sequence
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/error.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/core/model_shape.hpp"
#include "kqsvd/core/rope.hpp"
#include "kqsvd/kernels/partial_attention.hpp"

namespace kqsvd::detail {

// The queries of a KV head's group stacked head by head ((g T) x d, row j T + t = query head j's token
// t) and the rows each sees: causal from the cache's row first_row + t. Scaled by `scale`.
inline RowMatrix<float> group_queries(const ModelShape& shape, const Eigen::Ref<const RowMatrix<float>>& queries,
                                      Eigen::Index kv_head, float scale) {
  const Eigen::Index d = shape.head_dim, g = shape.group_size(), t = queries.rows();
  RowMatrix<float> stacked(g * t, d);
  for (Eigen::Index j = 0; j < g; ++j) {
    stacked.middleRows(j * t, t) = queries.middleCols((kv_head * g + j) * d, d) * scale;
  }
  return stacked;
}

// Row ranges of stacked group queries: token t of every head sees [begin(t), end(t)).
inline VisibleRows group_rows(Eigen::Index group, const VisibleRows& per_token) {
  const Eigen::Index t = per_token.queries();
  VisibleRows::Indices begin(group * t), end(group * t);
  for (Eigen::Index j = 0; j < group; ++j) {
    begin.segment(j * t, t) = per_token.begin();
    end.segment(j * t, t) = per_token.end();
  }
  return VisibleRows(std::move(begin), std::move(end));
}

// Writes stacked group outputs ((g T) x d) back into the columns of their query heads.
inline void scatter_group(const ModelShape& shape, const RowMatrix<float>& stacked, Eigen::Index kv_head,
                          RowMatrix<float>& output) {
  const Eigen::Index d = shape.head_dim, g = shape.group_size(), t = output.rows();
  for (Eigen::Index j = 0; j < g; ++j) output.middleCols((kv_head * g + j) * d, d) = stacked.middleRows(j * t, t);
}

}  // namespace kqsvd::detail

namespace kqsvd::llama {

class KvCache {
 public:
  using Index = Eigen::Index;

  virtual ~KvCache() = default;

  const ModelShape& shape() const { return shape_; }
  const RotaryEmbedding& rotary_embedding() const { return rope_; }

  // The position the next appended token of `layer` will have (= tokens appended so far).
  Index next_position(Index layer) const {
    return next_position_[checked_layer("kqsvd::llama::KvCache::next_position", layer)];
  }

  // Stores the keys (un-rotated) and values of the tokens at first_position, first_position+1, ...
  void append(Index layer, const Eigen::Ref<const RowMatrix<float>>& keys, const Eigen::Ref<const RowMatrix<float>>& values,
              Index first_position) {
    constexpr const char* where = "kqsvd::llama::KvCache::append";
    const std::size_t l = checked_layer(where, layer);
    detail::require_columns(where, "keys", keys.cols(), shape_.kv_width(), "kv_heads * head_dim");
    detail::require_columns(where, "values", values.cols(), shape_.kv_width(), "kv_heads * head_dim");
    if (values.rows() != keys.rows()) {
      detail::throw_invalid(where, "values",
                            "has " + std::to_string(values.rows()) + " rows, expected " + std::to_string(keys.rows()) +
                                " (one per key)");
    }
    if (first_position != next_position_[l]) {
      detail::throw_invalid(where, "first_position",
                            "is " + std::to_string(first_position) + ", expected " + std::to_string(next_position_[l]) +
                                " (the next position of layer " + std::to_string(layer) + ")");
    }
    do_append(layer, keys, values, first_position);
    next_position_[l] += keys.rows();
  }

  // Causal attention of `queries` (rotated) at positions first_position, first_position+1, ... over
  // everything cached in `layer`; their own keys must have been appended already.
  RowMatrix<float> attend(Index layer, const Eigen::Ref<const RowMatrix<float>>& queries, Index first_position) {
    constexpr const char* where = "kqsvd::llama::KvCache::attend";
    const std::size_t l = checked_layer(where, layer);
    detail::require_columns(where, "queries", queries.cols(), shape_.query_width(), "query_heads * head_dim");
    if (first_position < 0 || first_position + queries.rows() > next_position_[l]) {
      detail::throw_invalid(where, "first_position",
                            "is " + std::to_string(first_position) + " for " + std::to_string(queries.rows()) +
                                " queries, but layer " + std::to_string(layer) + " holds positions [0, " +
                                std::to_string(next_position_[l]) + ")");
    }
    return do_attend(layer, queries, first_position);
  }

  // Forgets every token, keeping the shape (and, where an implementation can, its memory).
  void reset() {
    std::fill(next_position_.begin(), next_position_.end(), Index(0));
    do_reset();
  }

  // Bytes of cached keys and values (or their compressed form) for the tokens held; excludes spare
  // capacity, so that methods compare by what they must store.
  virtual std::size_t bytes() const = 0;

 protected:
  KvCache(const ModelShape& shape, const RotaryEmbedding& rope) : shape_(shape), rope_(rope) {
    shape_.validate();
    if (rope.head_dim() != shape.head_dim) {
      detail::throw_invalid("kqsvd::llama::KvCache", "rope",
                            "rotates head_dim " + std::to_string(rope.head_dim()) + ", the shape has " +
                                std::to_string(shape.head_dim));
    }
    next_position_.assign(static_cast<std::size_t>(shape.layers), 0);
  }

  // Copyable by derived classes only (e.g. to fork a cache after a shared prompt), never by slicing.
  KvCache(const KvCache&) = default;
  KvCache(KvCache&&) = default;
  KvCache& operator=(const KvCache&) = default;
  KvCache& operator=(KvCache&&) = default;

  // The index of `layer` in per-layer storage; throws InvalidArgument naming `function` if out of range.
  std::size_t checked_layer(const char* function, Index layer) const {
    shape_.require_layer(function, layer);
    return static_cast<std::size_t>(layer);
  }

  // Arguments are validated: layer in range, column counts, keys.rows() == values.rows(), and
  // first_position == the number of tokens appended to this layer so far.
  virtual void do_append(Index layer, const Eigen::Ref<const RowMatrix<float>>& keys,
                         const Eigen::Ref<const RowMatrix<float>>& values, Index first_position) = 0;
  // Arguments are validated: positions first_position .. first_position + queries.rows() - 1 are cached.
  virtual RowMatrix<float> do_attend(Index layer, const Eigen::Ref<const RowMatrix<float>>& queries,
                                     Index first_position) = 0;
  virtual void do_reset() = 0;

 private:
  ModelShape shape_;
  RotaryEmbedding rope_;
  std::vector<Index> next_position_;  // per layer
};

}  // namespace kqsvd::llama
