// kqsvd/cache/cache_footprint.hpp -- what a model's KV cache costs in bytes: per token, and once.
//
// The accounting is exact: codes, per-group scales and minimums (StorageFormat::bytes_per_row), the
// projections' matrices, and a recent window's exact rows are all counted.
//   bytes_per_token     what every further token costs: keys and values of all layers and KV heads, as
//                       latents of their ranks (or as full rows of head_dim) in the storage format;
//   elements_per_token  the full cache's elements per token, layers x kv_heads x 2 x head_dim, what
//                       "bits per element" divides by, whatever the format and ranks;
//   fixed_bytes         what does not grow with the tokens: A and B of every projection in float32, and
//                       the float32 rows of a recent window of W tokens (per sequence).
//
//   kqsvd::CacheFootprint q4 = kqsvd::full_cache_footprint(shape, kqsvd::StorageFormat::parse("q4_0"));
//   q4.bits_per_element();                                           // 4.5
//   auto latents = kqsvd::latent_cache_footprint(projections.ranks(), kqsvd::StorageFormat::parse("int4"));
//   latents.bits_per_element();                                      // 2.5 at rank 32 of 64, blocks of 32
#pragma once

#include <Eigen/Core>

#include <cstdint>
#include <string>

#include "kqsvd/core/storage_format.hpp"
#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/model_shape.hpp"
#include "kqsvd/solvers/rank_allocation.hpp"

namespace kqsvd {

struct CacheFootprint {
  std::int64_t bytes_per_token = 0;
  std::int64_t elements_per_token = 0;
  std::int64_t fixed_bytes = 0;

  double bits_per_element() const {
    return elements_per_token == 0 ? 0.0 : 8.0 * static_cast<double>(bytes_per_token) / static_cast<double>(elements_per_token);
  }
  // The bytes of a cache holding `tokens` tokens.
  std::int64_t bytes(std::int64_t tokens) const { return fixed_bytes + tokens * bytes_per_token; }
};

namespace detail {

inline void require_window(const char* function, Eigen::Index window) {
  if (window < 0) throw_invalid(function, "window", "must be >= 0, got " + std::to_string(window));
}

}  // namespace detail

// The uncompressed cache: every key and value row in `format`, plus a window of exact float32 rows when
// `window` > 0 (a full cache in a narrow format may keep its recent tokens exact too).
inline CacheFootprint full_cache_footprint(const ModelShape& shape, const StorageFormat& format, Eigen::Index window = 0) {
  constexpr const char* where = "kqsvd::full_cache_footprint";
  shape.validate();
  format.require_width(where, "shape.head_dim", shape.head_dim);
  detail::require_window(where, window);
  CacheFootprint footprint;
  const std::int64_t heads = shape.layers * shape.kv_heads;
  footprint.bytes_per_token = heads * 2 * format.bytes_per_row(shape.head_dim);
  footprint.elements_per_token = heads * 2 * shape.head_dim;
  footprint.fixed_bytes = window * heads * 2 * shape.head_dim * 4;
  return footprint;
}

// A cache of latents at `ranks`, in `format`, with a window of `window` exact float32 tokens.
inline CacheFootprint latent_cache_footprint(const RankAllocation& ranks, const StorageFormat& format,
                                             Eigen::Index window = 0) {
  constexpr const char* where = "kqsvd::latent_cache_footprint";
  detail::require_window(where, window);
  const ModelShape& shape = ranks.shape();
  CacheFootprint footprint;
  for (Eigen::Index l = 0; l < shape.layers; ++l) {
    for (Eigen::Index h = 0; h < shape.kv_heads; ++h) {
      for (const Eigen::Index rank : {ranks.key(l, h), ranks.value(l, h)}) {
        format.require_width(where, "ranks", rank);
        footprint.bytes_per_token += format.bytes_per_row(rank);
        footprint.fixed_bytes += 2 * shape.head_dim * rank * 4;  // A and B, float32
      }
    }
  }
  footprint.elements_per_token = shape.layers * shape.kv_heads * 2 * shape.head_dim;
  footprint.fixed_bytes += window * shape.layers * shape.kv_heads * 2 * shape.head_dim * 4;
  return footprint;
}

}  // namespace kqsvd
