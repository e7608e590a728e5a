// Hostile arguments to every public entry point of the core library that the other suites do not
// already cover: NaN and infinity in each matrix argument, negative and oversized indices, empty
// matrices, mismatched shapes, out-of-range options. Each must raise the documented kqsvd::Error
// subclass with a message that names the function and the argument, and a rejected call must leave
// its object unchanged. Gaps this suite found, since fixed, stay as the ClosedGaps suite at the end
// (docs/reliability.md lists them).
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <kqsvd/kernels/reference_attention.hpp>
#include <kqsvd/metrics/fidelity.hpp>
#include <kqsvd/solvers/fit.hpp>
#include <kqsvd/calibration/gram_accumulator.hpp>
#include <kqsvd/io/npy.hpp>
#include <kqsvd/io/safetensors.hpp>
#include <kqsvd/llama/checkpoint.hpp>
#include <kqsvd/llama/tokenizer.hpp>
#include <kqsvd/solvers/low_rank_projection.hpp>
#include <kqsvd/calibration/model_calibration.hpp>
#include <kqsvd/solvers/model_projections.hpp>
#include <kqsvd/core/model_shape.hpp>
#include <kqsvd/calibration/output_projection.hpp>
#include <kqsvd/solvers/rank_selection.hpp>
#include <kqsvd/core/rope.hpp>
#include <kqsvd/solvers/spectrum.hpp>

#include <filesystem>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace kqsvd_test_hostile_inputs {

using Eigen::Index;
using Eigen::MatrixXd;
using Eigen::MatrixXf;
using Eigen::VectorXd;
using kqsvd::Method;
using kqsvd::RankSelection;
using kqsvd::test::gaussian;

constexpr double nan = std::numeric_limits<double>::quiet_NaN();
constexpr double inf = std::numeric_limits<double>::infinity();

using kqsvd::test::expect_invalid;

MatrixXd with_entry(MatrixXd m, Index row, Index col, double value) {
  m(row, col) = value;
  return m;
}

MatrixXd gram_of(Index d, unsigned seed) {
  const MatrixXd x = gaussian(4 * d, d, seed);
  return x.transpose() * x;
}

kqsvd::LowRankProjection<double> some_projection(Index d, Index r, unsigned seed) {
  const MatrixXd g = gram_of(d, seed);
  return kqsvd::fit_kq_svd<double>(g, gram_of(d, seed + 1), RankSelection::fixed(r));
}

// --- GramAccumulator ------------------------------------------------------------------------------

TEST(HostileInputs, GramAccumulatorRejectsInfinityInEveryInputKindAndStaysUnchanged) {
  kqsvd::GramAccumulator g(4);
  g.add(gaussian(10, 4, 1));
  const MatrixXd before = g.gram();
  MatrixXf floats = gaussian(300, 4, 2).cast<float>();
  floats(290, 1) = std::numeric_limits<float>::infinity();
  expect_invalid([&] { g.add(floats); },
                 "kqsvd::GramAccumulator::add: argument 'rows' contains a non-finite value (inf) at row 290, column 1");
  const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> row_major =
      with_entry(gaussian(3, 4, 3), 2, 3, -inf).cast<float>();
  expect_invalid([&] { g.add(row_major); }, "contains a non-finite value (-inf) at row 2, column 3");
  std::vector<double> buffer(8, 1.0);
  buffer[5] = nan;
  expect_invalid([&] { g.add(Eigen::Map<const MatrixXd>(buffer.data(), 2, 4)); }, "(nan) at row 1, column 2");
  expect_invalid([&] { g.add(MatrixXd::Zero(0, 5)); }, "argument 'rows' has 5 columns, expected 4 (the head dimension)");
  EXPECT_EQ(g.gram(), before);
  EXPECT_EQ(g.token_count(), 10);
  // An empty block of the right width is a no-op, not an error.
  g.add(MatrixXd::Zero(0, 4));
  EXPECT_EQ(g.token_count(), 10);
}

TEST(HostileInputs, GramAccumulatorDimensionsAndMergeNameTheArgument) {
  expect_invalid([] { kqsvd::GramAccumulator g(-3); }, "kqsvd::GramAccumulator: argument 'dimension' must be positive, got -3");
  kqsvd::GramAccumulator eight(8), nine(9);
  expect_invalid([&] { eight.merge(nine); }, "kqsvd::GramAccumulator::merge: argument 'other' has dimension 9, expected 8");
  expect_invalid([&] { (void)eight.mean_gram(); }, "kqsvd::GramAccumulator::mean_gram: no tokens have been added");
}

// --- the solvers ----------------------------------------------------------------------------------

