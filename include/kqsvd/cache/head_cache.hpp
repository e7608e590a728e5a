// kqsvd/cache/head_cache.hpp -- the KV cache of one head: its keys and values (full rows, or the latents
// K A and V A_v of low-rank projections) stored in a StorageFormat, in the layout the kernels read.
//
//   kqsvd::HeadCache cache(key_proj, value_proj, kqsvd::StorageFormat::parse("f16"));  // widths = ranks
//   cache.reserve(4096);
//   cache.append(key_proj, value_proj, K_new, V_new);   // T x d float rows, compressed and stored here
//   auto out = kqsvd::decode_attention(key_proj, value_proj, q, cache);   // kernels/decode_attention.hpp
//   cache.size();  cache.bytes();                       // tokens, bytes held (codes, scales, minimums)
//   cache.retain({0, 5, 7});                            // evicts every other token
//   kqsvd::RowMatrix<float> latents = cache.keys();     // size() x rank, decoded to float
//
//   kqsvd::HeadCache full(d, d, kqsvd::StorageFormat::parse("q8_0"));   // a quantized full cache
//   full.append(K_new, V_new);                                          // rows stored as they are
//   auto exact_ish = kqsvd::decode_attention(q, full);
//
// append() is all-or-nothing: a block with a wrong shape, a non-finite value or a value its format
// cannot hold leaves the cache unchanged (storage_format.hpp says which values each format refuses).
//
// Layout (what the kernels rely on): each side is a sequence of blocks of block_tokens tokens. Within a
// block, elements are stored dimension-major -- for every element of the row, the block's tokens are
// contiguous (a "run") -- so that a decode step adds a whole run to all the block's scores with vertical
// SIMD multiply-adds, instead of one horizontal reduction per token (bench/README.md, design
// measurements). Groups of elements that share scales store, per group, the float16 scales of the block's
// tokens, then their float16 minimums (asymmetric formats), then the group's runs. 4-bit runs hold
// token t of the block in the low nibble of byte t and token t + 64 in the high one; 2-bit runs token
// t + 32 p in bits 2p..2p+1 of byte t. A token costs exactly StorageFormat::bytes_per_row per side.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "kqsvd/cache/latent_compression.hpp"
#include "kqsvd/core/storage_format.hpp"
#include "kqsvd/core/detail/parallel_for.hpp"
#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/error.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/solvers/low_rank_projection.hpp"

namespace kqsvd {

namespace detail {

inline constexpr Eigen::Index cache_block_tokens = 128;

// Where one side's bytes live inside a block.
struct BlockLayout {
  using Index = Eigen::Index;
  static constexpr Index tokens = cache_block_tokens;

  StorageFormat format;
  Index width = 0;
  Index group = 0;        // elements per scale group
  Index run_bytes = 0;    // one element's codes for the block's tokens
  Index side_bytes = 0;   // per group: the float16 scales, then minimums, of the block's tokens
  Index group_bytes = 0;
  Index block_bytes = 0;

  BlockLayout() = default;
  BlockLayout(const StorageFormat& storage, Index row_width)
      : format(storage),
        width(row_width),
        group(storage.group_size(row_width)),
        run_bytes(tokens * storage.code_bits() / 8),
        side_bytes(tokens * ((storage.has_scale() ? 2 : 0) + (storage.has_minimum() ? 2 : 0))),
        group_bytes(side_bytes + group * run_bytes),
        block_bytes(row_width / group * group_bytes) {}

  Index groups() const { return width / group; }
  Index scale_offset(Index g) const { return g * group_bytes; }
  Index minimum_offset(Index g) const { return g * group_bytes + tokens * 2; }
  Index run_offset(Index element) const {
    return (element / group) * group_bytes + side_bytes + (element % group) * run_bytes;
  }
};

// A side as the kernels read it: `rows` tokens in blocks of BlockLayout::tokens.
struct BlockedSide {
  const std::uint8_t* data = nullptr;
  BlockLayout layout;
  Eigen::Index rows = 0;

