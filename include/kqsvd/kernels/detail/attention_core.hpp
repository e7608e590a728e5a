// kqsvd/kernels/detail/attention_core.hpp -- the single-pass attention core every kernel of the library
// runs: scores, an online softmax and the weighted value sum, fused per tile of cached rows.
//
// softmax(s) V over cache rows is computed tile by tile without ever holding all scores: a running
// maximum m, a running sum l = sum exp(s - m) and a running weighted sum acc = sum exp(s - m) v. When a
// tile raises the maximum, l and acc are rescaled by exp(m_old - m_new). Partial states of disjoint row
// ranges combine exactly like tiles, which is how long caches are split across threads and how a layered
// cache (latents, plus exact recent rows) combines its layers.
//
// Sources of rows:
//   RowKeys / RowValues     rows in the caller's memory: row-major float, half or bfloat16 (full caches
//                           given as Eigen matrices); tiles of 64 rows;
//   BlockedKeys / BlockedValues   a HeadCache side: blocks of 128 tokens, dimension-major, in any
//                           StorageFormat; a tile is a block;
//   PreRopeKeys             a HeadCache of pre-RoPE key latents: each tile reconstructed as (k A) B^T and
//                           rotated by its positions.
// Two strategies, chosen by the caller:
//   decode  few queries (a KV group's query heads at one position) sharing one row range: blocked keys
//           are scored one element's run at a time, converted into a 512-byte buffer and added to all
//           the block's scores with vertical multiply-adds, so that no tile is ever expanded to float;
//   tiles   many queries (prefill), each with its own row range: a tile is expanded to float once and
//           used by a 64-query block as matrix products.
// On 4- and 2-bit codes the decode strategy can instead quantize the query and the weights to int8 and
// multiply in integers (DecodeArithmetic::int8_dot_products; the section "Integer dot products").
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "kqsvd/cache/head_cache.hpp"
#include "kqsvd/core/storage_format.hpp"
#include "kqsvd/core/detail/float_conversion.hpp"
#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/core/rope.hpp"
#include "kqsvd/kernels/decode_arithmetic.hpp"

#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace kqsvd::detail {

using Index = Eigen::Index;
using StridedFloatRows = Eigen::Map<const RowMatrix<float>, 0, Eigen::OuterStride<>>;
using StridedFloatColumns = Eigen::Map<const Eigen::MatrixXf, 0, Eigen::OuterStride<>>;

// Rows per tile of rows in the caller's memory; a HeadCache tile is one of its blocks.
inline constexpr Index row_tile_rows = 64;
inline constexpr Index block_rows = cache_block_tokens;
// Queries per tile-strategy task: a 64 x 128 score tile is 32 KiB, and a block long enough that each
// expanded tile is reused 64 times.
inline constexpr Index query_block_rows = 64;
// Rows per parallel decode task: boundaries depend on the row positions only; the partial states are
// merged in task order, so results are bit-identical for any number of threads.
inline constexpr Index decode_task_rows = 2048;
static_assert(decode_task_rows % row_tile_rows == 0 && decode_task_rows % block_rows == 0,
              "decode tasks start on tile boundaries");

// Half-precision rows in the caller's memory are converted to float for decode a few at a time, at most
// this many bytes of float per buffer: keys and values buffers together stay well inside a 32 KiB L1
// data cache (whole tiles evicted each other; bench/README.md has the measurements).
inline constexpr Index conversion_buffer_bytes = 8192;

inline Index conversion_rows(Index width) {
  return std::max<Index>(1, conversion_buffer_bytes / (width * static_cast<Index>(sizeof(float))));
}

// ------------------------------------------------------------------------------------------------
// Softmax states

// The running state of m queries over some rows: per query the maximum score, the sum of exp(s - max)
// and the sum of exp(s - max) v (m x value width). A query that saw no row has max -inf and sum 0.
struct SoftmaxStates {
  Eigen::VectorXf max, sum;
  RowMatrix<float> weighted;

  SoftmaxStates() = default;
  SoftmaxStates(Index queries, Index value_width)
      : max(Eigen::VectorXf::Constant(queries, -std::numeric_limits<float>::infinity())),
        sum(Eigen::VectorXf::Zero(queries)),
        weighted(RowMatrix<float>::Zero(queries, value_width)) {}

  Index queries() const { return max.size(); }

  // Folds in the states of the same queries over other rows: the same arithmetic as one more tile.
  void merge(const SoftmaxStates& other) {
    for (Index q = 0; q < queries(); ++q) {
      if (other.sum(q) == 0.0f) continue;
      if (other.max(q) > max(q)) {
        const float rescale = std::exp(max(q) - other.max(q));  // 0 when this query had nothing yet
        weighted.row(q) *= rescale;
        sum(q) *= rescale;
        max(q) = other.max(q);
      }
      const float weight = std::exp(other.max(q) - max(q));
      weighted.row(q) += weight * other.weighted.row(q);
      sum(q) += weight * other.sum(q);
    }
  }
};

// Turns row q's `count` scores (entries outside [begin, end) of the tile already -inf) into weights and
// folds the rescaling into the state; returns false when the whole tile is masked for this query.
inline bool softmax_update(float* scores, Index count, SoftmaxStates& state, Index q) {
  Eigen::Map<Eigen::ArrayXf> row(scores, count);
  const float tile_max = row.maxCoeff();
  if (tile_max == -std::numeric_limits<float>::infinity()) {
    row.setZero();
    return false;
  }
  if (tile_max > state.max(q)) {
    const float rescale = std::exp(state.max(q) - tile_max);  // 0 on the first tile: exp(-inf)
    state.weighted.row(q) *= rescale;
    state.sum(q) *= rescale;
    state.max(q) = tile_max;
  }
  row = (row - state.max(q)).exp();
  state.sum(q) += row.sum();
  return true;
}

// ------------------------------------------------------------------------------------------------
// Rows in the caller's memory

// Cache rows as stored: row-major, `stride` elements from one row to the next (>= width).
template <typename Storage>
struct CacheRows {
  const Storage* data = nullptr;
  Index rows = 0;
  Index width = 0;
  Index stride = 0;

  const Storage* row(Index i) const { return data + i * stride; }
};

// Cache rows given as an Eigen expression must be row-major memory with contiguous rows.
template <typename Derived>
void require_cache_layout(const char* function, const char* argument, const Eigen::MatrixBase<Derived>& rows) {
  static_assert(is_cache_storage_v<typename Derived::Scalar>, "cache rows are float, Eigen::half or Eigen::bfloat16");
  static_assert(static_cast<bool>(Derived::Flags & Eigen::DirectAccessBit),
                "cache rows must be memory (a Matrix, a Map or a block of one), not an expression");
  static_assert(static_cast<bool>(Derived::Flags & Eigen::RowMajorBit) || Derived::ColsAtCompileTime == 1,
                "cache rows must be row-major: one token per row, contiguous");
  if (rows.cols() > 1 && rows.derived().innerStride() != 1) {
    throw_invalid(function, argument, "must have contiguous rows (inner stride 1)");
  }
}

template <typename Derived>
CacheRows<typename Derived::Scalar> cache_rows(const Eigen::MatrixBase<Derived>& m) {
  return {m.derived().data(), m.rows(), m.cols(), m.rows() > 1 ? m.derived().outerStride() : m.cols()};
}

// `count` rows starting at `first` as float, converted into `buffer` (count x width) unless the storage
// already is float.
template <typename Storage>
StridedFloatRows float_rows(const CacheRows<Storage>& rows, Index first, Index count, float* buffer) {
  if constexpr (std::is_same<Storage, float>::value) {
    return StridedFloatRows(rows.row(first), count, rows.width, Eigen::OuterStride<>(rows.stride));
  } else {
    if (rows.stride == rows.width) {
      to_float(rows.row(first), buffer, count * rows.width);
    } else {
      for (Index i = 0; i < count; ++i) to_float(rows.row(first + i), buffer + i * rows.width, rows.width);
    }
    return StridedFloatRows(buffer, count, rows.width, Eigen::OuterStride<>(rows.width));
  }
}

