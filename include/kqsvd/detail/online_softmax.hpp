// kqsvd/detail/online_softmax.hpp -- the single-pass attention core shared by decode and prefill.
//
// softmax(s) V over cache rows is computed tile by tile without ever holding all scores: a running
// maximum m, a running sum l = sum exp(s - m) and a running weighted sum acc = sum exp(s - m) v. When a
// tile raises the maximum, l and acc are rescaled by exp(m_old - m_new). Each tile of keys and values
// is read once, converted to float (if stored as half/bfloat16) a few rows at a time into small buffers
// that stay in L1, and used while they are there: scores, softmax and value accumulation are one pass
// over the cache.
// Partial states of disjoint row ranges combine exactly like tiles, which is how decode splits a long
// cache across threads.
//
// Keys come in two layouts:
//   RowKeys      row-major rows (a full cache given as Eigen matrices): a score is a dot product of a
//                row with the query, i.e. a row-major matrix-vector product;
//   BlockedKeys  LatentCache's layout: blocks of latent_tile_rows tokens, each block stored
//                dimension-major (for each latent dimension, the block's tokens are contiguous). The
//                scores of a block are then a column-major matrix-vector product: vertical multiply-adds
//                over whole SIMD registers instead of one horizontal reduction per token, which at
//                r = 16 halves the cost per token (measured 1.5 vs 4.0 ns/token, one core).
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>

#include "kqsvd/detail/storage_conversion.hpp"

namespace kqsvd::detail {

using StridedFloatRows = Eigen::Map<const FloatRows, 0, Eigen::OuterStride<>>;
using StridedFloatColumns = Eigen::Map<const Eigen::MatrixXf, 0, Eigen::OuterStride<>>;

// Tokens per tile (one softmax update each). Full rows: 64. Latent rows (r <= 64): 128 rows, which
// halves the per-tile overhead (max, rescale, loop control; measured 2.1 -> 1.6 ns/token at r = 16), and
// is the block size of a LatentCache's keys. Prefill converts whole tiles; decode converts half-precision
// tiles in smaller pieces (conversion_buffer_bytes).
inline constexpr Eigen::Index row_tile_rows = 64;
inline constexpr Eigen::Index latent_tile_rows = 128;
inline constexpr Eigen::Index max_tile_rows = 128;

// Half-precision rows are converted to float for decode a few at a time, at most this many bytes of
// float per buffer: keys and values buffers together stay well inside a 32 KiB L1 data cache. Whole
// tiles (32 KiB each at d = 128 or r = 64) evicted each other: float16 decode was slower than float32
// at twice the bytes (r = 32 latents at 32k tokens: 247 against 214 us per head-step), and a 512 MiB
// pool of full float16 caches took 32.1 ms per step against 17.4 ms with these buffers.
inline constexpr Eigen::Index conversion_buffer_bytes = 8192;

// Rows of `width` floats per conversion: as many as fit the buffer, at least one.
inline Eigen::Index conversion_rows(Eigen::Index width) {
  return std::max<Eigen::Index>(1, conversion_buffer_bytes / (width * static_cast<Eigen::Index>(sizeof(float))));
}

// Floats a conversion buffer for rows of `width` needs: conversion_rows(width) rows, or one latent
// dimension of a key block (latent_tile_rows floats, less than the buffer).
inline Eigen::Index conversion_buffer_floats(Eigen::Index width) {
  return std::max<Eigen::Index>(conversion_buffer_bytes / static_cast<Eigen::Index>(sizeof(float)), width);
}

// Cache rows as stored: row-major, `stride` elements from one row to the next (>= width).
template <typename Storage>
struct CacheRows {
  const Storage* data = nullptr;
  Eigen::Index rows = 0;
  Eigen::Index width = 0;
  Eigen::Index stride = 0;