  const std::uint8_t* block(Eigen::Index b) const { return data + b * layout.block_bytes; }
};

// Writes one token's quantized row (`codes`: element bytes as quantize_group wrote them, group after
// group; `groups`: their scales and minimums) at position `slot` of a block.
inline void store_token(std::uint8_t* block, const BlockLayout& layout, Eigen::Index slot, const std::uint8_t* codes,
                        const QuantizedGroup* groups) {
  using Index = Eigen::Index;
  const int bits = layout.format.code_bits();
  for (Index g = 0; g < layout.groups(); ++g) {
    if (layout.format.has_scale()) std::memcpy(block + layout.scale_offset(g) + 2 * slot, &groups[g].scale, 2);
    if (layout.format.has_minimum()) std::memcpy(block + layout.minimum_offset(g) + 2 * slot, &groups[g].minimum, 2);
  }
  for (Index j = 0; j < layout.width; ++j) {
    std::uint8_t* run = block + layout.run_offset(j);
    if (bits >= 8) {
      const Index bytes = bits / 8;
      std::memcpy(run + bytes * slot, codes + bytes * j, static_cast<std::size_t>(bytes));
    } else {
      const Index per_byte = 8 / bits, stride = layout.tokens / per_byte;
      const int shift = static_cast<int>((slot / stride) * bits);
      std::uint8_t& byte = run[slot % stride];
      const auto mask = static_cast<std::uint8_t>(((1 << bits) - 1) << shift);
      byte = static_cast<std::uint8_t>((byte & ~mask) | ((codes[j] << shift) & mask));
    }
  }
}

// The stored value of every element of the token at position `slot` of a block, into out[0..width).
inline void load_token(const std::uint8_t* block, const BlockLayout& layout, Eigen::Index slot, float* out) {
  using Index = Eigen::Index;
  const StorageKind kind = layout.format.kind();
  const int bits = layout.format.code_bits();
  for (Index j = 0; j < layout.width; ++j) {
    const std::uint8_t* run = block + layout.run_offset(j);
    if (is_float_kind(kind)) {
      out[j] = float_code_value(kind, run, slot);
      continue;
    }
    const Index g = j / layout.group;
    std::uint16_t scale = 0, minimum = 0;
    std::memcpy(&scale, block + layout.scale_offset(g) + 2 * slot, 2);
    if (layout.format.has_minimum()) std::memcpy(&minimum, block + layout.minimum_offset(g) + 2 * slot, 2);
    std::uint8_t code = 0;
    if (bits == 8) {
      code = run[slot];
    } else {
      const Index per_byte = 8 / bits, stride = layout.tokens / per_byte;
      code = static_cast<std::uint8_t>((run[slot % stride] >> ((slot / stride) * bits)) & ((1 << bits) - 1));
    }
    out[j] = dequantize(kind, code, half_bits_to_float(scale), half_bits_to_float(minimum));
  }
}

// Copies the stored bits of the token at `from_slot` of one block to `to_slot` of another (or the
// same): codes, scales and minimums unchanged, so that a moved row reads back bit for bit.
inline void copy_token(const std::uint8_t* from_block, Eigen::Index from_slot, std::uint8_t* to_block,
                       Eigen::Index to_slot, const BlockLayout& layout) {
  using Index = Eigen::Index;
  const int bits = layout.format.code_bits();
  for (Index g = 0; g < layout.groups(); ++g) {
    if (layout.format.has_scale()) {
      std::memmove(to_block + layout.scale_offset(g) + 2 * to_slot, from_block + layout.scale_offset(g) + 2 * from_slot, 2);
    }
    if (layout.format.has_minimum()) {
      std::memmove(to_block + layout.minimum_offset(g) + 2 * to_slot, from_block + layout.minimum_offset(g) + 2 * from_slot, 2);
    }
  }
  const Index per_byte = bits >= 8 ? 1 : 8 / bits, stride = layout.tokens / per_byte;
  for (Index j = 0; j < layout.width; ++j) {
    const std::uint8_t* from_run = from_block + layout.run_offset(j);
    std::uint8_t* to_run = to_block + layout.run_offset(j);
    if (bits >= 8) {
      const Index bytes = bits / 8;
      std::memmove(to_run + bytes * to_slot, from_run + bytes * from_slot, static_cast<std::size_t>(bytes));
    } else {
      const auto field = static_cast<std::uint8_t>((1 << bits) - 1);
      const int from_shift = static_cast<int>((from_slot / stride) * bits);
      const int to_shift = static_cast<int>((to_slot / stride) * bits);
      const auto code = static_cast<std::uint8_t>((from_run[from_slot % stride] >> from_shift) & field);
      std::uint8_t& byte = to_run[to_slot % stride];
      byte = static_cast<std::uint8_t>((byte & ~(field << to_shift)) | (code << to_shift));
    }
  }
}

}  // namespace detail

class HeadCache {
 public:
  using Index = Eigen::Index;

