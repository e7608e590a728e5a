// kqsvd/decode_attention.hpp -- one new query of a head against its whole cache, in one pass.
//
// A decode step reads every cached key and value once and does little arithmetic per byte, so its
// time is the cache's bytes over the memory bandwidth. These kernels read each cache row once: scores,
// an online softmax and the weighted value sum are fused per tile (detail/online_softmax.hpp), with
// float accumulation whatever the storage. On a compressed cache the query is mapped by B first
// (q B / sqrt(d), scores against the r-dim key latents), the value latents are summed in r dimensions,
// and only the result is decompressed by B_v^T: per token the step reads (r_k + r_v) elements
// instead of 2 d.
//
// Long caches are split into fixed runs of tokens processed in parallel with OpenMP (when built with
// it) and merged in order, so results are bit-identical for any number of threads. Called from inside
// a parallel loop (say, over heads) a call runs on its own thread, with the same result.
//
//   auto out = kqsvd::decode_attention(q, K, V);                          // full cache: 1 x d
//   kqsvd::LatentCache<Eigen::half> cache(key_proj, value_proj);
//   cache.append(key_proj, value_proj, K, V);
//   auto approx = kqsvd::decode_attention(key_proj, value_proj, q, cache);  // compressed: 1 x d
//
// The query is the newest token and sees every cached row (append its own key and value first).
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "kqsvd/detail/online_softmax.hpp"
#include "kqsvd/detail/parallel_for.hpp"
#include "kqsvd/detail/storage_conversion.hpp"
#include "kqsvd/detail/validation.hpp"
#include "kqsvd/error.hpp"
#include "kqsvd/latent_cache.hpp"
#include "kqsvd/low_rank_projection.hpp"

