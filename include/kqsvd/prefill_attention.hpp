// kqsvd/prefill_attention.hpp -- a block of T new queries against the cache, causally, in one pass per
// block of queries.
//
// Prefill (the prompt) scores T queries against up to n cached rows: T x n scores that are never
// materialised. Blocks of queries stream over tiles of keys and values with an online softmax
// (detail/online_softmax.hpp); scores and the value accumulation are matrix-matrix products of a
// query block with a tile. On a compressed cache the products are r-dimensional instead of
// d-dimensional. Query blocks run in parallel with OpenMP when built with it; each query row is
// computed the same way on any thread count, so results are bit-identical.
//
//   auto out = kqsvd::prefill_attention(Q, K, V);                             // T x d, full cache
//   auto approx = kqsvd::prefill_attention(key_proj, value_proj, Q, cache);   // T x d, compressed
//
// Layout as kqsvd::causal_attention: the cache holds n tokens at positions 0 .. n-1, the queries are
// at positions query_offset .. query_offset + T - 1 (default: the last T tokens, n - T), and query i
// sees cache rows 0 .. query_offset + i.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>

#include "kqsvd/attention.hpp"
#include "kqsvd/decode_attention.hpp"
#include "kqsvd/detail/online_softmax.hpp"
#include "kqsvd/detail/parallel_for.hpp"
#include "kqsvd/detail/validation.hpp"
#include "kqsvd/latent_cache.hpp"
#include "kqsvd/low_rank_projection.hpp"

namespace kqsvd {

namespace detail {

// Queries per parallel prefill task: a 64 x 64 score tile is 16 KiB, and a block long enough that
// each key tile converted to float is reused 64 times.
inline constexpr Eigen::Index prefill_query_rows = 64;

template <typename DerivedQ>
void require_float_queries(const char* function, const Eigen::MatrixBase<DerivedQ>& queries, Eigen::Index width) {
  static_assert(std::is_same<typename DerivedQ::Scalar, float>::value, "prefill queries are float");
  require_columns(function, "queries", queries.cols(), width, "the head dimension");
  require_finite(function, "queries", queries);
}

// Runs `finish(first_query, count, latent_rows -> output rows)` per block; the core computes the
// softmax-weighted value rows of each block from its scaled (and possibly mapped) queries.
template <typename Keys, typename Storage, typename MapQueries, typename Finish>
void prefill_blocks(Eigen::Index queries, Eigen::Index query_offset, Eigen::Index query_width, const Keys& keys,
                    const CacheRows<Storage>& values, MapQueries&& map_queries, Finish&& finish) {
  const Eigen::Index blocks = (queries + prefill_query_rows - 1) / prefill_query_rows;
  struct Workspace {
    PrefillWorkspace softmax;
    FloatRows mapped, weighted;
  };
  parallel_for(
      blocks,
      [&] {
        return Workspace{PrefillWorkspace(prefill_query_rows, keys.width(), values.width),
                         FloatRows(prefill_query_rows, query_width), FloatRows(prefill_query_rows, values.width)};
      },
      [&](Eigen::Index task, Workspace& workspace) {
        // The last blocks see the most keys: start them first so that both threads finish together.
        const Eigen::Index block = blocks - 1 - task;
        const Eigen::Index first = block * prefill_query_rows;
        const Eigen::Index count = std::min(prefill_query_rows, queries - first);
        auto mapped = workspace.mapped.topRows(count);
        auto weighted = workspace.weighted.topRows(count);
        map_queries(first, count, mapped);
        prefill_block(mapped, query_offset + first, keys, values, workspace.softmax, weighted);
        finish(first, count, weighted);
      },
      // Eigen products run inside each task: keep them single-threaded (see parallel_for.hpp).
      /*always_open_region=*/true);
}

inline Eigen::Index resolved_offset(const char* function, Eigen::Index queries, Eigen::Index cached,
                                    Eigen::Index query_offset) {
  if (query_offset == -1) query_offset = cached - queries;
  require_causal_layout(function, queries, cached, query_offset);
  return query_offset;
}

}  // namespace detail

// Full cache: softmax(Q K^T / sqrt(d)) V under the causal mask. queries: T x d float; keys n x d and
// values n x d_v, row-major memory as for decode_attention. Returns T x d_v.
template <typename DerivedQ, typename DerivedK, typename DerivedV>
RowMatrix<float> prefill_attention(const Eigen::MatrixBase<DerivedQ>& queries, const Eigen::MatrixBase<DerivedK>& keys,
                                   const Eigen::MatrixBase<DerivedV>& values, Eigen::Index query_offset = -1) {
  static_assert(std::is_same<typename DerivedK::Scalar, typename DerivedV::Scalar>::value,
                "keys and values are stored with the same element type");
  constexpr const char* where = "kqsvd::prefill_attention";
  detail::require_cache_layout(where, "keys", keys);
  detail::require_cache_layout(where, "values", values);
  if (values.rows() != keys.rows()) {
    detail::throw_invalid(where, "values",
                          "has " + std::to_string(values.rows()) + " rows, keys have " + std::to_string(keys.rows()));
  }
  detail::require_float_queries(where, queries, keys.cols());
  query_offset = detail::resolved_offset(where, queries.rows(), keys.rows(), query_offset);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(keys.cols())));
  RowMatrix<float> output(queries.rows(), values.cols());
  detail::prefill_blocks(
      queries.rows(), query_offset, keys.cols(), detail::RowKeys<typename DerivedK::Scalar>{detail::cache_rows(keys)},
      detail::cache_rows(values),
      [&](Eigen::Index first, Eigen::Index count, auto& mapped) { mapped = queries.middleRows(first, count) * scale; },
      [&](Eigen::Index first, Eigen::Index count, const auto& weighted) { output.middleRows(first, count) = weighted; });
  if (!output.allFinite()) throw NumericalError(std::string(where) + ": the attention output is not finite");
  return output;
}

