// kqsvd/solvers/budget_allocation.hpp -- spending a memory budget over a model's heads: per-head ranks
// for a target compression ratio or a number of bytes per token.
//
// Spectrum-only rules (no model needed):
//   uniform        every key and value projection at rank round(ratio * head_dim)
//                  (RankAllocation::uniform with uniform_rank_for_ratio);
//   error budget   one epsilon for every projection, each head at the smallest rank whose predicted
//                  relative error (from its own spectrum) is <= epsilon, epsilon bisected to the ratio
//                  (error_budget_allocation);
//   layer error    the authors' rule: one rank per layer and kind (keys, values), the smallest whose mean
//                  predicted relative error over the layer's KV heads is <= epsilon, epsilon bisected
//                  (layer_error_budget_allocation).
// Loss-aware (loss_aware_allocation): minimises sum_{layer, kind} w * err^2 under a byte budget, where err^2
// is the layer's squared relative error of the method's own objective and w the loss (KL per token) one
// unit of it costs, measured on the model (a sensitivity file, io/sensitivity_file.hpp). With every weight
// 1 it water-fills the layers' normalised spectra.
// All start from projections fitted at full rank: every method here orders its directions by
// importance, so truncating equals fitting at the lower rank, and one fit serves every budget.
//
//   auto full = kqsvd::ModelProjections<float>::fit(calibration, wo, method, kqsvd::RankSelection::fixed(d),
//                                                   kqsvd::RankSelection::fixed(d));
//   kqsvd::ErrorBudgetAllocation eps = kqsvd::error_budget_allocation(full, /*ratio=*/0.25);
//   auto projections = full.truncated(eps.ranks);      // ranks differ per head
//
//   kqsvd::LossWeights weights(full.shape());          // or io::read_sensitivity_file(...)
//   weights.set_layer(0, /*key=*/3.5, /*value=*/0.8);
//   kqsvd::LossAwareAllocation best = kqsvd::loss_aware_allocation(
//       full, weights, kqsvd::MemoryBudget::fraction_of_full_cache(0.25));
//   best.bytes_per_token <= best.budget_bytes_per_token;   // always; short of it by less than one step
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/storage_format.hpp"
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

namespace detail {

// The epsilon in (0, 1) whose allocation's compression ratio is closest to `target_ratio`, by bisection:
// the ratio falls as epsilon grows, in steps (ranks are integers), so the result is within one step of
// the target -- with realistic head counts well inside 1 %.
inline double bisect_epsilon(const char* where, double target_ratio, const std::function<double(double)>& ratio_at) {
  if (!(target_ratio > 0.0 && target_ratio <= 1.0)) {
    throw_invalid(where, "target_ratio", "must be in (0, 1], got " + std::to_string(target_ratio));
  }
  // Invariant: ratio_at(low) >= target >= ratio_at(high), or the target lies outside what any epsilon
  // reaches, in which case the nearer end wins below.
  double low = 1e-12, high = 1.0 - 1e-12;
  for (int i = 0; i < 100 && high - low > 1e-12; ++i) {
    const double middle = 0.5 * (low + high);
    (ratio_at(middle) > target_ratio ? low : high) = middle;
  }
  return std::abs(ratio_at(low) - target_ratio) < std::abs(ratio_at(high) - target_ratio) ? low : high;
}

}  // namespace detail

// The error budget epsilon (one for every key and value projection) whose per-head ranks bring the
// compression ratio closest to `target_ratio` (detail::bisect_epsilon).
template <typename Scalar>
ErrorBudgetAllocation error_budget_allocation(const ModelProjections<Scalar>& projections, double target_ratio) {
  const auto allocation_at = [&](double epsilon) {
    const RankSelection budget = RankSelection::error_budget(epsilon);
    return allocation_by_selection(projections, budget, budget);
  };
  const double epsilon = detail::bisect_epsilon("kqsvd::error_budget_allocation", target_ratio,
                                                [&](double e) { return allocation_at(e).compression_ratio(); });
  return ErrorBudgetAllocation{epsilon, allocation_at(epsilon)};
}