// acc += sum_i weights(i) * rows.row(i). For narrow rows a single accumulator would chain every
// multiply-add on the previous one (one FMA latency per token); independent chains, summed in a fixed
// order at the end, keep the FMA units busy.
template <int Width>
void add_weighted_rows(const StridedFloatRows& rows, const float* weights, float* acc) {
  using Row = Eigen::Matrix<float, Width, 1>;
  constexpr int chains = Width >= 64 ? 1 : 64 / Width;
  std::array<Row, chains> partial;
  for (Row& p : partial) p.setZero();
  const Index count = rows.rows();
  const Index stride = rows.outerStride();
  Index i = 0;
  for (; i + chains <= count; i += chains) {
    for (int c = 0; c < chains; ++c) {
      partial[static_cast<std::size_t>(c)].noalias() += weights[i + c] * Eigen::Map<const Row>(rows.data() + (i + c) * stride);
    }
  }
  for (; i < count; ++i) partial[0].noalias() += weights[i] * Eigen::Map<const Row>(rows.data() + i * stride);
  for (int c = 1; c < chains; ++c) partial[0] += partial[static_cast<std::size_t>(c)];
  Eigen::Map<Row>(acc) += partial[0];
}

inline void add_weighted_rows(const StridedFloatRows& rows, const float* weights, float* acc) {
  switch (rows.cols()) {
    case 16: add_weighted_rows<16>(rows, weights, acc); return;
    case 32: add_weighted_rows<32>(rows, weights, acc); return;
    default:
      // Wider rows give Eigen's matrix-vector kernel several independent packets per token already.
      Eigen::Map<Eigen::VectorXf>(acc, rows.cols()).noalias() +=
          rows.transpose() * Eigen::Map<const Eigen::VectorXf>(weights, rows.rows());
  }
}

template <typename Storage>
struct RowKeys {
  static constexpr Index tile_rows = row_tile_rows;
  static constexpr bool decodes = true;  // has score() for the decode strategy
  CacheRows<Storage> rows;

  Index width() const { return rows.width; }
  Index size() const { return rows.rows; }

  // Tile strategy: rows [first, first + count) as a float matrix (count x width).
  StridedFloatRows tile(Index first, Index count, float* buffer) const { return float_rows(rows, first, count, buffer); }
  Index tile_buffer_floats() const { return tile_rows * width(); }

  // Decode strategy: scores(q, i) = queries.row(q) . row(first + i), for count rows; `scores` has
  // tile_rows columns per query.
  void score(Index first, Index count, const RowMatrix<float>& queries, float* scores, float* buffer) const {
    const Index m = queries.rows();
    // Each score is its own row's dot product, so half-precision rows can be converted and scored a few
    // at a time from an L1-sized buffer.
    const Index step = std::is_same<Storage, float>::value ? count : conversion_rows(width());
    for (Index i = 0; i < count; i += step) {
      const Index n = std::min(step, count - i);
      const StridedFloatRows block = float_rows(rows, first + i, n, buffer);
      if (m == 1) {
        Eigen::Map<Eigen::VectorXf>(scores + i, n).noalias() = block * queries.row(0).transpose();
      } else {
        Eigen::Map<RowMatrix<float>, 0, Eigen::OuterStride<>>(scores + i, m, n, Eigen::OuterStride<>(tile_rows))
            .noalias() = queries * block.transpose();
      }
    }
  }
  Index decode_buffer_floats() const { return conversion_rows(width()) * width(); }
};

template <typename Storage>
struct RowValues {
  static constexpr Index tile_rows = row_tile_rows;
  CacheRows<Storage> rows;

  Index width() const { return rows.width; }

  StridedFloatRows tile(Index first, Index count, float* buffer) const { return float_rows(rows, first, count, buffer); }
  Index tile_buffer_floats() const { return tile_rows * width(); }

  // Decode strategy: acc.row(q) += sum_i weights(q, i) row(first + i).
  void accumulate(Index first, Index count, const float* weights, RowMatrix<float>& acc, float* buffer) const {
    const Index step = std::is_same<Storage, float>::value ? count : conversion_rows(width());
    for (Index i = 0; i < count; i += step) {
      const Index n = std::min(step, count - i);
      const StridedFloatRows block = float_rows(rows, first + i, n, buffer);
      for (Index q = 0; q < acc.rows(); ++q) add_weighted_rows(block, weights + q * tile_rows + i, &acc(q, 0));
    }
  }
  Index decode_buffer_floats() const { return conversion_rows(width()) * width(); }
};

// ------------------------------------------------------------------------------------------------
// HeadCache sides

using Lane = Eigen::Array<float, block_rows, 1>;
using LaneMap = Eigen::Map<Lane>;
using ConstLaneMap = Eigen::Map<const Lane>;

// block_rows float16 values at `bytes` to float. The run's length is a multiple of 8, so with F16C there
// is no scalar tail (GCC 12 also warns, wrongly, about the general routine's tail loop once inlined here).
inline void half_lane_to_float(const std::uint8_t* bytes, float* out) {
#ifdef __F16C__
  for (Index i = 0; i < block_rows; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 2 * i))));
  }
#else
  half_bytes_to_float(bytes, out, block_rows);
#endif
}

// One element's run of a block (block_rows tokens) as float codes: the values themselves for the float
// formats, the integer codes for the others (the group's scale and offset are applied by the caller).
// Returns the run itself for f32, else `buffer`.
template <StorageKind Kind>
const float* run_codes(const std::uint8_t* run, float* buffer) {
  constexpr Index n = block_rows;
  if constexpr (Kind == StorageKind::f32) {
    // The side's storage is an array of float (see HeadCache), so this is a float object.
    return reinterpret_cast<const float*>(run);
  } else if constexpr (Kind == StorageKind::f16) {
    half_lane_to_float(run, buffer);
  } else if constexpr (Kind == StorageKind::bf16) {
    for (Index i = 0; i < n; ++i) {
      std::uint16_t bits = 0;
      std::memcpy(&bits, run + 2 * i, 2);
      buffer[i] = bfloat16_bits_to_float(bits);
    }
  } else if constexpr (Kind == StorageKind::fp8_e4m3 || Kind == StorageKind::fp8_e5m2) {
    // Both are the top of a float16 pattern: E5M2 exactly (same exponent bias), E4M3 once its exponent
    // and mantissa are shifted down one bit and the result scaled by 2^8 (biases 7 and 15); the F16C
    // conversion then handles subnormals at full speed.
    alignas(64) std::uint16_t bits[n];
    for (Index i = 0; i < n; ++i) {
      const std::uint16_t code = run[i];
      bits[i] = Kind == StorageKind::fp8_e5m2 ? static_cast<std::uint16_t>(code << 8)
                                              : static_cast<std::uint16_t>(((code & 0x80u) << 8) | ((code & 0x7fu) << 7));
    }
    half_lane_to_float(reinterpret_cast<const std::uint8_t*>(bits), buffer);
    if constexpr (Kind == StorageKind::fp8_e4m3) LaneMap(buffer) *= 256.0f;
  } else if constexpr (Kind == StorageKind::int8 || Kind == StorageKind::q8_0) {
    for (Index i = 0; i < n; ++i) buffer[i] = static_cast<float>(static_cast<std::int8_t>(run[i]));
  } else if constexpr (Kind == StorageKind::q4_0 || Kind == StorageKind::int4) {
    for (Index i = 0; i < n / 2; ++i) {
      buffer[i] = static_cast<float>(run[i] & 0x0f);
      buffer[i + n / 2] = static_cast<float>(run[i] >> 4);
    }
  } else {
    static_assert(Kind == StorageKind::int2, "every storage kind has its conversion");
    for (Index i = 0; i < n / 4; ++i) {
      for (int p = 0; p < 4; ++p) buffer[i + p * n / 4] = static_cast<float>((run[i] >> (2 * p)) & 0x03);
    }
  }
  return buffer;
}

inline constexpr bool offset_kind(StorageKind kind) {
  return kind == StorageKind::q4_0 || kind == StorageKind::int4 || kind == StorageKind::int2;
}

inline constexpr bool scaled_kind(StorageKind kind) {
  return kind == StorageKind::int8 || kind == StorageKind::q8_0 || kind == StorageKind::q4_0 ||
         kind == StorageKind::int4 || kind == StorageKind::int2;
}

// 4- and 2-bit codes: two or four tokens in a byte.
template <StorageKind Kind>
inline constexpr bool packed_kind = Kind == StorageKind::q4_0 || Kind == StorageKind::int4 || Kind == StorageKind::int2;

// The float scale and offset of group g of a block, per token: an element is scale * code + offset
// (formats without an offset leave `offset` alone).
template <StorageKind Kind>
void group_scale(const std::uint8_t* block, const BlockLayout& layout, Index g, float* scale, float* offset) {
  half_lane_to_float(block + layout.scale_offset(g), scale);
  if constexpr (Kind == StorageKind::int4 || Kind == StorageKind::int2) {
    half_lane_to_float(block + layout.minimum_offset(g), offset);
  } else if constexpr (Kind == StorageKind::q4_0) {
    LaneMap{offset} = ConstLaneMap(scale) * -8.0f;
  }
}

