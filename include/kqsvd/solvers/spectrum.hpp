// kqsvd/solvers/spectrum.hpp -- what a spectrum of singular values says about every rank at once.
//
// By Eckart-Young, the best rank-r approximation of a matrix with singular values s_1 >= s_2 >= ...
// has relative Frobenius error sqrt(sum_{i>r} s_i^2 / sum_i s_i^2). For KQ-SVD the spectrum is that of
// Q K^T, so the error of every rank is known from the calibration Grams before anything is compressed.
//
//   Eigen::VectorXd s = projection.singular_values();
//   double e8 = kqsvd::relative_tail_error(s, 8);              // error at rank 8
//   Eigen::Index r = kqsvd::smallest_rank_within(s, 0.05);     // smallest rank with error <= 5 %
#pragma once

#include <Eigen/Core>

#include <string>

#include "kqsvd/core/detail/validation.hpp"

namespace kqsvd {

namespace detail {

inline void require_spectrum(const char* function, const Eigen::Ref<const Eigen::VectorXd>& singular_values) {
  require_finite(function, "singular_values", singular_values);
  if (singular_values.size() > 0 && singular_values.minCoeff() < 0.0) {
    throw_invalid(function, "singular_values", "contains a negative value; singular values are >= 0");
  }
}

}  // namespace detail

// Relative Frobenius error of the best rank-`rank` approximation; 0 for an all-zero spectrum (an
// all-zero matrix is represented exactly at every rank).
inline double relative_tail_error(const Eigen::Ref<const Eigen::VectorXd>& singular_values, Eigen::Index rank) {
  const Eigen::Index n = singular_values.size();
  detail::require_spectrum("kqsvd::relative_tail_error", singular_values);
  if (rank < 0 || rank > n) {
    detail::throw_invalid("kqsvd::relative_tail_error", "rank",
                          "must be in [0, " + std::to_string(n) + "], got " + std::to_string(rank));
  }
  // Summed from the smallest value up, so that a tail far below the head is not lost to cancellation
  // (total - head would be).
  double tail = 0.0;
  for (Eigen::Index i = n - 1; i >= rank; --i) tail += singular_values(i) * singular_values(i);
  double total = tail;
  for (Eigen::Index i = rank - 1; i >= 0; --i) total += singular_values(i) * singular_values(i);
  if (total == 0.0) return 0.0;
  return std::sqrt(tail / total);
}

// The smallest rank r >= 1 whose relative_tail_error is <= epsilon, for epsilon in (0, 1).
inline Eigen::Index smallest_rank_within(const Eigen::Ref<const Eigen::VectorXd>& singular_values, double epsilon) {
  if (!(epsilon > 0.0 && epsilon < 1.0)) {
    detail::throw_invalid("kqsvd::smallest_rank_within", "epsilon",
                          "must be in the open interval (0, 1), got " + std::to_string(epsilon));
  }
  const Eigen::Index n = singular_values.size();
  if (n == 0) detail::throw_invalid("kqsvd::smallest_rank_within", "singular_values", "is empty");
  detail::require_spectrum("kqsvd::smallest_rank_within", singular_values);
  for (Eigen::Index r = 1; r < n; ++r) {
    if (relative_tail_error(singular_values, r) <= epsilon) return r;
  }
  return n;
}

}  // namespace kqsvd
