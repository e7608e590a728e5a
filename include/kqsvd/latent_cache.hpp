// kqsvd/latent_cache.hpp -- the compressed KV cache of one head: key latents K A and value latents
// V A_v, stored as float, Eigen::half or Eigen::bfloat16.
//
// Half-precision storage halves the bytes a decode step reads; the kernels reading the cache
// (decode_attention, prefill_attention) convert tiles back to float and accumulate in float. Latents
// of projections fitted from mean Grams (fit_projection from accumulators does this) are O(1), well
// inside float16's range (|x| <= 65504); rounding is relative 2^-11 (float16) or 2^-8 (bfloat16).
//
//   kqsvd::LatentCache<Eigen::half> cache(key_proj, value_proj);   // widths = the two ranks
//   cache.reserve(4096);
//   cache.append(key_proj, value_proj, K_new, V_new);              // T x d float rows, compressed here
//   cache.size();   cache.bytes();                                 // tokens, bytes held
//   auto out = kqsvd::decode_attention(key_proj, value_proj, q, cache);
//   Eigen::MatrixXf k_latents = cache.keys();                      // size() x rank, as float
//
// Rows can also be appended already compressed: cache.append(key_latents, value_latents).
//
// Layout (what the kernels rely on): value latents are row-major, one token per row. Key latents are
// stored in blocks of key_block_tokens tokens, each block dimension-major -- for every latent dimension
// the block's tokens are contiguous -- so that a decode step scores a whole block with vertical SIMD
// multiply-adds instead of one horizontal reduction per token (twice as fast at r = 16). keys() and
// values() return ordinary token-per-row copies.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <string>
#include <type_traits>
#include <vector>

#include "kqsvd/detail/online_softmax.hpp"
#include "kqsvd/detail/parallel_for.hpp"
#include "kqsvd/detail/storage_conversion.hpp"
#include "kqsvd/detail/validation.hpp"
#include "kqsvd/error.hpp"
#include "kqsvd/latent_compression.hpp"
#include "kqsvd/low_rank_projection.hpp"

namespace kqsvd {

template <typename Storage = Eigen::half>
class LatentCache {
 public:
  static_assert(detail::is_cache_storage_v<Storage>, "LatentCache stores float, Eigen::half or Eigen::bfloat16");

  using Index = Eigen::Index;
  using FloatRows = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  static constexpr Index key_block_tokens = detail::latent_tile_rows;

  LatentCache(Index key_width, Index value_width)
      : key_width_(validated_width("key_width", key_width)), value_width_(validated_width("value_width", value_width)) {}

  // Widths from the projections: their ranks.
  template <typename Scalar>
  LatentCache(const LowRankProjection<Scalar>& key_projection, const LowRankProjection<Scalar>& value_projection)
      : LatentCache(key_projection.rank(), value_projection.rank()) {}

  Index key_width() const { return key_width_; }
  Index value_width() const { return value_width_; }
  Index size() const { return size_; }  // tokens
  Index capacity() const { return capacity_; }
  bool empty() const { return size_ == 0; }

  // Bytes of latents held: size() * (key_width() + value_width()) * sizeof(Storage).
  std::size_t bytes() const {
    return static_cast<std::size_t>(size_) * static_cast<std::size_t>(key_width_ + value_width_) * sizeof(Storage);
  }

  // Allocates room for `tokens` tokens, so that appends up to there do not reallocate.
  void reserve(Index tokens) {
    if (tokens < 0) {
      detail::throw_invalid("kqsvd::LatentCache::reserve", "tokens", "must be >= 0, got " + std::to_string(tokens));
    }
    if (tokens <= capacity_) return;
    const Index blocks = (tokens + key_block_tokens - 1) / key_block_tokens;
    keys_.resize(static_cast<std::size_t>(blocks * key_block_tokens * key_width_));
    values_.resize(static_cast<std::size_t>(blocks * key_block_tokens * value_width_));
    capacity_ = blocks * key_block_tokens;
  }

  void clear() { size_ = 0; }