// The authors' rule (Lesens et al., section 5): within a layer, keys share one rank and values share one
// rank -- for each, the smallest r whose predicted relative error averaged over the layer's KV heads is
// <= epsilon; one epsilon for the whole model, bisected so that the compression ratio matches the target.
template <typename Scalar>
ErrorBudgetAllocation layer_error_budget_allocation(const ModelProjections<Scalar>& projections, double target_ratio) {
  const ModelShape& shape = projections.shape();
  const auto allocation_at = [&](double epsilon) {
    RankAllocation allocation(shape);
    for (Eigen::Index l = 0; l < shape.layers; ++l) {
      for (const bool keys : {true, false}) {
        const auto spectrum = [&](Eigen::Index h) -> const Eigen::VectorXd& {
          return keys ? projections.keys(l, h).singular_values() : projections.values(l, h).singular_values();
        };
        Eigen::Index rank = shape.head_dim;
        for (Eigen::Index r = 1; r < shape.head_dim; ++r) {
          double mean = 0.0;
          for (Eigen::Index h = 0; h < shape.kv_heads; ++h) mean += relative_tail_error(spectrum(h), r);
          if (mean / static_cast<double>(shape.kv_heads) <= epsilon) {
            rank = r;
            break;
          }
        }
        for (Eigen::Index h = 0; h < shape.kv_heads; ++h) {
          keys ? allocation.set_key(l, h, rank) : allocation.set_value(l, h, rank);
        }
      }
    }
    return allocation;
  };
  const double epsilon = detail::bisect_epsilon("kqsvd::layer_error_budget_allocation", target_ratio,
                                                [&](double e) { return allocation_at(e).compression_ratio(); });
  return ErrorBudgetAllocation{epsilon, allocation_at(epsilon)};
}

// What one unit of a layer's squared relative error costs the loss, per layer, kind (keys, values) and
// KV head: w in sum_{layer, kind} sum_h w_h * tail_h / total_{layer, kind}. Finite and >= 0; default 1.
// A layer-level weight (the sensitivity file's number) is the same w for every KV head of the layer.
class LossWeights {
 public:
  using Index = Eigen::Index;

  explicit LossWeights(const ModelShape& shape, double weight = 1.0)
      : shape_((shape.validate(), shape)),
        keys_(static_cast<std::size_t>(shape.layers * shape.kv_heads), checked("weight", weight)),
        values_(keys_) {}

  const ModelShape& shape() const { return shape_; }
  double key(Index layer, Index kv_head) const { return keys_[slot("key", layer, kv_head)]; }
  double value(Index layer, Index kv_head) const { return values_[slot("value", layer, kv_head)]; }
  void set_key(Index layer, Index kv_head, double weight) { keys_[slot("set_key", layer, kv_head)] = checked("weight", weight); }
  void set_value(Index layer, Index kv_head, double weight) {
    values_[slot("set_value", layer, kv_head)] = checked("weight", weight);
  }
  // Every KV head of `layer`.
  void set_layer(Index layer, double key_weight, double value_weight) {
    for (Index h = 0; h < shape_.kv_heads; ++h) {
      set_key(layer, h, key_weight);
      set_value(layer, h, value_weight);
    }
  }

 private:
  static double checked(const char* argument, double weight) {
    if (!std::isfinite(weight) || weight < 0.0) {
      detail::throw_invalid("kqsvd::LossWeights", argument, "must be finite and >= 0, got " + std::to_string(weight));
    }
    return weight;
  }

  std::size_t slot(const char* which, Index layer, Index kv_head) const {
    return shape_.kv_head_slot("kqsvd::LossWeights", which, layer, kv_head);
  }

  ModelShape shape_;
  std::vector<double> keys_, values_;  // [layer * kv_heads + kv_head]
};

// How many bytes every further token may cost: a fraction of the full cache's bytes (keys and values, all
// layers and KV heads, full rows in the same storage format), or a number of bytes.
class MemoryBudget {
 public:
  static MemoryBudget fraction_of_full_cache(double fraction) {
    if (!(fraction > 0.0 && fraction <= 1.0)) {
      detail::throw_invalid("kqsvd::MemoryBudget::fraction_of_full_cache", "fraction",
                            "must be in (0, 1], got " + std::to_string(fraction));
    }
    return MemoryBudget(fraction, 0);
  }
  static MemoryBudget bytes_per_token(std::int64_t bytes) {
    if (bytes <= 0) {
      detail::throw_invalid("kqsvd::MemoryBudget::bytes_per_token", "bytes", "must be positive, got " + std::to_string(bytes));
    }
    return MemoryBudget(0.0, bytes);
  }

