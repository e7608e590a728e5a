// kqsvd/solvers/detail/principal_directions.hpp -- top eigenvectors of a Gram, the common core of the baselines.
#pragma once

#include <Eigen/Core>
#include <Eigen/Eigenvalues>

#include <sstream>
#include <string>

#include "kqsvd/solvers/detail/gram_factor.hpp"
#include "kqsvd/core/error.hpp"

namespace kqsvd::detail {

struct PrincipalDirections {
  Eigen::VectorXd singular_values;  // sqrt of the Gram's eigenvalues, descending
  Eigen::MatrixXd directions;       // matching orthonormal eigenvectors, as columns
};

inline PrincipalDirections principal_directions(const char* function, const char* argument,
                                                const Eigen::MatrixXd& gram) {
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eigen(gram);
  if (eigen.info() != Eigen::Success) {
    throw NumericalError(std::string(function) + ": the eigensolver did not converge on argument '" + argument + "'");
  }
  const Eigen::VectorXd values = eigen.eigenvalues().reverse();
  if (values(values.size() - 1) < -negativity_tolerance * values(0)) {
    std::ostringstream out;
    out << "is not positive semidefinite (eigenvalue " << values(values.size() - 1) << " against largest "
        << values(0) << ")";
    throw_invalid(function, argument, out.str());
  }
  PrincipalDirections result;
  // Rounding leaves tiny negative eigenvalues on a singular Gram; they are zeros.
  result.singular_values = values.cwiseMax(0.0).cwiseSqrt();
  result.directions = eigen.eigenvectors().rowwise().reverse();
  normalize_signs(result.directions);
  return result;
}

}  // namespace kqsvd::detail