TEST(HostileInputs, SolversRejectNonFiniteEmptyAndMismatchedGramsNamingThem) {
  const MatrixXd g = gram_of(6, 4);
  const auto fixed = RankSelection::fixed(2);
  expect_invalid([&] { kqsvd::fit_kq_svd<double>(g, with_entry(g, 5, 0, inf), fixed); },
                 "kqsvd::fit_kq_svd: argument 'query_gram' contains a non-finite value (inf) at row 5, column 0");
  expect_invalid([&] { kqsvd::fit_kq_svd<float>(MatrixXd(0, 0), g, fixed); },
                 "kqsvd::fit_kq_svd: argument 'cached_gram' must be a non-empty square matrix, got 0 x 0");
  expect_invalid([&] { kqsvd::fit_kq_svd<double>(with_entry(g, 1, 1, -1.0), g, fixed); },
                 "argument 'cached_gram' is not positive semidefinite (diagonal entry 1 is -1)");

  expect_invalid([&] { kqsvd::fit_k_svd<double>(with_entry(g, 0, 3, nan), fixed); },
                 "kqsvd::fit_k_svd: argument 'cached_gram' contains a non-finite value (nan) at row 0, column 3");
  expect_invalid([&] { kqsvd::fit_k_svd<double>(MatrixXd::Identity(6, 5), fixed); },
                 "kqsvd::fit_k_svd: argument 'cached_gram' must be a non-empty square matrix, got 6 x 5");
  expect_invalid([&] { kqsvd::fit_k_svd<double>(g, RankSelection::fixed(7)); }, "'rank' is 7, more than the head dimension 6");

  expect_invalid([&] { kqsvd::fit_eigen_attention<double>(g, MatrixXd::Identity(5, 5), fixed); },
                 "kqsvd::fit_eigen_attention: argument 'query_gram' is 5 x 5, expected 6 x 6");
  expect_invalid([&] { kqsvd::fit_eigen_attention<double>(g, with_entry(g, 2, 2, -inf), fixed); },
                 "argument 'query_gram' contains a non-finite value (-inf) at row 2, column 2");
  for (const double balance : {nan, inf, -1.0}) {
    kqsvd::FitOptions options;
    options.balance = balance;
    expect_invalid([&] { kqsvd::fit_eigen_attention<double>(g, g, fixed, options); },
                   "kqsvd::fit_eigen_attention: argument 'options.balance' must be finite and > 0");
  }
  expect_invalid([&] { kqsvd::fit_projection<double>(static_cast<Method>(42), g, g, fixed); },
                 "kqsvd::fit_projection: argument 'method' is not a known method");
}

TEST(HostileInputs, FitFromAccumulatorsChecksDimensionsAndTokenCounts) {
  kqsvd::GramAccumulator keys(6), queries(6), other(5), empty(6), values(6);
  keys.add(gaussian(20, 6, 5));
  queries.add(gaussian(20, 6, 6));
  other.add(gaussian(20, 5, 7));
  const auto fixed = RankSelection::fixed(2);
  expect_invalid([&] { kqsvd::fit_projection<float>(Method::kq_svd, keys, other, fixed); },
                 "kqsvd::fit_projection: argument 'queries' has dimension 5, the cached side 6");
  expect_invalid([&] { kqsvd::fit_projection<float>(Method::eigen_attention, keys, empty, fixed); },
                 "kqsvd::fit_projection: argument 'queries' holds no tokens");
  // K-SVD reads no queries: an empty query side is fine.
  EXPECT_NO_THROW(kqsvd::fit_projection<float>(Method::k_svd, keys, empty, fixed));

  expect_invalid([&] { kqsvd::fit_value_projection<float>(Method::kq_svd, empty, gram_of(6, 8), fixed); },
                 "kqsvd::fit_value_projection: argument 'values' holds no tokens");
  values.add(gaussian(20, 6, 9));
  expect_invalid([&] { kqsvd::fit_value_projection<float>(Method::kq_svd, values, with_entry(gram_of(6, 10), 4, 1, nan), fixed); },
                 "contains a non-finite value (nan) at row 4, column 1");
  expect_invalid([&] { kqsvd::fit_value_projection<float>(Method::kq_svd, values, gram_of(5, 11), fixed); },
                 "is 5 x 5, expected 6 x 6");
}

TEST(HostileInputs, RankSelectionAndSpectrumRejectOutOfRangeRanksAndBudgets) {
  expect_invalid([] { RankSelection::fixed(-5); }, "kqsvd::RankSelection::fixed: argument 'rank' must be >= 1, got -5");
  for (const double epsilon : {inf, -inf, -0.5, 1.5}) {
    expect_invalid([&] { RankSelection::error_budget(epsilon); },
                   "kqsvd::RankSelection::error_budget: argument 'epsilon' must be in the open interval (0, 1)");
  }
  const VectorXd s = VectorXd::LinSpaced(8, 8.0, 1.0);
  expect_invalid([&] { kqsvd::relative_tail_error(s, -1); }, "kqsvd::relative_tail_error: argument 'rank' must be in [0, 8], got -1");
  expect_invalid([&] { kqsvd::relative_tail_error(s, 9); }, "must be in [0, 8], got 9");
  expect_invalid([&] { kqsvd::smallest_rank_within(VectorXd(0), 0.1); },
                 "kqsvd::smallest_rank_within: argument 'singular_values' is empty");
  expect_invalid([&] { kqsvd::smallest_rank_within(s, nan); }, "argument 'epsilon' must be in the open interval (0, 1)");
}

