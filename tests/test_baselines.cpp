// K-SVD and Eigen Attention against direct SVDs, and how the three methods order on data built so
// that the answer is known.
#include <gtest/gtest.h>

#include <kqsvd/kqsvd.hpp>

#include "test_support.hpp"

namespace kqsvd_test_baselines {

using kqsvd::Method;
using kqsvd::RankSelection;
using kqsvd::test::gaussian;
using Eigen::Index;
using Eigen::MatrixXd;
using Eigen::VectorXd;

// Projector onto the column span of an orthonormal basis.
MatrixXd projector(const MatrixXd& basis) { return basis * basis.transpose(); }

TEST(KeySvd, IsTheTopPrincipalSubspaceOfTheKeys) {
  const Index n = 400, d = 24, r = 6;
  const MatrixXd k = gaussian(n, d, 1) * gaussian(d, d, 2);
  const auto proj = kqsvd::fit_k_svd<double>(k.transpose() * k, RankSelection::fixed(r));
  Eigen::JacobiSVD<MatrixXd> svd(k, Eigen::ComputeThinV);
  EXPECT_LT((projector(proj.encoder()) - projector(svd.matrixV().leftCols(r))).norm(), 1e-9);
  EXPECT_EQ(proj.encoder(), proj.decoder());
  EXPECT_LT((proj.encoder().transpose() * proj.encoder() - MatrixXd::Identity(r, r)).norm(), 1e-12);
  // Its predicted error is that of the keys: the tail of K's singular values.
  EXPECT_NEAR(proj.predicted_relative_error(), kqsvd::test::direct_tail_error(k, r), 1e-10);
  EXPECT_NEAR((k - proj.reconstruct(k)).norm() / k.norm(), kqsvd::test::direct_tail_error(k, r), 1e-10);
}

TEST(EigenAttention, IsTheTopPrincipalSubspaceOfStackedKeysAndQueries) {
  const Index n = 300, m = 500, d = 20, r = 5;
  const MatrixXd k = gaussian(n, d, 3) * gaussian(d, d, 4), q = gaussian(m, d, 5) * gaussian(d, d, 6);
  for (double a : {1.0, 0.5, 3.0}) {
    MatrixXd stacked(n + m, d);
    stacked << a * k, q / a;  // the factor appears once on each side
    Eigen::JacobiSVD<MatrixXd> svd(stacked, Eigen::ComputeThinV);
    kqsvd::FitOptions options;
    options.balance = a;
    const auto proj = kqsvd::fit_eigen_attention<double>(k.transpose() * k, q.transpose() * q, RankSelection::fixed(r), options);
    EXPECT_LT((projector(proj.encoder()) - projector(svd.matrixV().leftCols(r))).norm(), 1e-9) << "a=" << a;
    EXPECT_NEAR(proj.predicted_relative_error(), kqsvd::test::direct_tail_error(stacked, r), 1e-10) << "a=" << a;
  }
}

TEST(EigenAttention, AccumulatorsWeighKeysAndQueriesAsStacked) {
  // From accumulators, Grams are divided by one common count: the basis must still be that of the
  // raw stack even with different token counts on the two sides (GQA: g times more queries).
  const Index n = 200, m = 800, d = 12, r = 4;
  const MatrixXd k = gaussian(n, d, 7) * gaussian(d, d, 8), q = gaussian(m, d, 9) * gaussian(d, d, 10);
  kqsvd::GramAccumulator keys(d), queries(d);
  keys.add(k);
  queries.add(q);
  const auto proj = kqsvd::fit_projection<double>(Method::eigen_attention, keys, queries, RankSelection::fixed(r));
  MatrixXd stacked(n + m, d);
  stacked << k, q;
  Eigen::JacobiSVD<MatrixXd> svd(stacked, Eigen::ComputeThinV);
  EXPECT_LT((projector(proj.encoder()) - projector(svd.matrixV().leftCols(r))).norm(), 1e-9);
}

// Keys and queries whose dominant directions differ: K-SVD keeps the keys' big directions, which the
// queries hardly read; KQ-SVD keeps the directions where the products are large.
TEST(MethodOrdering, KqSvdWinsWhenKeyAndQuerySubspacesDiffer) {
  const Index n = 2000, d = 8, r = 4;
  const MatrixXd basis = kqsvd::test::orthonormal(d, d, 11);
  VectorXd key_scale(d), query_scale(d);
  key_scale << 8, 7, 6, 5, 4, 3, 2, 1;
  query_scale << 1, 1, 1, 1, 6, 6, 6, 6;
  const MatrixXd k = kqsvd::test::with_spectrum(n, key_scale, basis, 12);
  const MatrixXd q = kqsvd::test::with_spectrum(n, query_scale, basis, 13);
  kqsvd::GramAccumulator keys(d), queries(d);
  keys.add(k);
  queries.add(q);
  double error[3];
  for (Method m : kqsvd::all_methods) {
    const auto proj = kqsvd::fit_projection<double>(m, keys, queries, RankSelection::fixed(r));
    error[static_cast<int>(m)] = kqsvd::test::score_error(proj, q, k);
  }
  const double kq = error[0], ks = error[1], ea = error[2];
  EXPECT_NEAR(kq, kqsvd::test::direct_tail_error(q * k.transpose(), r), 1e-9);
  EXPECT_LT(kq, 0.8 * ks) << "K-SVD " << ks << " vs KQ-SVD " << kq;
  EXPECT_LT(kq, 0.95 * ea) << "Eigen Attention " << ea << " vs KQ-SVD " << kq;
}

// With the same principal axes and the same order of importance on both sides, all three methods keep
// the same subspace and reach the same (optimal) score error.
TEST(MethodOrdering, AllThreeAgreeWhenSubspacesCoincide) {
  const Index n = 1000, d = 10, r = 4;
  const MatrixXd basis = kqsvd::test::orthonormal(d, d, 21);
  VectorXd key_scale(d), query_scale(d);
  key_scale << 10, 8, 6, 5, 4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3;
  query_scale = 0.5 * key_scale;
  const MatrixXd k = kqsvd::test::with_spectrum(n, key_scale, basis, 22);
  const MatrixXd q = kqsvd::test::with_spectrum(n, query_scale, basis, 23);
  kqsvd::GramAccumulator keys(d), queries(d);
  keys.add(k);
  queries.add(q);
  const double optimum = kqsvd::test::direct_tail_error(q * k.transpose(), r);
  for (Method m : kqsvd::all_methods) {
    const auto proj = kqsvd::fit_projection<double>(m, keys, queries, RankSelection::fixed(r));
    EXPECT_NEAR(kqsvd::test::score_error(proj, q, k), optimum, 1e-9) << kqsvd::to_string(m);
  }
}

// No rank-r pair found by a baseline beats KQ-SVD on Q K^T, on unstructured data either.
TEST(MethodOrdering, NoBaselineBeatsKqSvdOnScores) {
  for (unsigned seed = 0; seed < 10; ++seed) {
    const Index n = 300, d = 16;
    const MatrixXd k = gaussian(n, d, 100 + seed) * gaussian(d, d, 200 + seed);
    const MatrixXd q = gaussian(n, d, 300 + seed) * gaussian(d, d, 400 + seed);
    kqsvd::GramAccumulator keys(d), queries(d);
    keys.add(k);
    queries.add(q);
    for (Index r : {2, 6, 12}) {
      const double kq = kqsvd::test::score_error(
          kqsvd::fit_projection<double>(Method::kq_svd, keys, queries, RankSelection::fixed(r)), q, k);
      for (Method m : {Method::k_svd, Method::eigen_attention}) {
        const auto proj = kqsvd::fit_projection<double>(m, keys, queries, RankSelection::fixed(r));
        EXPECT_GE(kqsvd::test::score_error(proj, q, k), kq - 1e-12) << kqsvd::to_string(m) << " seed " << seed;
      }
    }
  }
}

TEST(ValueProjection, BaselinesUseValueSvdAndAreLabelledSo) {
  const Index n = 300, d = 16, r = 4;
  const MatrixXd v = gaussian(n, d, 31) * gaussian(d, d, 32);
  kqsvd::GramAccumulator values(d);
  values.add(v);
  const MatrixXd unused = MatrixXd::Identity(d, d);
  Eigen::JacobiSVD<MatrixXd> svd(v, Eigen::ComputeThinV);
  for (Method m : {Method::k_svd, Method::eigen_attention}) {
    const auto proj = kqsvd::fit_value_projection<double>(m, values, unused, RankSelection::fixed(r));
    // Both compress values with V-SVD, K-SVD applied to values, and say so.
    EXPECT_EQ(proj.method(), Method::k_svd);
    EXPECT_EQ(kqsvd::value_method(m), Method::k_svd);
    EXPECT_LT((projector(proj.encoder()) - projector(svd.matrixV().leftCols(r))).norm(), 1e-9);
  }
}

}  // namespace kqsvd_test_baselines
