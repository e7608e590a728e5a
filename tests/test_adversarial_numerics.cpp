// Adversarial calibration data for KQ-SVD, each case checked against a reference computed here in
// long double (64-bit significand, exponent range to 1e4932), independent of the library's Gram route:
// the singular values of the m x n product Q K^T from a direct Eigen::JacobiSVD, and the achieved error
// ||Q K^T - (Q B)(K A)^T|| / ||Q K^T|| from the full products. Every case must give finite A and B with
// A^T B = I_r and an achieved (and predicted) error equal to the reference optimum -- "optimal on the
// range of K" -- or a clear kqsvd::Error. The 1e8-token accumulation is checked against an exact
// integer reference.
#include <gtest/gtest.h>

#include <kqsvd/solvers/fit.hpp>
#include <kqsvd/calibration/gram_accumulator.hpp>
#include <kqsvd/solvers/low_rank_projection.hpp>
#include <kqsvd/solvers/method.hpp>
#include <kqsvd/solvers/rank_selection.hpp>

#include <Eigen/SVD>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace kqsvd_test_adversarial_numerics {

using Eigen::Index;
using Eigen::MatrixXd;
using Eigen::VectorXd;
using kqsvd::Method;
using kqsvd::RankSelection;
using kqsvd::test::gaussian;

using LongMatrix = Eigen::Matrix<long double, Eigen::Dynamic, Eigen::Dynamic>;
using LongVector = Eigen::Matrix<long double, Eigen::Dynamic, 1>;

// --- the long-double reference ---------------------------------------------------------------------

// Singular values of Q K^T (descending), from the m x n product itself.
LongVector reference_singular_values(const MatrixXd& queries, const MatrixXd& keys) {
  const LongMatrix product = queries.cast<long double>() * keys.cast<long double>().transpose();
  return Eigen::JacobiSVD<LongMatrix>(product).singularValues();
}

// The Eckart-Young optimum: relative error of the best rank-r approximation of Q K^T.
long double reference_optimum(const LongVector& s, Index r) {
  long double tail = 0, total = 0;
  for (Index i = s.size() - 1; i >= 0; --i) {
    total += s(i) * s(i);
    if (i >= r) tail += s(i) * s(i);
  }
  return total == 0 ? 0.0L : std::sqrt(tail / total);
}

// What the projection achieves on the calibration data: ||Q K^T - (Q B)(K A)^T||_F / ||Q K^T||_F; 0 when
// Q K^T = 0 and the approximation is 0 too.
template <typename Scalar>
long double achieved_error(const kqsvd::LowRankProjection<Scalar>& projection, const MatrixXd& queries,
                           const MatrixXd& keys) {
  const LongMatrix q = queries.cast<long double>(), k = keys.cast<long double>();
  const LongMatrix a = projection.encoder().template cast<long double>();
  const LongMatrix b = projection.decoder().template cast<long double>();
  const LongMatrix exact = q * k.transpose();
  const LongMatrix approximation = (q * b) * (k * a).transpose();
  const long double reference = exact.norm(), error = (exact - approximation).norm();
  if (reference == 0) return error == 0 ? 0.0L : std::numeric_limits<long double>::infinity();
  return error / reference;
}

// A^T B - I_r, entry (i, j) relative to |a_i| |b_j|: the scale-free form of the identity. A cached
// side scaled by s scales B by s and A by 1/s, and A^T B is then exact only to rounding of |B|.
template <typename Scalar>
long double identity_defect(const kqsvd::LowRankProjection<Scalar>& projection) {
  const LongMatrix a = projection.encoder().template cast<long double>();
  const LongMatrix b = projection.decoder().template cast<long double>();
  const LongMatrix defect = a.transpose() * b - LongMatrix::Identity(a.cols(), a.cols());
  long double worst = 0;
  for (Index j = 0; j < defect.cols(); ++j)
    for (Index i = 0; i < defect.rows(); ++i) {
      worst = std::max(worst, std::abs(defect(i, j)) / std::max(1.0L, a.col(i).norm() * b.col(j).norm()));
    }
  return worst;
}

// Tolerances: on the relative score error, and on the entries of A^T B - I.
struct Tolerance {
  double error;
  double identity;
};
constexpr Tolerance in_double{1e-7, 1e-8};
constexpr Tolerance in_float{2e-4, 2e-4};

