// kqsvd/solvers/key_svd.hpp -- the K-SVD baseline: keep the top-r principal directions of the keys.
//
// A = B = P, the top-r eigenvectors of G_K = K^T K, an orthogonal projection of keys and queries alike.
// It minimises || K - K P P^T ||_F, the error of the keys, not of the attention scores. For values the
// same solve on G_V is V-SVD. It takes no FitOptions: a symmetric eigendecomposition of one Gram has
// neither a balance factor, nor a factorisation whose range needs a tolerance, nor an SVD to choose.
//
//   auto proj = kqsvd::fit_k_svd<float>(keys.mean_gram(), kqsvd::RankSelection::fixed(16));
#pragma once

#include <Eigen/Core>

#include "kqsvd/solvers/detail/gram_factor.hpp"
#include "kqsvd/solvers/detail/principal_directions.hpp"
#include "kqsvd/solvers/low_rank_projection.hpp"
#include "kqsvd/solvers/rank_selection.hpp"

namespace kqsvd {

template <typename Scalar = float>
LowRankProjection<Scalar> fit_k_svd(const Eigen::Ref<const Eigen::MatrixXd>& cached_gram, const RankSelection& rank) {
  constexpr const char* where = "kqsvd::fit_k_svd";
  const Eigen::MatrixXd gram = detail::checked_gram(where, "cached_gram", cached_gram, 0);
  const detail::PrincipalDirections principal = detail::principal_directions(where, "cached_gram", gram);
  const Eigen::Index r = rank.select(principal.singular_values);
  const Eigen::MatrixXd basis = principal.directions.leftCols(r);
  return LowRankProjection<Scalar>(Method::k_svd, basis.cast<Scalar>(), basis.cast<Scalar>(),
                                   principal.singular_values);
}

}  // namespace kqsvd
