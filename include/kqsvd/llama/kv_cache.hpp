// kqsvd/llama/kv_cache.hpp -- the interface between the forward pass and whatever stores keys and values.
//
// The transformer never touches cached keys or values itself. Per layer and per block of T new tokens
// it hands the cache
//   append(layer, keys, values, first_position)  -- UN-rotated keys and values, T x n_kv_heads*head_dim,
//                                                   of the tokens at first_position, first_position+1, ...
//   attend(layer, queries, first_position)        -- ROTATED queries, T x n_heads*head_dim, same positions;
//                                                   returns the causal attention output, same shape
// so that the cache decides what to store and how to score:
//   * an exact cache rotates the keys and keeps them (FullKvCache);
//   * a post-RoPE compressed cache rotates, then stores latents k A, and scores (q B)(k A)^T;
//   * a pre-RoPE compressed cache stores latents of the un-rotated keys, and at attend() reconstructs
//     k A B^T, rotates it by its position (shape().rotary_embedding()) and scores with the rotated query;
//   * any of them may keep the most recent W tokens uncompressed.
// Query row i (position first_position + i) attends to every cached position <= first_position + i.
// Heads are column blocks of width head_dim; query head h reads KV head h / shape().group_size().
//
// Implementing a cache: derive from KvCache, pass the shape to its constructor and override
// do_append, do_attend, do_reset and bytes(). The public functions validate shapes and positions
// first (positions must arrive contiguously from 0 in every layer), so overrides can rely on them.
//
//   kqsvd::llama::FullKvCache cache(model.attention_shape());
//   auto logits = model.forward(prompt, cache);   // prefill
//   auto next = model.forward({token}, cache);    // decode, position = prompt.size()
//   cache.bytes();                                // what the cache holds
//   cache.reset();                                // a new sequence
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include "kqsvd/detail/validation.hpp"
#include "kqsvd/error.hpp"
#include "kqsvd/llama/row_matrix.hpp"
#include "kqsvd/rope.hpp"

namespace kqsvd::llama {

// The attention geometry a cache serves, including the rotary embedding, so that a pre-RoPE cache can
// rotate reconstructed keys exactly as the model rotates queries.
struct AttentionShape {
  using Index = Eigen::Index;

  Index n_layers = 0;
  Index n_heads = 0;     // query heads
  Index n_kv_heads = 0;  // key/value heads
  Index head_dim = 0;
  double rope_theta = 10000.0;
  RopeStyle rope_style = RopeStyle::adjacent_pairs;

  Index group_size() const { return n_heads / n_kv_heads; }  // query heads per KV head
  Index query_width() const { return n_heads * head_dim; }
  Index kv_width() const { return n_kv_heads * head_dim; }
  RotaryEmbedding rotary_embedding() const { return RotaryEmbedding(head_dim, rope_theta, rope_style); }
};

inline bool operator==(const AttentionShape& a, const AttentionShape& b) {
  return a.n_layers == b.n_layers && a.n_heads == b.n_heads && a.n_kv_heads == b.n_kv_heads &&
         a.head_dim == b.head_dim && a.rope_theta == b.rope_theta && a.rope_style == b.rope_style;
}
inline bool operator!=(const AttentionShape& a, const AttentionShape& b) { return !(a == b); }

inline std::string to_string(const AttentionShape& shape) {
  return std::to_string(shape.n_layers) + " layers, " + std::to_string(shape.n_heads) + " query heads, " +
         std::to_string(shape.n_kv_heads) + " KV heads, head_dim " + std::to_string(shape.head_dim) + ", RoPE " +
         to_string(shape.rope_style) + " theta " + std::to_string(shape.rope_theta);
}

namespace detail {

// Softmax of each row of `scores` (queries x keys), where key j sits at position j and query row i at
// position first_query_position + i, so entries with j > first_query_position + i are masked out.
// Every query sees at least key 0, so no row is empty.
inline void causal_softmax(RowMatrix& scores, Eigen::Index first_query_position) {
  using Index = Eigen::Index;
  for (Index i = 0; i < scores.rows(); ++i) {
    const Index visible = std::min<Index>(scores.cols(), first_query_position + i + 1);
    auto row = scores.row(i);
    auto seen = row.head(visible);
    const float max_score = seen.maxCoeff();
    seen = (seen.array() - max_score).exp().matrix();
    seen /= seen.sum();
    row.tail(scores.cols() - visible).setZero();
  }
}

// Exact multi-head attention of `queries` (T x n_heads*head_dim, rotated) over `keys` and `values`
// (n x n_kv_heads*head_dim; keys rotated; row j at position j). Returns T x n_heads*head_dim.
// Queries go in blocks so that a long prefill neither scores keys its causal mask hides (half the work
// of a full T x n product) nor holds a T x n score matrix.
template <typename KeysDerived, typename ValuesDerived>
RowMatrix causal_attention(const AttentionShape& shape, const Eigen::Ref<const RowMatrix>& queries,
                           Eigen::Index first_position, const Eigen::MatrixBase<KeysDerived>& keys,
                           const Eigen::MatrixBase<ValuesDerived>& values) {
  using Index = Eigen::Index;
  constexpr Index query_block = 64;
  const Index d = shape.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  RowMatrix output(queries.rows(), shape.query_width());
  RowMatrix scores;
  for (Index start = 0; start < queries.rows(); start += query_block) {
    const Index rows = std::min(query_block, queries.rows() - start);
    const Index visible = std::min(keys.rows(), first_position + start + rows);
    for (Index h = 0; h < shape.n_heads; ++h) {
      const Index kv_head = h / shape.group_size();
      scores.noalias() = queries.block(start, h * d, rows, d) * keys.block(0, kv_head * d, visible, d).transpose();
      scores *= scale;
      causal_softmax(scores, first_position + start);
      output.block(start, h * d, rows, d).noalias() = scores * values.block(0, kv_head * d, visible, d);
    }
  }
  return output;
}

}  // namespace detail

class KvCache {
 public:
  using Index = Eigen::Index;

