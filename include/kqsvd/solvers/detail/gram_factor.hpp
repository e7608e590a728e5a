// kqsvd/solvers/detail/gram_factor.hpp -- a square-root factor of a calibration Gram, robust to rank deficiency
// and to dimensions whose scales differ by many orders of magnitude.
//
// For G = X^T X (d x d, positive semidefinite) it returns
//   factor      L (d x p): G = L L^T on the numerical range of G, p = numerical rank;
//   dual        R (d x p): L^T R = I_p, columns in range(L) (so X R is the minimum-norm choice);
//   complement  N (d x (d-p)): orthonormal basis of range(L)'s orthogonal complement.
// With X = U_X L^T (U_X orthonormal columns), X R = U_X: R is the pseudo-inverse route A = X^+ U.
//
// Why not a plain Cholesky: a Gram from fewer tokens than d, dead dimensions or duplicated tokens is
// singular and has none. Why scale first: activations have outlier dimensions; after the symmetric
// diagonal scaling G = D G' D (D = sqrt(diag G)), G' has unit diagonal and its eigenvalues are accurate
// relative to each other, so a range of 1e12 or more between dimensions does not reach the solver.
#pragma once

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <Eigen/QR>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/error.hpp"
#include "kqsvd/solvers/fit_options.hpp"

