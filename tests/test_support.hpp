// Shared helpers for the tests: seeded random data and *independent* reference computations (direct
// dense SVDs in double), never the library's own code paths.
#pragma once

#include <Eigen/Core>
#include <Eigen/QR>
#include <Eigen/SVD>

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <string>
#include <utility>

#include "kqsvd/io/activation_file.hpp"
#include "kqsvd/solvers/low_rank_projection.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace kqsvd::test {

using Eigen::Index;

// A file of the repository's data/ folder (models, text, captured activations).
inline std::string repository_data(const std::string& relative) { return std::string(KQSVD_DATA_DIR) + "/" + relative; }

// One KV head's captured activations, every sequence of the file stacked along tokens (rows): the
// matrices whose products the calibration Grams describe. queries: every query head of the group.
template <typename Matrix>
struct StackedHead {
  Matrix keys, values, queries;
};

template <typename Matrix>
StackedHead<Matrix> stacked_head(const kqsvd::io::ActivationFile& file, Index layer, Index kv_head) {
  using Scalar = typename Matrix::Scalar;
  const Index t = file.tokens(), d = file.shape().head_dim, g = file.shape().group_size();
  StackedHead<Matrix> head;
  head.keys.resize(file.batch() * t, d);
  head.values.resize(file.batch() * t, d);
  head.queries.resize(file.batch() * g * t, d);
  for (Index b = 0; b < file.batch(); ++b) {
    head.keys.middleRows(b * t, t) = file.keys(layer, b, kv_head).template cast<Scalar>();
    head.values.middleRows(b * t, t) = file.values(layer, b, kv_head).template cast<Scalar>();
    head.queries.middleRows(b * g * t, g * t) = file.group_queries(layer, b, kv_head).template cast<Scalar>();
  }
  return head;
}
using Eigen::MatrixXd;
using Eigen::VectorXd;

inline MatrixXd gaussian(Index rows, Index cols, unsigned seed) {
  std::mt19937 engine(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  MatrixXd m(rows, cols);
  for (Index j = 0; j < cols; ++j)
    for (Index i = 0; i < rows; ++i) m(i, j) = normal(engine);
  return m;
}

// n x k with orthonormal columns (n >= k).
inline MatrixXd orthonormal(Index n, Index k, unsigned seed) {
  Eigen::HouseholderQR<MatrixXd> qr(gaussian(n, k, seed));
  return qr.householderQ() * MatrixXd::Identity(n, k);
}

// n x d matrix Z diag(s) P^T: singular values exactly s, right singular vectors the columns of P.
inline MatrixXd with_spectrum(Index n, const VectorXd& s, const MatrixXd& p, unsigned seed) {
  return orthonormal(n, s.size(), seed) * s.asDiagonal() * p.transpose();
}

inline VectorXd direct_singular_values(const MatrixXd& m) {
  Eigen::JacobiSVD<MatrixXd> svd(m);
  return svd.singularValues();
}

// Relative Frobenius error of the best rank-r approximation of m, from a direct JacobiSVD of m.
inline double direct_tail_error(const MatrixXd& m, Index r) {
  const VectorXd s = direct_singular_values(m);
  const double total = s.squaredNorm();
  // A rank at or beyond min(rows, cols) keeps every singular value: the tail is empty.
  const Index tail = std::max<Index>(s.size() - r, 0);
  return total == 0.0 ? 0.0 : std::sqrt(s.tail(tail).squaredNorm() / total);
}

// || Q K^T - (Q B)(K A)^T ||_F / || Q K^T ||_F, computed with the full m x n products.
template <typename Scalar>
double score_error(const LowRankProjection<Scalar>& projection, const MatrixXd& queries, const MatrixXd& keys) {
  const MatrixXd a = projection.encoder().template cast<double>();
  const MatrixXd b = projection.decoder().template cast<double>();
  const MatrixXd exact = queries * keys.transpose();
  return (exact - (queries * b) * (keys * a).transpose()).norm() / exact.norm();
}

// Checks the exception type, a substring that identifies the problem, and (when given) that the
// message names the file.
template <class Exception, class Function>
void expect_error(Function&& function, const std::string& problem, const std::string& path = "") {
  try {
    function();
    ADD_FAILURE() << "expected an exception mentioning \"" << problem << "\"";
  } catch (const Exception& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find(problem), std::string::npos) << "message: " << message;
    if (!path.empty()) {
      EXPECT_NE(message.find(path), std::string::npos) << "message: " << message;
    }
  }
}

// An InvalidArgument whose message contains `fragment`.
template <typename Function>
void expect_invalid(Function&& call, const std::string& fragment) {
  expect_error<InvalidArgument>(std::forward<Function>(call), fragment);
}

// Runs call() with OpenMP set to `threads` threads (serially when built without OpenMP), then restores
// the previous setting: for tests that compare results across thread counts.
template <typename Function>
void with_threads([[maybe_unused]] int threads, Function&& call) {
#ifdef _OPENMP
  const int before = omp_get_max_threads();
  omp_set_num_threads(threads);
  call();
  omp_set_num_threads(before);
#else
  call();
#endif
}

}  // namespace kqsvd::test
