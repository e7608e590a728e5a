// kqsvd/solvers/fit_options.hpp -- knobs of the projection solvers; the defaults are what the papers do.
//
// Which method reads which field (the others are not consulted; fit_k_svd takes no options at all):
//   balance          Eigen Attention (keys) only;
//   range_tolerance  KQ-SVD only (keys and values): the numerical range of the cached side's Gram;
//   svd              KQ-SVD only: how the d x d core is decomposed.
//
//   kqsvd::FitOptions options;
//   options.balance = 2.0;                                   // Eigen Attention's a
//   options.svd = kqsvd::SvdAlgorithm::jacobi;               // most accurate, slowest
//   auto proj = kqsvd::fit_projection<float>(method, keys, queries, rank, options);
#pragma once

namespace kqsvd {

// How KQ-SVD takes the SVD of the d x d core matrix M = L_K^T L_Q.
enum class SvdAlgorithm {
  divide_and_conquer,  // Eigen::BDCSVD: backward stable, fast for d >= 64
  jacobi,              // Eigen::JacobiSVD: highest relative accuracy on tiny singular values
  // Symmetric eigendecomposition of M M^T = L_K^T G_Q L_K (no SVD, no factor of G_Q; G_K by Cholesky
  // when it is clearly positive definite). About 5x faster at d = 128, for fitting whole models.
  // Trade-off: squaring M squares its condition, so singular values below ~1e-8 of the largest (and
  // their directions) are only accurate to ~1e-16 * s_1^2 / s_i; the leading directions, the ones a
  // compressed cache keeps, and the predicted errors of ranks whose tail is above ~1e-7 are unaffected.
  symmetric_eigen,
};

struct FitOptions {
  // Eigen Attention's balance factor a: the basis is that of the stacked [a K; Q / a], i.e. the top
  // eigenvectors of a^2 G_K + G_Q / a^2. Defined once here (the authors' script applies it twice).
  double balance = 1.0;
  // Eigenvalues of a unit-diagonal-scaled Gram below range_tolerance * (largest) are treated as zero;
  // 0 selects d * machine epsilon.
  double range_tolerance = 0.0;
  SvdAlgorithm svd = SvdAlgorithm::divide_and_conquer;
};

}  // namespace kqsvd