// Asks for the cache line at `address`; a hint, never a fault, without effect where there is no builtin.
inline void prefetch_line(const std::uint8_t* address) {
#if defined(__GNUC__)
  __builtin_prefetch(address, 0, 3);
#else
  static_cast<void>(address);
#endif
}

// The lines of `bytes` bytes from `address` (a run of one element's codes, a group's scales, a block).
inline void prefetch_run(const std::uint8_t* address, Index bytes) {
  for (Index offset = 0; offset < bytes; offset += 64) prefetch_line(address + offset);
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// The decode strategy for one query, with AVX2 and FMA: codes are converted in registers, eight or more
// tokens at a time, and multiplied in the same step -- never stored as floats and read again (measured: 1.5-3x
// fewer instructions per element than converting a chunk first; bench/README.md). Only with AVX2: the
// portable path below is the same arithmetic in another order.

// Codes of tokens [8k, 8k + 8) of a run of 8-, 16- or 32-bit codes as 8 floats (fp8 and the packed
// formats are read sixteen or more tokens at a time, below).
template <StorageKind Kind>
inline __m256 load_codes8(const std::uint8_t* run, Index k) {
  if constexpr (Kind == StorageKind::f32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(run) + 8 * k);
  } else if constexpr (Kind == StorageKind::f16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(run + 16 * k)));
  } else if constexpr (Kind == StorageKind::bf16) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(run + 16 * k)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  } else {
    static_assert(Kind == StorageKind::int8 || Kind == StorageKind::q8_0, "fp8 and packed codes have their own loads");
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(run + 8 * k))));
  }
}

// The fp8 loads give E4M3 values times 2^-8: the factor that makes them exact.
template <StorageKind Kind>
inline constexpr float load_scale = Kind == StorageKind::fp8_e4m3 ? 256.0f : 1.0f;

// The codes of a run of 4- or 2-bit codes, a byte's worth of tokens at a time: one load and widening of
// 8 bytes yields the codes of 16 tokens (4-bit: token t and t + 64 share byte t mod 64) or 32 tokens
// (2-bit: tokens t, t + 32, t + 64, t + 96 share byte t mod 32), so the conversion is paid once per byte
// rather than once per code (measured: bench/README.md). `codes[p]` are the tokens of field p of bytes
// [8k, 8k + 8).
template <StorageKind Kind>
inline constexpr int fields_per_byte = Kind == StorageKind::int2 ? 4 : 2;

template <StorageKind Kind>
inline void load_packed_codes(const std::uint8_t* run, Index k, __m256* codes) {
  const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(run + 8 * k)));
  if constexpr (Kind == StorageKind::int2) {
    const __m256i mask = _mm256_set1_epi32(0x03);
    codes[0] = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, mask));
    codes[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(bytes, 2), mask));
    codes[2] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(bytes, 4), mask));
    codes[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 6));  // the top field needs no mask
  } else {
    codes[0] = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(0x0f)));
    codes[1] = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
  }
}

// Sixteen fp8 codes of a run, tokens [16k, 16k + 16), as two vectors of 8 floats: each code is moved
// into the high byte of a 16-bit lane by one unpack, which for E5M2 already is the float16 pattern and
// for E4M3 becomes it after an arithmetic shift (sign into bits 15 and 14) and clearing bit 14: the value
// times 2^-8 (see load_scale).
template <StorageKind Kind>
inline void load_fp8_codes16(const std::uint8_t* run, Index k, __m256* codes) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(run + 16 * k));
  __m128i halves[2] = {_mm_unpacklo_epi8(_mm_setzero_si128(), bytes), _mm_unpackhi_epi8(_mm_setzero_si128(), bytes)};
  for (int i = 0; i < 2; ++i) {
    if constexpr (Kind == StorageKind::fp8_e4m3) {
      halves[i] = _mm_and_si128(_mm_srai_epi16(halves[i], 1), _mm_set1_epi16(static_cast<short>(0xbfff)));
    }
    codes[i] = _mm256_cvtph_ps(halves[i]);
  }
}