// --- LowRankProjection ----------------------------------------------------------------------------

TEST(HostileInputs, LowRankProjectionConstructorChecksShapesAndFiniteness) {
  const MatrixXd a = gaussian(6, 2, 12);
  const VectorXd s = VectorXd::Ones(6);
  using Projection = kqsvd::LowRankProjection<double>;
  expect_invalid([&] { Projection(Method::kq_svd, MatrixXd(0, 0), MatrixXd(0, 0), VectorXd(0)); },
                 "kqsvd::LowRankProjection: argument 'encoder' must be d x r with 1 <= r <= d, got 0 x 0");
  expect_invalid([&] { Projection(Method::kq_svd, MatrixXd(6, 0), MatrixXd(6, 0), s); }, "got 6 x 0");
  expect_invalid([&] { Projection(Method::kq_svd, gaussian(3, 4, 13), gaussian(3, 4, 13), VectorXd::Ones(3)); },
                 "got 3 x 4");
  expect_invalid([&] { Projection(Method::kq_svd, a, gaussian(6, 3, 14), s); },
                 "argument 'decoder' must have the encoder's shape 6 x 2, got 6 x 3");
  expect_invalid([&] { Projection(Method::kq_svd, a, a, VectorXd::Ones(5)); },
                 "argument 'singular_values' must have 6 entries (the head dimension), got 5");
  expect_invalid([&] { Projection(Method::kq_svd, with_entry(a, 5, 1, nan), a, s); },
                 "argument 'encoder' contains a non-finite value (nan) at row 5, column 1");
  expect_invalid([&] { Projection(Method::kq_svd, a, with_entry(a, 0, 0, inf), s); },
                 "argument 'decoder' contains a non-finite value (inf) at row 0, column 0");
  VectorXd bad_s = s;
  bad_s(3) = -inf;
  expect_invalid([&] { Projection(Method::kq_svd, a, a, bad_s); }, "argument 'singular_values' contains a non-finite value (-inf) at row 3");
}

TEST(HostileInputs, LowRankProjectionOperatorsRejectBadRanksAndNonFiniteData) {
  const auto p = some_projection(6, 3, 15);
  expect_invalid([&] { (void)p.truncated(0); }, "kqsvd::LowRankProjection::truncated: argument 'rank' must be in [1, 3], got 0");
  expect_invalid([&] { (void)p.truncated(4); }, "must be in [1, 3], got 4");
  expect_invalid([&] { (void)p.predicted_relative_error(-1); }, "argument 'rank' must be in [0, 6], got -1");
  expect_invalid([&] { (void)p.predicted_relative_error(7); }, "must be in [0, 6], got 7");
  expect_invalid([&] { (void)p.map_queries(with_entry(gaussian(5, 6, 16), 4, 5, nan)); },
                 "kqsvd::LowRankProjection::map_queries: argument 'queries' contains a non-finite value (nan) at row 4, column 5");
  expect_invalid([&] { (void)p.decompress(with_entry(gaussian(5, 3, 17), 1, 2, -inf)); },
                 "kqsvd::LowRankProjection::decompress: argument 'latents' contains a non-finite value (-inf) at row 1, column 2");
  expect_invalid([&] { (void)p.reconstruct(with_entry(gaussian(5, 6, 18), 0, 0, nan)); },
                 "kqsvd::LowRankProjection::compress: argument 'rows' contains a non-finite value (nan)");
  // Empty inputs of the right width give empty outputs.
  EXPECT_EQ(p.compress(MatrixXd(0, 6)).rows(), 0);
  // Finite float input whose latents overflow float is a NumericalError, not a silent infinity.
  const kqsvd::LowRankProjection<float> pf(Method::k_svd, MatrixXf::Constant(6, 1, 0.5f), MatrixXf::Constant(6, 1, 0.5f),
                                            VectorXd::Zero(6));
  kqsvd::test::expect_error<kqsvd::NumericalError>(
      [&] { (void)pf.compress(MatrixXf::Constant(2, 6, 3e38f)); },
      "kqsvd::LowRankProjection::compress: the result overflowed (input 'rows' is finite but too large for float)");
}

// --- RoPE -------------------------------------------------------------------------------------------

