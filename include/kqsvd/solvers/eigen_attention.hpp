// kqsvd/solvers/eigen_attention.hpp -- the Eigen Attention baseline (Saxena et al., EMNLP Findings 2024).
//
// A = B = P, the top-r eigenvectors of a^2 G_K + G_Q / a^2: the principal directions of keys and
// queries stacked, [a K; Q / a], with balance factor a (FitOptions::balance, default 1). Because the
// two Grams are added, their relative scale matters: pass sums over tokens (or both divided by the
// same count), as fit_projection() does from accumulators. Values use V-SVD, as in the paper.
//
//   kqsvd::FitOptions options;  options.balance = 1.0;
//   auto proj = kqsvd::fit_eigen_attention<float>(gk, gq, kqsvd::RankSelection::fixed(16), options);
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <string>

#include "kqsvd/solvers/detail/gram_factor.hpp"
#include "kqsvd/solvers/detail/principal_directions.hpp"
#include "kqsvd/solvers/fit_options.hpp"
#include "kqsvd/solvers/low_rank_projection.hpp"
#include "kqsvd/solvers/rank_selection.hpp"

namespace kqsvd {

template <typename Scalar = float>
LowRankProjection<Scalar> fit_eigen_attention(const Eigen::Ref<const Eigen::MatrixXd>& cached_gram,
                                              const Eigen::Ref<const Eigen::MatrixXd>& query_gram,
                                              const RankSelection& rank, const FitOptions& options = {}) {
  constexpr const char* where = "kqsvd::fit_eigen_attention";
  const double a = options.balance;
  if (!(a > 0.0) || !std::isfinite(a)) {
    detail::throw_invalid(where, "options.balance", "must be finite and > 0, got " + std::to_string(a));
  }
  const Eigen::MatrixXd gk = detail::checked_gram(where, "cached_gram", cached_gram, 0);
  const Eigen::MatrixXd gq = detail::checked_gram(where, "query_gram", query_gram, gk.rows());
  const Eigen::MatrixXd stacked = (a * a) * gk + gq / (a * a);
  const detail::PrincipalDirections principal = detail::principal_directions(where, "a^2 G_K + G_Q / a^2", stacked);
  const Eigen::Index r = rank.select(principal.singular_values);
  const Eigen::MatrixXd basis = principal.directions.leftCols(r);
  return LowRankProjection<Scalar>(Method::eigen_attention, basis.cast<Scalar>(), basis.cast<Scalar>(),
                                   principal.singular_values);
}

}  // namespace kqsvd
