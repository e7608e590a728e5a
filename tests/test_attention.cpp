// Attention on full and compressed caches, and RoPE in both conventions, against naive loops written
// out here from the formulas.
#include <gtest/gtest.h>

#include <kqsvd/kqsvd.hpp>

#include <cmath>

#include "test_support.hpp"

namespace kqsvd_test_attention {

using kqsvd::Method;
using kqsvd::RankSelection;
using kqsvd::test::gaussian;
using Eigen::Index;
using Eigen::MatrixXd;

// softmax(q_i . k_j / sqrt(d)) over j <= offset + i, times V: three plain loops.
MatrixXd naive_attention(const MatrixXd& q, const MatrixXd& k, const MatrixXd& v, Index offset, double scale) {
  MatrixXd out = MatrixXd::Zero(q.rows(), v.cols());
  for (Index i = 0; i < q.rows(); ++i) {
    const Index visible = offset + i + 1;
    std::vector<double> w(static_cast<std::size_t>(visible));
    double largest = -1e300, total = 0.0;
    for (Index j = 0; j < visible; ++j) {
      double dot = 0.0;
      for (Index c = 0; c < q.cols(); ++c) dot += q(i, c) * k(j, c);
      w[static_cast<std::size_t>(j)] = dot * scale;
      largest = std::max(largest, w[static_cast<std::size_t>(j)]);
    }
    for (double& x : w) total += (x = std::exp(x - largest));
    for (Index j = 0; j < visible; ++j) out.row(i) += (w[static_cast<std::size_t>(j)] / total) * v.row(j);
  }
  return out;
}

TEST(Attention, CausalAttentionMatchesNaiveLoops) {
  const Index n = 40, d = 8;
  const MatrixXd q = gaussian(n, d, 1), k = gaussian(n, d, 2), v = gaussian(n, d, 3);
  const MatrixXd expected = naive_attention(q, k, v, 0, 1.0 / std::sqrt(8.0));
  EXPECT_LT((kqsvd::causal_attention(q, k, v) - expected).norm(), 1e-12);
  // A decode step: the last 3 queries against the whole cache.
  const MatrixXd tail = kqsvd::causal_attention(q.bottomRows(3), k, v);
  EXPECT_LT((tail - expected.bottomRows(3)).norm(), 1e-12);
  // Softmax rows sum to one, masked entries are exactly zero.
  const auto weights = kqsvd::causal_softmax(q * k.transpose(), 0);
  EXPECT_LT((weights.rowwise().sum().array() - 1.0).abs().maxCoeff(), 1e-12);
  EXPECT_EQ(weights(3, 4), 0.0);
  EXPECT_THROW(kqsvd::causal_attention(q, k.topRows(10), v.topRows(10)), kqsvd::InvalidArgument);
}

TEST(Attention, CompressedAttentionIsAttentionOnTheApproximateScores) {
  const Index n = 50, d = 16, r = 5, rv = 7;
  const MatrixXd q = gaussian(n, d, 4), k = gaussian(n, d, 5) * gaussian(d, d, 6), v = gaussian(n, d, 7);
  kqsvd::GramAccumulator keys(d), queries(d), values(d);
  keys.add(k);
  queries.add(q);
  values.add(v);
  const MatrixXd w = gaussian(32, d, 8);
  const auto kp = kqsvd::fit_projection<double>(Method::kq_svd, keys, queries, RankSelection::fixed(r));
  const auto vp = kqsvd::fit_value_projection<double>(Method::kq_svd, values, w.transpose() * w, RankSelection::fixed(rv));
  const MatrixXd out = kqsvd::compressed_causal_attention(kp, vp, q, kp.compress(k), vp.compress(v));
  // Independent route: explicit approximate scores (Q B)(K A)^T and reconstructed values V A_v B_v^T.
  const MatrixXd approx_keys_for_scores = (k * kp.encoder()) * kp.decoder().transpose();  // (QB)(KA)^T = Q (K A B^T)^T
  const MatrixXd expected = naive_attention(q, approx_keys_for_scores, (v * vp.encoder()) * vp.decoder().transpose(), 0,
                                            1.0 / std::sqrt(double(d)));
  EXPECT_LT((out - expected).norm(), 1e-10 * expected.norm());
}

TEST(Attention, FullRankCompressionIsExact) {
  const Index n = 30, d = 8;
  const MatrixXd q = gaussian(n, d, 9), k = gaussian(n, d, 10), v = gaussian(n, d, 11);
  kqsvd::GramAccumulator keys(d), queries(d), values(d);
  keys.add(k);
  queries.add(q);
  values.add(v);
  for (Method m : kqsvd::all_methods) {
    const auto kp = kqsvd::fit_projection<double>(m, keys, queries, RankSelection::fixed(d));
    const auto vp = kqsvd::fit_value_projection<double>(m, values, MatrixXd::Identity(d, d), RankSelection::fixed(d));
    const MatrixXd out = kqsvd::compressed_causal_attention(kp, vp, q, kp.compress(k), vp.compress(v));
    EXPECT_LT((out - kqsvd::causal_attention(q, k, v)).norm(), 1e-10) << kqsvd::to_string(m);
  }
}

// --- RoPE -----------------------------------------------------------------------------------------

TEST(Rope, AdjacentPairsMatchLlama2cFormula) {
  const Index d = 8;
  const MatrixXd x = gaussian(5, d, 12);
  MatrixXd rotated = x;
  kqsvd::RotaryEmbedding rope(d, 10000.0, kqsvd::RopeStyle::adjacent_pairs);
  rope.rotate(rotated, 3);
  for (Index t = 0; t < 5; ++t) {
    for (Index i = 0; i < d; i += 2) {  // run.c: freq = 1 / 10000^(i / head_size), val = pos * freq
      const double angle = double(t + 3) / std::pow(10000.0, double(i) / double(d));
      EXPECT_NEAR(rotated(t, i), x(t, i) * std::cos(angle) - x(t, i + 1) * std::sin(angle), 1e-12);
      EXPECT_NEAR(rotated(t, i + 1), x(t, i) * std::sin(angle) + x(t, i + 1) * std::cos(angle), 1e-12);
    }
  }
}

TEST(Rope, RotateHalfMatchesHuggingFaceFormula) {
  const Index d = 8, half = 4;
  const MatrixXd x = gaussian(4, d, 13);
  MatrixXd rotated = x;
  kqsvd::RotaryEmbedding rope(d, 500000.0, kqsvd::RopeStyle::rotate_half);
  rope.rotate(rotated, 7);
  for (Index t = 0; t < 4; ++t) {
    // transformers: q * cos + rotate_half(q) * sin, cos/sin = cat(freqs, freqs), rotate_half = cat(-x2, x1)
    for (Index i = 0; i < d; ++i) {
      const Index j = i % half;
      const double angle = double(t + 7) * std::pow(500000.0, -2.0 * double(j) / double(d));
      const double rotate_half = i < half ? -x(t, i + half) : x(t, i - half);
      EXPECT_NEAR(rotated(t, i), x(t, i) * std::cos(angle) + rotate_half * std::sin(angle), 1e-12);
    }
  }
}

TEST(Rope, ScoresDependOnlyOnRelativePositionAndRotationInverts) {
  const Index d = 16;
  for (auto style : {kqsvd::RopeStyle::adjacent_pairs, kqsvd::RopeStyle::rotate_half}) {
    kqsvd::RotaryEmbedding rope(d, 10000.0, style);
    const MatrixXd q = gaussian(1, d, 14), k = gaussian(1, d, 15);
    MatrixXd q1 = q, k1 = k, q2 = q, k2 = k;
    rope.rotate(q1, 10);
    rope.rotate(k1, 4);
    rope.rotate(q2, 1006);
    rope.rotate(k2, 1000);
    EXPECT_NEAR(q1.row(0).dot(k1.row(0)), q2.row(0).dot(k2.row(0)), 1e-10);
    MatrixXd back = q2;
    rope.rotate_back(back, 1006);
    EXPECT_LT((back - q).norm(), 1e-12);
    EXPECT_NEAR(q2.norm(), q.norm(), 1e-12);
  }
  EXPECT_THROW(kqsvd::RotaryEmbedding(7), kqsvd::InvalidArgument);
  EXPECT_THROW(kqsvd::RotaryEmbedding(8, 0.5), kqsvd::InvalidArgument);
  EXPECT_EQ(kqsvd::parse_rope_style("half"), kqsvd::RopeStyle::rotate_half);
  EXPECT_THROW(kqsvd::parse_rope_style("spiral"), kqsvd::InvalidArgument);
}

// Pre-RoPE: projections of un-rotated keys; at attention time keys are reconstructed, rotated by their
// positions and scored against rotated queries. At full rank this is exact attention with RoPE.
TEST(Attention, PreRopePathReconstructsRotatesAndScores) {
  const Index n = 24, d = 8, r = 3;
  const MatrixXd q = gaussian(n, d, 16), k = gaussian(n, d, 17), v = gaussian(n, d, 18);
  kqsvd::RotaryEmbedding rope(d);
  MatrixXd q_rot = q, k_rot = k;
  rope.rotate(q_rot, 0);
  rope.rotate(k_rot, 0);
  kqsvd::GramAccumulator keys(d), queries(d), values(d);
  keys.add(k);
  queries.add(q);
  values.add(v);
  const auto vp = kqsvd::fit_value_projection<double>(Method::k_svd, values, MatrixXd::Identity(d, d), RankSelection::fixed(d));
  const auto full = kqsvd::fit_projection<double>(Method::kq_svd, keys, queries, RankSelection::fixed(d));
  EXPECT_LT((kqsvd::pre_rope_causal_attention(full, vp, rope, q_rot, full.compress(k), vp.compress(v)) -
             kqsvd::causal_attention(q_rot, k_rot, v))
                .norm(),
            1e-10);
  const auto low = kqsvd::fit_projection<double>(Method::kq_svd, keys, queries, RankSelection::fixed(r));
  MatrixXd k_hat = (k * low.encoder()) * low.decoder().transpose();
  rope.rotate(k_hat, 0);
  const MatrixXd expected = naive_attention(q_rot, k_hat, v, 0, 1.0 / std::sqrt(double(d)));
  EXPECT_LT((kqsvd::pre_rope_causal_attention(low, vp, rope, q_rot, low.compress(k), vp.compress(v)) - expected).norm(),
            1e-10);
}

}  // namespace kqsvd_test_attention