TEST(HostileInputs, RotaryEmbeddingRejectsBadGeometryWidthsAndPositions) {
  for (const Index head_dim : {0, -2, 7}) {
    expect_invalid([&] { kqsvd::RotaryEmbedding rope(head_dim); },
                   "kqsvd::RotaryEmbedding: argument 'head_dim' must be a positive even number, got " + std::to_string(head_dim));
  }
  for (const double theta : {1.0, -10.0, nan, inf}) {
    expect_invalid([&] { kqsvd::RotaryEmbedding rope(8, theta); }, "kqsvd::RotaryEmbedding: argument 'theta' must be finite and > 1");
  }
  const kqsvd::RotaryEmbedding rope(8);
  MatrixXd rows = gaussian(3, 6, 19);
  expect_invalid([&] { rope.rotate(rows, 0); }, "kqsvd::RotaryEmbedding::rotate: argument 'rows' has 6 columns, expected 8");
  MatrixXd good = gaussian(3, 8, 20);
  const MatrixXd before = good;
  expect_invalid([&] { rope.rotate(good, -1); }, "argument 'first_position' must be >= 0, got -1");
  expect_invalid([&] { rope.rotate_back(good.topRows(2), -5); }, "argument 'first_position' must be >= 0, got -5");
  EXPECT_EQ(good, before);
  expect_invalid([] { kqsvd::parse_rope_style(""); }, "kqsvd::parse_rope_style: unknown RoPE style ''");
}

// --- attention --------------------------------------------------------------------------------------

TEST(HostileInputs, AttentionRejectsBadLayoutsScalesAndNonFiniteScores) {
  const MatrixXd q = gaussian(3, 4, 21), k = gaussian(5, 4, 22), v = gaussian(5, 2, 23);
  expect_invalid([&] { kqsvd::causal_softmax(gaussian(3, 5, 24), -1); },
                 "kqsvd::causal_softmax: argument 'query_offset' is -1");
  expect_invalid([&] { kqsvd::causal_softmax(gaussian(3, 5, 24), 3); }, "the cache holds 5 tokens");
  expect_invalid([&] { kqsvd::causal_attention(q, gaussian(5, 3, 25), v); },
                 "kqsvd::causal_attention: argument 'keys' has 3 columns, expected 4 (the query width)");
  expect_invalid([&] { kqsvd::causal_attention(q, k, gaussian(4, 2, 26)); },
                 "kqsvd::causal_attention: argument 'values' has 4 rows, keys have 5");
  for (const double scale : {0.0, -1.0, nan, inf}) {
    expect_invalid([&] { kqsvd::causal_attention(q, k, v, 2, scale); }, "kqsvd::causal_attention: argument 'scale' must be finite and > 0");
  }
  expect_invalid([&] { kqsvd::causal_attention(q, k, v, 3, 0.5); }, "argument 'query_offset' is 3");
  expect_invalid([&] { kqsvd::causal_attention(with_entry(q, 2, 1, nan), k, v); },
                 "kqsvd::causal_attention: argument 'queries' contains a non-finite value (nan) at row 2, column 1");
  expect_invalid([&] { kqsvd::causal_attention(q, with_entry(k, 4, 0, -inf), v); },
                 "kqsvd::causal_attention: argument 'keys' contains a non-finite value (-inf) at row 4, column 0");
  kqsvd::test::expect_error<kqsvd::NumericalError>(
      [&] { kqsvd::causal_attention(MatrixXd::Constant(1, 4, 1e200), MatrixXd::Constant(1, 4, 1e200), MatrixXd::Ones(1, 1)); },
      "kqsvd::causal_attention: the attention scores overflowed");
}

TEST(HostileInputs, CompressedAttentionChecksLatentWidthsAndLayout) {
  const auto keys = some_projection(4, 2, 27), values = some_projection(4, 3, 28);
  const MatrixXd q = gaussian(2, 4, 29), kl = gaussian(5, 2, 30), vl = gaussian(5, 3, 31);
  expect_invalid([&] { kqsvd::compressed_causal_attention(keys, values, q, gaussian(5, 3, 32), vl); },
                 "kqsvd::compressed_causal_attention: argument 'key_latents' has 3 columns, expected 2 (the key rank)");
  expect_invalid([&] { kqsvd::compressed_causal_attention(keys, values, q, kl, gaussian(5, 2, 33)); },
                 "argument 'value_latents' has 2 columns, expected 3 (the value rank)");
  expect_invalid([&] { kqsvd::compressed_causal_attention(keys, values, q, kl, vl, 4); }, "argument 'query_offset' is 4");
  expect_invalid([&] { kqsvd::compressed_causal_attention(keys, values, gaussian(2, 5, 34), kl, vl); },
                 "kqsvd::LowRankProjection::map_queries: argument 'queries' has 5 columns, expected 4");
  expect_invalid([&] { kqsvd::compressed_causal_attention(keys, values, with_entry(q, 1, 3, nan), kl, vl); },
                 "argument 'queries' contains a non-finite value (nan) at row 1, column 3");
  const kqsvd::RotaryEmbedding rope(4);
  expect_invalid([&] { kqsvd::pre_rope_causal_attention(keys, values, rope, q, kl, gaussian(5, 1, 35)); },
                 "kqsvd::pre_rope_causal_attention: argument 'value_latents' has 1 columns, expected 3 (the value rank)");
  expect_invalid([&] { kqsvd::pre_rope_causal_attention(keys, values, rope, q, gaussian(5, 4, 36), vl); },
                 "kqsvd::LowRankProjection::decompress: argument 'latents' has 4 columns, expected 2 (the rank)");
  expect_invalid([&] { kqsvd::pre_rope_causal_attention(keys, values, rope, q, with_entry(kl, 0, 1, inf), vl); },
                 "argument 'latents' contains a non-finite value (inf) at row 0, column 1");
}

