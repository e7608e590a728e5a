// kqsvd/kernels/attention_weights.hpp -- the softmax weights themselves: each query's attention
// probability on every row of a HeadCache, which eviction policies such as H2O accumulate
// (cache/heavy_hitter_cache.hpp).
//
// Query i's weights are softmax((scaled q_i) k_j^T) over the rows j in its visible range and 0 elsewhere;
// they sum to 1 over the range (a query that sees no row gets a row of zeros). The scores are the ones
// partial_attention computes: against full rows (pass q / sqrt(d)) or post-RoPE key latents (q B /
// sqrt(d)), each block of the cache expanded from its storage format once for every query.
//
//   const auto all = kqsvd::VisibleRows::all(queries.rows(), cache.size());
//   kqsvd::RowMatrix<float> p = kqsvd::attention_weights(queries / std::sqrt(d), all, cache);  // m x size()
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kqsvd/cache/head_cache.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/kernels/detail/attention_core.hpp"
#include "kqsvd/kernels/partial_attention.hpp"

namespace kqsvd {

template <typename DerivedQ>
RowMatrix<float> attention_weights(const Eigen::MatrixBase<DerivedQ>& scaled_queries, const VisibleRows& visible,
                                   const HeadCache& cache) {
  constexpr const char* where = "kqsvd::attention_weights";
  const RowMatrix<float> queries = detail::checked_queries(where, scaled_queries, cache.key_width(), "the cache's key width");
  visible.require_fits(where, queries.rows(), cache.size());
  const Eigen::Index m = queries.rows(), n = cache.size();
  RowMatrix<float> weights(m, n);
  detail::visit_storage_kind(cache.format().kind(), [&](auto kind) {
    constexpr StorageKind K = decltype(kind)::value;
    const detail::BlockedKeys<K> keys{cache.key_side()};
    std::vector<float> buffer(static_cast<std::size_t>(keys.tile_buffer_floats()));
    for (Eigen::Index first = 0; first < n; first += detail::block_rows) {
      const Eigen::Index count = std::min(detail::block_rows, n - first);
      weights.middleCols(first, count).noalias() = queries * keys.tile(first, count, buffer.data()).transpose();
    }
  });
  for (Eigen::Index i = 0; i < m; ++i) {
    const Eigen::Index begin = visible.begin()(i), end = visible.end()(i);
    auto row = weights.row(i);
    row.head(begin).setZero();
    row.tail(n - end).setZero();
    if (begin == end) continue;
    auto seen = row.segment(begin, end - begin).array();
    seen = (seen - seen.maxCoeff()).exp();
    seen /= seen.sum();
  }
  return weights;
}

}  // namespace kqsvd