  const Storage* row(Eigen::Index i) const { return data + i * stride; }
};

template <typename Derived>
CacheRows<typename Derived::Scalar> cache_rows(const Eigen::MatrixBase<Derived>& m) {
  return {m.derived().data(), m.rows(), m.cols(), m.rows() > 1 ? m.derived().outerStride() : m.cols()};
}

// `count` rows starting at `first` as float, converted into `buffer` (count x width) unless the storage
// already is float.
template <typename Storage>
StridedFloatRows float_rows(const CacheRows<Storage>& rows, Eigen::Index first, Eigen::Index count, float* buffer) {
  if constexpr (std::is_same<Storage, float>::value) {
    return StridedFloatRows(rows.row(first), count, rows.width, Eigen::OuterStride<>(rows.stride));
  } else {
    if (rows.stride == rows.width) {
      to_float(rows.row(first), buffer, count * rows.width);
    } else {
      for (Eigen::Index i = 0; i < count; ++i) to_float(rows.row(first + i), buffer + i * rows.width, rows.width);
    }
    return StridedFloatRows(buffer, count, rows.width, Eigen::OuterStride<>(rows.width));
  }
}

template <typename Storage>
struct RowKeys {
  static constexpr Eigen::Index tile_rows = row_tile_rows;
  CacheRows<Storage> rows;

  Eigen::Index width() const { return rows.width; }

  // The tile as a float matrix (count x width), whatever its memory order.
  StridedFloatRows tile(Eigen::Index first, Eigen::Index count, float* buffer) const {
    return float_rows(rows, first, count, buffer);
  }

  template <typename Scores>
  void score(Eigen::Index first, Eigen::Index count, const Eigen::VectorXf& query, float* buffer, Scores& scores) const {
    if constexpr (std::is_same<Storage, float>::value) {
      scores.noalias() = tile(first, count, buffer) * query;
    } else {
      // Each score is its own row's dot product, so rows can be converted and scored a few at a time
      // from an L1-sized buffer.
      const Eigen::Index step = conversion_rows(rows.width);
      for (Eigen::Index i = 0; i < count; i += step) {
        const Eigen::Index m = std::min(step, count - i);
        scores.segment(i, m).noalias() = tile(first + i, m, buffer) * query;
      }
    }
  }
};

template <typename Storage>
struct BlockedKeys {
  static constexpr Eigen::Index tile_rows = latent_tile_rows;
  const Storage* data = nullptr;  // block b starts at data + b * tile_rows * width
  Eigen::Index rows = 0;
  Eigen::Index width_ = 0;

  Eigen::Index width() const { return width_; }

  // `first` is a multiple of tile_rows: the tile is one block (count x width, column-major).
  StridedFloatColumns tile(Eigen::Index first, Eigen::Index count, float* buffer) const {
    const Storage* block = data + first * width_;
    const float* columns = nullptr;
    if constexpr (std::is_same<Storage, float>::value) {
      columns = block;
    } else {
      // Whole block: the padding of a partial last block is converted too (it is allocated and zeroed)
      // and never read.
      to_float(block, buffer, tile_rows * width_);
      columns = buffer;
    }
    return StridedFloatColumns(columns, count, width_, Eigen::OuterStride<>(tile_rows));
  }

  template <typename Scores>
  void score(Eigen::Index first, Eigen::Index count, const Eigen::VectorXf& query, float* buffer, Scores& scores) const {
    if constexpr (std::is_same<Storage, float>::value) {
      const auto keys = tile(first, count, buffer);
      // The common latent widths at compile time: Eigen then unrolls the product over the dimensions.
      if (count == tile_rows && width_ == 16) {
        scores.noalias() = fixed_block<16>(keys) * query.head<16>();
      } else if (count == tile_rows && width_ == 32) {
        scores.noalias() = fixed_block<32>(keys) * query.head<32>();
      } else {
        scores.noalias() = keys * query;
      }
    } else {
      // One latent dimension at a time: its tile_rows values are contiguous, converted into a 512-byte
      // buffer and added to all the block's scores with vertical multiply-adds. Converting the whole
      // block first (up to 32 KiB of float at r = 64) measured slower at every r, r = 16 included:
      // 22.4 against 16.5 ms per step of a 512 MiB pool of float16 caches, 32k tokens.
      const Storage* block = data + first * width_;
      scores.setZero();
      for (Eigen::Index j = 0; j < width_; ++j) {
        to_float(block + j * tile_rows, buffer, count);
        scores.noalias() += query(j) * Eigen::Map<const Eigen::VectorXf>(buffer, count);
      }
    }
  }