// --- output projection, fidelity ------------------------------------------------------------------

TEST(HostileInputs, OutputProjectionGramChecksHeadSelectionAndWeights) {
  const MatrixXd w = gaussian(10, 12, 37);  // 3 heads of dimension 4
  for (const Index head_dim : {0, -4, 5}) {
    expect_invalid([&] { kqsvd::output_projection_gram(w, head_dim, 0, 1); },
                   "kqsvd::output_projection_gram: argument 'output_weight' has 12 columns, not a positive multiple of head_dim = " +
                       std::to_string(head_dim));
  }
  expect_invalid([&] { kqsvd::output_projection_gram(w, 4, -1, 1); },
                 "argument 'first_head/head_count' select heads [-1, 0), outside the 3 heads of output_weight");
  expect_invalid([&] { kqsvd::output_projection_gram(w, 4, 0, 0); }, "select heads [0, 0)");
  expect_invalid([&] { kqsvd::output_projection_gram(w, 4, 2, 2); }, "select heads [2, 4), outside the 3 heads");
  expect_invalid([&] { kqsvd::output_projection_gram(with_entry(w, 9, 11, nan), 4, 0, 3); },
                 "argument 'output_weight' contains a non-finite value (nan) at row 9, column 11");
  // Weights whose squares leave double's range: a NumericalError naming 'output_weight'.
  MatrixXd huge = w;
  huge.col(5).setConstant(1e160);
  kqsvd::test::expect_error<kqsvd::NumericalError>(
      [&] { kqsvd::output_projection_gram(huge, 4, 1, 1); },
      "kqsvd::output_projection_gram: argument 'output_weight' cannot be squared in double");
}

TEST(HostileInputs, FidelityNamesEachInconsistentOrNonFiniteArgument) {
  const Index d = 4, n = 6;
  const auto kp = some_projection(d, 2, 38), vp = some_projection(d, 2, 39), other = some_projection(5, 2, 40);
  const MatrixXd k = gaussian(n, d, 41), v = gaussian(n, d, 42), q = gaussian(2 * n, d, 43), w = gaussian(7, 2 * d, 44);
  const std::string where = "kqsvd::measure_head_fidelity: ";
  expect_invalid([&] { kqsvd::measure_head_fidelity(kp, other, k, v, q, w); },
                 where + "argument 'value_projection' has dimension 5, the key projection 4");
  expect_invalid([&] { kqsvd::measure_head_fidelity(kp, vp, gaussian(n, 3, 45), v, q, w); }, where + "argument 'keys' has 3 columns");
  expect_invalid([&] { kqsvd::measure_head_fidelity(kp, vp, MatrixXd(0, d), MatrixXd(0, d), q, w); }, where + "argument 'keys' is empty");
  expect_invalid([&] { kqsvd::measure_head_fidelity(kp, vp, k, v, gaussian(n + 1, d, 46), w); },
                 where + "argument 'group_queries' has 7 rows, not a positive multiple of the 6 tokens");
  expect_invalid([&] { kqsvd::measure_head_fidelity(kp, vp, k, v, q, gaussian(7, d, 47)); },
                 where + "argument 'group_output_weight' has 4 columns, expected 8 (2 query heads x 4)");
  const kqsvd::RotaryEmbedding rope6(6), rope4(4);
  kqsvd::FidelityOptions options;
  options.pre_rope = &rope6;
  expect_invalid([&] { kqsvd::measure_head_fidelity(kp, vp, k, v, q, w, options); },
                 where + "argument 'options.pre_rope' rotates head_dim 6, the projections have 4");
  options.pre_rope = &rope4;
  options.first_position = -3;
  expect_invalid([&] { kqsvd::measure_head_fidelity(kp, vp, k, v, q, w, options); },
                 "argument 'first_position' must be >= 0, got -3");
  expect_invalid([&] { kqsvd::measure_head_fidelity(kp, vp, with_entry(k, 1, 1, nan), v, q, w); },
                 where + "argument 'keys' contains a non-finite value (nan) at row 1, column 1");
  expect_invalid([&] { kqsvd::measure_head_fidelity(kp, vp, k, with_entry(v, 5, 3, inf), q, w); },
                 where + "argument 'values' contains a non-finite value (inf) at row 5, column 3");
  expect_invalid([&] { kqsvd::measure_head_fidelity(kp, vp, k, v, with_entry(q, 11, 0, -inf), w); },
                 where + "argument 'group_queries' contains a non-finite value (-inf) at row 11, column 0");
  expect_invalid([&] { kqsvd::measure_head_fidelity(kp, vp, k, v, q, with_entry(w, 6, 7, nan)); },
                 where + "argument 'group_output_weight' contains a non-finite value (nan) at row 6, column 7");
}