  static constexpr Index block_tokens = detail::cache_block_tokens;

  HeadCache(Index key_width, Index value_width, StorageFormat format = StorageFormat())
      : keys_(validated(format, "key_width", key_width)), values_(validated(format, "value_width", value_width)) {}

  // Widths from the projections: their ranks.
  template <typename Scalar>
  HeadCache(const LowRankProjection<Scalar>& key_projection, const LowRankProjection<Scalar>& value_projection,
            StorageFormat format = StorageFormat())
      : HeadCache(key_projection.rank(), value_projection.rank(), format) {}

  Index key_width() const { return keys_.layout.width; }
  Index value_width() const { return values_.layout.width; }
  const StorageFormat& format() const { return keys_.layout.format; }
  Index size() const { return size_; }  // tokens
  Index capacity() const { return capacity_; }
  bool empty() const { return size_ == 0; }

  // Bytes one token costs, and the bytes held: codes, scales and minimums of size() tokens.
  Index bytes_per_token() const {
    return format().bytes_per_row(key_width()) + format().bytes_per_row(value_width());
  }
  std::size_t bytes() const { return static_cast<std::size_t>(size_) * static_cast<std::size_t>(bytes_per_token()); }

  // Allocates room for `tokens` tokens, so that appends up to there do not reallocate.
  void reserve(Index tokens) {
    if (tokens < 0) detail::throw_invalid("kqsvd::HeadCache::reserve", "tokens", "must be >= 0, got " + std::to_string(tokens));
    if (tokens <= capacity_) return;
    const Index blocks = (tokens + block_tokens - 1) / block_tokens;
    keys_.resize(blocks);
    values_.resize(blocks);
    capacity_ = blocks * block_tokens;
  }

  void clear() { size_ = 0; }

  // Appends rows as they are to be stored (T x key_width() and T x value_width(), float or double, any
  // layout): latents already compressed, or full rows.
  template <typename DerivedK, typename DerivedV>
  void append(const Eigen::MatrixBase<DerivedK>& keys, const Eigen::MatrixBase<DerivedV>& values) {
    constexpr const char* where = "kqsvd::HeadCache::append";
    static_assert(std::is_floating_point<typename DerivedK::Scalar>::value &&
                      std::is_floating_point<typename DerivedV::Scalar>::value,
                  "rows are float or double");
    detail::require_columns(where, "keys", keys.cols(), key_width(), "the cache's key width");
    detail::require_columns(where, "values", values.cols(), value_width(), "the cache's value width");
    require_same_rows(where, keys.rows(), values.rows());
    store_rows(keys.rows(), [&](Index first, Index count, Workspace& workspace) {
      workspace.tile = keys.middleRows(first, count).template cast<float>();
      store_tile(where, "keys", keys_, workspace, first);
      workspace.tile = values.middleRows(first, count).template cast<float>();
      store_tile(where, "values", values_, workspace, first);
    });
  }