// raw[t] = sum over elements j in [first, last) of query[j] * code_j(t), for the block's tokens t.
template <StorageKind Kind>
inline void score_elements(const std::uint8_t* block, const BlockLayout& layout, const float* query, Index first,
                           Index last, float* raw, Index next_block) {
  // Elements [first, last) lie in one scale group: their runs follow one another (run_offset divides).
  const std::uint8_t* runs = block + layout.run_offset(first);
  // Eight accumulators cover 64 tokens: two passes over the elements, their runs still in L1.
  for (Index half = 0; half < 2; ++half) {
    __m256 acc[8];
    for (__m256& a : acc) a = _mm256_setzero_ps();
    for (Index j = first; j < last; ++j) {
      const std::uint8_t* run = runs + (j - first) * layout.run_bytes;
      if (half == 0) prefetch_run(run + next_block, layout.run_bytes);
      const __m256 q = _mm256_set1_ps(query[j] * load_scale<Kind>);
      if constexpr (packed_kind<Kind>) {
        // Pass `half` reads 64 / fields bytes: 4-bit, bytes [32 half, 32 half + 32) hold tokens
        // 32 half + [0, 32) and 64 + 32 half + [0, 32); 2-bit, bytes [16 half, 16 half + 16) hold
        // 16 half + 32 p + [0, 16) for p = 0..3.
        constexpr int fields = fields_per_byte<Kind>;
        constexpr Index loads = 8 / fields;
        for (Index k = 0; k < loads; ++k) {
          __m256 codes[fields];
          load_packed_codes<Kind>(run, loads * half + k, codes);
          for (int p = 0; p < fields; ++p) acc[p * loads + k] = _mm256_fmadd_ps(q, codes[p], acc[p * loads + k]);
        }
      } else if constexpr (Kind == StorageKind::fp8_e4m3 || Kind == StorageKind::fp8_e5m2) {
        for (Index k = 0; k < 4; ++k) {
          __m256 codes[2];
          load_fp8_codes16<Kind>(run, 4 * half + k, codes);
          acc[2 * k] = _mm256_fmadd_ps(q, codes[0], acc[2 * k]);
          acc[2 * k + 1] = _mm256_fmadd_ps(q, codes[1], acc[2 * k + 1]);
        }
      } else {
        for (Index k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(q, load_codes8<Kind>(run, 8 * half + k), acc[k]);
      }
    }
    if constexpr (packed_kind<Kind>) {
      constexpr int fields = fields_per_byte<Kind>;
      constexpr Index loads = 8 / fields, field_tokens = block_rows / fields;
      for (int p = 0; p < fields; ++p) {
        for (Index k = 0; k < loads; ++k) _mm256_storeu_ps(raw + p * field_tokens + 8 * (loads * half + k), acc[p * loads + k]);
      }
    } else {
      for (Index k = 0; k < 8; ++k) _mm256_storeu_ps(raw + 64 * half + 8 * k, acc[k]);
    }
  }
}

// acc[j] += sum over the block's tokens t of weights[t] * code_j(t), for elements j in [first, last).
template <StorageKind Kind>
inline void accumulate_elements(const std::uint8_t* block, const BlockLayout& layout, const float* weights, Index first,
                                Index last, float* acc, Index next_block) {
  // Elements [first, last) lie in one scale group: their runs follow one another (run_offset divides).
  const std::uint8_t* runs = block + layout.run_offset(first);
  for (Index j = first; j < last; ++j) {
    const std::uint8_t* run = runs + (j - first) * layout.run_bytes;
    prefetch_run(run + next_block, layout.run_bytes);
    __m256 partial[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    if constexpr (packed_kind<Kind>) {
      constexpr int fields = fields_per_byte<Kind>;
      constexpr Index loads = 16 / fields, field_tokens = block_rows / fields;
      for (Index k = 0; k < loads; ++k) {
        __m256 codes[fields];
        load_packed_codes<Kind>(run, k, codes);
        for (int p = 0; p < fields; ++p) {
          const Index slot = (p * loads + k) % 4;
          partial[slot] = _mm256_fmadd_ps(_mm256_loadu_ps(weights + p * field_tokens + 8 * k), codes[p], partial[slot]);
        }
      }
    } else if constexpr (Kind == StorageKind::fp8_e4m3 || Kind == StorageKind::fp8_e5m2) {
      for (Index k = 0; k < 8; ++k) {
        __m256 codes[2];
        load_fp8_codes16<Kind>(run, k, codes);
        partial[(2 * k) % 4] = _mm256_fmadd_ps(_mm256_loadu_ps(weights + 16 * k), codes[0], partial[(2 * k) % 4]);
        partial[(2 * k + 1) % 4] = _mm256_fmadd_ps(_mm256_loadu_ps(weights + 16 * k + 8), codes[1], partial[(2 * k + 1) % 4]);
      }
    } else {
      for (Index k = 0; k < 16; ++k) {
        partial[k % 4] = _mm256_fmadd_ps(_mm256_loadu_ps(weights + 8 * k), load_codes8<Kind>(run, k), partial[k % 4]);
      }
    }
    const __m256 sum = _mm256_add_ps(_mm256_add_ps(partial[0], partial[1]), _mm256_add_ps(partial[2], partial[3]));
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
    acc[j] += load_scale<Kind> * _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
  }
}
#endif

// ------------------------------------------------------------------------------------------------
// Integer dot products for 4- and 2-bit codes (DecodeArithmetic::int8_dot_products)
//
// The float path converts every code to float before its multiply-add, so a 4- or 2-bit cache is bound
// by that conversion, not by its bytes (bench/README.md). Here the float operand is quantized to int8
// instead and the codes are multiplied in integers, 32 at a time (AVX2: _mm256_maddubs_epi16, as in
// llama.cpp's q4_0 x q8_0 dot products; with AVX-512 BW + VNNI, _mm512_dpbusd_epi32, 64 at a time):
//   keys    per scale group g of the query's elements: d = max|q_e| / 127, q8_e = round(q_e * (127 /
//           max|q_e|)); the group adds scale_t * d * sum_e q8_e c_e(t) + offset_t * d * sum_e q8_e to the
//           score of token t: the dot product of the quantized query with the stored key;
//   values  per block of 128 tokens and group: w_t = p_t * scale_t, d = max|w_t| / 127, w8_t = round(w_t *
//           (127 / max|w_t|)); acc_e += d * sum_t w8_t c_e(t) + sum_t p_t offset_t (that term in float).
// round is to nearest, ties to even (the default rounding mode); an operand group whose largest
// magnitude is below integer_operand_floor (2^-119) counts as zero. Integer sums are exact: the
// portable path computes the same integers as the AVX2 one.
// The kernels prefetch the next block as they go (`next_block`, see streams_next_block).

// Below this largest magnitude 127 / max would overflow float: the operand is treated as zero.
inline constexpr float integer_operand_floor = std::numeric_limits<float>::min() * 128.0f;

// x (count floats) as int8 codes with x_i ~ d * codes_i; returns d, or 0 (codes all 0) for a zero group.
inline float quantize_to_int8(const float* x, Index count, std::int8_t* codes) {
  // Vectorized (a scalar running maximum was a chain of dependent instructions); a maximum is exact in
  // any order.
  const float largest = Eigen::Map<const Eigen::ArrayXf>(x, count).abs().maxCoeff();
  if (!(largest >= integer_operand_floor)) {
    std::fill(codes, codes + count, std::int8_t{0});
    return 0.0f;
  }
  const float inverse = 127.0f / largest;
  Index i = 0;
#ifdef __AVX2__
  // cvtps rounds by the current mode, as nearbyint does: the same codes as the loop below.
  for (; i + 32 <= count; i += 32) {
    __m256i words[4];
    for (int k = 0; k < 4; ++k) words[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * k), _mm256_set1_ps(inverse)));
    // The packs interleave 128-bit lanes; the permutation puts the 32 codes back in order.
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(words[0], words[1]), _mm256_packs_epi32(words[2], words[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i),
                        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
#endif
  // The rest, through pointers: indexing x[i] from the vector loop's i, GCC 12 at -O2 warned
  // (-Waggressive-loop-optimizations) about iterations that cannot happen once a fixed-size array is inlined.
  const float* rest = x + i;
  std::int8_t* rest_codes = codes + i;
  for (Index k = 0; k < count - i; ++k) {
    rest_codes[k] = static_cast<std::int8_t>(std::clamp(std::nearbyint(rest[k] * inverse), -127.0f, 127.0f));
  }
  return largest / 127.0f;
}

// Code of token t in a run of 4- or 2-bit codes (the layout store_token writes).
template <StorageKind Kind>
inline int packed_code(const std::uint8_t* run, Index t) {
  if constexpr (Kind == StorageKind::int2) {
    return (run[t % 32] >> (2 * (t / 32))) & 0x03;
  } else {
    return t < 64 ? run[t] & 0x0f : run[t - 64] >> 4;
  }
}

#ifdef __AVX2__
// Tokens [32 v, 32 v + 32) of half `half` of a run as bytes: 4-bit, bytes [32 half, 32 half + 32) hold
// tokens 32 half + i (low nibble, v = 0) and 64 + 32 half + i (high, v = 1); 2-bit, the run's 32 bytes
// hold tokens 64 half + i (bits 4 half, v = 0) and 64 half + 32 + i (bits 4 half + 2, v = 1).
template <StorageKind Kind>
inline void load_packed_bytes(const std::uint8_t* run, Index half, __m256i* codes) {
  if constexpr (Kind == StorageKind::int2) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(run));
    const __m256i mask = _mm256_set1_epi8(0x03);
    const __m128i low = _mm_cvtsi32_si128(static_cast<int>(4 * half)), high = _mm_cvtsi32_si128(static_cast<int>(4 * half + 2));
    codes[0] = _mm256_and_si256(_mm256_srl_epi16(bytes, low), mask);
    codes[1] = _mm256_and_si256(_mm256_srl_epi16(bytes, high), mask);
  } else {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(run + 32 * half));
    const __m256i mask = _mm256_set1_epi8(0x0f);
    codes[0] = _mm256_and_si256(bytes, mask);
    codes[1] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
  }
}
#endif

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
// AVX-512 with VNNI: vpdpbusd multiplies four unsigned codes by four signed int8 operands and adds the
// products to a 32-bit sum in one instruction (no 16-bit sums to widen), 64 bytes at a time: one
// register holds a whole 4-bit run of a block (128 tokens) or two copies of a 2-bit run.
inline constexpr bool integer_kernels_avx512 = true;

// A run's bytes for split_codes: the 64 bytes of a 4-bit run; a 2-bit run's 32 bytes in both halves.
template <StorageKind Kind>
inline __m512i load_run(const std::uint8_t* run) {
  if constexpr (Kind == StorageKind::int2) {
    return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(run)));
  } else {
    return _mm512_loadu_si512(run);
  }
}

// One code per byte from bytes as load_run gives them: the code at byte position p of codes[0] is token
// p's, of codes[1] token 64 + p's. 4-bit: run byte p holds tokens p (low nibble) and 64 + p (high).
// 2-bit: run byte i holds tokens i, 32 + i, 64 + i, 96 + i (bits 0, 2, 4, 6); the register's lower half
// takes fields 0 and 2, its upper half (p = 32 + i) fields 1 and 3. The same holds for bytes that
// unpacks have moved within their 128-bit lane, as long as the lane keeps its half.
template <StorageKind Kind>
inline void split_codes(__m512i bytes, __m512i* codes) {
  if constexpr (Kind == StorageKind::int2) {
    const __m512i mask = _mm512_set1_epi8(0x03);
    const auto shifts = [](short lower, short upper) {
      return _mm512_inserti64x4(_mm512_set1_epi16(lower), _mm256_set1_epi16(upper), 1);
    };
    codes[0] = _mm512_and_si512(_mm512_srlv_epi16(bytes, shifts(0, 2)), mask);
    codes[1] = _mm512_and_si512(_mm512_srlv_epi16(bytes, shifts(4, 6)), mask);
  } else {
    const __m512i mask = _mm512_set1_epi8(0x0f);
    codes[0] = _mm512_and_si512(bytes, mask);
    codes[1] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), mask);
  }
}