  // Appends latents (T x key_width() and T x value_width(), float or double, any layout), rounded to
  // Storage. All-or-nothing: a rejected block (wrong shape, non-finite, beyond Storage's range) leaves
  // the cache unchanged.
  template <typename DerivedK, typename DerivedV>
  void append(const Eigen::MatrixBase<DerivedK>& key_latents, const Eigen::MatrixBase<DerivedV>& value_latents) {
    constexpr const char* where = "kqsvd::LatentCache::append";
    static_assert(std::is_floating_point<typename DerivedK::Scalar>::value &&
                      std::is_floating_point<typename DerivedV::Scalar>::value,
                  "latents are float or double");
    detail::require_columns(where, "key_latents", key_latents.cols(), key_width_, "the key width");
    detail::require_columns(where, "value_latents", value_latents.cols(), value_width_, "the value width");
    require_same_rows(where, key_latents.rows(), value_latents.rows());
    detail::require_finite(where, "key_latents", key_latents);
    detail::require_finite(where, "value_latents", value_latents);
    const Index count = key_latents.rows();
    grow_for(count);
    FloatRows tile;
    for (Index first = 0; first < count; first += key_block_tokens) {
      const Index rows = std::min(key_block_tokens, count - first);
      tile = key_latents.middleRows(first, rows).template cast<float>();
      require_storable(where, "key_latents", tile, first);
      store_keys(tile, size_ + first);
      tile = value_latents.middleRows(first, rows).template cast<float>();
      require_storable(where, "value_latents", tile, first);
      store_values(tile, size_ + first);
    }
    size_ += count;
  }

  // Compresses T x d float keys and values with the projections (K A, V A_v) and appends them, in
  // parallel over blocks of tokens with OpenMP. Same all-or-nothing guarantee.
  template <typename DerivedK, typename DerivedV>
  void append(const LowRankProjection<float>& key_projection, const LowRankProjection<float>& value_projection,
              const Eigen::MatrixBase<DerivedK>& keys, const Eigen::MatrixBase<DerivedV>& values) {
    constexpr const char* where = "kqsvd::LatentCache::append";
    static_assert(std::is_same<typename DerivedK::Scalar, float>::value &&
                      std::is_same<typename DerivedV::Scalar, float>::value,
                  "keys and values to compress are float");
    detail::require_columns(where, "key_projection", key_projection.rank(), key_width_, "the key width");
    detail::require_columns(where, "value_projection", value_projection.rank(), value_width_, "the value width");
    detail::require_columns(where, "keys", keys.cols(), key_projection.dimension(), "the head dimension");
    detail::require_columns(where, "values", values.cols(), value_projection.dimension(), "the head dimension");
    require_same_rows(where, keys.rows(), values.rows());
    const Index count = keys.rows();
    grow_for(count);
    // Tasks are runs of whole key blocks (the first may start inside one), so that no two tasks write
    // the same block; task boundaries depend on the positions only.
    const Index first_block = size_ / key_block_tokens;
    const Index end_block = (size_ + count + key_block_tokens - 1) / key_block_tokens;
    constexpr Index blocks_per_task = 4;
    const Index tasks = count == 0 ? 0 : (end_block - first_block + blocks_per_task - 1) / blocks_per_task;
    detail::parallel_for(
        tasks, [] { return FloatRows(); },
        [&](Index task, FloatRows& tile) {
          const Index begin = std::max(size_, (first_block + task * blocks_per_task) * key_block_tokens);
          const Index end = std::min(size_ + count, (first_block + (task + 1) * blocks_per_task) * key_block_tokens);
          const Index first = begin - size_;  // row of `keys` and `values`
          compress_tile(where, "keys", key_projection, keys.middleRows(first, end - begin), first, tile);
          store_keys(tile, begin);
          compress_tile(where, "values", value_projection, values.middleRows(first, end - begin), first, tile);
          store_values(tile, begin);
        },
        // Eigen products inside: keep them single-threaded (see detail/parallel_for.hpp).
        /*always_open_region=*/true);
    size_ += count;
  }

  // Copies of the latents as float, one token per row: size() x key_width() and size() x value_width().
  FloatRows keys() const {
    FloatRows result(size_, key_width_);
    Eigen::VectorXf block(key_block_tokens * key_width_);
    for (Index first = 0; first < size_; first += key_block_tokens) {
      const Index rows = std::min(key_block_tokens, size_ - first);
      detail::to_float(key_block_data(first / key_block_tokens), block.data(), block.size());
      result.middleRows(first, rows) = Eigen::Map<const Eigen::MatrixXf>(block.data(), key_block_tokens, key_width_).topRows(rows);
    }
    return result;
  }
  FloatRows values() const {
    FloatRows result(size_, value_width_);
    detail::to_float(values_.data(), result.data(), size_ * value_width_);
    return result;
  }

