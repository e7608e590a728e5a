// kqsvd/llama/compression_target.hpp -- choosing per-head ranks that reach a target compression ratio.
//
// Compression ratio = latent elements per token / full-cache elements per token (both K and V, all
// layers and KV heads, same element size): sum_heads (r_k + r_v) / (heads * 2 * head_dim). Two ways to
// spend a budget:
//   * uniform ranks: r = round(ratio * head_dim) for every key and value projection;
//   * an error budget: the smallest per-head ranks whose predicted relative error (from each
//     projection's spectrum) is <= epsilon, with epsilon bisected until the ratio matches the target.
// Both start from projections fitted at full rank (head_dim): every method here orders directions by
// importance, so truncating equals fitting at the lower rank, and one fit serves every budget.
//
//   auto full = kqsvd::ModelProjections<float>::fit(calibration, wo, method,
//                                                   kqsvd::RankSelection::fixed(d), kqsvd::RankSelection::fixed(d));
//   auto uniform = kqsvd::llama::truncate_projections(full, kqsvd::RankSelection::fixed(
//                                                     kqsvd::llama::uniform_rank_for_ratio(d, 0.25)));
//   kqsvd::llama::ErrorBudgetFit eps = kqsvd::llama::error_budget_for_ratio(full, 0.25);
//   eps.epsilon;  eps.ratio;  eps.projections;       // ranks differ per head
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "kqsvd/detail/validation.hpp"
#include "kqsvd/low_rank_projection.hpp"
#include "kqsvd/model_projections.hpp"
#include "kqsvd/rank_selection.hpp"

namespace kqsvd::llama {

// round(ratio * head_dim), at least 1 and at most head_dim. ratio in (0, 1].
inline Eigen::Index uniform_rank_for_ratio(Eigen::Index head_dim, double ratio) {
  constexpr const char* where = "kqsvd::llama::uniform_rank_for_ratio";
  if (head_dim <= 0) kqsvd::detail::throw_invalid(where, "head_dim", "must be positive, got " + std::to_string(head_dim));
  if (!(ratio > 0.0 && ratio <= 1.0)) {
    kqsvd::detail::throw_invalid(where, "ratio", "must be in (0, 1], got " + std::to_string(ratio));
  }
  const auto rank = static_cast<Eigen::Index>(std::lround(ratio * static_cast<double>(head_dim)));
  return std::clamp<Eigen::Index>(rank, 1, head_dim);
}

// Every head's projections cut to the rank `key_rank` / `value_rank` selects from that head's
// spectrum. Each selected rank must not exceed the head's current rank.
inline ModelProjections<float> truncate_projections(const ModelProjections<float>& projections,
                                                    const RankSelection& key_rank, const RankSelection& value_rank) {
  const ModelShape& shape = projections.shape();
  std::vector<LowRankProjection<float>> keys, values;
  for (Eigen::Index l = 0; l < shape.layers; ++l) {
    for (Eigen::Index h = 0; h < shape.kv_heads; ++h) {
      const LowRankProjection<float>& k = projections.keys(l, h);
      const LowRankProjection<float>& v = projections.values(l, h);
      keys.push_back(k.truncated(key_rank.select(k.singular_values())));
      values.push_back(v.truncated(value_rank.select(v.singular_values())));
    }
  }
  return ModelProjections<float>(shape, std::move(keys), std::move(values));
}

inline ModelProjections<float> truncate_projections(const ModelProjections<float>& projections,
                                                    const RankSelection& rank) {
  return truncate_projections(projections, rank, rank);
}

struct ErrorBudgetFit {
  double epsilon = 0.0;  // the error budget used for keys and values alike
  double ratio = 0.0;    // the compression ratio it reaches
  ModelProjections<float> projections;
};

// The error budget epsilon (one for every key and value projection) whose per-head ranks bring the
// compression ratio closest to `target_ratio`, found by bisection: the ratio falls as epsilon grows,
// in steps (ranks are integers), so the result is within one step of the target -- with realistic head
// counts well inside 1 %. `full_rank`: projections fitted at rank head_dim.
inline ErrorBudgetFit error_budget_for_ratio(const ModelProjections<float>& full_rank, double target_ratio) {
  constexpr const char* where = "kqsvd::llama::error_budget_for_ratio";
  if (!(target_ratio > 0.0 && target_ratio <= 1.0)) {
    kqsvd::detail::throw_invalid(where, "target_ratio", "must be in (0, 1], got " + std::to_string(target_ratio));
  }
  const ModelShape& shape = full_rank.shape();
  for (Eigen::Index l = 0; l < shape.layers; ++l)
    for (Eigen::Index h = 0; h < shape.kv_heads; ++h)
      if (full_rank.keys(l, h).rank() != shape.head_dim || full_rank.values(l, h).rank() != shape.head_dim) {
        kqsvd::detail::throw_invalid(where, "full_rank",
                                     "must hold projections of rank head_dim = " + std::to_string(shape.head_dim) +
                                         " (layer " + std::to_string(l) + ", KV head " + std::to_string(h) + " does not)");
      }
  const auto ratio_at = [&](double epsilon) {
    const RankSelection budget = RankSelection::error_budget(epsilon);
    double latent = 0.0;
    for (Eigen::Index l = 0; l < shape.layers; ++l)
      for (Eigen::Index h = 0; h < shape.kv_heads; ++h)
        latent += static_cast<double>(budget.select(full_rank.keys(l, h).singular_values()) +
                                      budget.select(full_rank.values(l, h).singular_values()));
    return latent / static_cast<double>(shape.layers * shape.kv_heads * 2 * shape.head_dim);
  };
  // Invariant: ratio_at(low) >= target >= ratio_at(high), or the target lies outside what any
  // epsilon reaches, in which case the nearer end wins below.
  double low = 1e-12, high = 1.0 - 1e-12;
  for (int i = 0; i < 100 && high - low > 1e-12; ++i) {
    const double middle = 0.5 * (low + high);
    (ratio_at(middle) > target_ratio ? low : high) = middle;
  }
  const double low_gap = std::abs(ratio_at(low) - target_ratio);
  const double high_gap = std::abs(ratio_at(high) - target_ratio);
  const double epsilon = low_gap < high_gap ? low : high;
  ModelProjections<float> projections = truncate_projections(full_rank, RankSelection::error_budget(epsilon));
  const double ratio = projections.footprint().ratio();
  return ErrorBudgetFit{epsilon, ratio, std::move(projections)};
}

}  // namespace kqsvd::llama