// --- whole-model containers -------------------------------------------------------------------------

TEST(HostileInputs, ModelShapeNamesEachBadField) {
  const kqsvd::ModelShape good{2, 4, 2, 8};
  const auto with = [&](Index kqsvd::ModelShape::*field, Index value) {
    kqsvd::ModelShape shape = good;
    shape.*field = value;
    return shape;
  };
  expect_invalid([&] { with(&kqsvd::ModelShape::layers, 0).validate(); }, "kqsvd::ModelShape: argument 'layers' must be positive, got 0");
  expect_invalid([&] { with(&kqsvd::ModelShape::query_heads, -4).validate(); }, "argument 'query_heads' must be positive, got -4");
  expect_invalid([&] { with(&kqsvd::ModelShape::kv_heads, 0).validate(); }, "argument 'kv_heads' must be positive, got 0");
  expect_invalid([&] { with(&kqsvd::ModelShape::head_dim, -1).validate(); }, "argument 'head_dim' must be positive, got -1");
  expect_invalid([&] { with(&kqsvd::ModelShape::kv_heads, 3).validate(); }, "argument 'kv_heads' (3) must divide query_heads (4)");
  expect_invalid([&] { kqsvd::ModelCalibration calibration(with(&kqsvd::ModelShape::kv_heads, 3)); }, "must divide query_heads");
}

TEST(HostileInputs, ModelCalibrationRejectsBadBlocksAtomically) {
  const kqsvd::ModelShape shape{2, 4, 2, 3};  // queries 12 wide, keys and values 6 wide
  kqsvd::ModelCalibration calibration(shape);
  const MatrixXd q = gaussian(5, 12, 48), kv = gaussian(5, 6, 49);
  const std::string where = "kqsvd::ModelCalibration::add: ";
  expect_invalid([&] { calibration.add(-1, q, kv, kv); }, where + "argument 'layer' is -1, outside [0, 2)");
  expect_invalid([&] { calibration.add(2, q, kv, kv); }, where + "argument 'layer' is 2, outside [0, 2)");
  expect_invalid([&] { calibration.add(0, gaussian(5, 9, 50), kv, kv); },
                 where + "argument 'queries' has 9 columns, expected 12 (query_heads x head_dim)");
  expect_invalid([&] { calibration.add(0, q, gaussian(5, 3, 51), kv); }, where + "argument 'keys' has 3 columns, expected 6");
  expect_invalid([&] { calibration.add(0, q, kv, gaussian(5, 7, 52)); }, where + "argument 'values' has 7 columns, expected 6");
  expect_invalid([&] { calibration.add(0, q, kv, gaussian(4, 6, 53)); }, where + "argument 'keys/values' must have as many rows");
  // A NaN in the last head's values: no head of the layer may have been updated.
  expect_invalid([&] { calibration.add(1, q, kv, with_entry(kv, 4, 5, nan)); },
                 where + "argument 'values' contains a non-finite value (nan) at row 4, column 5");
  for (Index h = 0; h < 2; ++h) {
    EXPECT_EQ(calibration.keys(1, h).token_count(), 0);
    EXPECT_EQ(calibration.queries(1, h).token_count(), 0);
    EXPECT_EQ(calibration.values(1, h).token_count(), 0);
  }
  expect_invalid([&] { (void)calibration.keys(0, 2); }, "kqsvd::ModelCalibration::keys: argument 'kv_head' is 2, outside [0, 2)");
  expect_invalid([&] { (void)calibration.values(-1, 0); }, "kqsvd::ModelCalibration::values: argument 'layer' is -1");
  kqsvd::ModelCalibration other(kqsvd::ModelShape{2, 4, 4, 3});
  expect_invalid([&] { calibration.merge(other); }, "kqsvd::ModelCalibration::merge: argument 'other' has a different model shape");
}