// Compressed cache: scores (Q B_k)(K A_k)^T / sqrt(d) over the key latents, weights times the value
// latents, decompressed by B_v^T. queries: T x d float. Returns T x d.
template <typename DerivedQ, typename Storage>
RowMatrix<float> prefill_attention(const LowRankProjection<float>& key_projection,
                                   const LowRankProjection<float>& value_projection,
                                   const Eigen::MatrixBase<DerivedQ>& queries, const LatentCache<Storage>& cache,
                                   Eigen::Index query_offset = -1) {
  constexpr const char* where = "kqsvd::prefill_attention";
  detail::require_columns(where, "key_projection", key_projection.rank(), cache.key_width(), "the cache's key width");
  detail::require_columns(where, "value_projection", value_projection.rank(), cache.value_width(),
                          "the cache's value width");
  const Eigen::Index d = key_projection.dimension();
  detail::require_float_queries(where, queries, d);
  query_offset = detail::resolved_offset(where, queries.rows(), cache.size(), query_offset);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const Eigen::MatrixXf mapping = key_projection.decoder() * scale;  // d x r_k: maps and scales in one product
  const auto& decompression = value_projection.decoder();
  RowMatrix<float> output(queries.rows(), value_projection.dimension());
  detail::prefill_blocks(
      queries.rows(), query_offset, cache.key_width(), detail::blocked_keys(cache), detail::value_rows(cache),
      [&](Eigen::Index first, Eigen::Index count, auto& mapped) {
        mapped.noalias() = queries.middleRows(first, count) * mapping;
      },
      [&](Eigen::Index first, Eigen::Index count, const auto& weighted) {
        output.middleRows(first, count).noalias() = weighted * decompression.transpose();
      });
  if (!output.allFinite()) throw NumericalError(std::string(where) + ": the attention output is not finite");
  return output;
}

}  // namespace kqsvd