  // Layout access for kernels: block b of the key latents (key_width() x key_block_tokens elements,
  // dimension-major), and the value latents (row-major, value_width() per token).
  const Storage* key_block_data(Index block) const { return keys_.data() + block * key_block_tokens * key_width_; }
  const Storage* value_data() const { return values_.data(); }

 private:
  static Index validated_width(const char* argument, Index width) {
    if (width <= 0) detail::throw_invalid("kqsvd::LatentCache", argument, "must be positive, got " + std::to_string(width));
    return width;
  }

  static void require_same_rows(const char* where, Index key_rows, Index value_rows) {
    if (key_rows != value_rows) {
      detail::throw_invalid(where, "values",
                            "has " + std::to_string(value_rows) + " rows, the keys " + std::to_string(key_rows) +
                                " (one row per token in both)");
    }
  }

  static void require_storable(const char* where, const char* argument, const FloatRows& tile, Index first_row) {
    if (!(tile.cwiseAbs().maxCoeff() < detail::storage_overflow_threshold<Storage>())) {
      detail::throw_invalid(where, argument, detail::unstorable_entry<Storage>(tile, first_row));
    }
  }

  // tile = rows * encoder, checked: InvalidArgument for non-finite rows, NumericalError for latents
  // beyond Storage's range.
  template <typename Derived>
  static void compress_tile(const char* where, const char* argument, const LowRankProjection<float>& projection,
                            const Eigen::MatrixBase<Derived>& rows, Index first_row, FloatRows& tile) {
    tile.noalias() = rows * projection.encoder();
    // One vectorised pass for both checks; the diagnosis runs only when something is wrong.
    if (!(tile.cwiseAbs().template maxCoeff<Eigen::PropagateNaN>() < detail::storage_overflow_threshold<Storage>())) {
      if (!detail::all_finite(tile)) {
        detail::require_finite_rows(where, argument, rows, first_row);
        throw NumericalError(std::string(where) + ": the latents of '" + argument + "' overflowed float");
      }
      throw NumericalError(std::string(where) + ": latent of '" + argument + "' " +
                           detail::unstorable_entry<Storage>(tile, first_row));
    }
  }

  void grow_for(Index count) {
    if (size_ + count > capacity_) reserve(std::max(size_ + count, 2 * capacity_));
  }

  // Writes float key latents (rows x key_width, row-major) of tokens first_token, first_token + 1, ...
  // into their blocks: per block, transposed to dimension-major, then rounded a run at a time.
  void store_keys(const FloatRows& latents, Index first_token) {
    Eigen::MatrixXf transposed;
    for (Index i = 0; i < latents.rows();) {
      const Index token = first_token + i;
      const Index position = token % key_block_tokens;
      const Index rows = std::min(key_block_tokens - position, latents.rows() - i);
      transposed = latents.middleRows(i, rows);  // column-major: each dimension's run is contiguous
      Storage* block = keys_.data() + (token / key_block_tokens) * key_block_tokens * key_width_;
      for (Index j = 0; j < key_width_; ++j) {
        detail::from_float(transposed.col(j).data(), block + j * key_block_tokens + position, rows);
      }
      i += rows;
    }
  }

  void store_values(const FloatRows& latents, Index first_token) {
    detail::from_float(latents.data(), values_.data() + first_token * value_width_, latents.size());
  }

  Index key_width_, value_width_;
  Index size_ = 0, capacity_ = 0;
  std::vector<Storage> keys_, values_;
};

namespace detail {

template <typename Storage>
BlockedKeys<Storage> blocked_keys(const LatentCache<Storage>& cache) {
  return {cache.key_block_data(0), cache.size(), cache.key_width()};
}

template <typename Storage>
CacheRows<Storage> value_rows(const LatentCache<Storage>& cache) {
  return {cache.value_data(), cache.size(), cache.value_width(), cache.value_width()};
}

}  // namespace detail

}  // namespace kqsvd
