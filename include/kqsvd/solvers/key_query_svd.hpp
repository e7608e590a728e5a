// kqsvd/solvers/key_query_svd.hpp -- the closed-form KQ-SVD projection of one KV head.
//
// KQ-SVD (Lesens, Rakhshan, Rabusseau, AISTATS 2026) chooses A, B (d x r) minimising
// || Q K^T - (Q B)(K A)^T ||_F. The optimum is the best rank-r approximation of Q K^T, reached from
// the d x d Grams alone: with G_K = L_K L_K^T, G_Q = L_Q L_Q^T and L_K^T L_Q = U S V^T,
//   A = L_K^{+T} U_r,  B = L_K U_r,  singular values of Q K^T = S.
// The same solve serves values: (G_V, G_W) with G_W = W_h^T W_h from the output projection gives the
// optimal rank-r approximation of V W_h^T. For GQA, sum the query (or W) Grams of the group.
//
// The scale of cached_gram sets the scale of the latents: pass the mean Gram (K^T K / n) and the
// latents K A are O(1) whatever n, as fp16/bf16 storage needs. query_gram's scale does not matter.
//
//   Eigen::MatrixXd gk = K.transpose() * K / K.rows(), gq = Q.transpose() * Q / Q.rows();
//   auto proj = kqsvd::fit_kq_svd<float>(gk, gq, kqsvd::RankSelection::fixed(16));
//   double err = proj.predicted_relative_error();   // exact ||QK^T - (QB)(KA)^T|| / ||QK^T||
#pragma once

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <Eigen/SVD>

#include <algorithm>
#include <sstream>
#include <string>

#include "kqsvd/solvers/detail/gram_factor.hpp"
#include "kqsvd/solvers/fit_options.hpp"
#include "kqsvd/solvers/low_rank_projection.hpp"
#include "kqsvd/solvers/rank_selection.hpp"

namespace kqsvd {

template <typename Scalar = float>
LowRankProjection<Scalar> fit_kq_svd(const Eigen::Ref<const Eigen::MatrixXd>& cached_gram,
                                     const Eigen::Ref<const Eigen::MatrixXd>& query_gram, const RankSelection& rank,
                                     const FitOptions& options = {}) {
  using Index = Eigen::Index;
  constexpr const char* where = "kqsvd::fit_kq_svd";
  const Eigen::MatrixXd gk = detail::checked_gram(where, "cached_gram", cached_gram, 0);
  const Index d = gk.rows();
  const Eigen::MatrixXd gq = detail::checked_gram(where, "query_gram", query_gram, d);
  const double tolerance = detail::checked_range_tolerance(where, options.range_tolerance, d);
  const bool by_eigen = options.svd == SvdAlgorithm::symmetric_eigen;
  const detail::GramFactor keys = by_eigen ? detail::factor_gram_fast(where, "cached_gram", gk, tolerance)
                                           : detail::factor_gram(where, "cached_gram", gk, tolerance);
  const Index p = keys.factor.cols();

  Eigen::MatrixXd left = Eigen::MatrixXd::Identity(p, p);
  Eigen::VectorXd singular_values = Eigen::VectorXd::Zero(d);
  if (by_eigen) {
    detail::require_positive_semidefinite(where, "query_gram", gq);
    if (p > 0 && gq.cwiseAbs().maxCoeff() > 0.0) {
      // M M^T = L_K^T L_Q L_Q^T L_K = L_K^T G_Q L_K: its eigenvectors are M's left singular vectors and
      // its eigenvalues their squared singular values.
      const Eigen::MatrixXd core = keys.factor.transpose() * gq * keys.factor;
      Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eigen(core);
      if (eigen.info() != Eigen::Success) {
        throw NumericalError(std::string(where) + ": the eigensolver did not converge");
      }
      left = eigen.eigenvectors().rowwise().reverse();  // descending
      // Rounding leaves tiny negative eigenvalues where Q K^T has rank < p: they are zeros.
      singular_values.head(p) = eigen.eigenvalues().reverse().cwiseMax(0.0).cwiseSqrt();
    }
  } else {
    const detail::GramFactor queries = detail::factor_gram(where, "query_gram", gq, tolerance);
    const Index q = queries.factor.cols();
    if (p > 0 && q > 0) {
      Eigen::VectorXd core_values;
      detail::left_singular_system(keys.factor.transpose() * queries.factor, options.svd, left, core_values);
      singular_values.head(core_values.size()) = core_values;
    }
  }

  const Index r = rank.select(singular_values);
  const Index from_range = std::min(r, p);
  Eigen::MatrixXd encoder(d, r), decoder(d, r);
  encoder.leftCols(from_range) = keys.dual * left.leftCols(from_range);
  decoder.leftCols(from_range) = keys.factor * left.leftCols(from_range);
  // Past the rank of K every direction is free; the complement keeps A^T B = I_r and, at r = d,
  // A B^T = I_d.
  encoder.rightCols(r - from_range) = keys.complement.leftCols(r - from_range);
  decoder.rightCols(r - from_range) = keys.complement.leftCols(r - from_range);
  detail::normalize_signs(decoder, &encoder);
  return LowRankProjection<Scalar>(Method::kq_svd, detail::narrowed<Scalar>(where, "encoder", encoder),
                                   detail::narrowed<Scalar>(where, "decoder", decoder), singular_values);
}

}  // namespace kqsvd