template <typename Scalar>
void expect_optimal_on_range(const kqsvd::LowRankProjection<Scalar>& projection, const MatrixXd& queries,
                             const MatrixXd& keys, const LongVector& reference, Tolerance tolerance,
                             const std::string& label) {
  SCOPED_TRACE(label + ", rank " + std::to_string(projection.rank()));
  ASSERT_TRUE(projection.encoder().allFinite());
  ASSERT_TRUE(projection.decoder().allFinite());
  ASSERT_TRUE(projection.singular_values().allFinite());
  EXPECT_LE(identity_defect(projection), tolerance.identity);
  const long double optimum = reference_optimum(reference, projection.rank());
  EXPECT_NEAR(static_cast<double>(achieved_error(projection, queries, keys)), static_cast<double>(optimum),
              tolerance.error);
  EXPECT_NEAR(projection.predicted_relative_error(), static_cast<double>(optimum), tolerance.error);
}

// Calibrates from the rows as given (double) through GramAccumulator, fits KQ-SVD at every rank 1..d
// and checks each against the reference. The baselines must at least be finite and orthonormal.
void expect_optimal_at_every_rank(const MatrixXd& keys, const MatrixXd& queries, const std::string& label,
                                  Tolerance tolerance = in_double) {
  const Index d = keys.cols();
  kqsvd::GramAccumulator cached(d), query(d);
  cached.add(keys);
  query.add(queries);
  const LongVector reference = reference_singular_values(queries, keys);
  for (Index r = 1; r <= d; ++r) {
    const auto projection = kqsvd::fit_projection<double>(Method::kq_svd, cached, query, RankSelection::fixed(r));
    expect_optimal_on_range(projection, queries, keys, reference, tolerance, label);
  }
  for (const Method method : {Method::k_svd, Method::eigen_attention}) {
    const auto baseline = kqsvd::fit_projection<double>(method, cached, query, RankSelection::fixed(d / 2));
    EXPECT_TRUE(baseline.encoder().allFinite()) << label << " " << kqsvd::to_string(method);
    EXPECT_LE(identity_defect(baseline), 1e-10) << label << " " << kqsvd::to_string(method);
  }
}

std::string sci(double value) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", value);
  return text;
}

MatrixXd low_rank(Index rows, Index cols, Index rank, unsigned seed) {
  return gaussian(rows, rank, seed) * gaussian(rank, cols, seed + 1000);
}

VectorXd log_spaced(Index count, double low_exponent, double high_exponent) {
  VectorXd scale(count);
  for (Index i = 0; i < count; ++i) {
    scale(i) = std::pow(10.0, low_exponent + (high_exponent - low_exponent) * static_cast<double>(i) /
                                                 static_cast<double>(count - 1));
  }
  return scale;
}

// --- rank deficiency --------------------------------------------------------------------------------

TEST(AdversarialNumerics, RankDeficientKeysQueriesAndBoth) {
  const Index d = 16;
  expect_optimal_at_every_rank(low_rank(60, d, 3, 1), gaussian(50, d, 2), "rank(K) = 3");
  expect_optimal_at_every_rank(gaussian(60, d, 3), low_rank(50, d, 2, 4), "rank(Q) = 2");
  expect_optimal_at_every_rank(low_rank(60, d, 5, 5), low_rank(50, d, 4, 6), "rank(K) = 5, rank(Q) = 4");
  // Keys and queries in orthogonal subspaces: Q K^T = 0 although neither is zero.
  MatrixXd keys = gaussian(40, d, 7), queries = gaussian(40, d, 8);
  keys.rightCols(8).setZero();
  queries.leftCols(8).setZero();
  expect_optimal_at_every_rank(keys, queries, "Q K^T = 0 with K, Q != 0");
}

TEST(AdversarialNumerics, DuplicatedTokens) {
  const Index d = 16;
  const MatrixXd distinct = gaussian(7, d, 9);
  MatrixXd keys(63, d);
  for (Index i = 0; i < 63; ++i) keys.row(i) = distinct.row((i * 5) % 7);  // 7 tokens, each 9 times, interleaved
  MatrixXd queries = gaussian(30, d, 10);
  queries.bottomRows(10) = queries.topRows(10);
  expect_optimal_at_every_rank(keys, queries, "7 distinct keys x 9");
  // One token repeated: rank-1 keys, and a Gram that is exactly n x x^T.
  const MatrixXd same = gaussian(1, d, 11).replicate(200, 1);
  expect_optimal_at_every_rank(same, gaussian(40, d, 12), "one key repeated 200 times");
}