  bool is_fraction() const { return bytes_ == 0; }
  double fraction() const { return fraction_; }  // 0 for a byte budget

  // The budget in bytes per token for a model of `shape` whose latents are stored in `format`: a
  // fraction is of the full cache in that format, rounded down (never more than asked for).
  std::int64_t bytes_for(const ModelShape& shape, const StorageFormat& format) const {
    if (!is_fraction()) return bytes_;
    const std::int64_t full = shape.layers * shape.kv_heads * 2 * format.bytes_per_row(shape.head_dim);
    return static_cast<std::int64_t>(std::floor(fraction_ * static_cast<double>(full) + 1e-9));
  }

  std::string to_string() const {
    if (!is_fraction()) return std::to_string(bytes_) + " bytes per token";
    std::string text = std::to_string(fraction_);
    text.erase(text.find_last_not_of('0') + 1);
    if (!text.empty() && text.back() == '.') text.pop_back();
    return text + " of the full cache";
  }

 private:
  MemoryBudget(double fraction, std::int64_t bytes) : fraction_(fraction), bytes_(bytes) {}
  double fraction_;
  std::int64_t bytes_;
};

// Whether keys and values draw on one budget (joint: the loss decides how much each gets) or each on
// half of it (separate).
enum class BudgetSharing { joint, separate };

inline const char* to_string(BudgetSharing sharing) { return sharing == BudgetSharing::joint ? "joint" : "separate"; }

struct LossAwareOptions {
  StorageFormat format;                    // how latents are stored: the bytes a rank costs, the widths allowed
  BudgetSharing sharing = BudgetSharing::joint;
  Eigen::Index min_rank = 0;               // 0: the format's width multiple (1 for unblocked formats)
  Eigen::Index max_rank = 0;               // 0: each projection's own rank
};

struct LossAwareAllocation {
  RankAllocation ranks;
  double predicted_loss = 0.0;             // sum_{layer, kind} w * err^2 at these ranks
  std::int64_t bytes_per_token = 0;        // what the latents cost, all layers, keys and values
  std::int64_t budget_bytes_per_token = 0; // what the budget allowed
};

// The same rank r in every key and value projection: the largest multiple of the format's width_multiple
// whose latents fit the budget. Needs no model and, as measured in docs/end-to-end.md, beats every
// spectrum-only per-head rule there; a loss-aware allocation beats it.
inline RankAllocation uniform_allocation(const ModelShape& shape, const MemoryBudget& budget,
                                         const StorageFormat& format = StorageFormat()) {
  shape.validate();
  const std::int64_t bytes = budget.bytes_for(shape, format);
  const std::int64_t rows = 2 * shape.layers * shape.kv_heads;
  const Eigen::Index step = format.width_multiple();
  Eigen::Index rank = 0;
  for (Eigen::Index r = step; r <= shape.head_dim; r += step) {
    if (rows * format.bytes_per_row(r) <= bytes) rank = r;
  }
  if (rank == 0) {
    detail::throw_invalid("kqsvd::uniform_allocation", "budget",
                          "is " + std::to_string(bytes) + " bytes per token (" + budget.to_string() + " in " +
                              format.name() + "), less than rank " + std::to_string(step) +
                              " in every key and value projection costs: " +
                              std::to_string(rows * format.bytes_per_row(step)) + " bytes per token");
  }
  return RankAllocation::uniform(shape, rank, rank);
}

// sum_{layer, kind} sum_h w_h * tail_h(r_h) / total_{layer, kind}: the objective loss_aware_allocation
// minimises, for any ranks (each at most its projection's rank). With unit weights, summed over the layers'
// keys and values, each term is the squared relative error the fidelity metrics report for that layer.
template <typename Scalar>
double predicted_loss(const ModelProjections<Scalar>& projections, const LossWeights& weights, const RankAllocation& ranks) {
  constexpr const char* where = "kqsvd::predicted_loss";
  const ModelShape& shape = projections.shape();
  if (weights.shape() != shape || ranks.shape() != shape) {
    detail::throw_invalid(where, "weights, ranks", "must be for the projections' model " + kqsvd::to_string(shape));
  }
  double loss = 0.0;
  for (Eigen::Index l = 0; l < shape.layers; ++l) {
    for (const bool key : {true, false}) {
      double total = 0.0, weighted_tail = 0.0;
      for (Eigen::Index h = 0; h < shape.kv_heads; ++h) {
        const Eigen::VectorXd& s = (key ? projections.keys(l, h) : projections.values(l, h)).singular_values();
        const Eigen::Index rank = key ? ranks.key(l, h) : ranks.value(l, h);
        total += s.squaredNorm();
        weighted_tail += (key ? weights.key(l, h) : weights.value(l, h)) * s.tail(s.size() - rank).squaredNorm();
      }
      if (total > 0.0) loss += weighted_tail / total;
    }
  }
  return loss;
}