TEST(HostileInputs, ModelProjectionsCheckCountsShapesAndIndices) {
  const kqsvd::ModelShape shape{1, 2, 1, 4};
  kqsvd::ModelCalibration calibration(shape);
  calibration.add(0, gaussian(20, 8, 54), gaussian(20, 4, 55), gaussian(20, 4, 56));
  const auto fixed = RankSelection::fixed(2);
  using Projections = kqsvd::ModelProjections<float>;
  const std::vector<MatrixXf> none, wrong_width{gaussian(6, 7, 57).cast<float>()};
  expect_invalid([&] { Projections::fit(calibration, none, Method::kq_svd, fixed, fixed); },
                 "kqsvd::ModelProjections::fit: argument 'output_weights' holds 0 matrices; KQ-SVD for values needs one o_proj weight per layer (1)");
  expect_invalid([&] { Projections::fit(calibration, wrong_width, Method::kq_svd, fixed, fixed); },
                 "argument 'output_weights' layer 0 has 7 columns, expected query_heads x head_dim = 8");
  const std::vector<MatrixXf> with_nan{with_entry(gaussian(6, 8, 58), 0, 7, nan).cast<float>()};
  expect_invalid([&] { Projections::fit(calibration, with_nan, Method::kq_svd, fixed, fixed); },
                 "kqsvd::output_projection_gram: argument 'output_weight' contains a non-finite value (nan) at row 0, column 7");
  const Projections model = Projections::fit(calibration, none, Method::k_svd, fixed, fixed);
  expect_invalid([&] { (void)model.keys(1, 0); }, "kqsvd::ModelProjections::keys: argument 'layer' is 1, outside [0, 1)");
  expect_invalid([&] { (void)model.values(0, -1); }, "kqsvd::ModelProjections::values: argument 'kv_head' is -1, outside [0, 1)");
  const auto p = kqsvd::LowRankProjection<float>(Method::k_svd, MatrixXf::Identity(4, 2), MatrixXf::Identity(4, 2), VectorXd::Ones(4));
  const auto q = kqsvd::LowRankProjection<float>(Method::k_svd, MatrixXf::Identity(5, 2), MatrixXf::Identity(5, 2), VectorXd::Ones(5));
  expect_invalid([&] { Projections(shape, {p, p}, {p}); }, "kqsvd::ModelProjections: argument 'keys/values' must hold layers x kv_heads = 1 projections each");
  expect_invalid([&] { Projections(shape, {q}, {p}); }, "argument 'keys/values' projection 0 is not of head_dim 4");
  expect_invalid([&] { Projections(kqsvd::ModelShape{0, 2, 1, 4}, {p}, {p}); }, "kqsvd::ModelShape: argument 'layers' must be positive, got 0");
}

// --- file readers: paths that are not regular files ------------------------------------------------

// Runs `call` in a child process, which a hang cannot take the test suite down with: the child's exit
// code, or -1 when it had to be killed after `seconds`.
int exit_code_within(const std::function<int()>& call, int seconds) {
  const pid_t child = ::fork();
  if (child == 0) {
    int code = 3;
    try {
      code = call();
    } catch (...) {
      code = 4;
    }
    ::_exit(code);
  }
  for (int tick = 0; tick < 100 * seconds; ++tick) {
    int status = 0;
    if (::waitpid(child, &status, WNOHANG) == child) return WIFEXITED(status) ? WEXITSTATUS(status) : -2;
    ::usleep(10'000);
  }
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  return -1;
}

// 0 when `load` throws IoError saying "is not a regular file", 1 for any other outcome.
int rejects_as_not_regular(const std::function<void()>& load) {
  try {
    load();
  } catch (const kqsvd::IoError& e) {
    return std::string(e.what()).find("is not a regular file") != std::string::npos ? 0 : 1;
  }
  return 1;
}

// A FIFO must not block a reader waiting for a writer that never comes, and a directory must not read
// as an empty or unreadable file: every reader says "not a regular file" at once.
TEST(HostileInputs, EveryFileReaderRejectsDirectoriesAndFifosWithoutBlocking) {
  namespace fs = std::filesystem;
  const fs::path directory = fs::temp_directory_path() / ("kqsvd-hostile-" + std::to_string(::getpid()));
  fs::create_directories(directory);
  const fs::path fifo = directory / "fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  const std::vector<std::pair<const char*, std::function<void(const std::string&)>>> readers = {
      {"SafetensorsFile", [](const std::string& p) { kqsvd::io::SafetensorsFile file(p); }},
      {"read_npy", [](const std::string& p) { (void)kqsvd::io::read_npy<float>(p); }},
      {"Checkpoint::load", [](const std::string& p) { (void)kqsvd::llama::Checkpoint::load(p); }},
      {"Tokenizer::load", [](const std::string& p) { (void)kqsvd::llama::Tokenizer::load(p); }},
  };
  for (const auto& [name, read] : readers) {
    for (const fs::path& path : {directory, fifo}) {
      const std::string p = path.string();
      EXPECT_EQ(exit_code_within([&] { return rejects_as_not_regular([&] { read(p); }); }, 10), 0)
          << name << " on " << p << " (-1: it blocked)";
    }
  }
  fs::remove_all(directory);
}

// --- gaps found by this suite ----------------------------------------------------------------------
// ClosedGaps: found, fixed, and kept as regressions; docs/reliability.md has the list.

