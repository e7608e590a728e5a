// kqsvd/kernels/partial_attention.hpp -- attention of a few or many queries over one source of cached
// rows, kept as the softmax's running state so that sources combine: the building block of every
// kernel in the library, and of caches built from layers (latents of old tokens, exact recent rows).
//
// For queries q_1..q_m (already mapped and scaled: q / sqrt(d) against full rows, q B / sqrt(d) against
// post-RoPE key latents) and the rows [begin_i, end_i) each one sees, a PartialAttention holds per query
// the largest score m_i, the sum of exp(s - m_i) and the sum of exp(s - m_i) v. merge() combines the
// states of disjoint rows of the same value space exactly; decompressed() maps value latents back to the
// head dimension (V A_v B_v^T is linear), after which states of latent and exact rows merge; result()
// is the attention output.
//
//   // a layered cache: older tokens as latents, the last W exact (kqsvd::RowMatrix<float> rows)
//   kqsvd::RowMatrix<float> mapped = queries * key_proj.decoder() / std::sqrt(d);
//   auto old = kqsvd::partial_attention(mapped, kqsvd::VisibleRows::all(m, latents.size()), latents);
//   auto recent = kqsvd::partial_attention(queries / std::sqrt(d), kqsvd::VisibleRows::all(m, W),
//                                          exact_keys, exact_values);
//   auto state = old.decompressed(value_proj);
//   state.merge(recent);
//   kqsvd::RowMatrix<float> out = state.result();   // m x d
//
// Few queries sharing one range (a decode step, a KV group's query heads at one position) run the
// decode strategy, split into fixed runs of 2048 rows processed in parallel with OpenMP and merged in
// order; many queries (prefill) run blocks of 64 queries in parallel against tiles expanded to float.
// Either way each result is computed the same way on any thread count: bit-identical.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kqsvd/cache/head_cache.hpp"
#include "kqsvd/core/detail/parallel_for.hpp"
#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/error.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/core/rope.hpp"
#include "kqsvd/kernels/decode_arithmetic.hpp"
#include "kqsvd/kernels/detail/attention_core.hpp"
#include "kqsvd/solvers/low_rank_projection.hpp"

namespace kqsvd {

// The rows of a source each query sees: [begin(i), end(i)), 0 <= begin <= end <= rows.
class VisibleRows {
 public:
  using Index = Eigen::Index;
  using Indices = Eigen::Matrix<Index, Eigen::Dynamic, 1>;

  VisibleRows(Indices begin, Indices end) : begin_(std::move(begin)), end_(std::move(end)) {
    if (begin_.size() != end_.size()) {
      detail::throw_invalid("kqsvd::VisibleRows", "end",
                            "has " + std::to_string(end_.size()) + " entries, begin " + std::to_string(begin_.size()));
    }
    for (Index i = 0; i < begin_.size(); ++i) {
      if (begin_(i) < 0 || end_(i) < begin_(i)) {
        detail::throw_invalid("kqsvd::VisibleRows", "begin/end",
                              "give query " + std::to_string(i) + " the rows [" + std::to_string(begin_(i)) + ", " +
                                  std::to_string(end_(i)) + "); need 0 <= begin <= end");
      }
    }
  }

  // Every query sees every row.
  static VisibleRows all(Index queries, Index rows) {
    return VisibleRows(Indices::Zero(queries), Indices::Constant(queries, rows));
  }
  // Query i sits at row first_query_row + i and sees rows 0 .. first_query_row + i (causal).
  static VisibleRows causal(Index queries, Index first_query_row) {
    return VisibleRows(Indices::Zero(queries), Indices::LinSpaced(queries, first_query_row + 1, first_query_row + queries));
  }

  Index queries() const { return begin_.size(); }
  const Indices& begin() const { return begin_; }
  const Indices& end() const { return end_; }

  // Throws InvalidArgument naming `function` unless there is one range per query (`query_count`) and
  // every range lies within `rows` rows.
  void require_fits(const char* function, Index query_count, Index rows) const {
    if (queries() != query_count) {
      detail::throw_invalid(function, "visible",
                            "has " + std::to_string(queries()) + " ranges for " + std::to_string(query_count) + " queries");
    }
    for (Index i = 0; i < queries(); ++i) {
      if (end_(i) > rows) {
        detail::throw_invalid(function, "visible",
                              "gives query " + std::to_string(i) + " rows up to " + std::to_string(end_(i)) +
                                  ", but the source holds " + std::to_string(rows));
      }
    }
  }