// raw[t] = sum over the `count` elements e of q8[e] * code_e(t), runs `run_bytes` apart from `runs`.
template <StorageKind Kind>
inline void integer_scores_avx512(const std::uint8_t* runs, Index run_bytes, const std::int8_t* q8, Index count,
                                  std::int32_t* raw, Index next_block) {
  // Four elements at a time: their run bytes interleaved (two unpacks of bytes, then of 16-bit pairs) so
  // that each 32-bit lane holds the four elements' bytes of one position p, then split into codes: one
  // vpdpbusd per split adds the four products of a token. sums[v][k], 32-bit lane i of 128-bit lane L:
  // token 64 v + 16 L + 4 k + i.
  __m512i sums[2][4];
  for (auto& split : sums) {
    for (__m512i& s : split) s = _mm512_setzero_si512();
  }
  // The packed formats' groups are multiples of 4 elements (StorageFormat checks their block sizes).
  for (Index e = 0; e < count; e += 4) {
    __m512i bytes[4];
    for (Index i = 0; i < 4; ++i) prefetch_line(runs + (e + i) * run_bytes + next_block);
    for (Index i = 0; i < 4; ++i) bytes[i] = load_run<Kind>(runs + (e + i) * run_bytes);
    std::int32_t operands = 0;
    std::memcpy(&operands, q8 + e, 4);  // byte i of each lane weighs element e + i (little-endian)
    const __m512i weights = _mm512_set1_epi32(operands);
    const __m512i low01 = _mm512_unpacklo_epi8(bytes[0], bytes[1]), high01 = _mm512_unpackhi_epi8(bytes[0], bytes[1]);
    const __m512i low23 = _mm512_unpacklo_epi8(bytes[2], bytes[3]), high23 = _mm512_unpackhi_epi8(bytes[2], bytes[3]);
    const __m512i quads[4] = {_mm512_unpacklo_epi16(low01, low23), _mm512_unpackhi_epi16(low01, low23),
                              _mm512_unpacklo_epi16(high01, high23), _mm512_unpackhi_epi16(high01, high23)};
    for (int k = 0; k < 4; ++k) {
      __m512i codes[2];
      split_codes<Kind>(quads[k], codes);
      sums[0][k] = _mm512_dpbusd_epi32(sums[0][k], codes[0], weights);
      sums[1][k] = _mm512_dpbusd_epi32(sums[1][k], codes[1], weights);
    }
  }
  // Transposing the 4 x 4 grid of 128-bit lanes puts tokens 64 v + 16 L + [0, 16) in register L.
  for (int v = 0; v < 2; ++v) {
    const __m512i* s = sums[v];
    const __m512i low01 = _mm512_shuffle_i32x4(s[0], s[1], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i low23 = _mm512_shuffle_i32x4(s[2], s[3], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i high01 = _mm512_shuffle_i32x4(s[0], s[1], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i high23 = _mm512_shuffle_i32x4(s[2], s[3], _MM_SHUFFLE(3, 2, 3, 2));
    std::int32_t* out = raw + 64 * v;
    _mm512_storeu_si512(out, _mm512_shuffle_i32x4(low01, low23, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_si512(out + 16, _mm512_shuffle_i32x4(low01, low23, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_si512(out + 32, _mm512_shuffle_i32x4(high01, high23, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_si512(out + 48, _mm512_shuffle_i32x4(high01, high23, _MM_SHUFFLE(3, 1, 3, 1)));
  }
}

// Sixteen vectors of 32-bit sums reduced to one: lane i the total of sums[i] (a transposing tree of adds).
inline __m512i horizontal_sums16(const __m512i* sums) {
  __m512i pairs[8], quads[4], halves[2];
  for (int i = 0; i < 8; ++i) {  // each 128-bit lane: [a, b, a, b] partials of elements 2i, 2i + 1
    pairs[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(sums[2 * i], sums[2 * i + 1]),
                                _mm512_unpackhi_epi32(sums[2 * i], sums[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // each 128-bit lane: elements 4i .. 4i + 3, that lane's share
    quads[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(pairs[2 * i], pairs[2 * i + 1]),
                                _mm512_unpackhi_epi64(pairs[2 * i], pairs[2 * i + 1]));
  }
  for (int i = 0; i < 2; ++i) {  // lanes: quads 2i's lanes 0 + 1 and 2 + 3, then quads 2i + 1's
    halves[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_i32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  return _mm512_add_epi32(_mm512_shuffle_i32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_i32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// sums[e] = sum over the block's tokens t of w8[t] * code_e(t), for the `count` elements e.
template <StorageKind Kind>
inline void integer_sums_avx512(const std::uint8_t* runs, Index run_bytes, const std::int8_t* w8, Index count,
                                std::int32_t* sums, Index next_block) {
  // split_codes gives tokens in order: a run's codes meet the weights of tokens [0, 64) and [64, 128).
  const __m512i weights[2] = {_mm512_loadu_si512(w8), _mm512_loadu_si512(w8 + 64)};
  const auto partial = [&](Index e) {
    __m512i codes[2];
    split_codes<Kind>(load_run<Kind>(runs + e * run_bytes), codes);
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[0], weights[0]), codes[1], weights[1]);
  };
  Index e = 0;
  for (; e + 16 <= count; e += 16) {
    __m512i partials[16];
    for (int i = 0; i < 16; ++i) prefetch_line(runs + (e + i) * run_bytes + next_block);
    for (int i = 0; i < 16; ++i) partials[i] = partial(e + i);
    _mm512_storeu_si512(sums + e, horizontal_sums16(partials));
  }
  for (; e < count; ++e) {
    prefetch_line(runs + e * run_bytes + next_block);
    sums[e] = _mm512_reduce_add_epi32(partial(e));
  }
}
#else
inline constexpr bool integer_kernels_avx512 = false;
#endif

// raw[t] = sum over elements j in [first, last) of q8[j - first] * code_j(t), for the block's tokens t.
template <StorageKind Kind>
inline void integer_scores(const std::uint8_t* block, const BlockLayout& layout, const std::int8_t* q8, Index first,
                           Index last, std::int32_t* raw, Index next_block) {
  // Elements [first, last) lie in one scale group: their runs follow one another (run_offset divides).
  const std::uint8_t* runs = block + layout.run_offset(first);
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
  integer_scores_avx512<Kind>(runs, layout.run_bytes, q8, last - first, raw, next_block);
#elif defined(__AVX2__)
  // Elements go in pairs: their codes interleaved byte by byte, one maddubs gives per token
  // c_j(t) q8_j + c_j+1(t) q8_j+1 in 16 bits, at most 2 * 15 * 127 (4-bit) or 2 * 3 * 127 (2-bit); the
  // 16-bit sums take this many pairs before they are widened into 32-bit ones.
  constexpr int pairs_per_widening = Kind == StorageKind::int2 ? 32 : 8;
  for (Index half = 0; half < 2; ++half) {
    const Index base[2] = {Kind == StorageKind::int2 ? 64 * half : 32 * half,
                           Kind == StorageKind::int2 ? 64 * half + 32 : 64 + 32 * half};
    // sums32[4 v + 2 p + h]: tokens base[v] + 16 p + 8 h + [0, 8) (unpacklo gives h = 0, unpackhi h = 1;
    // p the 128-bit lane).
    __m256i sums32[8], sums16[4];
    for (__m256i& s : sums32) s = _mm256_setzero_si256();
    for (__m256i& s : sums16) s = _mm256_setzero_si256();
    const auto widen = [&] {
      for (int v = 0; v < 2; ++v) {
        for (int h = 0; h < 2; ++h) {
          const __m256i s = sums16[2 * v + h];
          sums32[4 * v + h] = _mm256_add_epi32(sums32[4 * v + h], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s)));
          sums32[4 * v + 2 + h] = _mm256_add_epi32(sums32[4 * v + 2 + h], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s, 1)));
          sums16[2 * v + h] = _mm256_setzero_si256();
        }
      }
    };
    int pending = 0;
    for (Index j = first; j < last; j += 2) {
      const bool pair = j + 1 < last;
      __m256i a[2], b[2];
      if (half == 0) {
        prefetch_line(runs + (j - first) * layout.run_bytes + next_block);
        prefetch_line(runs + ((pair ? j + 1 : j) - first) * layout.run_bytes + next_block);
      }
      load_packed_bytes<Kind>(runs + (j - first) * layout.run_bytes, half, a);
      // An odd last element is paired with itself at weight zero.
      load_packed_bytes<Kind>(runs + ((pair ? j + 1 : j) - first) * layout.run_bytes, half, b);
      // Byte 2i of every 16-bit lane weighs element j, byte 2i + 1 element j + 1: on x86 (little-endian)
      // the two codes as they lie in memory.
      std::int16_t weight_pair = 0;
      if (pair) {
        std::memcpy(&weight_pair, q8 + (j - first), 2);
      } else {
        weight_pair = static_cast<std::uint8_t>(q8[j - first]);
      }
      const __m256i weights = _mm256_set1_epi16(weight_pair);
      for (int v = 0; v < 2; ++v) {
        sums16[2 * v] = _mm256_add_epi16(sums16[2 * v], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(a[v], b[v]), weights));
        sums16[2 * v + 1] = _mm256_add_epi16(sums16[2 * v + 1], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(a[v], b[v]), weights));
      }
      if (++pending == pairs_per_widening) {
        widen();
        pending = 0;
      }
    }
    widen();
    for (int v = 0; v < 2; ++v) {
      for (int k = 0; k < 4; ++k) _mm256_storeu_si256(reinterpret_cast<__m256i*>(raw + base[v] + 8 * k), sums32[4 * v + k]);
    }
  }
#else
  std::fill(raw, raw + block_rows, 0);
  for (Index j = first; j < last; ++j) {
    const std::uint8_t* run = runs + (j - first) * layout.run_bytes;
    prefetch_line(run + next_block);
    const int weight = q8[j - first];
    for (Index t = 0; t < block_rows; ++t) raw[t] += weight * packed_code<Kind>(run, t);
  }
#endif
}

// sums[j - first] = sum over the block's tokens t of w8[t] * code_j(t), for elements j in [first, last).
template <StorageKind Kind>
inline void integer_sums(const std::uint8_t* block, const BlockLayout& layout, const std::int8_t* w8, Index first,
                         Index last, std::int32_t* sums, Index next_block) {
  // Elements [first, last) lie in one scale group: their runs follow one another (run_offset divides).
  const std::uint8_t* runs = block + layout.run_offset(first);
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
  integer_sums_avx512<Kind>(runs, layout.run_bytes, w8, last - first, sums, next_block);
#elif defined(__AVX2__)
  __m256i weights[4];
  for (int k = 0; k < 4; ++k) weights[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w8 + 32 * k));
  // Per element, 8 32-bit partial sums: four maddubs of 32 tokens (each 16-bit lane at most 2 * 15 *
  // 127, four of them 15240, inside int16), widened in pairs by madd with ones.
  const auto partial = [&](Index j) {
    const std::uint8_t* run = runs + (j - first) * layout.run_bytes;
    __m256i low[2], high[2];
    load_packed_bytes<Kind>(run, 0, low);
    load_packed_bytes<Kind>(run, 1, high);
    // Token order: 4-bit low = tokens [0, 32) and [64, 96), high = [32, 64) and [96, 128); 2-bit low =
    // [0, 32) and [32, 64), high = [64, 96) and [96, 128).
    const int order[4] = {0, Kind == StorageKind::int2 ? 1 : 2, Kind == StorageKind::int2 ? 2 : 1, 3};
    const __m256i s = _mm256_add_epi16(
        _mm256_add_epi16(_mm256_maddubs_epi16(low[0], weights[order[0]]), _mm256_maddubs_epi16(low[1], weights[order[1]])),
        _mm256_add_epi16(_mm256_maddubs_epi16(high[0], weights[order[2]]), _mm256_maddubs_epi16(high[1], weights[order[3]])));
    return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
  };
  Index j = first;
  for (; j + 8 <= last; j += 8) {
    __m256i e[8];
    for (int i = 0; i < 8; ++i) prefetch_line(runs + (j + i - first) * layout.run_bytes + next_block);
    for (int i = 0; i < 8; ++i) e[i] = partial(j + i);
    // Horizontal adds within 128-bit lanes, then the two lanes: the 8 elements' totals in order.
    const __m256i x = _mm256_hadd_epi32(_mm256_hadd_epi32(e[0], e[1]), _mm256_hadd_epi32(e[2], e[3]));
    const __m256i y = _mm256_hadd_epi32(_mm256_hadd_epi32(e[4], e[5]), _mm256_hadd_epi32(e[6], e[7]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums + (j - first)),
                        _mm256_add_epi32(_mm256_permute2x128_si256(x, y, 0x20), _mm256_permute2x128_si256(x, y, 0x31)));
  }
  for (; j < last; ++j) {
    prefetch_line(runs + (j - first) * layout.run_bytes + next_block);
    const __m256i p = partial(j);
    const __m128i four = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
    const __m128i two = _mm_add_epi32(four, _mm_unpackhi_epi64(four, four));
    sums[j - first] = _mm_cvtsi128_si32(_mm_add_epi32(two, _mm_shuffle_epi32(two, 1)));
  }
#else
  for (Index j = first; j < last; ++j) {
    const std::uint8_t* run = runs + (j - first) * layout.run_bytes;
    prefetch_line(run + next_block);
    std::int32_t sum = 0;
    for (Index t = 0; t < block_rows; ++t) sum += w8[t] * packed_code<Kind>(run, t);
    sums[j - first] = sum;
  }
#endif
}

// Elements converted at a time in the decode strategy: 32 runs of a block are 16 KiB of float, so that
// the chunk, the scores and the weights stay in a 32 KiB L1 data cache.
inline constexpr Index chunk_elements = 32;

// Scratch of one thread for blocked sides: a chunk of converted runs, a group's scales and offsets,
// per-query raw scores of a group and scaled weights.
struct BlockScratch {
  alignas(64) float chunk[block_rows * chunk_elements];
  alignas(64) float scale[block_rows];
  alignas(64) float offset[block_rows];
  Eigen::MatrixXf raw;  // block_rows x queries
  // Integer dot products: the queries as int8 codes (m x width) with per query and group the step and
  // the codes' sum, set by BlockedKeys::prepare for the call; the weights of a group as int8 codes; a
  // group's integer sums.
  std::vector<std::int8_t> query_codes;
  std::vector<float> query_steps;
  std::vector<std::int32_t> query_code_sums;
  std::vector<std::int8_t> operand_codes;
  std::vector<std::int32_t> integer_results;
  bool next_block_follows = false;  // the task reads the block after this one (see streams_next_block)

  // The kernels' `next_block` for a side of this layout: the distance to the next block, 0 when none.
  Index next_block(const BlockLayout& layout) const { return next_block_follows ? layout.block_bytes : 0; }

  void reserve_integer(Index count) {
    if (static_cast<Index>(operand_codes.size()) < count) {
      operand_codes.resize(static_cast<std::size_t>(count));
      integer_results.resize(static_cast<std::size_t>(count));
    }
  }
};

// Runs [first, first + count) of a block as float codes, column-major (block_rows x count): the values
// for float formats, the integer codes for the others. For f32 the block itself, converted nothing.
template <StorageKind Kind>
const float* chunk_codes(const std::uint8_t* block, const BlockLayout& layout, Index first, Index count, float* buffer) {
  if constexpr (Kind == StorageKind::f32) {
    // The runs of an f32 side are consecutive: the block is a column-major block_rows x width matrix.
    return reinterpret_cast<const float*>(block + layout.run_offset(first));
  } else {
    for (Index j = 0; j < count; ++j) run_codes<Kind>(block + layout.run_offset(first + j), buffer + j * block_rows);
    return buffer;
  }
}

using ConstChunk = Eigen::Map<const Eigen::MatrixXf>;

// Block b of a side as float values, column-major (block_rows x width) into `buffer`.
template <StorageKind Kind>
void expand_block(const BlockedSide& side, Index b, float* buffer) {
  const std::uint8_t* block = side.block(b);
  const BlockLayout& layout = side.layout;
  alignas(64) float scale[block_rows], offset[block_rows];
  for (Index g = 0; g < layout.groups(); ++g) {
    if constexpr (scaled_kind(Kind)) group_scale<Kind>(block, layout, g, scale, offset);
    for (Index j = g * layout.group; j < (g + 1) * layout.group; ++j) {
      float* column = buffer + j * block_rows;
      const float* codes = run_codes<Kind>(block + layout.run_offset(j), column);
      if constexpr (offset_kind(Kind)) {
        LaneMap{column} = ConstLaneMap(scale) * ConstLaneMap(codes) + ConstLaneMap(offset);
      } else if constexpr (scaled_kind(Kind)) {
        LaneMap{column} = ConstLaneMap(scale) * ConstLaneMap(codes);
      } else if (codes != column) {
        std::memcpy(column, codes, sizeof(float) * block_rows);
      }
    }
  }
}

// Asks for block b of a side to be brought into the cache while the current block is computed on. A
// decode reads each block once, in order, but a block spans several 4 KiB pages, where the hardware's
// stream prefetchers stop; without this, memory and arithmetic took turns (bench/README.md).
inline void prefetch_block(const BlockedSide& side, Index b) {
  prefetch_run(side.block(b), side.layout.block_bytes);
}

// Whether a decode step's kernels prefetch the next block themselves: the integer ones, and the AVX2
// ones for a single query; the others are given prefetch_block. Those kernels take `next_block`, the
// distance in bytes to the block the task reads next (0: none), and ask for the next block's line at
// the same place as each line they read. Asking for a whole block at once stalls the core once its
// line-fill buffers are full, until the block has all but arrived: where a block's arithmetic takes
// about as long as its bytes (4- and 2-bit codes, 8-bit codes widened to float), memory and arithmetic
// then took turns; one line at a time they overlap (bench/README.md).
constexpr bool streams_next_block(StorageKind kind, bool integer_dot_products, [[maybe_unused]] Index queries) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  if (queries == 1) return true;
#endif
  return int8_dot_products_apply(kind) && integer_dot_products;
}

// The scales and minimums of group g of the block `next_block` bytes after `block`.
inline void prefetch_group_side(const std::uint8_t* block, const BlockLayout& layout, Index g, Index next_block) {
  prefetch_run(block + layout.scale_offset(g) + next_block, layout.side_bytes);
}

template <StorageKind Kind>
struct BlockedKeys {
  static constexpr Index tile_rows = block_rows;
  static constexpr bool decodes = true;
  BlockedSide side;
  // Decode strategy on 4- and 2-bit codes: integer dot products with the query quantized to int8.
  bool integer_dot_products = false;
  // Whether score() asks for the next block itself, line by line as it reads this one: the integer
  // kernels and, for one query, the AVX2 ones.
  bool prefetches_next_block(Index queries) const { return streams_next_block(Kind, integer_dot_products, queries); }

  Index width() const { return side.layout.width; }
  Index size() const { return side.rows; }

  // Decode strategy: scores of `queries` (m x width) against block first / block_rows, all of its
  // block_rows lanes (the caller masks the rows it does not use); `scores` holds block_rows per query.
  // A chunk of runs is converted once and multiplied by every query: vertical multiply-adds.
  void score(Index first, Index count, const RowMatrix<float>& queries, float* scores, BlockScratch& scratch) const {
    if constexpr (int8_dot_products_apply(Kind)) {
      if (integer_dot_products) return integer_score(first, queries, scores, scratch);
    }
    static_cast<void>(count);
    const std::uint8_t* block = side.block(first / block_rows);
    const BlockLayout& layout = side.layout;
    const Index m = queries.rows();
    [[maybe_unused]] const Index next_block = scratch.next_block(layout);
    Eigen::Map<Eigen::MatrixXf> all_scores(scores, block_rows, m);
    all_scores.setZero();
    // Unscaled formats: one group of the whole row, no scale to apply.
    const Index group = scaled_kind(Kind) ? layout.group : layout.width;
    if (scaled_kind(Kind)) scratch.raw.resize(block_rows, m);
    for (Index g = 0; g * group < layout.width; ++g) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
      if (m == 1) {
        float* target = scaled_kind(Kind) ? scratch.raw.data() : scratch.chunk;
        prefetch_group_side(block, layout, g, next_block);
        score_elements<Kind>(block, layout, queries.data(), g * group, (g + 1) * group, target, next_block);
        if constexpr (!scaled_kind(Kind)) LaneMap{scores} += ConstLaneMap(target);
      } else
#endif
      {
      Eigen::Map<Eigen::MatrixXf> target = scaled_kind(Kind) ? Eigen::Map<Eigen::MatrixXf>(scratch.raw.data(), block_rows, m)
                                                             : all_scores;
      if (scaled_kind(Kind)) target.setZero();
      for (Index first_element = g * group; first_element < (g + 1) * group; first_element += chunk_elements) {
        const Index count = std::min(chunk_elements, (g + 1) * group - first_element);
        const ConstChunk codes(chunk_codes<Kind>(block, layout, first_element, count, scratch.chunk), block_rows, count);
        if (m == 1) {
          target.col(0).noalias() += codes * queries.row(0).segment(first_element, count).transpose();
        } else {
          target.noalias() += codes * queries.middleCols(first_element, count).transpose();
        }
      }
      }
      if constexpr (scaled_kind(Kind)) {
        group_scale<Kind>(block, layout, g, scratch.scale, scratch.offset);
        for (Index q = 0; q < m; ++q) {
          LaneMap column(scores + q * block_rows);
          column += ConstLaneMap(scratch.scale) * ConstLaneMap(&scratch.raw(0, q));
          if constexpr (offset_kind(Kind)) {
            column += ConstLaneMap(scratch.offset) * queries.row(q).segment(g * group, group).sum();
          }
        }
      }
    }
  }

  // Before the decode strategy's first block: with integer dot products, the queries quantized once for
  // every block of the task (one per 2048 tokens: m <= 16 rows of d, small next to the task's blocks).
  void prepare(const RowMatrix<float>& queries, BlockScratch& scratch) const {
    if (!int8_dot_products_apply(Kind) || !integer_dot_products) return;
    const Index m = queries.rows(), width = side.layout.width, group = side.layout.group, groups = side.layout.groups();
    scratch.query_codes.resize(static_cast<std::size_t>(m * width));
    scratch.query_steps.resize(static_cast<std::size_t>(m * groups));
    scratch.query_code_sums.resize(static_cast<std::size_t>(m * groups));
    for (Index q = 0; q < m; ++q) {
      for (Index g = 0; g < groups; ++g) {
        std::int8_t* codes = scratch.query_codes.data() + q * width + g * group;
        const auto at = static_cast<std::size_t>(q * groups + g);
        scratch.query_steps[at] = quantize_to_int8(&queries(q, g * group), group, codes);
        scratch.query_code_sums[at] = std::accumulate(codes, codes + group, std::int32_t{0});
      }
    }
  }

  // score() with integer dot products (see integer_scores), one query at a time.
  void integer_score(Index first, const RowMatrix<float>& queries, float* scores, BlockScratch& scratch) const {
    const std::uint8_t* block = side.block(first / block_rows);
    const BlockLayout& layout = side.layout;
    const Index group = layout.group, groups = layout.groups(), m = queries.rows();
    scratch.reserve_integer(block_rows);
    std::int32_t* raw = scratch.integer_results.data();
    const Index next_block = scratch.next_block(layout);
    Eigen::Map<Eigen::MatrixXf>(scores, block_rows, m).setZero();
    for (Index g = 0; g < groups; ++g) {
      prefetch_group_side(block, layout, g, next_block);
      group_scale<Kind>(block, layout, g, scratch.scale, scratch.offset);
      for (Index q = 0; q < m; ++q) {
        const auto at = static_cast<std::size_t>(q * groups + g);
        const float step = scratch.query_steps[at];
        if (step == 0.0f) continue;
        integer_scores<Kind>(block, layout, scratch.query_codes.data() + q * layout.width + g * group, g * group,
                             (g + 1) * group, raw, next_block);
        LaneMap{scores + q * block_rows} +=
            ConstLaneMap(scratch.scale) * (step * Eigen::Map<const Eigen::Array<std::int32_t, block_rows, 1>>(raw).cast<float>()) +
            ConstLaneMap(scratch.offset) * (step * static_cast<float>(scratch.query_code_sums[at]));
      }
    }
  }

  // Tile strategy: the block expanded to float, column-major (block_rows x width).
  StridedFloatColumns tile(Index first, Index count, float* buffer) const {
    expand_block<Kind>(side, first / block_rows, buffer);
    return StridedFloatColumns(buffer, count, width(), Eigen::OuterStride<>(block_rows));
  }
  Index tile_buffer_floats() const { return block_rows * width(); }
  // The decode strategy converts into the thread's BlockScratch.
  Index decode_buffer_floats() const { return 0; }
};

template <StorageKind Kind>
struct BlockedValues {
  static constexpr Index tile_rows = block_rows;
  BlockedSide side;
  // Decode strategy on 4- and 2-bit codes: integer dot products with the weights quantized to int8.
  bool integer_dot_products = false;
  bool prefetches_next_block(Index queries) const { return streams_next_block(Kind, integer_dot_products, queries); }

  Index width() const { return side.layout.width; }

  // Decode strategy: acc.row(q) += sum_i weights(q, i) row(i) over the block's lanes (weights of rows
  // the caller does not use are 0): per chunk of runs, a transposed matrix-vector product (the column
  // dot products interleaved, their reductions overlapping), with the group's scales folded into the
  // weights.
  void accumulate(Index first, Index /*count*/, const float* weights, RowMatrix<float>& acc, BlockScratch& scratch) const {
    if constexpr (int8_dot_products_apply(Kind)) {
      if (integer_dot_products) return integer_accumulate(first, weights, acc, scratch);
    }
    const std::uint8_t* block = side.block(first / block_rows);
    const BlockLayout& layout = side.layout;
    const Index m = acc.rows();
    [[maybe_unused]] const Index next_block = scratch.next_block(layout);
    const Index group = scaled_kind(Kind) ? layout.group : layout.width;
    if (scaled_kind(Kind)) scratch.raw.resize(block_rows, m);
    for (Index g = 0; g * group < layout.width; ++g) {
      if constexpr (scaled_kind(Kind)) {
        group_scale<Kind>(block, layout, g, scratch.scale, scratch.offset);
        for (Index q = 0; q < m; ++q) {
          LaneMap{&scratch.raw(0, q)} = ConstLaneMap(weights + q * block_rows) * ConstLaneMap(scratch.scale);
          if constexpr (offset_kind(Kind)) {
            acc.row(q).segment(g * group, group).array() +=
                (ConstLaneMap(weights + q * block_rows) * ConstLaneMap(scratch.offset)).sum();
          }
        }
      }
      const Eigen::Map<const Eigen::MatrixXf> scaled_weights(scaled_kind(Kind) ? scratch.raw.data() : weights, block_rows, m);
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
      if (m == 1) {
        prefetch_group_side(block, layout, g, next_block);
        accumulate_elements<Kind>(block, layout, scaled_weights.data(), g * group, (g + 1) * group, acc.data(), next_block);
        continue;
      }
#endif
      for (Index first_element = g * group; first_element < (g + 1) * group; first_element += chunk_elements) {
        const Index count = std::min(chunk_elements, (g + 1) * group - first_element);
        const ConstChunk codes(chunk_codes<Kind>(block, layout, first_element, count, scratch.chunk), block_rows, count);
        if (m == 1) {
          acc.row(0).segment(first_element, count).noalias() += scaled_weights.col(0).transpose() * codes;
        } else {
          acc.middleCols(first_element, count).noalias() += scaled_weights.transpose() * codes;
        }
      }
    }
  }

  // accumulate() with integer dot products (see integer_sums), one query at a time.
  void integer_accumulate(Index first, const float* weights, RowMatrix<float>& acc, BlockScratch& scratch) const {
    const std::uint8_t* block = side.block(first / block_rows);
    const BlockLayout& layout = side.layout;
    const Index group = layout.group;
    scratch.reserve_integer(std::max(group, block_rows));
    alignas(64) float scaled[block_rows];
    std::int8_t* weight_codes = scratch.operand_codes.data();
    std::int32_t* sums = scratch.integer_results.data();
    const Index next_block = scratch.next_block(layout);
    for (Index g = 0; g < layout.groups(); ++g) {
      prefetch_group_side(block, layout, g, next_block);
      group_scale<Kind>(block, layout, g, scratch.scale, scratch.offset);
      for (Index q = 0; q < acc.rows(); ++q) {
        const ConstLaneMap query_weights(weights + q * block_rows);
        auto target = acc.row(q).segment(g * group, group).array();
        target += (query_weights * ConstLaneMap(scratch.offset)).sum();
        LaneMap{scaled} = query_weights * ConstLaneMap(scratch.scale);
        const float step = quantize_to_int8(scaled, block_rows, weight_codes);
        if (step == 0.0f) continue;
        integer_sums<Kind>(block, layout, weight_codes, g * group, (g + 1) * group, sums, next_block);
        target += step * Eigen::Map<const Eigen::Array<std::int32_t, 1, Eigen::Dynamic>>(sums, group).cast<float>();
      }
    }
  }

  StridedFloatColumns tile(Index first, Index count, float* buffer) const {
    expand_block<Kind>(side, first / block_rows, buffer);
    return StridedFloatColumns(buffer, count, width(), Eigen::OuterStride<>(block_rows));
  }
  Index tile_buffer_floats() const { return block_rows * width(); }
  Index decode_buffer_floats() const { return 0; }
};

// Pre-RoPE key latents: tile = rotate((k A) B^T) by position, as float rows (block_rows x d).
template <StorageKind Kind>
struct PreRopeKeys {
  static constexpr Index tile_rows = block_rows;
  static constexpr bool decodes = false;  // tiles only: a reconstructed tile serves every query at once
  BlockedSide side;
  const Eigen::MatrixXf* decoder = nullptr;  // B, d x r
  const RotaryEmbedding* rope = nullptr;
  Index first_position = 0;                  // position of row 0

  Index width() const { return decoder->rows(); }
  Index size() const { return side.rows; }

  Eigen::Map<const RowMatrix<float>> tile(Index first, Index count, float* buffer) const {
    const Index r = side.layout.width, d = width();
    float* latents = buffer + block_rows * d;  // block_rows x r, column-major
    expand_block<Kind>(side, first / block_rows, latents);
    Eigen::Map<RowMatrix<float>> keys(buffer, count, d);
    keys.noalias() = StridedFloatColumns(latents, count, r, Eigen::OuterStride<>(block_rows)) * decoder->transpose();
    rope->rotate(keys, first_position + first);
    return Eigen::Map<const RowMatrix<float>>(buffer, count, d);
  }
  Index tile_buffer_floats() const { return block_rows * (width() + side.layout.width); }
};

// ------------------------------------------------------------------------------------------------
// The two strategies

// Which rows each query sees: [begin(q), end(q)) of the source.
struct RowRanges {
  Eigen::Matrix<Index, Eigen::Dynamic, 1> begin, end;
  Index queries() const { return begin.size(); }
  bool uniform() const {
    return queries() == 0 || ((begin.array() == begin(0)).all() && (end.array() == end(0)).all());
  }
};

// Scratch of one thread of the decode strategy.
struct DecodeScratch {
  RowMatrix<float> scores;  // queries x tile_rows
  std::vector<float> keys, values;
  BlockScratch block;
};

template <typename Keys, typename Values>
void attend_decode(const Keys& keys, const Values& values, const RowMatrix<float>& queries, Index begin, Index end,
                 DecodeScratch& scratch, SoftmaxStates& state) {
  constexpr Index tile = Keys::tile_rows;
  static_assert(Keys::tile_rows == Values::tile_rows, "keys and values are read in the same tiles");
  const Index m = queries.rows();
  if constexpr (Keys::tile_rows == block_rows) keys.prepare(queries, scratch.block);
  for (Index first = begin / tile * tile; first < end; first += tile) {
    const Index count = std::min(tile, keys.size() - first);
    float* scores = scratch.scores.data();
    if constexpr (Keys::tile_rows == block_rows) {
      const bool next = first + tile < end;
      if (next && !keys.prefetches_next_block(m)) prefetch_block(keys.side, first / tile + 1);
      if (next && !values.prefetches_next_block(m)) prefetch_block(values.side, first / tile + 1);
      scratch.block.next_block_follows = next;
      keys.score(first, count, queries, scores, scratch.block);
    } else {
      keys.score(first, count, queries, scores, scratch.keys.data());
    }
    // Rows of the tile outside [begin, end) (and a block's unused lanes) take no part.
    const Index low = std::max<Index>(0, begin - first), high = std::min(tile, end - first);
    for (Index q = 0; q < m; ++q) {
      float* row = scores + q * tile;
      std::fill(row, row + low, -std::numeric_limits<float>::infinity());
      std::fill(row + high, row + tile, -std::numeric_limits<float>::infinity());
      softmax_update(row, tile, state, q);
    }
    if constexpr (Values::tile_rows == block_rows) {
      values.accumulate(first, count, scores, state.weighted, scratch.block);
    } else {
      values.accumulate(first, high, scores, state.weighted, scratch.values.data());
    }
  }
}

// Scratch of one thread of the tile strategy.
struct TileScratch {
  std::vector<float> keys, values;
  RowMatrix<float> scores;
};

// States of a block of queries (rows of `queries`, already mapped and scaled) over their ranges.
template <typename Keys, typename Values, typename DerivedQ>
void attend_tiles(const Keys& keys, const Values& values, const Eigen::MatrixBase<DerivedQ>& queries, const RowRanges& ranges,
               Index first_query, TileScratch& scratch, SoftmaxStates& state) {
  constexpr Index tile = Keys::tile_rows;
  static_assert(Keys::tile_rows == Values::tile_rows, "keys and values are read in the same tiles");
  const Index m = queries.rows();
  const auto begins = ranges.begin.segment(first_query, m);
  const auto ends = ranges.end.segment(first_query, m);
  const Index low = begins.minCoeff(), high = ends.maxCoeff();
  for (Index first = low / tile * tile; first < high; first += tile) {
    const Index count = std::min(tile, high - first);
    auto scores = scratch.scores.topLeftCorner(m, count);
    scores.noalias() = queries * keys.tile(first, count, scratch.keys.data()).transpose();
    for (Index q = 0; q < m; ++q) {
      const Index seen_low = std::clamp<Index>(begins(q) - first, 0, count);
      const Index seen_high = std::clamp<Index>(ends(q) - first, seen_low, count);
      auto row = scores.row(q);
      row.head(seen_low).setConstant(-std::numeric_limits<float>::infinity());
      row.tail(count - seen_high).setConstant(-std::numeric_limits<float>::infinity());
      softmax_update(row.data(), count, state, q);
    }
    state.weighted.noalias() += scores * values.tile(first, count, scratch.values.data());
  }
}

}  // namespace kqsvd::detail