TEST(AdversarialNumerics, ZeroHeadGivesFiniteIdentityPreservingProjectionsForEveryMethod) {
  const Index d = 16;
  const MatrixXd zero = MatrixXd::Zero(50, d), random = gaussian(50, d, 13);
  struct Case {
    const char* label;
    const MatrixXd& keys;
    const MatrixXd& queries;
  };
  for (const Case& c : {Case{"zero keys", zero, random}, Case{"zero queries", random, zero}, Case{"both zero", zero, zero}}) {
    expect_optimal_at_every_rank(c.keys, c.queries, c.label);
    kqsvd::GramAccumulator cached(d), query(d);
    cached.add(c.keys.cast<float>());
    query.add(c.queries.cast<float>());
    for (const Method method : kqsvd::all_methods) {
      for (const RankSelection& rank : {RankSelection::fixed(4), RankSelection::error_budget(0.1)}) {
        const auto projection = kqsvd::fit_projection<float>(method, cached, query, rank);
        EXPECT_TRUE(projection.encoder().allFinite() && projection.decoder().allFinite()) << c.label;
        EXPECT_LE(identity_defect(projection), 1e-6) << c.label << " " << kqsvd::to_string(method);
        const auto latents = projection.compress(c.keys.cast<float>());
        EXPECT_TRUE(latents.allFinite()) << c.label;
      }
    }
    // A zero value head against a zero output projection: V W^T = 0.
    const auto value = kqsvd::fit_value_projection<float>(Method::kq_svd, cached, MatrixXd::Zero(d, d),
                                                         RankSelection::error_budget(0.05));
    EXPECT_TRUE(value.encoder().allFinite()) << c.label;
    EXPECT_EQ(value.rank(), 1) << c.label;
  }
  // An accumulator that saw no tokens at all is an error, not a zero head.
  kqsvd::GramAccumulator empty(d), some(d);
  some.add(random);
  try {
    (void)kqsvd::fit_projection<float>(Method::kq_svd, empty, some, RankSelection::fixed(2));
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const kqsvd::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("argument 'cached' holds no tokens"), std::string::npos) << e.what();
  }
}

TEST(AdversarialNumerics, FewerTokensThanHeadDim) {
  const Index d = 32;
  for (const Index n : {1, 2, 5}) {
    for (const Index m : {3, 40}) {
      expect_optimal_at_every_rank(gaussian(n, d, static_cast<unsigned>(14 + n)), gaussian(m, d, static_cast<unsigned>(20 + m)),
                                   std::to_string(n) + " keys, " + std::to_string(m) + " queries, d = 32");
    }
  }
}

// --- dynamic range ----------------------------------------------------------------------------------

TEST(AdversarialNumerics, WholeMatricesScaledFrom1eMinus30To1e30InDouble) {
  const Index d = 12;
  const MatrixXd keys = gaussian(80, d, 30) * gaussian(d, d, 31), queries = gaussian(60, d, 32);
  for (const double key_scale : {1e-30, 1.0, 1e30}) {
    for (const double query_scale : {1e-30, 1e30}) {
      expect_optimal_at_every_rank(key_scale * keys, query_scale * queries,
                                   "K x " + sci(key_scale) + ", Q x " + sci(query_scale));
    }
  }
}

TEST(AdversarialNumerics, ColumnsAndTokensSpanning1eMinus30To1e30InDouble) {
  const Index d = 12;
  const VectorXd scale = log_spaced(d, -30.0, 30.0);
  const MatrixXd keys = gaussian(80, d, 33) * scale.asDiagonal();
  // Queries that read the small key dimensions (Q K^T is O(1) in every direction), and queries with
  // the same outliers (Q K^T dominated by the large dimensions).
  expect_optimal_at_every_rank(keys, gaussian(60, d, 34) * scale.cwiseInverse().asDiagonal(),
                               "columns 1e-30..1e30, inverse queries");
  expect_optimal_at_every_rank(keys, gaussian(60, d, 35) * scale.asDiagonal(), "columns 1e-30..1e30, same queries");
  // Tokens (rows) over 60 orders of magnitude: a few outlier tokens dominate the Gram.
  const VectorXd token_scale = log_spaced(80, -30.0, 30.0);
  expect_optimal_at_every_rank(token_scale.asDiagonal() * gaussian(80, d, 36), gaussian(60, d, 37),
                               "tokens 1e-30..1e30");
}

