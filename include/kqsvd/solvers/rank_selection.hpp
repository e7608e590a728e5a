// kqsvd/solvers/rank_selection.hpp -- how many dimensions to keep: a fixed rank, or an error budget.
//
//   auto sixteen = kqsvd::RankSelection::fixed(16);            // keep 16 of d dimensions
//   auto budget  = kqsvd::RankSelection::error_budget(0.05);   // the smallest rank whose predicted
//                                                              // relative error is <= 5 %
//   Eigen::Index r = budget.select(projection_spectrum);
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <string>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/solvers/spectrum.hpp"

namespace kqsvd {

class RankSelection {
 public:
  using Index = Eigen::Index;

  static RankSelection fixed(Index rank) {
    if (rank < 1) {
      detail::throw_invalid("kqsvd::RankSelection::fixed", "rank", "must be >= 1, got " + std::to_string(rank));
    }
    return RankSelection(rank, 0.0);
  }

  static RankSelection error_budget(double epsilon) {
    if (!(epsilon > 0.0 && epsilon < 1.0)) {
      detail::throw_invalid("kqsvd::RankSelection::error_budget", "epsilon",
                            "must be in the open interval (0, 1), got " + std::to_string(epsilon));
    }
    return RankSelection(0, epsilon);
  }

  bool is_fixed() const { return rank_ > 0; }
  Index rank() const { return rank_; }          // 0 for an error budget
  double epsilon() const { return epsilon_; }   // 0 for a fixed rank

  // The rank to use for a method whose objective has this spectrum (length = head dimension d).
  Index select(const Eigen::Ref<const Eigen::VectorXd>& singular_values) const {
    const Index d = singular_values.size();
    if (is_fixed()) {
      if (rank_ > d) {
        detail::throw_invalid("kqsvd::RankSelection::select", "rank",
                              "is " + std::to_string(rank_) + ", more than the head dimension " + std::to_string(d));
      }
      return rank_;
    }
    return smallest_rank_within(singular_values, epsilon_);
  }

  std::string to_string() const {
    return is_fixed() ? "rank " + std::to_string(rank_) : "error budget " + std::to_string(epsilon_);
  }

 private:
  RankSelection(Index rank, double epsilon) : rank_(rank), epsilon_(epsilon) {}

  Index rank_;
  double epsilon_;
};

}  // namespace kqsvd
