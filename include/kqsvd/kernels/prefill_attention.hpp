// kqsvd/kernels/prefill_attention.hpp -- a block of T new queries against the cache, causally, in one pass
// per block of queries.
//
// Prefill (the prompt) scores T queries against up to n cached rows: T x n scores that are never
// materialised. Blocks of 64 queries stream over tiles of keys and values with an online softmax
// (kernels/detail/attention_core.hpp); scores and the value accumulation are matrix-matrix products of a
// query block with a tile expanded to float. On a compressed cache the products are r-dimensional
// instead of d-dimensional. Query blocks run in parallel with OpenMP when built with it; each query row
// is computed the same way on any thread count, so results are bit-identical.
//
//   auto out = kqsvd::prefill_attention(Q, K, V);                             // T x d, full rows
//   auto approx = kqsvd::prefill_attention(key_proj, value_proj, Q, cache);   // T x d, latents
//
// Layout as kqsvd::causal_attention (kernels/reference_attention.hpp): the cache holds n tokens at
// positions 0 .. n-1, the queries are at positions query_offset .. query_offset + T - 1 (default: the
// last T tokens, n - T), and query i sees cache rows 0 .. query_offset + i.
#pragma once

#include <Eigen/Core>

#include <string>

#include "kqsvd/cache/head_cache.hpp"
#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/kernels/decode_attention.hpp"
#include "kqsvd/kernels/partial_attention.hpp"
#include "kqsvd/kernels/reference_attention.hpp"
#include "kqsvd/solvers/low_rank_projection.hpp"

namespace kqsvd {

namespace detail {

// The causal rows of T queries at query_offset (-1: the last T of `cached`), checked.
inline VisibleRows causal_rows(const char* function, Index queries, Index cached, Index query_offset) {
  if (query_offset == -1) query_offset = cached - queries;
  require_causal_layout(function, queries, cached, query_offset);
  return VisibleRows::causal(queries, query_offset);
}

}  // namespace detail

// Full rows in the caller's memory: softmax(Q K^T / sqrt(d)) V under the causal mask. queries: T x d
// (float or double); keys n x d and values n x d_v as for decode_attention. Returns T x d_v.
template <typename DerivedQ, typename DerivedK, typename DerivedV>
RowMatrix<float> prefill_attention(const Eigen::MatrixBase<DerivedQ>& queries, const Eigen::MatrixBase<DerivedK>& keys,
                                   const Eigen::MatrixBase<DerivedV>& values, Eigen::Index query_offset = -1) {
  constexpr const char* where = "kqsvd::prefill_attention";
  const VisibleRows visible = detail::causal_rows(where, queries.rows(), keys.rows(), query_offset);
  const RowMatrix<float> scaled =
      detail::checked_queries(where, queries, keys.cols(), "the key width") * detail::score_scale(keys.cols());
  return partial_attention(scaled, visible, keys, values).result();
}

// Full rows stored in a HeadCache (any StorageFormat). Returns T x d_v.
template <typename DerivedQ>
RowMatrix<float> prefill_attention(const Eigen::MatrixBase<DerivedQ>& queries, const HeadCache& cache,
                                   Eigen::Index query_offset = -1) {
  constexpr const char* where = "kqsvd::prefill_attention";
  const VisibleRows visible = detail::causal_rows(where, queries.rows(), cache.size(), query_offset);
  const Eigen::Index d = cache.key_width();
  const RowMatrix<float> scaled =
      detail::checked_queries(where, queries, d, "the cache's key width") * detail::score_scale(d);
  return partial_attention(scaled, visible, cache).result();
}

// Latents (post-RoPE): queries T x d are mapped by B / sqrt(d), scored against the key latents, and
// the weighted value latents decompressed by B_v^T. Returns T x d.
template <typename DerivedQ>
RowMatrix<float> prefill_attention(const LowRankProjection<float>& key_projection,
                                   const LowRankProjection<float>& value_projection,
                                   const Eigen::MatrixBase<DerivedQ>& queries, const HeadCache& cache,
                                   Eigen::Index query_offset = -1) {
  constexpr const char* where = "kqsvd::prefill_attention";
  detail::require_columns(where, "key_projection", key_projection.rank(), cache.key_width(), "the cache's key width");
  detail::require_columns(where, "value_projection", value_projection.rank(), cache.value_width(),
                          "the cache's value width");
  const VisibleRows visible = detail::causal_rows(where, queries.rows(), cache.size(), query_offset);
  const Eigen::Index d = key_projection.dimension();
  const RowMatrix<float> mapped = detail::checked_queries(where, queries, d, "the head dimension") *
                                  (key_projection.decoder() * detail::score_scale(d));
  return partial_attention(mapped, visible, cache).decompressed(value_projection).result();
}

}  // namespace kqsvd