// fp16 activations: every value an IEEE half (normal range 6.1e-5 .. 65504), handed over as float,
// columns spread over that whole range. Fitted and applied in float.
TEST(AdversarialNumerics, Fp16RangeValuesInFloat) {
  const Index d = 16, n = 160, m = 120;
  const VectorXd scale = log_spaced(d, std::log10(6.2e-5), std::log10(6.0e4));
  const auto to_half_grid = [](MatrixXd x) {
    for (Index j = 0; j < x.cols(); ++j)
      for (Index i = 0; i < x.rows(); ++i) {
        x(i, j) = static_cast<double>(static_cast<float>(Eigen::half(static_cast<float>(x(i, j)))));
      }
    return x;
  };
  // Uniform in [-1, 1] times the column scale, so no value leaves fp16's range.
  const MatrixXd key_base = (gaussian(n, d, 40).array().tanh()).matrix();
  const MatrixXd keys = to_half_grid(key_base * scale.asDiagonal());
  for (const bool inverse : {true, false}) {
    const MatrixXd query_base = (gaussian(m, d, 41).array().tanh()).matrix();
    const MatrixXd queries = to_half_grid(query_base * (inverse ? VectorXd(scale.cwiseInverse() * 6.2e-5 * 6.0e4) : scale).asDiagonal());
    ASSERT_LE(keys.cwiseAbs().maxCoeff(), 65504.0);
    ASSERT_LE(queries.cwiseAbs().maxCoeff(), 65504.0);
    const Eigen::MatrixXf keys_f = keys.cast<float>(), queries_f = queries.cast<float>();
    kqsvd::GramAccumulator cached(d), query(d);
    cached.add(keys_f);
    query.add(queries_f);
    const LongVector reference = reference_singular_values(queries, keys);
    for (Index r = 1; r <= d; ++r) {
      const auto projection = kqsvd::fit_projection<float>(Method::kq_svd, cached, query, RankSelection::fixed(r));
      expect_optimal_on_range(projection, queries, keys, reference, in_float,
                              inverse ? "fp16 range, inverse queries" : "fp16 range, same queries");
      // Applied in float: latents O(1) thanks to the mean Gram, nothing overflows.
      const auto latents = projection.compress(keys_f);
      ASSERT_TRUE(latents.allFinite());
      EXPECT_LT(latents.cwiseAbs().maxCoeff(), 1e3f);
      ASSERT_TRUE(projection.map_queries(queries_f).allFinite());
    }
  }
}

// --- denormals ----------------------------------------------------------------------------------------

TEST(AdversarialNumerics, FloatDenormalInputIsWidenedExactly) {
  const Index d = 8;
  // Keys entirely subnormal in float (below 1.18e-38), queries normal; one key column subnormal only.
  const Eigen::MatrixXf tiny = (gaussian(60, d, 50) * 1e-41).cast<float>();
  ASSERT_LT(tiny.cwiseAbs().maxCoeff(), std::numeric_limits<float>::min());
  ASSERT_GT(tiny.cwiseAbs().maxCoeff(), 0.0f);
  const MatrixXd queries = gaussian(40, d, 51);
  expect_optimal_at_every_rank(tiny.cast<double>(), queries, "float-subnormal keys (as double)");
  kqsvd::GramAccumulator cached(d), query(d);
  cached.add(tiny);
  query.add(queries.cast<float>());
  EXPECT_EQ(cached.gram(), (tiny.cast<double>().transpose() * tiny.cast<double>()).eval());  // exact
  const LongVector reference = reference_singular_values(queries, tiny.cast<double>());
  for (Index r = 1; r <= d; ++r) {
    const auto projection = kqsvd::fit_projection<double>(Method::kq_svd, cached, query, RankSelection::fixed(r));
    expect_optimal_on_range(projection, queries, tiny.cast<double>(), reference, in_double, "float subnormal keys");
  }
  // A float projection would need an encoder of ~1e41, past float's range: a NumericalError, not inf.
  kqsvd::test::expect_error<kqsvd::NumericalError>(
      [&] { (void)kqsvd::fit_projection<float>(Method::kq_svd, cached, query, RankSelection::fixed(2)); },
      "kqsvd::fit_kq_svd: the encoder has entries of magnitude");

  Eigen::MatrixXf mixed = gaussian(60, d, 52).cast<float>();
  mixed.col(3) = tiny.col(3);
  expect_optimal_at_every_rank(mixed.cast<double>(), queries, "one float-subnormal key column");
}

