// kqsvd/solvers/rank_allocation.hpp -- how many dimensions every key and value projection of a model
// keeps (solvers/budget_allocation.hpp chooses them for a memory budget).
//
// The compression ratio of an allocation is latent elements per token over full-cache elements per token
// (keys and values, all layers and KV heads, at the same element size):
// sum_heads (r_k + r_v) / (heads * 2 * head_dim).
//
//   kqsvd::RankAllocation ranks = kqsvd::RankAllocation::uniform(shape, /*key_rank=*/16, /*value_rank=*/16);
//   ranks.set_key(/*layer=*/5, /*kv_head=*/0, 24);
//   ranks.compression_ratio();                    // (keys + values kept) / (2 d per head)
//   auto projections = full_rank.truncated(ranks); // ModelProjections::truncated
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/model_shape.hpp"

namespace kqsvd {

// Per (layer, KV head): the rank of its key and of its value projection.
class RankAllocation {
 public:
  using Index = Eigen::Index;

  explicit RankAllocation(const ModelShape& shape)
      : shape_(validated(shape)),
        keys_(static_cast<std::size_t>(shape.layers * shape.kv_heads), shape.head_dim),
        values_(keys_) {}

  // Every key projection at key_rank, every value projection at value_rank (each in [1, head_dim]).
  static RankAllocation uniform(const ModelShape& shape, Index key_rank, Index value_rank) {
    RankAllocation allocation(shape);
    for (Index l = 0; l < shape.layers; ++l) {
      for (Index h = 0; h < shape.kv_heads; ++h) {
        allocation.set_key(l, h, key_rank);
        allocation.set_value(l, h, value_rank);
      }
    }
    return allocation;
  }

  const ModelShape& shape() const { return shape_; }
  Index key(Index layer, Index kv_head) const { return keys_[slot("key", layer, kv_head)]; }
  Index value(Index layer, Index kv_head) const { return values_[slot("value", layer, kv_head)]; }
  void set_key(Index layer, Index kv_head, Index rank) { keys_[slot("set_key", layer, kv_head)] = checked(rank); }
  void set_value(Index layer, Index kv_head, Index rank) { values_[slot("set_value", layer, kv_head)] = checked(rank); }

  // Latent elements per token (keys and values, all layers and KV heads) and the full cache's.
  Index latent_elements() const {
    return std::accumulate(keys_.begin(), keys_.end(), Index(0)) + std::accumulate(values_.begin(), values_.end(), Index(0));
  }
  Index full_elements() const { return shape_.layers * shape_.kv_heads * 2 * shape_.head_dim; }
  double compression_ratio() const {
    return static_cast<double>(latent_elements()) / static_cast<double>(full_elements());
  }

  // "16" when every rank is the same, else "12.5 (8-16)": the mean and the range.
  std::string describe_keys() const { return describe(keys_); }
  std::string describe_values() const { return describe(values_); }

  friend bool operator==(const RankAllocation& a, const RankAllocation& b) {
    return a.shape_ == b.shape_ && a.keys_ == b.keys_ && a.values_ == b.values_;
  }
  friend bool operator!=(const RankAllocation& a, const RankAllocation& b) { return !(a == b); }

 private:
  static const ModelShape& validated(const ModelShape& shape) {
    shape.validate();
    return shape;
  }

  Index checked(Index rank) const {
    if (rank < 1 || rank > shape_.head_dim) {
      detail::throw_invalid("kqsvd::RankAllocation", "rank",
                            "must be in [1, " + std::to_string(shape_.head_dim) + "], got " + std::to_string(rank));
    }
    return rank;
  }

  std::size_t slot(const char* which, Index layer, Index kv_head) const {
    return shape_.kv_head_slot("kqsvd::RankAllocation", which, layer, kv_head);
  }

  static std::string describe(const std::vector<Index>& ranks) {
    const auto [low, high] = std::minmax_element(ranks.begin(), ranks.end());
    if (*low == *high) return std::to_string(*low);
    const double mean = static_cast<double>(std::accumulate(ranks.begin(), ranks.end(), Index(0))) /
                        static_cast<double>(ranks.size());
    std::string text = std::to_string(mean);
    text.erase(text.find_last_not_of('0') + 1);
    if (!text.empty() && text.back() == '.') text.pop_back();
    return text + " (" + std::to_string(*low) + "-" + std::to_string(*high) + ")";
  }

  ModelShape shape_;
  std::vector<Index> keys_, values_;  // [layer * kv_heads + kv_head]
};

// round(ratio * head_dim), at least 1 and at most head_dim. ratio in (0, 1].
inline Eigen::Index uniform_rank_for_ratio(Eigen::Index head_dim, double ratio) {
  constexpr const char* where = "kqsvd::uniform_rank_for_ratio";
  if (head_dim <= 0) detail::throw_invalid(where, "head_dim", "must be positive, got " + std::to_string(head_dim));
  if (!(ratio > 0.0 && ratio <= 1.0)) detail::throw_invalid(where, "ratio", "must be in (0, 1], got " + std::to_string(ratio));
  const auto rank = static_cast<Eigen::Index>(std::lround(ratio * static_cast<double>(head_dim)));
  return std::clamp<Eigen::Index>(rank, 1, head_dim);
}

}  // namespace kqsvd