namespace kqsvd::detail {

struct GramFactor {
  Eigen::MatrixXd factor;
  Eigen::MatrixXd dual;
  Eigen::MatrixXd complement;
};

// Eigenvalues of the scaled Gram below tolerance * (largest) are treated as zero. d * epsilon is the
// rounding floor of a symmetric eigensolver on a d x d matrix.
inline double default_range_tolerance(Eigen::Index dimension) {
  return static_cast<double>(dimension) * std::numeric_limits<double>::epsilon();
}

// A symmetric Gram built from float data or by another library can be asymmetric by rounding; more
// than this (relative to its largest entry) means it is not a Gram at all.
inline constexpr double symmetry_tolerance = 1e-6;
// Eigenvalues below -this (relative to the largest) mean the matrix is not positive semidefinite.
inline constexpr double negativity_tolerance = 1e-6;

// Validates a Gram argument and returns its symmetric part.
inline Eigen::MatrixXd checked_gram(const char* function, const char* argument,
                                    const Eigen::Ref<const Eigen::MatrixXd>& gram, Eigen::Index dimension) {
  require_square(function, argument, gram.rows(), gram.cols());
  if (dimension > 0 && gram.rows() != dimension) {
    throw_invalid(function, argument,
                  "is " + shape_string(gram.rows(), gram.cols()) + ", expected " + shape_string(dimension, dimension));
  }
  require_finite(function, argument, gram);
  const double largest = gram.cwiseAbs().maxCoeff();
  const double asymmetry = (gram - gram.transpose()).cwiseAbs().maxCoeff();
  if (asymmetry > symmetry_tolerance * largest) {
    std::ostringstream out;
    out << "is not symmetric (largest |G - G^T| entry " << asymmetry << ", largest |G| entry " << largest << ")";
    throw_invalid(function, argument, out.str());
  }
  for (Eigen::Index i = 0; i < gram.rows(); ++i) {
    if (gram(i, i) < 0.0) {
      std::ostringstream out;
      out << "is not positive semidefinite (diagonal entry " << i << " is " << gram(i, i) << ")";
      throw_invalid(function, argument, out.str());
    }
  }
  return 0.5 * (gram + gram.transpose());
}

inline GramFactor factor_gram(const char* function, const char* argument, const Eigen::MatrixXd& gram,
                              double relative_tolerance) {
  using Index = Eigen::Index;
  const Index d = gram.rows();

  // Dimensions with a zero diagonal are zero in every token: they carry nothing and are left out.
  std::vector<Index> active;
  for (Index i = 0; i < d; ++i) {
    if (gram(i, i) > 0.0) active.push_back(i);
  }
  const auto a = static_cast<Index>(active.size());

  GramFactor result;
  Eigen::MatrixXd factor_active(a, 0), dual_active(a, 0), complement_active(a, a);
  complement_active.setIdentity();
  if (a > 0) {
    Eigen::VectorXd scale(a);
    for (Index i = 0; i < a; ++i) scale(i) = std::sqrt(gram(active[i], active[i]));
    Eigen::MatrixXd scaled(a, a);
    for (Index j = 0; j < a; ++j) {
      for (Index i = 0; i < a; ++i) scaled(i, j) = gram(active[i], active[j]) / (scale(i) * scale(j));
    }
    Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eigen(scaled);
    if (eigen.info() != Eigen::Success) {
      throw NumericalError(std::string(function) + ": the eigensolver did not converge on argument '" + argument + "'");
    }
    const Eigen::VectorXd& values = eigen.eigenvalues();  // ascending
    const double largest = values(a - 1);
    if (values(0) < -negativity_tolerance * largest) {
      std::ostringstream out;
      out << "is not positive semidefinite (eigenvalue " << values(0) << " against largest " << largest
          << " after unit-diagonal scaling)";
      throw_invalid(function, argument, out.str());
    }
    Index p = 0;
    while (p < a && values(a - 1 - p) > relative_tolerance * largest) ++p;

    // Columns in descending order of eigenvalue.
    Eigen::MatrixXd top = eigen.eigenvectors().rightCols(p).rowwise().reverse();
    const Eigen::VectorXd root = values.tail(p).reverse().cwiseSqrt();
    factor_active = scale.asDiagonal() * top * root.asDiagonal();
    dual_active = scale.cwiseInverse().asDiagonal() * top * root.cwiseInverse().asDiagonal();
    if (p < a) {
      // The scaled eigenvectors span range(G) but the dual is not yet in it; projecting onto the range
      // keeps L^T R = I_p and makes R the minimum-norm solution.
      Eigen::HouseholderQR<Eigen::MatrixXd> qr(factor_active);
      const Eigen::MatrixXd q = qr.householderQ();
      const auto range = q.leftCols(p);
      dual_active = range * (range.transpose() * dual_active);
      complement_active = q.rightCols(a - p);
    } else {
      complement_active.resize(a, 0);
    }
  }

  const Index p = factor_active.cols();
  result.factor = Eigen::MatrixXd::Zero(d, p);
  result.dual = Eigen::MatrixXd::Zero(d, p);
  result.complement = Eigen::MatrixXd::Zero(d, d - p);
  for (Index i = 0; i < a; ++i) {
    result.factor.row(active[i]) = factor_active.row(i);
    result.dual.row(active[i]) = dual_active.row(i);
    result.complement.row(active[i]).head(complement_active.cols()) = complement_active.row(i);
  }
  // Dead dimensions complete the complement as unit vectors.
  Index column = complement_active.cols();
  for (Index i = 0, k = 0; i < d; ++i) {
    if (k < a && active[k] == i) {
      ++k;
      continue;
    }
    result.complement(i, column++) = 1.0;
  }
  return result;
}

// Flips each column so that its largest-magnitude entry is positive: singular vectors are defined up
// to sign, and a fixed convention makes fits reproducible and comparable across methods and machines.
// `companion` (same shape, may be null) is flipped with it: the two factors of one rank-1 term.
inline void normalize_signs(Eigen::MatrixXd& reference, Eigen::MatrixXd* companion = nullptr) {
  for (Eigen::Index j = 0; j < reference.cols(); ++j) {
    Eigen::Index largest = 0;
    reference.col(j).cwiseAbs().maxCoeff(&largest);
    if (reference(largest, j) < 0.0) {
      reference.col(j) *= -1.0;
      if (companion != nullptr) companion->col(j) *= -1.0;
    }
  }
}

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

// The symmetric_eigen route's factor of G_K: by Cholesky when G_K is clearly positive definite, which
// is some 30x cheaper than factor_gram's eigendecomposition; factor_gram otherwise. "Clearly": after
// the unit-diagonal scaling (G' = D^-1 G D^-1), 1 / ||L^-1||_F^2 -- a lower bound on the smallest
// eigenvalue of G' -- exceeds tolerance * d >= tolerance * (largest eigenvalue), so factor_gram would
// have found full rank too. A and B do not depend on which square root of G_K is used.
inline GramFactor factor_gram_fast(const char* function, const char* argument, const Eigen::MatrixXd& gram,
                                   double tolerance) {
  const Eigen::Index d = gram.rows();
  const Eigen::ArrayXd diagonal = gram.diagonal().array();
  if ((diagonal > 0.0).all()) {
    const Eigen::VectorXd scale = diagonal.sqrt().matrix();
    const Eigen::MatrixXd scaled = scale.cwiseInverse().asDiagonal() * gram * scale.cwiseInverse().asDiagonal();
    const Eigen::LLT<Eigen::MatrixXd> cholesky(scaled);
    if (cholesky.info() == Eigen::Success) {
      const Eigen::MatrixXd lower = cholesky.matrixL();
      const Eigen::MatrixXd inverse =
          lower.triangularView<Eigen::Lower>().solve(Eigen::MatrixXd::Identity(d, d));  // L^-1
      if (1.0 / inverse.squaredNorm() > tolerance * static_cast<double>(d)) {
        GramFactor result;
        result.factor = scale.asDiagonal() * lower;                                // G = (D L)(D L)^T
        result.dual = scale.cwiseInverse().asDiagonal() * inverse.transpose();     // (D L)^T R = I
        result.complement.resize(d, 0);
        return result;
      }
    }
  }
  return factor_gram(function, argument, gram, tolerance);
}

// Throws unless the symmetric `gram` is positive semidefinite up to negativity_tolerance (relative, after
// unit-diagonal scaling), checked by a pivoted LDL^T: a cheap stand-in for the eigendecomposition the
// default route gets anyway.
inline void require_positive_semidefinite(const char* function, const char* argument, const Eigen::MatrixXd& gram) {
  const Eigen::VectorXd scale = gram.diagonal().cwiseMax(0.0).cwiseSqrt().unaryExpr(
      [](double x) { return x > 0.0 ? 1.0 / x : 0.0; });
  const Eigen::MatrixXd scaled = scale.asDiagonal() * gram * scale.asDiagonal();
  const Eigen::LDLT<Eigen::MatrixXd> ldlt(scaled);
  const Eigen::VectorXd pivots = ldlt.vectorD();
  if (ldlt.info() != Eigen::Success || pivots.minCoeff() < -negativity_tolerance * std::max(1.0, pivots.maxCoeff())) {
    std::ostringstream out;
    out << "is not positive semidefinite (pivot " << pivots.minCoeff() << " of its LDL^T factorisation after "
        << "unit-diagonal scaling)";
    throw_invalid(function, argument, out.str());
  }
}

// options.range_tolerance, or the default for 0. A tolerance of 1 or more would discard the whole range
// (any data would "fit" with error 0), so only (0, 1) is accepted.
inline double checked_range_tolerance(const char* function, double tolerance, Eigen::Index dimension) {
  if (tolerance == 0.0) return default_range_tolerance(dimension);
  if (!(tolerance > 0.0 && tolerance < 1.0)) {  // also NaN
    std::ostringstream out;
    out << "must be in (0, 1), or 0 for the default, got " << tolerance;
    throw_invalid(function, "options.range_tolerance", out.str());
  }
  return tolerance;
}

}  // namespace kqsvd::detail