TEST(AdversarialNumerics, ScatteredDoubleDenormalsAmongNormalValues) {
  const Index d = 10;
  MatrixXd keys = gaussian(70, d, 53), queries = gaussian(50, d, 54);
  for (Index i = 0; i < 70; i += 3) keys(i, i % d) = 4.9e-324 * static_cast<double>(i + 1);  // subnormal doubles
  for (Index i = 0; i < 50; i += 4) queries(i, (i + 1) % d) = -1e-310;
  expect_optimal_at_every_rank(keys, queries, "scattered subnormal doubles");
}

// Squares of |x| < sqrt(DBL_MIN) ~ 1.5e-154 underflow in double: keys that small would give a Gram that
// is zero or has lost its bits, and a fit reporting "error 0" while Q K^T is not zero. The accumulator
// knows each column's largest magnitude and refuses to hand out such a Gram: a NumericalError naming
// the column. (Before the fix this was a silently wrong projection.)
TEST(AdversarialNumerics, KeysTooSmallForTheirSquaresAreANumericalError) {
  const Index d = 8;
  const MatrixXd base = gaussian(50, d, 55), queries = gaussian(40, d, 56);
  for (const double scale : {1e-160, 1e-200, 1e-310}) {
    kqsvd::GramAccumulator cached(d), query(d);
    cached.add(scale * base);
    query.add(queries);
    kqsvd::test::expect_error<kqsvd::NumericalError>(
        [&] { (void)kqsvd::fit_projection<double>(Method::kq_svd, cached, query, RankSelection::fixed(2)); },
        "kqsvd::GramAccumulator::gram: column 0 of the rows added has values only up to");
  }
  // One tiny column is refused, whatever the others hold; a column at the threshold is optimal.
  MatrixXd keys = gaussian(50, d, 57);
  keys.col(5) *= 1e-160;
  kqsvd::GramAccumulator mixed(d);
  mixed.add(keys);
  kqsvd::test::expect_error<kqsvd::NumericalError>([&] { (void)mixed.gram(); }, "column 5");
  keys.col(5) = gaussian(50, 1, 58) * 1e-150;
  expect_optimal_at_every_rank(keys, queries, "one column at 1e-150");
}

// Squares of |x| above ~1e154 / sqrt(tokens) overflow double. add() refuses the block with a
// NumericalError naming 'rows' and the column, and leaves the accumulator unchanged; merge() likewise.
TEST(AdversarialNumerics, KeysTooLargeForTheirSquaresAreANumericalErrorNamingRows) {
  const Index d = 8;
  const MatrixXd base = gaussian(50, d, 57);
  for (const double scale : {1e155, 1e200}) {
    kqsvd::GramAccumulator cached(d);
    cached.add(base);
    const MatrixXd before = cached.gram();
    kqsvd::test::expect_error<kqsvd::NumericalError>([&] { cached.add(scale * base); },
                                                      "kqsvd::GramAccumulator::add: argument 'rows' has values up to");
    EXPECT_EQ(cached.token_count(), 50);
    EXPECT_EQ(cached.gram(), before);
  }
  // Each shard fits; their sum does not.
  MatrixXd big = gaussian(50, d, 59);
  big.col(2).setConstant(1.55e153);  // 50 squares: 1.2e308 < DBL_MAX = 1.8e308 < twice that
  kqsvd::GramAccumulator first(d), second(d);
  first.add(big);
  second.add(big);
  kqsvd::test::expect_error<kqsvd::NumericalError>([&] { first.merge(second); },
                                                    "kqsvd::GramAccumulator::merge: argument 'other' has values up to");
  EXPECT_EQ(first.token_count(), 50);
  // Just inside the range: finite and optimal.
  expect_optimal_at_every_rank(base * 1e150, gaussian(40, d, 56), "keys x 1e150");
}

// --- 10^8 tokens ------------------------------------------------------------------------------------

// splitmix64: fast, seeded, and the same on every platform.
struct SplitMix64 {
  std::uint64_t state;
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
};

__extension__ typedef __int128 Int128;  // exact sums of 10^8 products of 21-bit integers
__extension__ typedef unsigned __int128 UInt128;

#if defined(__SANITIZE_ADDRESS__)
constexpr bool sanitized_build = true;
#else
constexpr bool sanitized_build = false;
#endif