// spectrum.hpp: a NaN or negative singular value gives a NaN error or a silently wrong rank.
TEST(ClosedGaps, SpectrumFunctionsRejectNonFiniteOrNegativeSingularValues) {
  VectorXd s(3);
  s << 1.0, nan, 0.5;
  expect_invalid([&] { kqsvd::relative_tail_error(s, 1); }, "kqsvd::relative_tail_error: argument 'singular_values' contains a non-finite value");
  expect_invalid([&] { kqsvd::smallest_rank_within(s, 0.1); }, "argument 'singular_values'");
  s << 1.0, -2.0, 0.5;
  expect_invalid([&] { kqsvd::relative_tail_error(s, 1); }, "argument 'singular_values'");
}

// attention.hpp: NaN or infinite scores give NaN weights, and NaN values a NaN output, silently.
TEST(ClosedGaps, AttentionRejectsNonFiniteScoresAndValues) {
  MatrixXd scores = MatrixXd::Zero(2, 2);
  scores(0, 0) = nan;
  expect_invalid([&] { kqsvd::causal_softmax(scores, 0); }, "kqsvd::causal_softmax: argument 'scores' contains a non-finite value (nan)");
  scores(0, 0) = inf;
  expect_invalid([&] { kqsvd::causal_softmax(scores, 0); }, "argument 'scores' contains a non-finite value (inf)");
  expect_invalid([&] { kqsvd::causal_attention(MatrixXd::Ones(2, 2), MatrixXd::Ones(2, 2), with_entry(MatrixXd::Ones(2, 2), 0, 0, nan)); },
                 "kqsvd::causal_attention: argument 'values' contains a non-finite value (nan)");
  const auto keys = some_projection(4, 2, 59), values = some_projection(4, 2, 60);
  expect_invalid([&] { kqsvd::compressed_causal_attention(keys, values, gaussian(2, 4, 61), gaussian(5, 2, 62), with_entry(gaussian(5, 2, 63), 0, 0, nan)); },
                 "argument 'value_latents' contains a non-finite value (nan)");
}

// rope.hpp: rotate() passes NaN and infinity through; every other entry point rejects them.
TEST(ClosedGaps, RotaryEmbeddingRejectsNonFiniteRows) {
  const kqsvd::RotaryEmbedding rope(8);
  MatrixXd rows = with_entry(MatrixXd::Ones(2, 8), 1, 4, nan);
  expect_invalid([&] { rope.rotate(rows, 0); }, "kqsvd::RotaryEmbedding::rotate: argument 'rows' contains a non-finite value (nan) at row 1, column 4");
}

// fit_options.hpp / key_query_svd.hpp: range_tolerance >= 1 silently drops the whole range (the fit
// reports error 0 for any data); NaN or a negative value silently means "default".
TEST(ClosedGaps, RangeToleranceOutsideZeroOneIsRejected) {
  const MatrixXd g = gram_of(6, 64);
  for (const double tolerance : {1.0, 2.0, -1e-3, nan, inf}) {
    kqsvd::FitOptions options;
    options.range_tolerance = tolerance;
    expect_invalid([&] { kqsvd::fit_kq_svd<double>(g, g, RankSelection::fixed(2), options); },
                   "kqsvd::fit_kq_svd: argument 'options.range_tolerance'");
  }
}

// fit.hpp: fit_value_projection's second argument is 'output_gram', but messages call it 'query_gram'.
TEST(ClosedGaps, ValueProjectionMessagesNameOutputGram) {
  kqsvd::GramAccumulator values(6);
  values.add(gaussian(20, 6, 65));
  expect_invalid([&] { kqsvd::fit_value_projection<float>(Method::kq_svd, values, gram_of(5, 66), RankSelection::fixed(2)); },
                 "argument 'output_gram'");
}

// fidelity.hpp: FidelityTotals::add accepts NaN, infinite or negative squared norms.
TEST(ClosedGaps, FidelityTotalsRejectNonFiniteOrNegativeSquaredNorms) {
  kqsvd::FidelityTotals totals;
  expect_invalid([&] { totals.add(kqsvd::FidelityMetric::keys, nan, 1.0); }, "kqsvd::FidelityTotals::add: argument 'error_squared'");
  expect_invalid([&] { totals.add(kqsvd::FidelityMetric::keys, 1.0, -1.0); }, "argument 'reference_squared'");
}

// low_rank_projection.hpp / fit.hpp: a projection that does not fit the requested scalar type (float
// encoder entries past 3.4e38, e.g. keys of magnitude 1e-40) is reported as an InvalidArgument about an
// 'encoder' argument the caller never passed; a NumericalError saying "fit in double" would be right.
TEST(ClosedGaps, ProjectionBeyondFloatRangeIsANumericalError) {
  kqsvd::GramAccumulator keys(4), queries(4);
  keys.add((gaussian(20, 4, 67) * 1e-41).cast<float>());
  queries.add(gaussian(20, 4, 68));
  kqsvd::test::expect_error<kqsvd::NumericalError>(
      [&] { (void)kqsvd::fit_projection<float>(Method::kq_svd, keys, queries, RankSelection::fixed(2)); }, "float");
}

}  // namespace kqsvd_test_hostile_inputs
