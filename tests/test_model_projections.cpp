#include <gtest/gtest.h>

#include <kqsvd/kqsvd.hpp>

#include <cmath>
#include <vector>

#include "test_support.hpp"

namespace kqsvd_test_model_projections {

using kqsvd::Method;
using kqsvd::ModelShape;
using kqsvd::RankSelection;
using kqsvd::test::gaussian;
using Eigen::Index;
using Eigen::MatrixXd;

const ModelShape shape{/*layers=*/2, /*query_heads=*/4, /*kv_heads=*/2, /*head_dim=*/8};

struct Layer {
  MatrixXd q, k, v;
};

Layer make_layer(Index tokens, unsigned seed) {
  Layer x;
  x.q = gaussian(tokens, 4 * 8, seed) * 0.5;
  x.k = gaussian(tokens, 2 * 8, seed + 1) * gaussian(16, 16, seed + 2);
  x.v = gaussian(tokens, 2 * 8, seed + 3);
  return x;
}

TEST(ModelShape, GroupsQueryHeadsOntoKvHeads) {
  EXPECT_EQ(shape.group_size(), 2);
  EXPECT_EQ(shape.kv_head_of(0), 0);
  EXPECT_EQ(shape.kv_head_of(3), 1);
  EXPECT_EQ(shape.first_query_head_of(1), 2);
  EXPECT_THROW((ModelShape{1, 6, 4, 8}.validate()), kqsvd::InvalidArgument);
  EXPECT_THROW((ModelShape{0, 4, 4, 8}.validate()), kqsvd::InvalidArgument);
}

TEST(ModelCalibration, RoutesHeadsAndMergesShards) {
  kqsvd::ModelCalibration calibration(shape), first(shape), second(shape);
  const Layer x = make_layer(50, 1);
  calibration.add(1, x.q, x.k, x.v);
  first.add(1, x.q.topRows(20), x.k.topRows(20), x.v.topRows(20));
  second.add(1, x.q.bottomRows(30), x.k.bottomRows(30), x.v.bottomRows(30));
  first.merge(second);
  for (Index h = 0; h < 2; ++h) {
    const MatrixXd k = x.k.middleCols(h * 8, 8), v = x.v.middleCols(h * 8, 8);
    const MatrixXd q0 = x.q.middleCols(2 * h * 8, 8), q1 = x.q.middleCols((2 * h + 1) * 8, 8);
    EXPECT_LT((calibration.keys(1, h).gram() - k.transpose() * k).norm(), 1e-10);
    EXPECT_LT((calibration.values(1, h).gram() - v.transpose() * v).norm(), 1e-10);
    EXPECT_LT((calibration.queries(1, h).gram() - (q0.transpose() * q0 + q1.transpose() * q1)).norm(), 1e-10);
    EXPECT_EQ(calibration.queries(1, h).token_count(), 100);
    EXPECT_LT((first.keys(1, h).gram() - calibration.keys(1, h).gram()).norm(), 1e-10);
    EXPECT_EQ(calibration.keys(0, h).token_count(), 0);
  }
  EXPECT_THROW(calibration.add(2, x.q, x.k, x.v), kqsvd::InvalidArgument);
  EXPECT_THROW(calibration.add(0, x.q.leftCols(24), x.k, x.v), kqsvd::InvalidArgument);
  EXPECT_THROW(calibration.keys(0, 2), kqsvd::InvalidArgument);
}

// A calibration stream cut into blocks differently gives the same bytes: the Grams of every head,
// including the stacked GQA queries (each query head accumulates its own rows), and so the fitted
// projections. 5,000 tokens cross two 2,048-token tasks of the accumulators.
TEST(ModelCalibration, ByteIdenticalForAnySplitOfTheStreamUnderGqa) {
  const Layer x = make_layer(5000, 7);
  kqsvd::ModelCalibration whole(shape), cut(shape);
  for (Index l = 0; l < 2; ++l) whole.add(l, x.q, x.k, x.v);
  for (Index l = 0; l < 2; ++l) {
    Index first = 0;
    for (const Index count : {Index{1}, Index{300}, Index{2047}, Index{2652}}) {
      cut.add(l, x.q.middleRows(first, count), x.k.middleRows(first, count), x.v.middleRows(first, count));
      first += count;
    }
    ASSERT_EQ(first, 5000);
  }
  for (Index l = 0; l < 2; ++l) {
    for (Index h = 0; h < 2; ++h) {
      EXPECT_EQ(cut.keys(l, h).gram(), whole.keys(l, h).gram());
      EXPECT_EQ(cut.values(l, h).gram(), whole.values(l, h).gram());
      EXPECT_EQ(cut.queries(l, h).gram(), whole.queries(l, h).gram());
      EXPECT_EQ(cut.queries(l, h).token_count(), 10000);
      // Independent check of the stacked query Gram: the direct products in double.
      const MatrixXd q0 = x.q.middleCols(2 * h * 8, 8), q1 = x.q.middleCols((2 * h + 1) * 8, 8);
      const MatrixXd direct = q0.transpose() * q0 + q1.transpose() * q1;
      EXPECT_LT((whole.queries(l, h).gram() - direct).norm(), 1e-12 * direct.norm());
    }
  }
  const std::vector<MatrixXd> o_proj = {gaussian(32, 32, 8), gaussian(32, 32, 9)};
  const auto fit = [&](const kqsvd::ModelCalibration& calibration) {
    return kqsvd::ModelProjections<float>::fit(calibration, o_proj, Method::kq_svd, RankSelection::fixed(3),
                                               RankSelection::fixed(3));
  };
  const auto from_whole = fit(whole), from_cut = fit(cut);
  for (Index l = 0; l < 2; ++l) {
    for (Index h = 0; h < 2; ++h) {
      EXPECT_EQ(from_cut.keys(l, h).encoder(), from_whole.keys(l, h).encoder());
      EXPECT_EQ(from_cut.keys(l, h).decoder(), from_whole.keys(l, h).decoder());
      EXPECT_EQ(from_cut.values(l, h).encoder(), from_whole.values(l, h).encoder());
    }
  }
  kqsvd::test::expect_invalid([&] { whole.add_queries(0, 4, MatrixXd::Zero(1, 8)); },
                              "kqsvd::ModelCalibration::add_queries: argument 'query_head' is 4, outside [0, 4)");
  kqsvd::test::expect_invalid([&] { (void)whole.queries(0, 2); }, "kqsvd::ModelCalibration::queries");
}

// A block refused by one head's accumulator (its squares overflow double) leaves every head of the
// layer as it was, including the heads whose rows were added before the refusal.
TEST(ModelCalibration, ABlockRefusedForOverflowLeavesEveryHeadUnchanged) {
  kqsvd::ModelCalibration calibration(shape), reference(shape);
  const Layer x = make_layer(40, 21);
  calibration.add(0, x.q, x.k, x.v);
  reference.add(0, x.q, x.k, x.v);
  Layer big = make_layer(40, 22);
  big.k.col(8 + 3).setConstant(1e160);  // KV head 1, after KV head 0 and its values: 1e320 overflows
  kqsvd::test::expect_error<kqsvd::NumericalError>([&] { calibration.add(0, big.q, big.k, big.v); },
                                                    "kqsvd::GramAccumulator::add: argument 'rows' has values up to");
  for (Index h = 0; h < 2; ++h) {
    EXPECT_EQ(calibration.keys(0, h).gram(), reference.keys(0, h).gram()) << "KV head " << h;
    EXPECT_EQ(calibration.values(0, h).gram(), reference.values(0, h).gram()) << "KV head " << h;
    EXPECT_EQ(calibration.queries(0, h).gram(), reference.queries(0, h).gram()) << "KV head " << h;
    EXPECT_EQ(calibration.keys(0, h).token_count(), 40);
  }
  // The calibration goes on as if the block had never been offered.
  const Layer more = make_layer(30, 23);
  calibration.add(0, more.q, more.k, more.v);
  reference.add(0, more.q, more.k, more.v);
  EXPECT_EQ(calibration.keys(0, 0).gram(), reference.keys(0, 0).gram());
}

TEST(ModelProjections, FitsEveryHeadLikeTheSingleHeadSolver) {
  kqsvd::ModelCalibration calibration(shape);
  for (Index l = 0; l < 2; ++l) {
    const Layer x = make_layer(80, 10 + 10 * static_cast<unsigned>(l));
    calibration.add(l, x.q, x.k, x.v);
  }
  const std::vector<MatrixXd> o_proj = {gaussian(32, 32, 100), gaussian(32, 32, 101)};
  const auto model = kqsvd::ModelProjections<double>::fit(calibration, o_proj, Method::kq_svd, RankSelection::fixed(3),
                                                          RankSelection::error_budget(0.3));
  for (Index l = 0; l < 2; ++l) {
    for (Index h = 0; h < 2; ++h) {
      const auto key = kqsvd::fit_projection<double>(Method::kq_svd, calibration.keys(l, h), calibration.queries(l, h),
                                                     RankSelection::fixed(3));
      EXPECT_LT((model.keys(l, h).decoder() - key.decoder()).norm(), 1e-12);
      const auto& value = model.values(l, h);
      // Per-head ranks from the budget: each the smallest whose predicted error fits.
      EXPECT_LE(value.predicted_relative_error(), 0.3);
      if (value.rank() > 1) {
        EXPECT_GT(value.predicted_relative_error(value.rank() - 1), 0.3);
      }
      // ... and the value side optimises V [W_j]^T for the group's two query heads.
      const MatrixXd gw = kqsvd::output_projection_gram(o_proj[static_cast<std::size_t>(l)], 8, 2 * h, 2);
      const auto expected = kqsvd::fit_value_projection<double>(Method::kq_svd, calibration.values(l, h), gw,
                                                                RankSelection::error_budget(0.3));
      EXPECT_EQ(value.rank(), expected.rank());
    }
  }
  EXPECT_THROW(model.keys(2, 0), kqsvd::InvalidArgument);
  // KQ-SVD for values needs the output projection.
  EXPECT_THROW(kqsvd::ModelProjections<double>::fit(calibration, std::vector<MatrixXd>{}, Method::kq_svd,
                                                    RankSelection::fixed(3), RankSelection::fixed(3)),
               kqsvd::InvalidArgument);
  // The baselines do not.
  const auto baseline = kqsvd::ModelProjections<double>::fit(calibration, std::vector<MatrixXd>{}, Method::k_svd,
                                                             RankSelection::fixed(2), RankSelection::fixed(5));
  EXPECT_EQ(baseline.values(1, 1).rank(), 5);
}

TEST(ModelProjections, FootprintCountsLatentsProjectionsAndTheWindowExactly) {
  kqsvd::ModelCalibration calibration(shape);
  for (Index l = 0; l < 2; ++l) {
    const Layer x = make_layer(40, 50 + static_cast<unsigned>(l));
    calibration.add(l, x.q, x.k, x.v);
  }
  const auto model = kqsvd::ModelProjections<float>::fit(calibration, std::vector<MatrixXd>{}, Method::eigen_attention,
                                                         RankSelection::fixed(4), RankSelection::fixed(8));
  EXPECT_EQ(model.ranks(), kqsvd::RankAllocation::uniform(shape, 4, 8));
  EXPECT_DOUBLE_EQ(model.ranks().compression_ratio(), 0.75);
  const auto fp32 = kqsvd::latent_cache_footprint(model.ranks(), kqsvd::StorageFormat());
  // 2 layers x 2 KV heads x (4 + 8) latents x 4 bytes, against 2 x 2 x (8 + 8) elements.
  EXPECT_EQ(fp32.bytes_per_token, 2 * 2 * (4 + 8) * 4);
  EXPECT_EQ(fp32.elements_per_token, 2 * 2 * 16);
  EXPECT_DOUBLE_EQ(fp32.bits_per_element(), 24.0);
  // A and B (8 x r each) for keys and values of every head, stored as float.
  EXPECT_EQ(fp32.fixed_bytes, 2 * 2 * (2 * 8 * 4 + 2 * 8 * 8) * 4);
  // int4 in blocks of 4: per row of r elements r / 2 bytes of codes and r / 4 float16 scale-minimum pairs.
  const auto int4 = kqsvd::latent_cache_footprint(model.ranks(), kqsvd::StorageFormat::parse("int4/4"), /*window=*/3);
  EXPECT_EQ(int4.bytes_per_token, 2 * 2 * ((2 + 4) + (4 + 8)));
  EXPECT_EQ(int4.fixed_bytes, fp32.fixed_bytes + 3 * 2 * 2 * 16 * 4);
  EXPECT_EQ(int4.bytes(10), int4.fixed_bytes + 10 * int4.bytes_per_token);
  const auto q8 = kqsvd::full_cache_footprint(kqsvd::ModelShape{2, 4, 2, 64}, kqsvd::StorageFormat::parse("q8_0"));
  EXPECT_DOUBLE_EQ(q8.bits_per_element(), 8.5);
  EXPECT_THROW(kqsvd::latent_cache_footprint(model.ranks(), kqsvd::StorageFormat::parse("q4_0")), kqsvd::InvalidArgument);
  EXPECT_THROW(kqsvd::latent_cache_footprint(model.ranks(), kqsvd::StorageFormat(), -1), kqsvd::InvalidArgument);
}

// Walsh-Hadamard by its closed form, H[i][j] = (-1)^popcount(i & j) / sqrt(n), not Sylvester's recursion.
MatrixXd closed_form_hadamard(Index n) {
  MatrixXd h(n, n);
  for (Index i = 0; i < n; ++i) {
    for (Index j = 0; j < n; ++j) h(i, j) = (__builtin_popcountll(static_cast<unsigned long long>(i & j)) % 2 ? -1.0 : 1.0);
  }
  return h / std::sqrt(static_cast<double>(n));
}

TEST(LatentRotation, HadamardIsWalshHadamardInPowerOfTwoBlocks) {
  for (const Index n : {1, 2, 8, 32, 64}) {
    EXPECT_LT((kqsvd::hadamard_rotation(n) - closed_form_hadamard(n)).cwiseAbs().maxCoeff(), 1e-15) << n;
  }
  // 48 = 3 x 16: three blocks of 16 on the diagonal, zero elsewhere; 7 is odd: the identity.
  const MatrixXd h48 = kqsvd::hadamard_rotation(48);
  MatrixXd expected = MatrixXd::Zero(48, 48);
  for (Index b = 0; b < 3; ++b) expected.block(16 * b, 16 * b, 16, 16) = closed_form_hadamard(16);
  EXPECT_LT((h48 - expected).cwiseAbs().maxCoeff(), 1e-15);
  EXPECT_EQ(kqsvd::hadamard_rotation(7), MatrixXd::Identity(7, 7));
  EXPECT_THROW(kqsvd::hadamard_rotation(0), kqsvd::InvalidArgument);
}

// Rotating changes the latents, not what attention sees: (Q B R)(K A R)^T = (Q B)(K A)^T and the
// reconstruction K A R R^T B^T = K A B^T, checked against the unrotated projection in double.
TEST(LatentRotation, RotatedProjectionsGiveTheSameScoresAndOutputs) {
  kqsvd::ModelCalibration calibration(shape);
  for (Index l = 0; l < 2; ++l) {
    const Layer x = make_layer(80, 50 + 10 * static_cast<unsigned>(l));
    calibration.add(l, x.q, x.k, x.v);
  }
  const std::vector<MatrixXd> o_proj = {gaussian(32, 32, 200), gaussian(32, 32, 201)};
  const auto model = kqsvd::ModelProjections<double>::fit(calibration, o_proj, Method::kq_svd, RankSelection::fixed(4),
                                                          RankSelection::fixed(6));
  const auto rotated = kqsvd::hadamard_rotated(model);
  const Layer x = make_layer(20, 77);
  for (Index l = 0; l < 2; ++l) {
    for (Index h = 0; h < 2; ++h) {
      const auto& key = model.keys(l, h);
      const auto& turned = rotated.keys(l, h);
      EXPECT_EQ(turned.basis(), kqsvd::LatentBasis::rotated);
      EXPECT_EQ(turned.rank(), key.rank());
      const MatrixXd k = x.k.middleCols(8 * h, 8), q = x.q.middleCols(16 * h, 8);
      const MatrixXd scores = key.map_queries(q) * key.compress(k).transpose();
      EXPECT_LT((turned.map_queries(q) * turned.compress(k).transpose() - scores).norm(), 1e-12 * scores.norm());
      // The latents themselves did change: they are K A R.
      EXPECT_GT((turned.compress(k) - key.compress(k)).norm(), 0.1 * key.compress(k).norm());
      const MatrixXd v = x.v.middleCols(8 * h, 8);
      EXPECT_LT((rotated.values(l, h).reconstruct(v) - model.values(l, h).reconstruct(v)).norm(), 1e-12 * v.norm());
      // KQ-SVD's A^T B = I survives a rotation: R^T A^T B R = I.
      EXPECT_LT((turned.encoder().transpose() * turned.decoder() - MatrixXd::Identity(4, 4)).norm(), 1e-10);
      EXPECT_EQ(turned.singular_values(), key.singular_values());
    }
  }
  // Mixed coordinates are not a lower-rank fit: truncating is refused, keeping every rank is not.
  EXPECT_THROW(rotated.keys(0, 0).truncated(2), kqsvd::InvalidArgument);
  EXPECT_THROW(rotated.truncated(kqsvd::RankAllocation::uniform(shape, 2, 2)), kqsvd::InvalidArgument);
  EXPECT_NO_THROW(rotated.truncated(rotated.ranks()));
  // Only rank x rank orthogonal matrices rotate.
  EXPECT_THROW(model.keys(0, 0).rotated(MatrixXd::Identity(3, 3)), kqsvd::InvalidArgument);
  EXPECT_THROW(model.keys(0, 0).rotated(2.0 * MatrixXd::Identity(4, 4)), kqsvd::InvalidArgument);
  MatrixXd not_finite = MatrixXd::Identity(4, 4);
  not_finite(1, 2) = std::nan("");
  EXPECT_THROW(model.keys(0, 0).rotated(not_finite), kqsvd::InvalidArgument);
}

// What the rotation does, and for which method. K-SVD's latents K A are K's principal components: their
// scales are K's singular values, so one outlier direction sets every block's scale, and a Hadamard that
// spreads it makes the stored latents (turned back) several times closer to the exact ones. KQ-SVD's
// key latents are whitened on the calibration data (Z^T Z = n I, checked here), every coordinate
// already of the same scale: the rotation then changes the quantization error by no more than noise.
TEST(LatentRotation, HadamardHelpsPrincipalComponentLatentsNotWhitenedOnes) {
  const Index n = 400, d = 64, r = 32;
  MatrixXd k = gaussian(n, d, 5);
  k.col(0) *= 30.0;  // one outlier direction
  const MatrixXd q = gaussian(n, d, 6);
  kqsvd::GramAccumulator keys(d), queries(d);
  keys.add(k);
  queries.add(q);
  const MatrixXd rotation = kqsvd::hadamard_rotation(r);
  for (const Method method : {Method::k_svd, Method::kq_svd}) {
    const auto projection = kqsvd::fit_projection<double>(method, keys, queries, RankSelection::fixed(r));
    const MatrixXd latents = projection.compress(k);
    const MatrixXd turned = projection.rotated(rotation).compress(k);
    EXPECT_LT((turned - latents * rotation).norm(), 1e-10 * latents.norm());
    if (method == Method::kq_svd) {
      EXPECT_LT((latents.transpose() * latents / double(n) - MatrixXd::Identity(r, r)).norm(), 1e-9);
    }
    for (const char* name : {"int4", "int2", "q4_0", "int8"}) {
      const kqsvd::StorageFormat format = kqsvd::StorageFormat::parse(name);
      const double plain_error = (kqsvd::round_trip(format, latents).cast<double>() - latents).norm();
      const double rotated_error =
          (kqsvd::round_trip(format, turned).cast<double>() * rotation.transpose() - latents).norm();
      if (method == Method::k_svd) {
        EXPECT_LT(rotated_error, 0.4 * plain_error) << name << ": " << rotated_error << " vs " << plain_error;
      } else {
        EXPECT_NEAR(rotated_error / plain_error, 1.0, 0.05) << name;
      }
    }
  }
}
}  // namespace kqsvd_test_model_projections