  virtual ~KvCache() = default;

  const AttentionShape& shape() const { return shape_; }

  // The position the next appended token of `layer` will have (= tokens appended so far).
  Index next_position(Index layer) const {
    return next_position_[checked_layer("kqsvd::llama::KvCache::next_position", layer)];
  }

  // Stores the keys (un-rotated) and values of the tokens at first_position, first_position+1, ...
  void append(Index layer, const Eigen::Ref<const RowMatrix>& keys, const Eigen::Ref<const RowMatrix>& values,
              Index first_position) {
    constexpr const char* where = "kqsvd::llama::KvCache::append";
    const std::size_t l = checked_layer(where, layer);
    kqsvd::detail::require_columns(where, "keys", keys.cols(), shape_.kv_width(), "n_kv_heads * head_dim");
    kqsvd::detail::require_columns(where, "values", values.cols(), shape_.kv_width(), "n_kv_heads * head_dim");
    if (values.rows() != keys.rows()) {
      kqsvd::detail::throw_invalid(
          where, "values",
          "has " + std::to_string(values.rows()) + " rows, expected " + std::to_string(keys.rows()) + " (one per key)");
    }
    if (first_position != next_position_[l]) {
      kqsvd::detail::throw_invalid(where, "first_position",
                                   "is " + std::to_string(first_position) + ", expected " +
                                       std::to_string(next_position_[l]) + " (the next position of layer " +
                                       std::to_string(layer) + ")");
    }
    do_append(layer, keys, values, first_position);
    next_position_[l] += keys.rows();
  }

  // Causal attention of `queries` (rotated) at positions first_position, first_position+1, ... over
  // everything cached in `layer`; their own keys must have been appended already.
  RowMatrix attend(Index layer, const Eigen::Ref<const RowMatrix>& queries, Index first_position) {
    constexpr const char* where = "kqsvd::llama::KvCache::attend";
    const std::size_t l = checked_layer(where, layer);
    kqsvd::detail::require_columns(where, "queries", queries.cols(), shape_.query_width(), "n_heads * head_dim");
    if (first_position < 0 || first_position + queries.rows() > next_position_[l]) {
      kqsvd::detail::throw_invalid(where, "first_position",
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
  explicit KvCache(const AttentionShape& shape) : shape_(shape) {
    constexpr const char* where = "kqsvd::llama::KvCache";
    const auto require_positive = [](const char* field, Index value) {
      if (value <= 0) {
        kqsvd::detail::throw_invalid(where, "shape",
                                     std::string(field) + " must be positive, got " + std::to_string(value));
      }
    };
    require_positive("n_layers", shape.n_layers);
    require_positive("n_heads", shape.n_heads);
    require_positive("n_kv_heads", shape.n_kv_heads);
    require_positive("head_dim", shape.head_dim);
    if (shape.n_heads % shape.n_kv_heads != 0) {
      kqsvd::detail::throw_invalid(where, "shape",
                                   "n_heads = " + std::to_string(shape.n_heads) +
                                       " is not divisible by n_kv_heads = " + std::to_string(shape.n_kv_heads));
    }
    shape.rotary_embedding();  // validates head_dim parity and theta
    next_position_.assign(static_cast<std::size_t>(shape.n_layers), 0);
  }

  // Copyable by derived classes only (e.g. to fork a cache after a shared prompt), never by slicing.
  KvCache(const KvCache&) = default;
  KvCache(KvCache&&) = default;
  KvCache& operator=(const KvCache&) = default;
  KvCache& operator=(KvCache&&) = default;

  // The index of `layer` in per-layer storage; throws InvalidArgument naming `function` if out of range.
  std::size_t checked_layer(const char* function, Index layer) const {
    if (layer < 0 || layer >= shape_.n_layers) {
      kqsvd::detail::throw_invalid(
          function, "layer",
          "is " + std::to_string(layer) + ", expected 0 <= layer < " + std::to_string(shape_.n_layers));
    }
    return static_cast<std::size_t>(layer);
  }

  // Arguments are validated: layer in range, column counts, keys.rows() == values.rows(), and
  // first_position == the number of tokens appended to this layer so far.
  virtual void do_append(Index layer, const Eigen::Ref<const RowMatrix>& keys,
                         const Eigen::Ref<const RowMatrix>& values, Index first_position) = 0;
  // Arguments are validated: positions first_position .. first_position + queries.rows() - 1 are cached.
  virtual RowMatrix do_attend(Index layer, const Eigen::Ref<const RowMatrix>& queries, Index first_position) = 0;
  virtual void do_reset() = 0;

 private:
  AttentionShape shape_;
  std::vector<Index> next_position_;  // per layer
};

}  // namespace kqsvd::llama
