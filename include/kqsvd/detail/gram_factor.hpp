// kqsvd/detail/gram_factor.hpp -- a square-root factor of a calibration Gram, robust to rank deficiency
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

#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <Eigen/QR>

#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "kqsvd/detail/validation.hpp"
#include "kqsvd/error.hpp"

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

}  // namespace kqsvd::detail