 private:
  Indices begin_, end_;
};

class PartialAttention;

namespace detail {
// The kernels fill a PartialAttention's states through this, and nothing else does.
struct PartialAttentionAccess {
  static SoftmaxStates& states(PartialAttention& attention);
};
}  // namespace detail

class PartialAttention {
 public:
  using Index = Eigen::Index;

  PartialAttention(Index queries, Index value_width) : states_(queries, value_width) {}

  Index queries() const { return states_.queries(); }
  Index value_width() const { return states_.weighted.cols(); }
  const Eigen::VectorXf& max() const { return states_.max; }
  const Eigen::VectorXf& sum() const { return states_.sum; }
  const RowMatrix<float>& weighted() const { return states_.weighted; }

  // Combines the state of the same queries over other rows, in the same value space.
  PartialAttention& merge(const PartialAttention& other) {
    constexpr const char* where = "kqsvd::PartialAttention::merge";
    if (other.queries() != queries() || other.value_width() != value_width()) {
      detail::throw_invalid(where, "other",
                            "holds " + std::to_string(other.queries()) + " queries of value width " +
                                std::to_string(other.value_width()) + ", this one " + std::to_string(queries()) +
                                " of " + std::to_string(value_width()) +
                                " (decompress latent states before merging them with exact ones)");
    }
    states_.merge(other.states_);
    return *this;
  }

  // The same state with its weighted value latents decompressed by B_v^T (value width: the rank ->
  // the head dimension).
  PartialAttention decompressed(const LowRankProjection<float>& value_projection) const {
    detail::require_columns("kqsvd::PartialAttention::decompressed", "value_projection", value_projection.rank(),
                            value_width(), "the state's value width");
    PartialAttention result(queries(), value_projection.dimension());
    result.states_.max = states_.max;
    result.states_.sum = states_.sum;
    result.states_.weighted.noalias() = states_.weighted * value_projection.decoder().transpose();
    return result;
  }

  // The attention output of each query (queries x value width). A query that saw no row has none: an
  // InvalidArgument. A non-finite output (cached values beyond float's range) is a NumericalError.
  RowMatrix<float> result() const {
    constexpr const char* where = "kqsvd::PartialAttention::result";
    for (Index q = 0; q < queries(); ++q) {
      if (!(states_.sum(q) > 0.0f)) {
        throw InvalidArgument(std::string(where) + ": query " + std::to_string(q) + " saw no cached row");
      }
    }
    RowMatrix<float> output = states_.sum.cwiseInverse().asDiagonal() * states_.weighted;
    if (!detail::all_finite(output)) {
      throw NumericalError(std::string(where) + ": the attention output is not finite (cached values beyond float's range)");
    }
    return output;
  }