// 10^8 tokens (10^7 in an AddressSanitizer build unless KQSVD_LONG_TESTS is set) of d = 4 float values,
// generated block by block and never stored. Each value is k / 2^20 with k a 21-bit integer, so every
// product x_i x_j is exact in double and the exact Gram is an integer sum, kept in 128 bits. Dimension
// 0 is all positive (its diagonal sum grows linearly, the worst case for a running double sum); the
// others are centred. Bound: a running double sum over n/256 chunks of 256 exact products has relative
// error at most about (n/256 + 256) * 2^-53 of the sum of |products|, 4.4e-11 for n = 10^8; the test
// allows 1e-10 of sqrt(G_ii G_jj). Float or naive float accumulation would be off by 1e-1 or worse.
TEST(AdversarialNumerics, HundredMillionTokensAccumulateWithoutLoss) {
  const std::int64_t tokens = sanitized_build && std::getenv("KQSVD_LONG_TESTS") == nullptr ? 10'000'000 : 100'000'000;
  constexpr Index d = 4, block = 1 << 16;
  constexpr double unit = 1.0 / (1 << 20);
  const auto start = std::chrono::steady_clock::now();

  kqsvd::GramAccumulator accumulator(d);
  Int128 exact[d][d] = {};
  Eigen::Matrix<float, Eigen::Dynamic, d, Eigen::RowMajor> rows(block, d);
  std::vector<std::int64_t> k(static_cast<std::size_t>(block * d));
  SplitMix64 random{20260101};
  for (std::int64_t first = 0; first < tokens; first += block) {
    const Index count = static_cast<Index>(std::min<std::int64_t>(block, tokens - first));
    for (Index t = 0; t < count; ++t) {
      const std::uint64_t bits = random.next(), more = random.next();
      std::int64_t* token = &k[static_cast<std::size_t>(t * d)];
      token[0] = static_cast<std::int64_t>(bits & 0xFFFFF) + 1;                       // (0, 1]
      token[1] = static_cast<std::int64_t>((bits >> 20) & 0x1FFFFF) - (1 << 20);      // [-1, 1)
      token[2] = static_cast<std::int64_t>((bits >> 41) & 0x1FFFFF) - (1 << 20);
      token[3] = static_cast<std::int64_t>(more & 0x1FFFFF) - (1 << 20);
      for (Index j = 0; j < d; ++j) rows(t, j) = static_cast<float>(static_cast<double>(token[j]) * unit);
    }
    // The exact reference, block by block: products < 2^40, a block's sum < 2^56 fits int64.
    for (Index i = 0; i < d; ++i) {
      for (Index j = 0; j <= i; ++j) {
        std::int64_t sum = 0;
        for (Index t = 0; t < count; ++t) sum += k[static_cast<std::size_t>(t * d + i)] * k[static_cast<std::size_t>(t * d + j)];
        exact[i][j] += sum;
      }
    }
    accumulator.add(rows.topRows(count));
  }
  ASSERT_EQ(accumulator.token_count(), tokens);

  const MatrixXd gram = accumulator.gram();
  MatrixXd reference(d, d);
  for (Index i = 0; i < d; ++i)
    for (Index j = 0; j <= i; ++j) {
      // Exact integer to long double (64-bit significand): relative rounding 5e-20, far below the bound.
      const Int128 value = exact[i][j];
      const bool negative = value < 0;
      const auto magnitude = static_cast<UInt128>(negative ? -value : value);
      const long double high = static_cast<long double>(static_cast<std::uint64_t>(magnitude >> 64));
      const long double low = static_cast<long double>(static_cast<std::uint64_t>(magnitude));
      const long double v = (std::ldexp(high, 64) + low) * static_cast<long double>(unit) * static_cast<long double>(unit);
      reference(i, j) = reference(j, i) = static_cast<double>(negative ? -v : v);
    }
  double worst = 0;
  for (Index i = 0; i < d; ++i)
    for (Index j = 0; j < d; ++j) {
      const double relative = std::abs(gram(i, j) - reference(i, j)) / std::sqrt(reference(i, i) * reference(j, j));
      worst = std::max(worst, relative);
    }
  EXPECT_LT(worst, 1e-10) << "largest relative Gram error over " << tokens << " tokens";
  // The mean Gram is what fits use: dimension 0 is uniform on (0, 1], so its second moment is 1/3.
  EXPECT_NEAR(accumulator.mean_gram()(0, 0), 1.0 / 3.0, 1e-3);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  RecordProperty("tokens", std::to_string(tokens));
  RecordProperty("worst_relative_error", std::to_string(worst));
  RecordProperty("seconds", std::to_string(seconds));
  std::printf("%lld tokens: worst relative Gram error %.3g, %.1f s\n", static_cast<long long>(tokens), worst, seconds);
}

}  // namespace kqsvd_test_adversarial_numerics
