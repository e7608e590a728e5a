// kqsvd/kernels/decode_attention.hpp -- one new query of a head against its whole cache, in one pass.
//
// A decode step reads every cached key and value once and does little arithmetic per byte, so its time
// is the cache's bytes over the memory bandwidth. These kernels read each cached row once: scores, an
// online softmax and the weighted value sum are fused per tile (kernels/detail/attention_core.hpp), with
// float accumulation whatever the storage format. On a compressed cache the query is mapped by B first
// (q B / sqrt(d), scored against the r-dimensional key latents), the value latents are summed in r
// dimensions, and only the result is decompressed by B_v^T: per token a step reads the latents' bytes
// instead of the full rows'.
//
// Long caches are split into fixed runs of tokens processed in parallel with OpenMP (when built with it)
// and merged in order, so results are bit-identical for any number of threads. Called from inside a
// parallel loop (say, over heads) a call runs on its own thread, with the same result.
//
//   auto out = kqsvd::decode_attention(q, K, V);                         // full rows in your memory
//   kqsvd::HeadCache cache(key_proj, value_proj, kqsvd::StorageFormat::parse("int8"));
//   cache.append(key_proj, value_proj, K, V);
//   auto approx = kqsvd::decode_attention(key_proj, value_proj, q, cache);   // compressed: 1 x d
//   kqsvd::HeadCache full(d, d, kqsvd::StorageFormat::parse("q8_0"));
//   full.append(K, V);
//   auto quantized = kqsvd::decode_attention(q, full);                   // a quantized full cache
//   auto fast = kqsvd::decode_attention(q, full, kqsvd::DecodeArithmetic::int8_dot_products);  // 4/2-bit
//
// The query is the newest token and sees every cached row (append its own key and value first).
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <string>
#include <type_traits>

#include "kqsvd/cache/head_cache.hpp"
#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/kernels/decode_arithmetic.hpp"
#include "kqsvd/kernels/partial_attention.hpp"
#include "kqsvd/solvers/low_rank_projection.hpp"

namespace kqsvd {

namespace detail {

// A query (1 x width or width x 1, float or double) as a 1 x width float row, checked.
template <typename Derived>
RowMatrix<float> checked_query(const char* function, const Eigen::MatrixBase<Derived>& query, Index width) {
  static_assert(std::is_floating_point<typename Derived::Scalar>::value, "the query is float or double");
  if (!((query.rows() == 1 && query.cols() == width) || (query.cols() == 1 && query.rows() == width))) {
    throw_invalid(function, "query",
                  "is " + shape_string(query.rows(), query.cols()) + ", expected 1 x " + std::to_string(width) +
                      " (one token of the head dimension)");
  }
  require_finite(function, "query", query);
  RowMatrix<float> row(1, width);
  for (Index j = 0; j < width; ++j) row(0, j) = static_cast<float>(query.rows() == 1 ? query(0, j) : query(j, 0));
  return row;
}

// Scores are scaled by 1 / sqrt(d), d the head dimension, also when computed from latents: the latents
// stand in for d-dimensional vectors.
inline float score_scale(Index head_dim) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim))); }

}  // namespace detail

// Full rows in the caller's memory: softmax(q K^T / sqrt(d)) V. query: 1 x d (or d x 1), float or double;
// keys n x d and values n x d_v, row-major float, Eigen::half or Eigen::bfloat16 (a Matrix, a Map, or a
// column block of a wider row-major matrix, e.g. one head of n x H*d). Returns 1 x d_v.
template <typename DerivedQ, typename DerivedK, typename DerivedV>
Eigen::RowVectorXf decode_attention(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& keys,
                                   const Eigen::MatrixBase<DerivedV>& values) {
  constexpr const char* where = "kqsvd::decode_attention";
  if (keys.rows() == 0 || keys.cols() == 0) {
    detail::throw_invalid(where, "keys", "must hold at least one token, got " + detail::shape_string(keys.rows(), keys.cols()));
  }
  const RowMatrix<float> q = detail::checked_query(where, query, keys.cols()) * detail::score_scale(keys.cols());
  return partial_attention(q, VisibleRows::all(1, keys.rows()), keys, values).result();
}

// Full rows stored in a HeadCache (any StorageFormat): softmax(q K^T / sqrt(d)) V. Returns 1 x d_v.
// `arithmetic`: float32, or int8 dot products on 4- and 2-bit formats (kernels/decode_arithmetic.hpp).
template <typename DerivedQ>
Eigen::RowVectorXf decode_attention(const Eigen::MatrixBase<DerivedQ>& query, const HeadCache& cache,
                                   DecodeArithmetic arithmetic = DecodeArithmetic::float32) {
  constexpr const char* where = "kqsvd::decode_attention";
  if (cache.empty()) detail::throw_invalid(where, "cache", "holds no tokens");
  const Eigen::Index d = cache.key_width();
  const RowMatrix<float> q = detail::checked_query(where, query, d) * detail::score_scale(d);
  return partial_attention(q, VisibleRows::all(1, cache.size()), cache, arithmetic).result();
}

// Latents (post-RoPE, the paper's setting): scores (q B_k)(K A_k)^T / sqrt(d) over the key latents,
// weights times the value latents, decompressed by B_v^T. query: 1 x d. Returns 1 x d. `arithmetic` as
// above (the mapped query q B is what is quantized).
template <typename DerivedQ>
Eigen::RowVectorXf decode_attention(const LowRankProjection<float>& key_projection,
                                   const LowRankProjection<float>& value_projection,
                                   const Eigen::MatrixBase<DerivedQ>& query, const HeadCache& cache,
                                   DecodeArithmetic arithmetic = DecodeArithmetic::float32) {
  constexpr const char* where = "kqsvd::decode_attention";
  detail::require_columns(where, "key_projection", key_projection.rank(), cache.key_width(), "the cache's key width");
  detail::require_columns(where, "value_projection", value_projection.rank(), cache.value_width(),
                          "the cache's value width");
  if (cache.empty()) detail::throw_invalid(where, "cache", "holds no tokens");
  const Eigen::Index d = key_projection.dimension();
  const RowMatrix<float> mapped =
      (detail::checked_query(where, query, d) * key_projection.decoder()) * detail::score_scale(d);
  return partial_attention(mapped, VisibleRows::all(1, cache.size()), cache, arithmetic)
      .decompressed(value_projection)
      .result();
}

}  // namespace kqsvd
