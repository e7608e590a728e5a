// The seven fidelity metrics against formulas computed independently here.
#include <gtest/gtest.h>

#include <kqsvd/kqsvd.hpp>

#include <cmath>

#include "test_support.hpp"

namespace kqsvd_test_fidelity {

using kqsvd::FidelityMetric;
using kqsvd::Method;
using kqsvd::RankSelection;
using kqsvd::test::gaussian;
using Eigen::Index;
using Eigen::MatrixXd;

MatrixXd naive_causal_softmax(const MatrixXd& scores) {
  MatrixXd p = MatrixXd::Zero(scores.rows(), scores.cols());
  for (Index i = 0; i < scores.rows(); ++i) {
    double total = 0.0;
    for (Index j = 0; j <= i; ++j) total += std::exp(scores(i, j));
    for (Index j = 0; j <= i; ++j) p(i, j) = std::exp(scores(i, j)) / total;
  }
  return p;
}

double relative(const MatrixXd& reference, const MatrixXd& approximation) {
  return (reference - approximation).norm() / reference.norm();
}

struct Group {
  MatrixXd k, v, queries, weight;  // queries: g*n x d stacked; weight: hidden x g*d
};

Group make_group(Index n, Index d, Index g, Index hidden, unsigned seed) {
  Group x;
  x.k = gaussian(n, d, seed) * gaussian(d, d, seed + 1);
  x.v = gaussian(n, d, seed + 2) * gaussian(d, d, seed + 3);
  x.queries = gaussian(g * n, d, seed + 4) * gaussian(d, d, seed + 5) * 0.3;
  x.weight = gaussian(hidden, g * d, seed + 6);
  return x;
}

TEST(Fidelity, EveryMetricMatchesItsFormula) {
  const Index n = 30, d = 8, g = 2, hidden = 20;
  const Group x = make_group(n, d, g, hidden, 1);
  kqsvd::GramAccumulator keys(d), queries(d), values(d);
  keys.add(x.k);
  queries.add(x.queries);
  values.add(x.v);
  const auto kp = kqsvd::fit_projection<double>(Method::kq_svd, keys, queries, RankSelection::fixed(3));
  const MatrixXd gw = kqsvd::output_projection_gram(x.weight, d, 0, g);
  const auto vp = kqsvd::fit_value_projection<double>(Method::kq_svd, values, gw, RankSelection::fixed(4));
  const auto totals = kqsvd::measure_head_fidelity(kp, vp, x.k, x.v, x.queries, x.weight);

  const MatrixXd a = kp.encoder(), b = kp.decoder(), av = vp.encoder(), bv = vp.decoder();
  EXPECT_NEAR(totals.relative_error(FidelityMetric::keys), relative(x.k, x.k * a * b.transpose()), 1e-12);
  EXPECT_NEAR(totals.relative_error(FidelityMetric::queries), relative(x.queries, x.queries * b * a.transpose()), 1e-12);
  EXPECT_NEAR(totals.relative_error(FidelityMetric::values), relative(x.v, x.v * av * bv.transpose()), 1e-12);
  double err[4] = {0, 0, 0, 0}, ref[4] = {0, 0, 0, 0};  // scores, vo, softmax, out
  for (Index j = 0; j < g; ++j) {
    const MatrixXd q = x.queries.middleRows(j * n, n), w = x.weight.middleCols(j * d, d);
    const MatrixXd s = q * x.k.transpose(), s_hat = (q * b) * (x.k * a).transpose();
    const MatrixXd vo = x.v * w.transpose(), vo_hat = x.v * av * bv.transpose() * w.transpose();
    const MatrixXd p = naive_causal_softmax(s / std::sqrt(double(d))), p_hat = naive_causal_softmax(s_hat / std::sqrt(double(d)));
    const MatrixXd pairs[4][2] = {{s, s_hat}, {vo, vo_hat}, {p, p_hat}, {p * vo, p_hat * vo_hat}};
    for (int m = 0; m < 4; ++m) {
      err[m] += (pairs[m][0] - pairs[m][1]).squaredNorm();
      ref[m] += pairs[m][0].squaredNorm();
    }
  }
  const FidelityMetric order[4] = {FidelityMetric::scores, FidelityMetric::value_output, FidelityMetric::softmax,
                                   FidelityMetric::output};
  for (int m = 0; m < 4; ++m) {
    EXPECT_NEAR(totals.relative_error(order[m]), std::sqrt(err[m] / ref[m]), 1e-12) << kqsvd::to_string(order[m]);
    EXPECT_GT(totals.relative_error(order[m]), 0.0);
  }
}

// With a latent format, the latents are what the format gives back (round_trip, itself tested against
// ggml's vectors and exhaustive tables) and everything downstream is reconstructed from them.
TEST(Fidelity, LatentFormatMeasuresTheStoredLatents) {
  const Index n = 24, d = 16, g = 2, hidden = 20;
  const Group x = make_group(n, d, g, hidden, 7);
  kqsvd::GramAccumulator keys(d), queries(d), values(d);
  keys.add(x.k);
  queries.add(x.queries);
  values.add(x.v);
  const auto kp = kqsvd::fit_projection<double>(Method::kq_svd, keys, queries, RankSelection::fixed(8));
  const auto vp = kqsvd::fit_value_projection<double>(Method::kq_svd, values, kqsvd::output_projection_gram(x.weight, d, 0, g),
                                                      RankSelection::fixed(8));
  const MatrixXd a = kp.encoder(), b = kp.decoder(), av = vp.encoder(), bv = vp.decoder();
  const auto exact = kqsvd::measure_head_fidelity(kp, vp, x.k, x.v, x.queries, x.weight);
  double previous_scores = exact.relative_error(FidelityMetric::scores);
  for (const char* name : {"f16", "int8", "int4/8", "int2/8"}) {
    const kqsvd::StorageFormat format = kqsvd::StorageFormat::parse(name);
    kqsvd::FidelityOptions options;
    options.latent_format = format;
    const auto totals = kqsvd::measure_head_fidelity(kp, vp, x.k, x.v, x.queries, x.weight, options);
    const MatrixXd key_latents = kqsvd::round_trip(format, MatrixXd(x.k * a)).cast<double>();
    const MatrixXd value_latents = kqsvd::round_trip(format, MatrixXd(x.v * av)).cast<double>();
    EXPECT_NEAR(totals.relative_error(FidelityMetric::keys), relative(x.k, key_latents * b.transpose()), 1e-12) << name;
    EXPECT_NEAR(totals.relative_error(FidelityMetric::values), relative(x.v, value_latents * bv.transpose()), 1e-12) << name;
    EXPECT_NEAR(totals.relative_error(FidelityMetric::queries), exact.relative_error(FidelityMetric::queries), 1e-12);
    double error = 0.0, reference = 0.0;
    for (Index j = 0; j < g; ++j) {
      const MatrixXd q = x.queries.middleRows(j * n, n);
      const MatrixXd s = q * x.k.transpose(), s_hat = (q * b) * key_latents.transpose();
      error += (s - s_hat).squaredNorm();
      reference += s.squaredNorm();
    }
    EXPECT_NEAR(totals.relative_error(FidelityMetric::scores), std::sqrt(error / reference), 1e-12) << name;
    // Fewer bits, more error: f16 is nearly exact, 2 bits in blocks of 8 are not.
    EXPECT_GE(totals.relative_error(FidelityMetric::scores), previous_scores * (1 - 1e-9)) << name;
    previous_scores = totals.relative_error(FidelityMetric::scores);
  }
  kqsvd::FidelityOptions unholdable;
  unholdable.latent_format = kqsvd::StorageFormat::parse("q4_0");
  EXPECT_THROW(kqsvd::measure_head_fidelity(kp, vp, x.k, x.v, x.queries, x.weight, unholdable), kqsvd::InvalidArgument);
}

// On the calibration data itself, the measured Q K^T and V W^T errors are the predicted ones.
TEST(Fidelity, CalibrationErrorEqualsPrediction) {
  const Index n = 60, d = 8, g = 2, hidden = 16;
  const Group x = make_group(n, d, g, hidden, 20);
  kqsvd::GramAccumulator keys(d), queries(d), values(d);
  keys.add(x.k);
  queries.add(x.queries);
  values.add(x.v);
  for (Index r : {1, 3, 6}) {
    const auto kp = kqsvd::fit_projection<double>(Method::kq_svd, keys, queries, RankSelection::fixed(r));
    const auto vp = kqsvd::fit_value_projection<double>(Method::kq_svd, values, kqsvd::output_projection_gram(x.weight, d, 0, g),
                                                        RankSelection::fixed(r));
    const auto totals = kqsvd::measure_head_fidelity(kp, vp, x.k, x.v, x.queries, x.weight);
    EXPECT_NEAR(totals.relative_error(FidelityMetric::scores), kp.predicted_relative_error(), 1e-10) << r;
    EXPECT_NEAR(totals.relative_error(FidelityMetric::value_output), vp.predicted_relative_error(), 1e-10) << r;
  }
}

TEST(Fidelity, FullRankIsLossless) {
  const Index n = 20, d = 8;
  const Group x = make_group(n, d, 1, 12, 30);
  kqsvd::GramAccumulator keys(d), queries(d), values(d);
  keys.add(x.k);
  queries.add(x.queries);
  values.add(x.v);
  for (Method m : kqsvd::all_methods) {
    const auto kp = kqsvd::fit_projection<double>(m, keys, queries, RankSelection::fixed(d));
    const auto vp = kqsvd::fit_value_projection<double>(m, values, MatrixXd::Identity(d, d), RankSelection::fixed(d));
    const auto totals = kqsvd::measure_head_fidelity(kp, vp, x.k, x.v, x.queries, x.weight);
    for (FidelityMetric metric : kqsvd::all_fidelity_metrics) {
      EXPECT_LT(totals.relative_error(metric), 1e-10) << kqsvd::to_string(m) << " " << kqsvd::to_string(metric);
    }
  }
}

TEST(Fidelity, PreRopeScoresCompareRotatedReconstructions) {
  const Index n = 16, d = 8;
  const Group x = make_group(n, d, 1, 12, 40);
  kqsvd::GramAccumulator keys(d), queries(d), values(d);
  keys.add(x.k);
  queries.add(x.queries);
  values.add(x.v);
  const auto kp = kqsvd::fit_projection<double>(Method::k_svd, keys, queries, RankSelection::fixed(4));
  const auto vp = kqsvd::fit_value_projection<double>(Method::k_svd, values, MatrixXd::Identity(d, d), RankSelection::fixed(4));
  kqsvd::RotaryEmbedding rope(d);
  kqsvd::FidelityOptions options;
  options.pre_rope = &rope;
  options.first_position = 5;
  const auto totals = kqsvd::measure_head_fidelity(kp, vp, x.k, x.v, x.queries, x.weight, options);
  MatrixXd q = x.queries, k = x.k, k_hat = x.k * kp.encoder() * kp.decoder().transpose();
  rope.rotate(q, 5);
  rope.rotate(k, 5);
  rope.rotate(k_hat, 5);
  EXPECT_NEAR(totals.relative_error(FidelityMetric::scores), relative(q * k.transpose(), q * k_hat.transpose()), 1e-12);
}

TEST(Fidelity, TotalsAggregateSquaredNorms) {
  kqsvd::FidelityTotals a, b;
  a.add(FidelityMetric::keys, 1.0, 100.0);
  b.add(FidelityMetric::keys, 8.0, 800.0);
  a += b;
  EXPECT_DOUBLE_EQ(a.relative_error(FidelityMetric::keys), std::sqrt(9.0 / 900.0));
  EXPECT_EQ(a.relative_error(FidelityMetric::values), 0.0);
  a.add(FidelityMetric::values, 1.0, 0.0);
  EXPECT_TRUE(std::isinf(a.relative_error(FidelityMetric::values)));
}

TEST(Fidelity, RejectsInconsistentShapes) {
  const Group x = make_group(10, 8, 2, 12, 50);
  kqsvd::GramAccumulator keys(8);
  keys.add(x.k);
  const auto kp = kqsvd::fit_projection<double>(Method::k_svd, keys, keys, RankSelection::fixed(2));
  EXPECT_THROW(kqsvd::measure_head_fidelity(kp, kp, x.k, x.v, x.queries.topRows(15), x.weight), kqsvd::InvalidArgument);
  EXPECT_THROW(kqsvd::measure_head_fidelity(kp, kp, x.k, x.v, x.queries, x.weight.leftCols(8)), kqsvd::InvalidArgument);
  EXPECT_THROW(kqsvd::measure_head_fidelity(kp, kp, x.k, x.v.topRows(9), x.queries, x.weight), kqsvd::InvalidArgument);
}

}  // namespace kqsvd_test_fidelity
