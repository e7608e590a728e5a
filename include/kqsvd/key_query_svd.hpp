// kqsvd/key_query_svd.hpp -- the closed-form KQ-SVD projection of one KV head.
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

#include <Eigen/Core>
#include <Eigen/SVD>

#include <algorithm>

#include "kqsvd/detail/gram_factor.hpp"
#include "kqsvd/fit_options.hpp"
#include "kqsvd/low_rank_projection.hpp"
#include "kqsvd/rank_selection.hpp"

namespace kqsvd {

namespace detail {

// Full left singular vectors and the singular values of M (p x q).
inline void left_singular_system(const Eigen::MatrixXd& m, SvdAlgorithm algorithm, Eigen::MatrixXd& left,
                                 Eigen::VectorXd& values) {
  if (algorithm == SvdAlgorithm::jacobi) {
    Eigen::JacobiSVD<Eigen::MatrixXd> svd(m, Eigen::ComputeFullU);
    left = svd.matrixU();
    values = svd.singularValues();
  } else {
    Eigen::BDCSVD<Eigen::MatrixXd> svd(m, Eigen::ComputeFullU);
    left = svd.matrixU();
    values = svd.singularValues();
  }
}

}  // namespace detail

template <typename Scalar = float>
LowRankProjection<Scalar> fit_kq_svd(const Eigen::Ref<const Eigen::MatrixXd>& cached_gram,
                                     const Eigen::Ref<const Eigen::MatrixXd>& query_gram, const RankSelection& rank,
                                     const FitOptions& options = {}) {
  using Index = Eigen::Index;
  constexpr const char* where = "kqsvd::fit_kq_svd";
  const Eigen::MatrixXd gk = detail::checked_gram(where, "cached_gram", cached_gram, 0);
  const Index d = gk.rows();
  const Eigen::MatrixXd gq = detail::checked_gram(where, "query_gram", query_gram, d);
  const double tolerance = options.range_tolerance > 0.0 ? options.range_tolerance : detail::default_range_tolerance(d);
  const detail::GramFactor keys = detail::factor_gram(where, "cached_gram", gk, tolerance);
  const detail::GramFactor queries = detail::factor_gram(where, "query_gram", gq, tolerance);
  const Index p = keys.factor.cols();
  const Index q = queries.factor.cols();

  Eigen::MatrixXd left = Eigen::MatrixXd::Identity(p, p);
  Eigen::VectorXd singular_values = Eigen::VectorXd::Zero(d);
  if (p > 0 && q > 0) {
    Eigen::VectorXd core_values;
    detail::left_singular_system(keys.factor.transpose() * queries.factor, options.svd, left, core_values);
    singular_values.head(core_values.size()) = core_values;
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
  return LowRankProjection<Scalar>(Method::kq_svd, encoder.cast<Scalar>(), decoder.cast<Scalar>(), singular_values);
}

}  // namespace kqsvd
