// kqsvd/core/detail/validation.hpp -- argument checks shared by the public entry points.
//
// Every check throws kqsvd::InvalidArgument with a message of the form
//   "<function>: argument '<name>' <what was wrong>"
// so that a user reading the message knows which call and which argument to fix.
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>

#include "kqsvd/core/error.hpp"

namespace kqsvd::detail {

inline std::string shape_string(Eigen::Index rows, Eigen::Index cols) {
  std::ostringstream out;
  out << rows << " x " << cols;
  return out.str();
}

[[noreturn]] inline void throw_invalid(const char* function, const char* argument, const std::string& problem) {
  throw InvalidArgument(std::string(function) + ": argument '" + argument + "' " + problem);
}

inline void require_columns(const char* function, const char* argument, Eigen::Index cols, Eigen::Index expected,
                            const char* expected_meaning = "the head dimension") {
  if (cols != expected) {
    std::ostringstream out;
    out << "has " << cols << " columns, expected " << expected << " (" << expected_meaning << ")";
    throw_invalid(function, argument, out.str());
  }
}

inline void require_square(const char* function, const char* argument, Eigen::Index rows, Eigen::Index cols) {
  if (rows != cols || rows == 0) {
    throw_invalid(function, argument, "must be a non-empty square matrix, got " + shape_string(rows, cols));
  }
}

// Eigen 3.4's allFinite() is a scalar loop (a third of the Gram accumulation's
// cost at d = 128). A product with zero summed is the same test, vectorised: 0 when every entry is
// finite, NaN when any is infinite or NaN.
template <typename Derived>
bool all_finite(const Eigen::DenseBase<Derived>& x) {
  using Scalar = typename Derived::Scalar;
  return (x.derived().array() * Scalar(0)).sum() == Scalar(0);
}

// Reports the first non-finite entry by position; rows are tokens, so the row index is the token.
template <typename Derived>
void require_finite(const char* function, const char* argument, const Eigen::DenseBase<Derived>& x) {
  if (all_finite(x)) return;
  for (Eigen::Index i = 0; i < x.rows(); ++i) {
    for (Eigen::Index j = 0; j < x.cols(); ++j) {
      using std::isfinite;
      if (!isfinite(static_cast<double>(x(i, j)))) {
        std::ostringstream out;
        out << "contains a non-finite value (" << static_cast<double>(x(i, j)) << ") at row " << i << ", column "
            << j;
        throw_invalid(function, argument, out.str());
      }
    }
  }
}

// `matrix`, computed in double, converted to Scalar. A result beyond Scalar's range (a float projection
// of keys near 1e-40 has entries near 1e40) is the computation's limit, not the caller's mistake: a
// NumericalError that says which type would hold it.
template <typename Scalar, typename Derived>
Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> narrowed(const char* function, const char* what,
                                                               const Eigen::MatrixBase<Derived>& matrix) {
  using Source = typename Derived::Scalar;
  if constexpr (std::numeric_limits<Scalar>::max() < std::numeric_limits<Source>::max()) {
    const Source largest = matrix.size() == 0 ? Source(0) : matrix.cwiseAbs().maxCoeff();
    if (largest > static_cast<Source>(std::numeric_limits<Scalar>::max())) {
      std::ostringstream out;
      out << function << ": the " << what << " has entries of magnitude " << largest
          << ", beyond the range of " << (std::is_same_v<Scalar, float> ? "float" : "the requested scalar type")
          << " (largest " << std::numeric_limits<Scalar>::max() << "); fit in double, or rescale the data";
      throw NumericalError(out.str());
    }
  }
  return matrix.template cast<Scalar>();
}

}  // namespace kqsvd::detail