  // Compresses T x d float keys and values with the projections (K A, V A_v) and appends the latents.
  // A latent the format cannot hold (beyond float16's range, say) is a NumericalError: the rows were
  // valid, their latents are not storable.
  template <typename DerivedK, typename DerivedV>
  void append(const LowRankProjection<float>& key_projection, const LowRankProjection<float>& value_projection,
              const Eigen::MatrixBase<DerivedK>& keys, const Eigen::MatrixBase<DerivedV>& values) {
    constexpr const char* where = "kqsvd::HeadCache::append";
    static_assert(std::is_same<typename DerivedK::Scalar, float>::value &&
                      std::is_same<typename DerivedV::Scalar, float>::value,
                  "keys and values to compress are float");
    detail::require_columns(where, "key_projection", key_projection.rank(), key_width(), "the cache's key width");
    detail::require_columns(where, "value_projection", value_projection.rank(), value_width(), "the cache's value width");
    detail::require_columns(where, "keys", keys.cols(), key_projection.dimension(), "the head dimension");
    detail::require_columns(where, "values", values.cols(), value_projection.dimension(), "the head dimension");
    require_same_rows(where, keys.rows(), values.rows());
    store_rows(keys.rows(), [&](Index first, Index count, Workspace& workspace) {
      detail::compress_tile(where, "keys", key_projection, keys.middleRows(first, count), first, workspace.tile);
      store_latents(where, "keys", keys_, workspace, first);
      detail::compress_tile(where, "values", value_projection, values.middleRows(first, count), first, workspace.tile);
      store_latents(where, "values", values_, workspace, first);
    });
  }

  // Keeps only the tokens at `rows` -- strictly increasing indices below size() -- in that order; the
  // others leave the cache (eviction, as kqsvd::HeavyHitterCache does). Kept rows move with their stored
  // bits unchanged, never re-quantized. The capacity stays.
  void retain(const std::vector<Index>& rows) {
    constexpr const char* where = "kqsvd::HeadCache::retain";
    for (std::size_t i = 0; i < rows.size(); ++i) {
      if (rows[i] < 0 || rows[i] >= size_) {
        detail::throw_invalid(where, "rows",
                              "holds " + std::to_string(rows[i]) + " at entry " + std::to_string(i) +
                                  ", outside the cache's tokens [0, " + std::to_string(size_) + ")");
      }
      if (i > 0 && rows[i] <= rows[i - 1]) {
        detail::throw_invalid(where, "rows",
                              "must be strictly increasing, got " + std::to_string(rows[i - 1]) + " then " +
                                  std::to_string(rows[i]) + " at entry " + std::to_string(i));
      }
    }
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const auto to = static_cast<Index>(i);
      if (rows[i] == to) continue;
      // to < rows[i], and slots are filled in increasing order: no kept row is overwritten before it moves.
      for (Side* side : {&keys_, &values_}) {
        const Index block_bytes = side->layout.block_bytes;
        detail::copy_token(side->data() + (rows[i] / block_tokens) * block_bytes, rows[i] % block_tokens,
                           side->data() + (to / block_tokens) * block_bytes, to % block_tokens, side->layout);
      }
    }
    size_ = static_cast<Index>(rows.size());
  }

  // The stored rows decoded to float, one token per row: size() x key_width() and size() x value_width().
  RowMatrix<float> keys() const { return decoded(keys_); }
  RowMatrix<float> values() const { return decoded(values_); }

  // Layout access for the kernels.
  detail::BlockedSide key_side() const { return {keys_.data(), keys_.layout, size_}; }
  detail::BlockedSide value_side() const { return {values_.data(), values_.layout, size_}; }

 private:
  // A side's bytes live in an array of float, so that f32 runs are float objects the kernels read in
  // place; every other format's codes are accessed as bytes (unsigned char may alias anything).
  struct Side {
    detail::BlockLayout layout;
    std::vector<float> storage;

    void resize(Index blocks) {
      storage.resize(static_cast<std::size_t>((blocks * layout.block_bytes + 3) / 4));  // new blocks zeroed
    }
    std::uint8_t* data() { return reinterpret_cast<std::uint8_t*>(storage.data()); }
    const std::uint8_t* data() const { return reinterpret_cast<const std::uint8_t*>(storage.data()); }
  };

