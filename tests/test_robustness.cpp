// Singular and ill-conditioned Grams give finite projections that are still optimal on the range of
// K; invalid input raises a clear exception naming the argument.
#include <gtest/gtest.h>

#include <kqsvd/kqsvd.hpp>

#include <functional>
#include <limits>

#include "test_support.hpp"

namespace kqsvd_test_robustness {

using kqsvd::Method;
using kqsvd::RankSelection;
using kqsvd::test::gaussian;
using Eigen::Index;
using Eigen::MatrixXd;
using Eigen::VectorXd;

// Finite, A^T B = I_r, and the score error equals the direct optimum.
void expect_optimal(const MatrixXd& k, const MatrixXd& q, Index r, const char* label, double tolerance = 1e-8) {
  const auto proj = kqsvd::fit_kq_svd<double>(k.transpose() * k, q.transpose() * q, RankSelection::fixed(r));
  ASSERT_TRUE(proj.encoder().allFinite()) << label;
  ASSERT_TRUE(proj.decoder().allFinite()) << label;
  EXPECT_LT((proj.encoder().transpose() * proj.decoder() - MatrixXd::Identity(r, r)).norm(), 1e-8) << label;
  const double optimum = kqsvd::test::direct_tail_error(q * k.transpose(), r);
  EXPECT_NEAR(kqsvd::test::score_error(proj, q, k), optimum, tolerance) << label;
  EXPECT_NEAR(proj.predicted_relative_error(), optimum, tolerance) << label;
}

TEST(RankDeficient, FewerTokensThanHeadDim) {
  const MatrixXd k = gaussian(5, 16, 1), q = gaussian(40, 16, 2);
  for (Index r : {1, 3, 5}) expect_optimal(k, q, r, "5 tokens, d = 16");
  // Ranks beyond rank(K) are allowed: the error is already zero and A^T B = I still holds.
  for (Index r : {6, 12, 16}) expect_optimal(k, q, r, "rank beyond rank(K)");
  const auto full = kqsvd::fit_kq_svd<double>(k.transpose() * k, q.transpose() * q, RankSelection::fixed(16));
  EXPECT_LT((full.encoder() * full.decoder().transpose() - MatrixXd::Identity(16, 16)).norm(), 1e-9);
}

TEST(RankDeficient, DeadAndDuplicatedDimensions) {
  MatrixXd k = gaussian(200, 12, 3), q = gaussian(200, 12, 4);
  k.col(3).setZero();        // a dead dimension
  k.col(7) = k.col(2);       // a duplicated dimension
  q.col(9).setZero();
  for (Index r : {2, 6, 10, 12}) expect_optimal(k, q, r, "dead + duplicated");
  // A dimension dead in the keys is never read from the cache.
  const auto proj = kqsvd::fit_kq_svd<double>(k.transpose() * k, q.transpose() * q, RankSelection::fixed(6));
  EXPECT_EQ(proj.encoder().row(3).norm(), 0.0);
  EXPECT_EQ(proj.decoder().row(3).norm(), 0.0);
}

TEST(RankDeficient, DuplicatedTokens) {
  const MatrixXd base = gaussian(6, 16, 5);
  MatrixXd k(60, 16);
  for (Index i = 0; i < 10; ++i) k.middleRows(6 * i, 6) = base;  // 60 tokens, rank 6
  const MatrixXd q = gaussian(50, 16, 6);
  for (Index r : {2, 6, 9}) expect_optimal(k, q, r, "duplicated tokens");
}

TEST(RankDeficient, ZeroHeadAndZeroQueries) {
  const MatrixXd zero = MatrixXd::Zero(16, 16), g = gaussian(100, 16, 7).transpose() * gaussian(100, 16, 7);
  for (const auto& [gk, gq] : {std::pair<MatrixXd, MatrixXd>{zero, g}, {g, zero}, {zero, zero}}) {
    const auto proj = kqsvd::fit_kq_svd<double>(gk, gq, RankSelection::fixed(4));
    EXPECT_TRUE(proj.encoder().allFinite() && proj.decoder().allFinite());
    EXPECT_LT((proj.encoder().transpose() * proj.decoder() - MatrixXd::Identity(4, 4)).norm(), 1e-12);
    EXPECT_EQ(proj.predicted_relative_error(), 0.0);  // nothing to approximate
    const auto budget = kqsvd::fit_kq_svd<double>(gk, gq, RankSelection::error_budget(0.1));
    EXPECT_EQ(budget.rank(), 1);
  }
}

// Columns scaled over 12 orders of magnitude (Gram entries over 24): a plain eigensolver on G_K would
// lose the small directions; the scaled factorisation keeps the optimum.
TEST(IllConditioned, DynamicRangeOfTwelveOrders) {
  const Index n = 300, d = 16;
  VectorXd scale(d);
  for (Index i = 0; i < d; ++i) scale(i) = std::pow(10.0, -6.0 + 12.0 * static_cast<double>(i) / (d - 1));
  const MatrixXd k = gaussian(n, d, 8) * scale.asDiagonal();
  const MatrixXd q = gaussian(n, d, 9) * scale.cwiseInverse().asDiagonal();  // reads the small key directions
  for (Index r : {1, 4, 8, 15}) expect_optimal(k, q, r, "1e12 column range", 1e-7);
}

TEST(IllConditioned, NearlySingularKeys) {
  // Singular values of K from 1 down to 1e-6: a 1e12 range inside the Gram.
  const Index n = 200, d = 16;
  VectorXd s(d);
  for (Index i = 0; i < d; ++i) s(i) = std::pow(10.0, -6.0 * static_cast<double>(i) / (d - 1));
  const MatrixXd k = kqsvd::test::with_spectrum(n, s, kqsvd::test::orthonormal(d, d, 10), 11);
  const MatrixXd q = gaussian(n, d, 12);
  for (Index r : {2, 8, 14}) expect_optimal(k, q, r, "cond(K) = 1e6", 1e-7);
}

TEST(IllConditioned, FloatInputMatchesDoubleInput) {
  const Index n = 1000, d = 32;
  const MatrixXd k = gaussian(n, d, 13) * gaussian(d, d, 14), q = gaussian(n, d, 15);
  kqsvd::GramAccumulator kd(d), qd(d), kf(d), qf(d);
  kd.add(k);
  qd.add(q);
  kf.add(k.cast<float>());
  qf.add(q.cast<float>());
  const auto from_double = kqsvd::fit_projection<double>(Method::kq_svd, kd, qd, RankSelection::fixed(8));
  const auto from_float = kqsvd::fit_projection<double>(Method::kq_svd, kf, qf, RankSelection::fixed(8));
  // The inputs differ by float rounding (~6e-8 relative); so may the projections, to first order.
  EXPECT_LT((from_float.decoder() - from_double.decoder()).norm() / from_double.decoder().norm(), 1e-5);
  EXPECT_NEAR(kqsvd::test::score_error(from_float, q, k), kqsvd::test::score_error(from_double, q, k), 1e-6);
}

// --- invalid input --------------------------------------------------------------------------------

// Every check names the argument; the fragments below are the user-visible contract.
using kqsvd::test::expect_invalid;

TEST(InvalidInput, FitRejectsBadGramsRanksAndBudgets) {
  const MatrixXd g = gaussian(50, 8, 16).transpose() * gaussian(50, 8, 16);
  MatrixXd nan = g;
  nan(2, 3) = std::numeric_limits<double>::quiet_NaN();
  MatrixXd asymmetric = g;
  asymmetric(0, 1) += 1.0;
  MatrixXd negative = -g;
  const MatrixXd indefinite = g - 2.0 * g.norm() * (VectorXd::Unit(8, 0) * VectorXd::Unit(8, 0).transpose()) +
                              g.norm() * MatrixXd::Identity(8, 8);
  const auto fit = [](const MatrixXd& gk, const MatrixXd& gq, RankSelection r) {
    return kqsvd::fit_kq_svd<double>(gk, gq, r);
  };
  expect_invalid([&] { fit(g, MatrixXd::Identity(7, 7), RankSelection::fixed(2)); }, "'query_gram' is 7 x 7, expected 8 x 8");
  expect_invalid([&] { fit(MatrixXd(8, 7), g, RankSelection::fixed(2)); }, "'cached_gram' must be a non-empty square");
  expect_invalid([&] { fit(nan, g, RankSelection::fixed(2)); }, "non-finite value (nan) at row 2, column 3");
  expect_invalid([&] { fit(g, asymmetric, RankSelection::fixed(2)); }, "'query_gram' is not symmetric");
  expect_invalid([&] { fit(negative, g, RankSelection::fixed(2)); }, "not positive semidefinite");
  expect_invalid([&] { fit(g, indefinite, RankSelection::fixed(2)); }, "not positive semidefinite");
  expect_invalid([&] { fit(g, g, RankSelection::fixed(9)); }, "more than the head dimension 8");
  expect_invalid([] { RankSelection::fixed(0); }, "'rank' must be >= 1");
  expect_invalid([] { RankSelection::error_budget(0.0); }, "'epsilon' must be in the open interval (0, 1)");
  expect_invalid([] { RankSelection::error_budget(1.0); }, "open interval");
  expect_invalid([] { RankSelection::error_budget(std::numeric_limits<double>::quiet_NaN()); }, "open interval");
  kqsvd::FitOptions bad_balance;
  bad_balance.balance = 0.0;
  expect_invalid([&] { kqsvd::fit_eigen_attention<double>(g, g, RankSelection::fixed(2), bad_balance); },
                 "'options.balance' must be finite and > 0");
  expect_invalid([] { kqsvd::parse_method("svd"); }, "unknown method 'svd'");
}

TEST(InvalidInput, OperatorsRejectWrongShapesAndNonFiniteData) {
  const MatrixXd k = gaussian(50, 8, 17);
  kqsvd::GramAccumulator keys(8), queries(8);
  keys.add(k);
  queries.add(k);
  const auto proj = kqsvd::fit_projection<double>(Method::kq_svd, keys, queries, RankSelection::fixed(3));
  expect_invalid([&] { proj.compress(MatrixXd(4, 7)); }, "'rows' has 7 columns, expected 8 (the head dimension)");
  expect_invalid([&] { proj.map_queries(MatrixXd(4, 3)); }, "'queries' has 3 columns, expected 8");
  expect_invalid([&] { proj.decompress(MatrixXd(4, 8)); }, "'latents' has 8 columns, expected 3 (the rank)");
  MatrixXd bad = k;
  bad(10, 4) = std::numeric_limits<double>::infinity();
  expect_invalid([&] { proj.compress(bad); }, "non-finite value (inf) at row 10, column 4");
  // Finite input whose latents overflow: every entry 1e308, summed along a unit vector of equal weights.
  const MatrixXd ones = MatrixXd::Constant(8, 1, 1.0 / std::sqrt(8.0));
  const kqsvd::LowRankProjection<double> uniform(Method::k_svd, ones, ones, Eigen::VectorXd::Zero(8));
  try {
    uniform.compress(MatrixXd::Constant(2, 8, 1e308));
    ADD_FAILURE() << "expected NumericalError";
  } catch (const kqsvd::NumericalError& e) {
    EXPECT_NE(std::string(e.what()).find("overflowed (input 'rows' is finite"), std::string::npos) << e.what();
  }
}

}  // namespace kqsvd_test_robustness
