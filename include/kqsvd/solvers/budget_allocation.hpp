// kqsvd/solvers/budget_allocation.hpp -- spending a memory budget over a model's heads: per-head ranks
// for a target compression ratio.
//
// Spectrum-only rules (no model needed):
//   uniform       every key and value projection at rank round(ratio * head_dim)
//                 (RankAllocation::uniform with uniform_rank_for_ratio);
//   error budget  one epsilon for every projection, each head at the smallest rank whose predicted
//                 relative error (from its own spectrum) is <= epsilon, epsilon bisected to the ratio.
// All start from projections fitted at full rank: every method here orders its directions by
// importance, so truncating equals fitting at the lower rank, and one fit serves every budget.
//
//   auto full = kqsvd::ModelProjections<float>::fit(calibration, wo, method, kqsvd::RankSelection::fixed(d),
//                                                   kqsvd::RankSelection::fixed(d));
//   kqsvd::ErrorBudgetAllocation eps = kqsvd::error_budget_allocation(full, /*ratio=*/0.25);
//   auto projections = full.truncated(eps.ranks);      // ranks differ per head
//   eps.ranks.compression_ratio();                     // 0.25, within one rank
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <string>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/solvers/model_projections.hpp"
#include "kqsvd/solvers/rank_allocation.hpp"
#include "kqsvd/solvers/rank_selection.hpp"

namespace kqsvd {

// Each head at the rank `selection` picks from its own spectrum (a fixed rank, or the smallest within an
// error budget), keys and values alike.
template <typename Scalar>
RankAllocation allocation_by_selection(const ModelProjections<Scalar>& projections, const RankSelection& key_selection,
                                       const RankSelection& value_selection) {
  RankAllocation allocation(projections.shape());
  for (Eigen::Index l = 0; l < projections.shape().layers; ++l) {
    for (Eigen::Index h = 0; h < projections.shape().kv_heads; ++h) {
      allocation.set_key(l, h, key_selection.select(projections.keys(l, h).singular_values()));
      allocation.set_value(l, h, value_selection.select(projections.values(l, h).singular_values()));
    }
  }
  return allocation;
}

struct ErrorBudgetAllocation {
  double epsilon = 0.0;  // the error budget used for keys and values alike
  RankAllocation ranks;
};

// The error budget epsilon (one for every key and value projection) whose per-head ranks bring the
// compression ratio closest to `target_ratio`, found by bisection: the ratio falls as epsilon grows, in
// steps (ranks are integers), so the result is within one step of the target -- with realistic head
// counts well inside 1 %.
template <typename Scalar>
ErrorBudgetAllocation error_budget_allocation(const ModelProjections<Scalar>& projections, double target_ratio) {
  constexpr const char* where = "kqsvd::error_budget_allocation";
  if (!(target_ratio > 0.0 && target_ratio <= 1.0)) {
    detail::throw_invalid(where, "target_ratio", "must be in (0, 1], got " + std::to_string(target_ratio));
  }
  const auto ratio_at = [&](double epsilon) {
    const RankSelection budget = RankSelection::error_budget(epsilon);
    return allocation_by_selection(projections, budget, budget).compression_ratio();
  };
  // Invariant: ratio_at(low) >= target >= ratio_at(high), or the target lies outside what any epsilon
  // reaches, in which case the nearer end wins below.
  double low = 1e-12, high = 1.0 - 1e-12;
  for (int i = 0; i < 100 && high - low > 1e-12; ++i) {
    const double middle = 0.5 * (low + high);
    (ratio_at(middle) > target_ratio ? low : high) = middle;
  }
  const double epsilon =
      std::abs(ratio_at(low) - target_ratio) < std::abs(ratio_at(high) - target_ratio) ? low : high;
  const RankSelection budget = RankSelection::error_budget(epsilon);
  return ErrorBudgetAllocation{epsilon, allocation_by_selection(projections, budget, budget)};
}

}  // namespace kqsvd
