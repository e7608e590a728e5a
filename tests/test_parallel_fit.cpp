// Calibration and fitting with OpenMP: Gram accumulation and whole-model fits are bit-identical for any
// thread count, errors from a parallel head still surface; and the symmetric_eigen route agrees with
// the default SVD route on what a compressed cache uses.
#include <gtest/gtest.h>

#include <kqsvd/kqsvd.hpp>

#include <string>
#include <vector>


#include "test_support.hpp"

namespace kqsvd_test_parallel_fit {

using Eigen::Index;
using Eigen::MatrixXd;
using kqsvd::Method;
using kqsvd::RankSelection;
using kqsvd::test::gaussian;
using kqsvd::test::with_threads;

TEST(ParallelGram, BitIdenticalOnAnyThreadCountAndEqualToTheDirectProduct) {
  const Index d = 12;
  const Eigen::MatrixXf x = (gaussian(20000, d, 1) * gaussian(d, d, 2)).cast<float>();  // 10 tasks, 2 waves
  MatrixXd grams[3];
  for (int threads : {1, 2, 3}) {
    with_threads(threads, [&] {
      kqsvd::GramAccumulator g(d);
      g.add(x.topRows(100));     // one serial block
      g.add(x.bottomRows(19900));  // split into parallel tasks
      grams[threads - 1] = g.gram();
    });
  }
  EXPECT_EQ(grams[0], grams[1]);
  EXPECT_EQ(grams[0], grams[2]);
  const MatrixXd xd = x.cast<double>();
  const MatrixXd direct = xd.transpose() * xd;
  EXPECT_LT((grams[0] - direct).norm(), 1e-12 * direct.norm());
}

const kqsvd::ModelShape shape{/*layers=*/3, /*query_heads=*/4, /*kv_heads=*/2, /*head_dim=*/16};

kqsvd::ModelCalibration calibrate(Index layers_with_tokens) {
  kqsvd::ModelCalibration calibration(shape);
  for (Index l = 0; l < layers_with_tokens; ++l) {
    const auto seed = static_cast<unsigned>(10 * l);
    calibration.add(l, gaussian(120, 64, seed), gaussian(120, 32, seed + 1) * gaussian(32, 32, seed + 2),
                    gaussian(120, 32, seed + 3));
  }
  return calibration;
}

TEST(ParallelModelFit, BitIdenticalOnAnyThreadCountAndEqualToPerHeadFits) {
  const kqsvd::ModelCalibration calibration = calibrate(shape.layers);
  const std::vector<MatrixXd> o_proj = {gaussian(64, 64, 100), gaussian(64, 64, 101), gaussian(64, 64, 102)};
  std::vector<kqsvd::ModelProjections<float>> models;
  for (int threads : {1, 2, 3}) {
    with_threads(threads, [&] {
      models.push_back(kqsvd::ModelProjections<float>::fit(calibration, o_proj, Method::kq_svd, RankSelection::fixed(4),
                                                           RankSelection::error_budget(0.3)));
    });
  }
  for (Index l = 0; l < shape.layers; ++l) {
    for (Index h = 0; h < shape.kv_heads; ++h) {
      for (std::size_t m = 1; m < models.size(); ++m) {
        EXPECT_EQ(models[m].keys(l, h).encoder(), models[0].keys(l, h).encoder());
        EXPECT_EQ(models[m].keys(l, h).decoder(), models[0].keys(l, h).decoder());
        EXPECT_EQ(models[m].values(l, h).encoder(), models[0].values(l, h).encoder());
        EXPECT_EQ(models[m].values(l, h).decoder(), models[0].values(l, h).decoder());
      }
      const auto single = kqsvd::fit_projection<float>(Method::kq_svd, calibration.keys(l, h),
                                                       calibration.queries(l, h), RankSelection::fixed(4));
      EXPECT_LT((models[0].keys(l, h).decoder() - single.decoder()).norm(), 1e-5 * single.decoder().norm());
    }
  }
}

TEST(ParallelModelFit, AFailingHeadIsReportedWhateverThreadRunsIt) {
  const kqsvd::ModelCalibration calibration = calibrate(2);  // the last layer has no tokens
  for (int threads : {1, 2}) {
    with_threads(threads, [&] {
      try {
        kqsvd::ModelProjections<float>::fit(calibration, std::vector<MatrixXd>{}, Method::k_svd, RankSelection::fixed(4),
                                            RankSelection::fixed(4));
        FAIL() << "expected InvalidArgument";
      } catch (const kqsvd::InvalidArgument& e) {
        EXPECT_NE(std::string(e.what()).find("argument 'cached' holds no tokens"), std::string::npos) << e.what();
      }
    });
  }
}

kqsvd::FitOptions eigen_route() {
  kqsvd::FitOptions options;
  options.svd = kqsvd::SvdAlgorithm::symmetric_eigen;
  return options;
}

TEST(SymmetricEigenRoute, AgreesWithTheSvdRouteOnFullRankAndRankDeficientKeys) {
  const Index d = 32, r = 8;
  const MatrixXd q = gaussian(100, d, 3) * gaussian(d, d, 4);
  for (Index tokens : {150, 20 /* fewer keys than d: G_K singular, the eigendecomposition fallback */}) {
    const MatrixXd k = gaussian(tokens, d, 1) * gaussian(d, d, 2);
    const MatrixXd gk = k.transpose() * k / static_cast<double>(tokens), gq = q.transpose() * q / 100.0;
    const auto svd = kqsvd::fit_kq_svd<double>(gk, gq, RankSelection::fixed(r));
    const auto eig = kqsvd::fit_kq_svd<double>(gk, gq, RankSelection::fixed(r), eigen_route());
    const Eigen::VectorXd s = svd.singular_values();
    const Index shared = std::min<Index>(tokens, d);
    EXPECT_LT((eig.singular_values().head(shared) - s.head(shared)).cwiseAbs().maxCoeff(), 1e-7 * s(0)) << tokens;
    EXPECT_LT((eig.encoder() - svd.encoder()).norm(), 1e-6 * svd.encoder().norm()) << tokens;
    EXPECT_LT((eig.decoder() - svd.decoder()).norm(), 1e-6 * svd.decoder().norm()) << tokens;
    EXPECT_NEAR(eig.predicted_relative_error(), svd.predicted_relative_error(), 1e-9);
    // The defining identity of KQ-SVD holds on the route's own result.
    EXPECT_LT((eig.encoder().transpose() * eig.decoder() - MatrixXd::Identity(r, r)).norm(), 1e-8) << tokens;
    EXPECT_NEAR(kqsvd::test::score_error(eig, q, k), kqsvd::test::direct_tail_error(q * k.transpose(), r), 1e-7);
  }
}

TEST(SymmetricEigenRoute, RejectsAnIndefiniteQueryGram) {
  const Index d = 6;
  const MatrixXd k = gaussian(50, d, 5);
  MatrixXd indefinite = MatrixXd::Identity(d, d);
  indefinite(0, 1) = indefinite(1, 0) = 2.0;  // eigenvalue -1
  try {
    kqsvd::fit_kq_svd<double>(k.transpose() * k, indefinite, RankSelection::fixed(2), eigen_route());
    FAIL() << "expected InvalidArgument";
  } catch (const kqsvd::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("kqsvd::fit_kq_svd: argument 'query_gram' is not positive semidefinite"),
              std::string::npos)
        << e.what();
  }
  // A zero query Gram is allowed: all singular values are zero.
  const auto zero = kqsvd::fit_kq_svd<double>(k.transpose() * k, MatrixXd::Zero(d, d), RankSelection::fixed(2),
                                              eigen_route());
  EXPECT_EQ(zero.singular_values().norm(), 0.0);
}

}  // namespace kqsvd_test_parallel_fit