  // Scratch of one task: a float tile, one row's codes and its groups' scales.
  struct Workspace {
    RowMatrix<float> tile;
    std::vector<std::uint8_t> codes;
    std::vector<detail::QuantizedGroup> groups;
  };

  static Side validated(const StorageFormat& format, const char* argument, Index width) {
    format.require_width("kqsvd::HeadCache", argument, width);
    return Side{detail::BlockLayout(format, width), {}};
  }

  static void require_same_rows(const char* where, Index key_rows, Index value_rows) {
    if (key_rows != value_rows) {
      detail::throw_invalid(where, "values",
                            "has " + std::to_string(value_rows) + " rows, the keys " + std::to_string(key_rows) +
                                " (one row per token in both)");
    }
  }

  // Runs fill(first, count, workspace) over the `count` new rows in tasks of whole blocks (the first may
  // start inside one), in parallel with OpenMP: no two tasks write the same block, and task boundaries
  // depend on the positions only. size() moves only once every row is stored.
  template <typename Fill>
  void store_rows(Index count, Fill&& fill) {
    if (size_ + count > capacity_) reserve(std::max(size_ + count, 2 * capacity_));
    const Index first_block = size_ / block_tokens;
    const Index end_block = (size_ + count + block_tokens - 1) / block_tokens;
    constexpr Index blocks_per_task = 4;
    const Index tasks = count == 0 ? 0 : (end_block - first_block + blocks_per_task - 1) / blocks_per_task;
    detail::parallel_for(
        tasks, [] { return Workspace(); },
        [&](Index task, Workspace& workspace) {
          const Index begin = std::max(size_, (first_block + task * blocks_per_task) * block_tokens);
          const Index end = std::min(size_ + count, (first_block + (task + 1) * blocks_per_task) * block_tokens);
          fill(begin - size_, end - begin, workspace);
        },
        // Eigen products inside: keep them single-threaded (see core/detail/parallel_for.hpp).
        /*always_open_region=*/true);
    size_ += count;
  }

  // Quantizes workspace.tile (rows `first`.. of the caller's block) into `side` at tokens size_ + first...
  void store_tile(const char* where, const char* argument, Side& side, Workspace& workspace, Index first) {
    const detail::BlockLayout& layout = side.layout;
    workspace.codes.resize(static_cast<std::size_t>(layout.width) * 4);
    workspace.groups.resize(static_cast<std::size_t>(layout.groups()));
    for (Index i = 0; i < workspace.tile.rows(); ++i) {
      const float* row = &workspace.tile(i, 0);
      for (Index g = 0; g < layout.groups(); ++g) {
        const Index column = g * layout.group;
        workspace.groups[static_cast<std::size_t>(g)] = detail::quantize_group(
            where, argument, layout.format, row + column, layout.group,
            workspace.codes.data() + column * std::max(1, layout.format.code_bits() / 8), first + i, column);
      }
      const Index token = size_ + first + i;
      detail::store_token(side.data() + (token / block_tokens) * layout.block_bytes, layout, token % block_tokens,
                          workspace.codes.data(), workspace.groups.data());
    }
  }

  void store_latents(const char* where, const char* argument, Side& side, Workspace& workspace, Index first) {
    try {
      store_tile(where, argument, side, workspace, first);
    } catch (const InvalidArgument& error) {
      // The rows were finite (compress_tile checked them): it is their latents the format cannot hold.
      throw NumericalError(std::string(error.what()) + " (a latent of finite rows; the " + side.layout.format.name() +
                           " cache cannot store it)");
    }
  }

  RowMatrix<float> decoded(const Side& side) const {
    RowMatrix<float> result(size_, side.layout.width);
    for (Index token = 0; token < size_; ++token) {
      detail::load_token(side.data() + (token / block_tokens) * side.layout.block_bytes, side.layout,
                         token % block_tokens, &result(token, 0));
    }
    return result;
  }

  Side keys_, values_;
  Index size_ = 0, capacity_ = 0;
};

}  // namespace kqsvd