 private:
  template <int Width>
  static Eigen::Map<const Eigen::Matrix<float, tile_rows, Width>> fixed_block(const StridedFloatColumns& keys) {
    return Eigen::Map<const Eigen::Matrix<float, tile_rows, Width>>(keys.data());
  }
};

// acc += sum_i weights(i) * rows.row(i). For narrow rows a single accumulator would chain every
// multiply-add on the previous one (one FMA latency per token); Chains independent accumulators,
// summed in a fixed order at the end, keep the FMA units busy.
template <int Width>
void add_weighted_rows(const StridedFloatRows& rows, const float* weights, Eigen::VectorXf& acc) {
  using Row = Eigen::Matrix<float, Width, 1>;
  constexpr int chains = Width >= 64 ? 1 : 64 / Width;
  std::array<Row, chains> partial;
  for (Row& p : partial) p.setZero();
  const Eigen::Index count = rows.rows();
  const Eigen::Index stride = rows.outerStride();
  Eigen::Index i = 0;
  for (; i + chains <= count; i += chains) {
    for (int c = 0; c < chains; ++c) {
      partial[static_cast<std::size_t>(c)].noalias() += weights[i + c] * Eigen::Map<const Row>(rows.data() + (i + c) * stride);
    }
  }
  for (; i < count; ++i) partial[0].noalias() += weights[i] * Eigen::Map<const Row>(rows.data() + i * stride);
  for (int c = 1; c < chains; ++c) partial[0] += partial[static_cast<std::size_t>(c)];
  acc += partial[0];
}

inline void add_weighted_rows(const StridedFloatRows& rows, const float* weights, Eigen::VectorXf& acc) {
  switch (rows.cols()) {
    case 16: add_weighted_rows<16>(rows, weights, acc); return;
    case 32: add_weighted_rows<32>(rows, weights, acc); return;
    default:
      // Wider rows give Eigen's matrix-vector kernel several independent packets per token already.
      acc.noalias() += rows.transpose() * Eigen::Map<const Eigen::VectorXf>(weights, rows.rows());
  }
}

// Running softmax state of one query.
struct SoftmaxState {
  float max = -std::numeric_limits<float>::infinity();
  float sum = 0.0f;
  Eigen::VectorXf weighted;  // sum of exp(s - max) * value row

  explicit SoftmaxState(Eigen::Index value_width = 0) : weighted(Eigen::VectorXf::Zero(value_width)) {}

