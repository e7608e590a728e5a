// KQ-SVD against independent computations: direct SVDs of Q K^T (and V W^T) in double, and the
// authors' QR route.
#include <gtest/gtest.h>

#include <kqsvd/kqsvd.hpp>

#include <Eigen/QR>
#include <Eigen/SVD>

#include "test_support.hpp"

namespace kqsvd_test_key_query_svd {

using kqsvd::Method;
using kqsvd::RankSelection;
using kqsvd::test::gaussian;
using Eigen::Index;
using Eigen::MatrixXd;
using Eigen::VectorXd;

struct Shape {
  Index keys, queries, dim, rank;
};

class KqSvdOptimality : public ::testing::TestWithParam<Shape> {};

// Eckart-Young: the error KQ-SVD reaches, the error it predicts, and the tail of the singular values of
// Q K^T computed directly are one number.
TEST_P(KqSvdOptimality, ErrorEqualsTailOfDirectSvdOfQKt) {
  const Shape s = GetParam();
  const MatrixXd k = gaussian(s.keys, s.dim, 1) * gaussian(s.dim, s.dim, 2);  // correlated columns
  const MatrixXd q = gaussian(s.queries, s.dim, 3) * gaussian(s.dim, s.dim, 4);
  const MatrixXd gk = k.transpose() * k, gq = q.transpose() * q;
  const auto proj = kqsvd::fit_kq_svd<double>(gk, gq, RankSelection::fixed(s.rank));
  const double direct = kqsvd::test::direct_tail_error(q * k.transpose(), s.rank);
  EXPECT_NEAR(kqsvd::test::score_error(proj, q, k), direct, 1e-9 * std::max(1.0, direct));
  EXPECT_NEAR(proj.predicted_relative_error(), direct, 1e-9 * std::max(1.0, direct));
  // The full spectrum is that of Q K^T (zero beyond its rank).
  const VectorXd sv = kqsvd::test::direct_singular_values(q * k.transpose());
  const Index shared = std::min<Index>(sv.size(), s.dim);
  EXPECT_LT((proj.singular_values().head(shared) - sv.head(shared)).norm(), 1e-9 * sv(0));
  EXPECT_EQ(proj.singular_values().size(), s.dim);
}

INSTANTIATE_TEST_SUITE_P(Shapes, KqSvdOptimality,
                         ::testing::Values(Shape{200, 150, 16, 4}, Shape{500, 500, 32, 8}, Shape{300, 400, 64, 16},
                                           Shape{1000, 700, 8, 7}, Shape{20, 60, 32, 5} /* fewer keys than d */,
                                           Shape{128, 128, 64, 64} /* full rank */));

// GQA: one (A, B) per KV head serves g query heads; the exact objective stacks their queries.
TEST(KqSvd, GqaStackingIsTheExactObjective) {
  const Index n = 300, d = 24, g = 4, r = 6;
  const MatrixXd k = gaussian(n, d, 11) * gaussian(d, d, 12);
  MatrixXd stacked(g * n, d);
  kqsvd::GramAccumulator keys(d), queries(d);
  keys.add(k);
  for (Index j = 0; j < g; ++j) {
    stacked.middleRows(j * n, n) = gaussian(n, d, 20 + j) * gaussian(d, d, 30 + j);
    queries.add(stacked.middleRows(j * n, n));
  }
  const auto proj = kqsvd::fit_projection<double>(Method::kq_svd, keys, queries, RankSelection::fixed(r));
  const double direct = kqsvd::test::direct_tail_error(stacked * k.transpose(), r);
  EXPECT_NEAR(kqsvd::test::score_error(proj, stacked, k), direct, 1e-9);
  EXPECT_NEAR(proj.predicted_relative_error(), direct, 1e-9);
  // Serving only one head of the group is worse than the joint optimum is for that head... but the
  // joint fit must be optimal for the stack: a fit on head 0 alone is not better on the stack.
  kqsvd::GramAccumulator first(d);
  first.add(stacked.topRows(n));
  const auto single = kqsvd::fit_projection<double>(Method::kq_svd, keys, first, RankSelection::fixed(r));
  EXPECT_GE(kqsvd::test::score_error(single, stacked, k), direct - 1e-12);
}

TEST(KqSvd, EncoderDecoderIdentities) {
  const Index n = 400, d = 32;
  const MatrixXd k = gaussian(n, d, 5) * gaussian(d, d, 6);
  const MatrixXd q = gaussian(n, d, 7);
  const MatrixXd gk = k.transpose() * k / n, gq = q.transpose() * q / n;
  for (Index r : {1, 5, 16, 31}) {
    const auto proj = kqsvd::fit_kq_svd<double>(gk, gq, RankSelection::fixed(r));
    EXPECT_LT((proj.encoder().transpose() * proj.decoder() - MatrixXd::Identity(r, r)).norm(), 1e-10) << "r=" << r;
  }
  const auto full = kqsvd::fit_kq_svd<double>(gk, gq, RankSelection::fixed(d));
  EXPECT_LT((full.encoder() * full.decoder().transpose() - MatrixXd::Identity(d, d)).norm(), 1e-10);
  // At full rank the cache gives back exactly what went in.
  EXPECT_LT((full.reconstruct(k) - k).norm(), 1e-10 * k.norm());
}

// The authors' algorithm: QR of K and Q, SVD of R_K R_Q^T, A = R_K^{-1} U_r, B = R_K^T U_r.
TEST(KqSvd, GramRouteEqualsQrRoute) {
  const Index n = 600, m = 500, d = 32;
  const MatrixXd k = gaussian(n, d, 41) * gaussian(d, d, 42);
  const MatrixXd q = gaussian(m, d, 43) * gaussian(d, d, 44);
  Eigen::HouseholderQR<MatrixXd> qr_k(k), qr_q(q);
  const MatrixXd rk = qr_k.matrixQR().topRows(d).triangularView<Eigen::Upper>();
  const MatrixXd rq = qr_q.matrixQR().topRows(d).triangularView<Eigen::Upper>();
  Eigen::JacobiSVD<MatrixXd> svd(rk * rq.transpose(), Eigen::ComputeFullU);
  for (Index r : {4, 12, 32}) {
    const MatrixXd u = svd.matrixU().leftCols(r);
    MatrixXd a_qr = rk.triangularView<Eigen::Upper>().solve(u);
    MatrixXd b_qr = rk.transpose() * u;
    const auto proj = kqsvd::fit_kq_svd<double>(k.transpose() * k, q.transpose() * q, RankSelection::fixed(r),
                                                {1.0, 0.0, kqsvd::SvdAlgorithm::jacobi});
    // Singular vectors are defined up to sign: align each column on B before comparing.
    for (Index j = 0; j < r; ++j) {
      if (b_qr.col(j).dot(proj.decoder().col(j)) < 0) {
        a_qr.col(j) *= -1;
        b_qr.col(j) *= -1;
      }
    }
    EXPECT_LT((proj.decoder() - b_qr).norm() / b_qr.norm(), 1e-10) << "r=" << r;
    EXPECT_LT((proj.encoder() - a_qr).norm() / a_qr.norm(), 1e-10) << "r=" << r;
    EXPECT_LT((proj.singular_values().head(d) - svd.singularValues()).norm() / svd.singularValues()(0), 1e-12);
  }
}

TEST(KqSvd, BothSvdAlgorithmsAgree) {
  const Index n = 400, d = 48;
  const MatrixXd k = gaussian(n, d, 51) * gaussian(d, d, 52), q = gaussian(n, d, 53);
  const MatrixXd gk = k.transpose() * k, gq = q.transpose() * q;
  const auto bdc = kqsvd::fit_kq_svd<double>(gk, gq, RankSelection::fixed(10));
  const auto jacobi = kqsvd::fit_kq_svd<double>(gk, gq, RankSelection::fixed(10), {1.0, 0.0, kqsvd::SvdAlgorithm::jacobi});
  EXPECT_LT((bdc.decoder() - jacobi.decoder()).norm() / jacobi.decoder().norm(), 1e-9);
  EXPECT_LT((bdc.encoder() - jacobi.encoder()).norm() / jacobi.encoder().norm(), 1e-9);
}

// Values: the same closed form on (G_V, G_W) optimises V W^T, for one head and for a GQA group.
TEST(KqSvd, ValueSideOptimisesVWt) {
  const Index n = 300, d = 16, hidden = 64, heads = 4, r = 5;
  const MatrixXd v = gaussian(n, d, 61) * gaussian(d, d, 62);
  const MatrixXd o_proj = gaussian(hidden, heads * d, 63);
  kqsvd::GramAccumulator values(d);
  values.add(v);
  // Group of query heads 2 and 3 (second KV head under GQA with group size 2).
  const MatrixXd w2 = o_proj.middleCols(2 * d, d), w3 = o_proj.middleCols(3 * d, d);
  MatrixXd stacked_w(2 * hidden, d);
  stacked_w << w2, w3;
  const MatrixXd gw = kqsvd::output_projection_gram(o_proj, d, 2, 2);
  EXPECT_LT((gw - stacked_w.transpose() * stacked_w).norm(), 1e-10 * gw.norm());
  const auto proj = kqsvd::fit_value_projection<double>(Method::kq_svd, values, gw, RankSelection::fixed(r));
  const double direct = kqsvd::test::direct_tail_error(v * stacked_w.transpose(), r);
  EXPECT_NEAR(kqsvd::test::score_error(proj, stacked_w, v), direct, 1e-9);
  EXPECT_NEAR(proj.predicted_relative_error(), direct, 1e-9);

  // The authors' averaging of the group's slices is the optimum for the averaged slice.
  const MatrixXd mean_w = 0.5 * (w2 + w3);
  const MatrixXd gw_mean = kqsvd::output_projection_gram(o_proj, d, 2, 2, kqsvd::GroupCombination::average);
  EXPECT_LT((gw_mean - mean_w.transpose() * mean_w).norm(), 1e-10 * gw_mean.norm());
  const auto averaged = kqsvd::fit_value_projection<double>(Method::kq_svd, values, gw_mean, RankSelection::fixed(r));
  EXPECT_NEAR(kqsvd::test::score_error(averaged, mean_w, v), kqsvd::test::direct_tail_error(v * mean_w.transpose(), r), 1e-9);
  // ... and no better than the exact objective on the real (concatenated) one.
  EXPECT_GE(kqsvd::test::score_error(averaged, stacked_w, v), direct - 1e-12);
}

TEST(KqSvd, ErrorBudgetPicksTheSmallestSufficientRank) {
  const Index n = 500, d = 32;
  VectorXd decay(d);
  for (Index i = 0; i < d; ++i) decay(i) = std::pow(0.8, static_cast<double>(i));
  const MatrixXd p = kqsvd::test::orthonormal(d, d, 71);
  const MatrixXd k = kqsvd::test::with_spectrum(n, decay, p, 72), q = gaussian(n, d, 73);
  const MatrixXd exact = q * k.transpose();
  for (double eps : {0.5, 0.2, 0.05, 0.01, 1e-4}) {
    const auto proj = kqsvd::fit_kq_svd<double>(k.transpose() * k, q.transpose() * q, RankSelection::error_budget(eps));
    const Index r = proj.rank();
    EXPECT_LE(kqsvd::test::direct_tail_error(exact, r), eps + 1e-12) << "eps=" << eps;
    if (r > 1) {
      EXPECT_GT(kqsvd::test::direct_tail_error(exact, r - 1), eps) << "eps=" << eps;
    }
    EXPECT_LE(kqsvd::test::score_error(proj, q, k), eps + 1e-9);
  }
}

TEST(KqSvd, TruncationEqualsFittingAtTheLowerRank) {
  const Index n = 300, d = 20;
  const MatrixXd k = gaussian(n, d, 81) * gaussian(d, d, 82), q = gaussian(n, d, 83);
  const MatrixXd gk = k.transpose() * k / n, gq = q.transpose() * q / n;
  const auto wide = kqsvd::fit_kq_svd<double>(gk, gq, RankSelection::fixed(12));
  const auto narrow = kqsvd::fit_kq_svd<double>(gk, gq, RankSelection::fixed(5));
  const auto cut = wide.truncated(5);
  EXPECT_LT((cut.encoder() - narrow.encoder()).norm(), 1e-12 * narrow.encoder().norm());
  EXPECT_LT((cut.decoder() - narrow.decoder()).norm(), 1e-12 * narrow.decoder().norm());
  EXPECT_THROW(wide.truncated(13), kqsvd::InvalidArgument);
  EXPECT_THROW(wide.truncated(0), kqsvd::InvalidArgument);
}

// Mean-normalised Grams: same subspace, latents O(1) whatever the token count.
TEST(KqSvd, MeanGramKeepsLatentsOrderOne) {
  const Index d = 16;
  for (Index n : {100, 10000}) {
    const MatrixXd k = gaussian(n, d, 91), q = gaussian(n, d, 92);
    kqsvd::GramAccumulator keys(d), queries(d);
    keys.add(k);
    queries.add(q);
    const auto proj = kqsvd::fit_projection<double>(Method::kq_svd, keys, queries, RankSelection::fixed(8));
    const MatrixXd latents = proj.compress(k);
    // K A = sqrt(n) U_K U_r: columns of unit mean square.
    EXPECT_NEAR(latents.squaredNorm() / static_cast<double>(n * 8), 1.0, 1e-9) << "n=" << n;
  }
}

}  // namespace kqsvd_test_key_query_svd