// The ranks that minimise sum_{layer, kind} sum_h w_h * tail_h(r_h) / total_{layer, kind} -- tail_h(r) the
// energy of head h's spectrum beyond rank r, total the layer's energy for that kind -- subject to the
// latents' bytes per token <= the budget and min_rank <= r <= max_rank, ranks multiples of the format's
// width_multiple m.
//
// Why the greedy below is optimal. Every head starts at min_rank; growing a head by one step (m more
// dimensions) costs the same c = bytes_per_row(r + m) - bytes_per_row(r) bytes whatever the head and r
// (one format everywhere; its per-row and per-block side bytes are linear in the steps), and lowers the
// objective by the step's gain w_h * (sigma_{r+1}^2 + ... + sigma_{r+m}^2) / total >= 0. So an allocation
// is a set of at most K = floor((budget - base) / c) steps that forms a prefix in each head, and its
// objective is a constant minus the sum of its gains. Without the prefix condition the best set is the K
// largest gains. Singular values are non-increasing, so each head's gains are too (its tail is convex
// in the rank), and with ties broken toward earlier steps the K largest gains already are prefixes: if
// step j+1 of a head were among them and step j not, gain_j >= gain_{j+1} and the tie rule would have
// ranked j first. Hence taking the K largest gains -- the greedy on gain per byte -- is optimal, and it
// leaves less than one step's bytes of the budget unused unless every head is at max_rank. Separate
// sharing solves the same problem for keys and for values, each with half the budget.
// Cost: one sort-free selection (nth_element) over heads x head_dim / m gains.
template <typename Scalar>
LossAwareAllocation loss_aware_allocation(const ModelProjections<Scalar>& projections, const LossWeights& weights,
                                          const MemoryBudget& budget, const LossAwareOptions& options = {}) {
  constexpr const char* where = "kqsvd::loss_aware_allocation";
  using Index = Eigen::Index;
  const ModelShape& shape = projections.shape();
  if (weights.shape() != shape) {
    detail::throw_invalid(where, "weights", "are for a model of shape " + kqsvd::to_string(weights.shape()) +
                                                ", the projections for " + kqsvd::to_string(shape));
  }
  const StorageFormat& format = options.format;
  const Index step = format.width_multiple();
  const Index min_rank = options.min_rank == 0 ? step : options.min_rank;
  if (min_rank < 1 || min_rank % step != 0 || min_rank > shape.head_dim) {
    detail::throw_invalid(where, "options.min_rank",
                          "must be a multiple of " + std::to_string(step) + " (what " + format.name() +
                              " holds) in [1, " + std::to_string(shape.head_dim) + "], got " + std::to_string(min_rank));
  }
  if (options.max_rank != 0 && (options.max_rank < min_rank || options.max_rank > shape.head_dim)) {
    detail::throw_invalid(where, "options.max_rank",
                          "must be 0 (each projection's rank) or in [min_rank = " + std::to_string(min_rank) + ", " +
                              std::to_string(shape.head_dim) + "], got " + std::to_string(options.max_rank));
  }
  const std::int64_t step_bytes = format.bytes_per_row(2 * step) - format.bytes_per_row(step);
  const std::int64_t budget_bytes = budget.bytes_for(shape, format);

  // One unit per (layer, kind, KV head); gains of its steps beyond min_rank, in order.
  struct Unit {
    Index layer, kv_head;
    bool key;
    std::vector<double> gains;  // one per step from min_rank up to the unit's largest rank
  };
  std::vector<Unit> units;  // [((layer * 2) + value) * kv_heads + kv_head]
  units.reserve(static_cast<std::size_t>(2 * shape.layers * shape.kv_heads));
  for (Index l = 0; l < shape.layers; ++l) {
    for (const bool key : {true, false}) {
      const auto projection = [&](Index h) -> const LowRankProjection<Scalar>& {
        return key ? projections.keys(l, h) : projections.values(l, h);
      };
      double total = 0.0;
      for (Index h = 0; h < shape.kv_heads; ++h) total += projection(h).singular_values().squaredNorm();
      for (Index h = 0; h < shape.kv_heads; ++h) {
        const LowRankProjection<Scalar>& p = projection(h);
        Index cap = options.max_rank == 0 ? p.rank() : std::min(options.max_rank, p.rank());
        cap -= cap % step;
        if (cap < min_rank) {
          detail::throw_invalid(where, "projections",
                                std::string(key ? "key" : "value") + " projection of layer " + std::to_string(l) +
                                    ", KV head " + std::to_string(h) + " has rank " + std::to_string(p.rank()) +
                                    ", below min_rank " + std::to_string(min_rank) + " (fit at full rank first)");
        }
        const double w = key ? weights.key(l, h) : weights.value(l, h);
        const Eigen::VectorXd& s = p.singular_values();
        Unit unit{l, h, key, {}};
        for (Index r = min_rank; r < cap; r += step) {
          const double energy = s.segment(r, step).squaredNorm();
          unit.gains.push_back(total > 0.0 ? w * energy / total : 0.0);
        }
        units.push_back(std::move(unit));
      }
    }
  }

  struct Step {
    double gain;
    std::uint32_t unit, index;
  };
  const auto better = [](const Step& a, const Step& b) {
    if (a.gain != b.gain) return a.gain > b.gain;
    if (a.unit != b.unit) return a.unit < b.unit;
    return a.index < b.index;
  };
  LossAwareAllocation result{RankAllocation(shape), 0.0, 0, budget_bytes};
  const std::int64_t min_row_bytes = format.bytes_per_row(min_rank);
  std::int64_t spent = 0;
  const auto spend = [&](bool (*member)(const Unit&), std::int64_t pool) {
    std::int64_t base = 0;
    std::vector<Step> steps;
    for (std::size_t u = 0; u < units.size(); ++u) {
      if (!member(units[u])) continue;
      base += min_row_bytes;
      for (std::size_t i = 0; i < units[u].gains.size(); ++i) {
        steps.push_back(Step{units[u].gains[i], static_cast<std::uint32_t>(u), static_cast<std::uint32_t>(i)});
      }
    }
    const auto affordable = static_cast<std::size_t>(std::min<std::int64_t>((pool - base) / step_bytes,
                                                                            static_cast<std::int64_t>(steps.size())));
    std::nth_element(steps.begin(), steps.begin() + static_cast<std::ptrdiff_t>(affordable), steps.end(), better);
    std::vector<Index> taken(units.size(), 0);
    for (std::size_t k = 0; k < affordable; ++k) ++taken[steps[k].unit];
    for (std::size_t u = 0; u < units.size(); ++u) {
      if (!member(units[u])) continue;
      const Unit& unit = units[u];
      const Index rank = min_rank + taken[u] * step;
      unit.key ? result.ranks.set_key(unit.layer, unit.kv_head, rank) : result.ranks.set_value(unit.layer, unit.kv_head, rank);
    }
    spent += base + static_cast<std::int64_t>(affordable) * step_bytes;
  };
  const auto least = static_cast<std::int64_t>(units.size()) * min_row_bytes;
  if (budget_bytes < least) {
    detail::throw_invalid(where, "budget",
                          "is " + std::to_string(budget_bytes) + " bytes per token (" + budget.to_string() + " in " +
                              format.name() + "), less than rank " + std::to_string(min_rank) +
                              " in every key and value projection costs: " + std::to_string(least) + " bytes per token");
  }
  if (options.sharing == BudgetSharing::joint) {
    spend([](const Unit&) { return true; }, budget_bytes);
  } else {
    spend([](const Unit& unit) { return unit.key; }, budget_bytes / 2);
    spend([](const Unit& unit) { return !unit.key; }, budget_bytes / 2);
  }
  result.bytes_per_token = spent;
  result.predicted_loss = predicted_loss(projections, weights, result.ranks);
  return result;
}

}  // namespace kqsvd