  // Folds in another state (of disjoint rows): the same arithmetic as one more tile.
  void merge(const SoftmaxState& other) {
    if (other.sum == 0.0f) return;
    if (other.max > max) {
      const float rescale = std::exp(max - other.max);
      weighted *= rescale;
      sum *= rescale;
      max = other.max;
    }
    const float weight = std::exp(other.max - max);
    weighted += weight * other.weighted;
    sum += weight * other.sum;
  }
};

// Scratch for one thread: conversion buffers for keys and values (used only when the cache is not
// float). Uninitialised Eigen storage: a decode step on a short cache should not spend its time zeroing.
struct DecodeWorkspace {
  Eigen::VectorXf keys, values;
  Eigen::Matrix<float, max_tile_rows, 1> scores;
  DecodeWorkspace(Eigen::Index key_width, Eigen::Index value_width, bool converts)
      : keys(converts ? conversion_buffer_floats(key_width) : 0),
        values(converts ? conversion_buffer_floats(value_width) : 0) {}
};

// Folds cache rows [first, last) into `state` for one query (already multiplied by the score scale).
// `first` is a multiple of Keys::tile_rows.
template <typename Keys, typename Storage>
void accumulate_decode(const Eigen::VectorXf& scaled_query, const Keys& keys, const CacheRows<Storage>& values,
                       Eigen::Index first, Eigen::Index last, DecodeWorkspace& workspace, SoftmaxState& state) {
  for (Eigen::Index begin = first; begin < last; begin += Keys::tile_rows) {
    const Eigen::Index count = std::min(Keys::tile_rows, last - begin);
    auto scores = workspace.scores.head(count);
    keys.score(begin, count, scaled_query, workspace.keys.data(), scores);
    const float tile_max = scores.maxCoeff();
    if (tile_max > state.max) {
      const float rescale = std::exp(state.max - tile_max);  // 0 on the first tile: exp(-inf)
      state.weighted *= rescale;
      state.sum *= rescale;
      state.max = tile_max;
    }
    scores = (scores.array() - state.max).exp().matrix();
    state.sum += scores.sum();
    const Eigen::Index step = std::is_same<Storage, float>::value ? count : conversion_rows(values.width);
    for (Eigen::Index i = 0; i < count; i += step) {
      const Eigen::Index m = std::min(step, count - i);
      add_weighted_rows(float_rows(values, begin + i, m, workspace.values.data()), scores.data() + i, state.weighted);
    }
  }
}

// Scratch for one thread of prefill: a block of queries against a tile of keys.
struct PrefillWorkspace {
  Eigen::VectorXf keys, values;
  FloatRows scores;    // query block x key tile
  FloatRows weighted;  // query block x value width
  Eigen::VectorXf max, sum, rescale, tile_max;
  PrefillWorkspace(Eigen::Index query_block, Eigen::Index key_width, Eigen::Index value_width)
      : keys(max_tile_rows * key_width),
        values(max_tile_rows * value_width),
        scores(query_block, max_tile_rows),
        weighted(query_block, value_width),
        max(query_block),
        sum(query_block),
        rescale(query_block),
        tile_max(query_block) {}
};

// Causal attention of a block of queries (rows of `scaled_queries`, already multiplied by the score
// scale) at absolute positions first_position, first_position + 1, ...: query i sees cache rows
// 0 .. first_position + i. Writes the softmax-weighted value rows into `output` (queries x value width).
template <typename Keys, typename Storage, typename DerivedQ, typename DerivedOut>
void prefill_block(const Eigen::MatrixBase<DerivedQ>& scaled_queries, Eigen::Index first_position, const Keys& keys,
                   const CacheRows<Storage>& values, PrefillWorkspace& workspace, Eigen::MatrixBase<DerivedOut>& output) {
  const Eigen::Index m = scaled_queries.rows();
  const Eigen::Index visible_end = first_position + m;  // rows [0, visible_end) are seen by some query
  auto max = workspace.max.head(m);
  auto sum = workspace.sum.head(m);
  auto rescale = workspace.rescale.head(m);
  auto tile_max = workspace.tile_max.head(m);
  auto weighted = workspace.weighted.topRows(m);
  max.setConstant(-std::numeric_limits<float>::infinity());
  sum.setZero();
  weighted.setZero();
  for (Eigen::Index begin = 0; begin < visible_end; begin += Keys::tile_rows) {
    const Eigen::Index count = std::min(Keys::tile_rows, visible_end - begin);
    auto scores = workspace.scores.topLeftCorner(m, count);
    scores.noalias() = scaled_queries * keys.tile(begin, count, workspace.keys.data()).transpose();
    // A tile reaching past the first query's position holds keys that later rows of the block see but
    // earlier ones do not: mask them.
    if (begin + count > first_position + 1) {
      for (Eigen::Index i = 0; i < m; ++i) {
        const Eigen::Index seen = std::max<Eigen::Index>(0, first_position + i + 1 - begin);
        if (seen < count) scores.row(i).tail(count - seen).setConstant(-std::numeric_limits<float>::infinity());
      }
    }
    tile_max = scores.rowwise().maxCoeff();
    for (Eigen::Index i = 0; i < m; ++i) {
      const float new_max = std::max(max(i), tile_max(i));
      // A row entirely masked in this tile keeps its state; its weights below are exp(-inf) = 0.
      rescale(i) = new_max == max(i) ? 1.0f : std::exp(max(i) - new_max);
      max(i) = new_max;
    }
    scores = (scores.array().colwise() - max.array()).exp().matrix();
    sum = sum.cwiseProduct(rescale) + scores.rowwise().sum();
    weighted.array().colwise() *= rescale.array();
    weighted.noalias() += scores * float_rows(values, begin, count, workspace.values.data());
  }
  output = sum.cwiseInverse().asDiagonal() * weighted;
}

}  // namespace kqsvd::detail