namespace kqsvd {

namespace detail {

// Tokens per parallel decode task. Task boundaries depend on the cache length only; the partial
// softmax states are merged in task order.
inline constexpr Eigen::Index decode_task_rows = 2048;
static_assert(decode_task_rows % row_tile_rows == 0 && decode_task_rows % latent_tile_rows == 0,
              "decode tasks start on tile (and key block) boundaries");

// A query (1 x d or d x 1, float or double) as a float column, checked for shape and finiteness.
template <typename Derived>
Eigen::VectorXf checked_query(const char* function, const Eigen::MatrixBase<Derived>& query, Eigen::Index width) {
  static_assert(std::is_floating_point<typename Derived::Scalar>::value, "the query is float or double");
  if (!((query.rows() == 1 && query.cols() == width) || (query.cols() == 1 && query.rows() == width))) {
    throw_invalid(function, "query",
                  "is " + shape_string(query.rows(), query.cols()) + ", expected 1 x " + std::to_string(width) +
                      " (one token of the head dimension)");
  }
  require_finite(function, "query", query);
  Eigen::VectorXf column(width);
  if (query.rows() == 1) {
    column = query.row(0).transpose().template cast<float>();
  } else {
    column = query.col(0).template cast<float>();
  }
  return column;
}

// Cache rows given as an Eigen expression: row-major memory with contiguous rows.
template <typename Derived>
void require_cache_layout(const char* function, const char* argument, const Eigen::MatrixBase<Derived>& rows) {
  static_assert(is_cache_storage_v<typename Derived::Scalar>,
                "cache rows are float, Eigen::half or Eigen::bfloat16");
  static_assert(static_cast<bool>(Derived::Flags & Eigen::DirectAccessBit),
                "cache rows must be memory (a Matrix, a Map or a block of one), not an expression");
  static_assert(static_cast<bool>(Derived::Flags & Eigen::RowMajorBit) || Derived::ColsAtCompileTime == 1,
                "cache rows must be row-major: one token per row, contiguous");
  if (rows.cols() > 1 && rows.derived().innerStride() != 1) {
    throw_invalid(function, argument, "must have contiguous rows (inner stride 1)");
  }
}

// softmax(q . k_i) weighted sum of value rows over all cache rows; q already scaled.
template <typename Keys, typename Storage>
Eigen::VectorXf decode_rows(const Eigen::VectorXf& scaled_query, const Keys& keys, const CacheRows<Storage>& values) {
  const Eigen::Index n = values.rows;
  const Eigen::Index tasks = (n + decode_task_rows - 1) / decode_task_rows;
  auto make_workspace = [&] {
    return DecodeWorkspace(keys.width(), values.width, !std::is_same<Storage, float>::value);
  };
  SoftmaxState total(values.width);
  if (tasks == 1) {
    auto workspace = make_workspace();
    accumulate_decode(scaled_query, keys, values, 0, n, workspace, total);
  } else {
    std::vector<SoftmaxState> partial(static_cast<std::size_t>(tasks), SoftmaxState(values.width));
    // No Eigen matrix-matrix products inside (Eigen never parallelises matrix-vector ones): the
    // region may be skipped when nested.
    parallel_for(tasks, make_workspace,
                 [&](Eigen::Index task, DecodeWorkspace& workspace) {
                   const Eigen::Index first = task * decode_task_rows;
                   accumulate_decode(scaled_query, keys, values, first, std::min(n, first + decode_task_rows),
                                     workspace, partial[static_cast<std::size_t>(task)]);
                 },
                 /*always_open_region=*/false);
    for (const SoftmaxState& state : partial) total.merge(state);
  }
  return total.weighted / total.sum;
}

inline void require_finite_output(const char* function, const Eigen::VectorXf& output) {
  if (!detail::all_finite(output)) {
    throw NumericalError(std::string(function) + ": the attention output is not finite (cache rows out of float range)");
  }
}

}  // namespace detail

// Full cache: softmax(q K^T / sqrt(d)) V. query: 1 x d (or d x 1), float or double; keys: n x d and
// values: n x d_v, row-major rows stored as float, Eigen::half or Eigen::bfloat16 (a Matrix, a Map over
// the caller's memory, or a column block of a wider row-major matrix, e.g. one head of n x H*d).
// Returns 1 x d_v.
template <typename DerivedQ, typename DerivedK, typename DerivedV>
Eigen::RowVectorXf decode_attention(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& keys,
                                   const Eigen::MatrixBase<DerivedV>& values) {
  static_assert(std::is_same<typename DerivedK::Scalar, typename DerivedV::Scalar>::value,
                "keys and values are stored with the same element type");
  constexpr const char* where = "kqsvd::decode_attention";
  detail::require_cache_layout(where, "keys", keys);
  detail::require_cache_layout(where, "values", values);
  if (keys.rows() == 0 || keys.cols() == 0 || values.cols() == 0) {
    detail::throw_invalid(where, "keys", "must hold at least one token, got " + detail::shape_string(keys.rows(), keys.cols()));
  }
  if (values.rows() != keys.rows()) {
    detail::throw_invalid(where, "values",
                          "has " + std::to_string(values.rows()) + " rows, keys have " + std::to_string(keys.rows()));
  }
  const Eigen::VectorXf q = detail::checked_query(where, query, keys.cols());
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(keys.cols())));
  const Eigen::VectorXf output =
      detail::decode_rows(Eigen::VectorXf(q * scale), detail::RowKeys<typename DerivedK::Scalar>{detail::cache_rows(keys)},
                          detail::cache_rows(values));
  detail::require_finite_output(where, output);
  return output.transpose();
}

// Compressed cache (post-RoPE, the paper's setting): scores (q B_k)(K A_k)^T / sqrt(d) over the key
// latents, weights times the value latents, decompressed by B_v^T. query: 1 x d. Returns 1 x d.
template <typename DerivedQ, typename Storage>
Eigen::RowVectorXf decode_attention(const LowRankProjection<float>& key_projection,
                                   const LowRankProjection<float>& value_projection,
                                   const Eigen::MatrixBase<DerivedQ>& query, const LatentCache<Storage>& cache) {
  constexpr const char* where = "kqsvd::decode_attention";
  detail::require_columns(where, "key_projection", key_projection.rank(), cache.key_width(),
                          "the cache's key width");
  detail::require_columns(where, "value_projection", value_projection.rank(), cache.value_width(),
                          "the cache's value width");
  if (cache.empty()) detail::throw_invalid(where, "cache", "holds no tokens");
  const Eigen::Index d = key_projection.dimension();
  const Eigen::VectorXf q = detail::checked_query(where, query, d);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const Eigen::VectorXf mapped = (key_projection.decoder().transpose() * q) * scale;
  const Eigen::VectorXf latent = detail::decode_rows(mapped, detail::blocked_keys(cache), detail::value_rows(cache));
  const Eigen::VectorXf output = value_projection.decoder() * latent;
  detail::require_finite_output(where, output);
  return output.transpose();
}

}  // namespace kqsvd