 private:
  friend struct detail::PartialAttentionAccess;
  detail::SoftmaxStates states_;
};

namespace detail {

inline SoftmaxStates& PartialAttentionAccess::states(PartialAttention& attention) { return attention.states_; }

// Queries at most this many, sharing one row range, run the decode strategy.
inline constexpr Index decode_query_limit = 16;

// Runs f(std::integral_constant<StorageKind, K>{}) for the format's kind K.
template <typename F>
decltype(auto) visit_storage_kind(StorageKind kind, F&& f) {
  switch (kind) {
    case StorageKind::f32: return f(std::integral_constant<StorageKind, StorageKind::f32>{});
    case StorageKind::f16: return f(std::integral_constant<StorageKind, StorageKind::f16>{});
    case StorageKind::bf16: return f(std::integral_constant<StorageKind, StorageKind::bf16>{});
    case StorageKind::fp8_e4m3: return f(std::integral_constant<StorageKind, StorageKind::fp8_e4m3>{});
    case StorageKind::fp8_e5m2: return f(std::integral_constant<StorageKind, StorageKind::fp8_e5m2>{});
    case StorageKind::int8: return f(std::integral_constant<StorageKind, StorageKind::int8>{});
    case StorageKind::q8_0: return f(std::integral_constant<StorageKind, StorageKind::q8_0>{});
    case StorageKind::q4_0: return f(std::integral_constant<StorageKind, StorageKind::q4_0>{});
    case StorageKind::int4: return f(std::integral_constant<StorageKind, StorageKind::int4>{});
    case StorageKind::int2: break;
  }
  return f(std::integral_constant<StorageKind, StorageKind::int2>{});
}

template <typename DerivedQ>
RowMatrix<float> checked_queries(const char* function, const Eigen::MatrixBase<DerivedQ>& queries, Index width,
                                 const char* meaning) {
  static_assert(std::is_floating_point<typename DerivedQ::Scalar>::value, "queries are float or double");
  require_columns(function, "queries", queries.cols(), width, meaning);
  require_finite(function, "queries", queries);
  return queries.template cast<float>();
}

// The states of `queries` over `keys` / `values` rows as `visible` says, by the strategy that fits.
template <typename Keys, typename Values>
PartialAttention attend(const Keys& keys, const Values& values, const RowMatrix<float>& queries,
                        const VisibleRows& visible) {
  const Index m = queries.rows();
  PartialAttention result(m, values.width());
  if (m == 0) return result;
  const RowRanges ranges{visible.begin(), visible.end()};
  if constexpr (Keys::decodes) {
    if (m <= decode_query_limit && ranges.uniform()) {
      const Index begin = ranges.begin(0), end = ranges.end(0);
      if (begin == end) return result;
      // Tasks at fixed row positions: the same boundaries, and the same bits, on any thread count.
      const Index first_task = begin / decode_task_rows, end_task = (end + decode_task_rows - 1) / decode_task_rows;
      const Index tasks = end_task - first_task;
      const auto make_scratch = [&] {
        DecodeScratch scratch;
        scratch.scores.resize(m, Keys::tile_rows);
        // Only what the sources convert into (zeroing whole tiles per call cost as much as a 2-bit decode).
        scratch.keys.resize(static_cast<std::size_t>(keys.decode_buffer_floats()));
        scratch.values.resize(static_cast<std::size_t>(values.decode_buffer_floats()));
        return scratch;
      };
      const auto run = [&](Index task, DecodeScratch& scratch, SoftmaxStates& state) {
        const Index low = std::max(begin, (first_task + task) * decode_task_rows);
        const Index high = std::min(end, (first_task + task + 1) * decode_task_rows);
        attend_decode(keys, values, queries, low, high, scratch, state);
      };
      if (tasks == 1) {
        DecodeScratch scratch = make_scratch();
        run(0, scratch, PartialAttentionAccess::states(result));
      } else {
        std::vector<SoftmaxStates> partial(static_cast<std::size_t>(tasks), SoftmaxStates(m, values.width()));
        // No matrix-matrix products inside (the decode strategy is vector work): the region may be
        // skipped when nested.
        parallel_for(tasks, make_scratch,
                     [&](Index task, DecodeScratch& scratch) { run(task, scratch, partial[static_cast<std::size_t>(task)]); },
                     /*always_open_region=*/false);
        for (const SoftmaxStates& state : partial) PartialAttentionAccess::states(result).merge(state);
      }
      return result;
    }
  }
  // Tile strategy: blocks of queries in parallel; the last blocks usually see the most rows, so they
  // start first and both threads finish together.
  const Index blocks = (m + query_block_rows - 1) / query_block_rows;
  std::vector<SoftmaxStates> block_states(static_cast<std::size_t>(blocks));
  parallel_for(
      blocks,
      [&] {
        TileScratch scratch;
        scratch.keys.resize(static_cast<std::size_t>(keys.tile_buffer_floats()));
        scratch.values.resize(static_cast<std::size_t>(values.tile_buffer_floats()));
        scratch.scores.resize(query_block_rows, Keys::tile_rows);
        return scratch;
      },
      [&](Index task, TileScratch& scratch) {
        const Index block = blocks - 1 - task;
        const Index first = block * query_block_rows;
        const Index count = std::min(query_block_rows, m - first);
        SoftmaxStates& state = block_states[static_cast<std::size_t>(block)];
        state = SoftmaxStates(count, values.width());
        attend_tiles(keys, values, queries.middleRows(first, count), ranges, first, scratch, state);
      },
      // Eigen products run inside each task: keep them single-threaded (see core/detail/parallel_for.hpp).
      /*always_open_region=*/true);
  SoftmaxStates& all = PartialAttentionAccess::states(result);
  for (Index block = 0; block < blocks; ++block) {
    const SoftmaxStates& state = block_states[static_cast<std::size_t>(block)];
    const Index first = block * query_block_rows;
    all.max.segment(first, state.queries()) = state.max;
    all.sum.segment(first, state.queries()) = state.sum;
    all.weighted.middleRows(first, state.queries()) = state.weighted;
  }
  return result;
}

}  // namespace detail

// Scaled queries (m x key width, float or double) against the rows of a HeadCache: its full rows, or its
// post-RoPE key latents (then pass q B / sqrt(d)); values stay in the cache's value space (decompressed()
// maps latents back). `arithmetic`: see kernels/decode_arithmetic.hpp (4- and 2-bit formats, decode).
template <typename DerivedQ>
PartialAttention partial_attention(const Eigen::MatrixBase<DerivedQ>& scaled_queries, const VisibleRows& visible,
                                   const HeadCache& cache, DecodeArithmetic arithmetic = DecodeArithmetic::float32) {
  constexpr const char* where = "kqsvd::partial_attention";
  const RowMatrix<float> queries = detail::checked_queries(where, scaled_queries, cache.key_width(), "the cache's key width");
  visible.require_fits(where, queries.rows(), cache.size());
  return detail::visit_storage_kind(cache.format().kind(), [&](auto kind) {
    constexpr StorageKind K = decltype(kind)::value;
    const bool integer = arithmetic == DecodeArithmetic::int8_dot_products;
    return detail::attend(detail::BlockedKeys<K>{cache.key_side(), integer},
                          detail::BlockedValues<K>{cache.value_side(), integer}, queries, visible);
  });
}

// Scaled rotated queries (m x d) against pre-RoPE key latents: each cached row i is reconstructed as
// (k A) B^T and rotated by its position first_position + i before it is scored (the cost of pre-RoPE:
// O(rows x rank x d) per call, shared by every query of the call).
template <typename DerivedQ>
PartialAttention partial_attention(const Eigen::MatrixBase<DerivedQ>& scaled_queries, const VisibleRows& visible,
                                   const HeadCache& cache, const LowRankProjection<float>& key_projection,
                                   const RotaryEmbedding& rope, Eigen::Index first_position) {
  constexpr const char* where = "kqsvd::partial_attention";
  detail::require_columns(where, "key_projection", key_projection.rank(), cache.key_width(), "the cache's key width");
  if (rope.head_dim() != key_projection.dimension()) {
    detail::throw_invalid(where, "rope", "rotates head_dim " + std::to_string(rope.head_dim()) + ", the projection has " +
                                             std::to_string(key_projection.dimension()));
  }
  if (first_position < 0) detail::throw_invalid(where, "first_position", "must be >= 0, got " + std::to_string(first_position));
  const RowMatrix<float> queries =
      detail::checked_queries(where, scaled_queries, key_projection.dimension(), "the head dimension");
  visible.require_fits(where, queries.rows(), cache.size());
  return detail::visit_storage_kind(cache.format().kind(), [&](auto kind) {
    constexpr StorageKind K = decltype(kind)::value;
    const detail::PreRopeKeys<K> keys{cache.key_side(), &key_projection.decoder(), &rope, first_position};
    return detail::attend(keys, detail::BlockedValues<K>{cache.value_side()}, queries, visible);
  });
}

// Scaled queries against rows in the caller's memory: keys n x k and values n x c, row-major float,
// Eigen::half or Eigen::bfloat16 (a Matrix, a Map, or a column block of a wider row-major matrix, such
// as one head of n x H*d).
template <typename DerivedQ, typename DerivedK, typename DerivedV>
PartialAttention partial_attention(const Eigen::MatrixBase<DerivedQ>& scaled_queries, const VisibleRows& visible,
                                   const Eigen::MatrixBase<DerivedK>& keys, const Eigen::MatrixBase<DerivedV>& values) {
  constexpr const char* where = "kqsvd::partial_attention";
  detail::require_cache_layout(where, "keys", keys);
  detail::require_cache_layout(where, "values", values);
  if (values.rows() != keys.rows()) {
    detail::throw_invalid(where, "values", "has " + std::to_string(values.rows()) + " rows, keys have " +
                                               std::to_string(keys.rows()));
  }
  const RowMatrix<float> queries = detail::checked_queries(where, scaled_queries, keys.cols(), "the key width");
  visible.require_fits(where, queries.rows(), keys.rows());
  return detail::attend(detail::RowKeys<typename DerivedK::Scalar>{detail::cache_rows(keys)},
                        detail::RowValues<typename DerivedV::Scalar>{detail::cache_rows(values)}, queries, visible);
}

}  // namespace kqsvd
