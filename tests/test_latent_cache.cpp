// LatentCache and compress_into: what goes in comes back (exactly in float, within the stated rounding
// bound in float16/bfloat16), across the cache's internal key blocks; the conversions agree bit for bit
// with Eigen's own scalar conversions; bad input is rejected by name and leaves the cache unchanged;
// results do not depend on the number of threads.
#include <gtest/gtest.h>

#include <kqsvd/kqsvd.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>


#include "test_support.hpp"

namespace {

using Eigen::Index;
using kqsvd::test::gaussian;
using kqsvd::test::with_threads;

using kqsvd::test::expect_invalid;
using FloatRows = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename Storage>
using StorageRows = Eigen::Matrix<Storage, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

FloatRows random_rows(Index rows, Index cols, unsigned seed) { return gaussian(rows, cols, seed).cast<float>(); }

// Largest |stored - exact| / |exact| over entries with |exact| in float16's normal range.
double max_relative_rounding(const FloatRows& stored, const FloatRows& exact) {
  double worst = 0.0;
  for (Index i = 0; i < exact.rows(); ++i) {
    for (Index j = 0; j < exact.cols(); ++j) {
      const double x = exact(i, j);
      if (std::abs(x) > 1e-4) worst = std::max(worst, std::abs(stored(i, j) - x) / std::abs(x));
    }
  }
  return worst;
}

kqsvd::LowRankProjection<float> random_projection(Index d, Index r, unsigned seed) {
  kqsvd::GramAccumulator keys(d), queries(d);
  keys.add(gaussian(4 * d, d, seed) * gaussian(d, d, seed + 1));
  queries.add(gaussian(4 * d, d, seed + 2));
  return kqsvd::fit_projection<float>(kqsvd::Method::kq_svd, keys, queries, kqsvd::RankSelection::fixed(r));
}

TEST(StorageConversion, MatchesEigenScalarConversionsBitForBit) {
  // Every float16 bit pattern to float, and back.
  std::vector<Eigen::half> halves(65536);
  for (std::uint32_t bits = 0; bits < 65536; ++bits) {
    halves[bits] = Eigen::half(Eigen::half_impl::raw_uint16_to_half(static_cast<std::uint16_t>(bits)));
  }
  std::vector<float> widened(halves.size());
  kqsvd::detail::to_float(halves.data(), widened.data(), static_cast<Index>(halves.size()));
  for (std::size_t i = 0; i < halves.size(); ++i) {
    const float expected = static_cast<float>(halves[i]);
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(widened[i])) << i;
    } else {
      EXPECT_EQ(widened[i], expected) << i;
    }
  }
  // Floats around every float16/bfloat16 boundary: normal, subnormal, overflow, ties.
  std::mt19937 engine(7);
  std::vector<float> floats;
  for (int i = 0; i < 200000; ++i) {
    const float mantissa = std::uniform_real_distribution<float>(-2.0f, 2.0f)(engine);
    floats.push_back(std::ldexp(mantissa, std::uniform_int_distribution<int>(-30, 20)(engine)));
  }
  for (float special : {0.0f, -0.0f, 65504.0f, 65519.0f, 65520.0f, 1e-8f, std::numeric_limits<float>::infinity(),
                        -std::numeric_limits<float>::infinity(), 3.0e38f, 1.0f + 1.0f / 2048.0f, 1.0f + 3.0f / 2048.0f}) {
    floats.push_back(special);
  }
  std::vector<Eigen::half> narrowed(floats.size());
  std::vector<Eigen::bfloat16> brain(floats.size());
  kqsvd::detail::from_float(floats.data(), narrowed.data(), static_cast<Index>(floats.size()));
  kqsvd::detail::from_float(floats.data(), brain.data(), static_cast<Index>(floats.size()));
  std::vector<float> brain_widened(floats.size());
  kqsvd::detail::to_float(brain.data(), brain_widened.data(), static_cast<Index>(floats.size()));
  for (std::size_t i = 0; i < floats.size(); ++i) {
    ASSERT_EQ(narrowed[i].x, Eigen::half(floats[i]).x) << floats[i];
    ASSERT_EQ(brain[i].value, Eigen::bfloat16(floats[i]).value) << floats[i];
    ASSERT_EQ(brain_widened[i], static_cast<float>(Eigen::bfloat16(floats[i])));
  }
}

TEST(LatentCache, FloatStorageGivesBackExactlyWhatWasAppendedAcrossBlocks) {
  const Index kw = 16, vw = 5;
  const FloatRows keys = random_rows(333, kw, 1), values = random_rows(333, vw, 2);
  kqsvd::LatentCache<float> cache(kw, vw);
  // Pieces that start and end inside and on the cache's key blocks (128 tokens).
  Index first = 0;
  for (Index count : {1, 126, 1, 128, 70, 7}) {
    cache.append(keys.middleRows(first, count), values.middleRows(first, count).cast<double>());
    first += count;
  }
  ASSERT_EQ(first, 333);
  EXPECT_EQ(cache.size(), 333);
  EXPECT_GE(cache.capacity(), 333);
  EXPECT_EQ(cache.bytes(), static_cast<std::size_t>(333 * (kw + vw) * 4));
  EXPECT_EQ(cache.keys(), keys);
  EXPECT_EQ(cache.values(), values);
  cache.clear();
  EXPECT_TRUE(cache.empty());
  EXPECT_EQ(cache.bytes(), 0u);
  EXPECT_EQ(cache.keys().rows(), 0);
}

template <typename Storage>
void check_half_storage(double bound) {
  const FloatRows keys = random_rows(200, 32, 3), values = random_rows(200, 16, 4);
  kqsvd::LatentCache<Storage> cache(32, 16);
  cache.reserve(10);
  cache.append(keys.topRows(77), values.topRows(77));
  cache.append(keys.bottomRows(123), values.bottomRows(123));
  EXPECT_EQ(cache.bytes(), static_cast<std::size_t>(200 * 48 * 2));
  EXPECT_LE(max_relative_rounding(cache.keys(), keys), bound);
  EXPECT_LE(max_relative_rounding(cache.values(), values), bound);
  // Rounded once, exactly as Eigen rounds a single value.
  EXPECT_EQ(cache.keys()(150, 7), static_cast<float>(Storage(keys(150, 7))));
}

TEST(LatentCache, HalfPrecisionStorageRoundsToNearestWithinUnitRoundoff) {
  check_half_storage<Eigen::half>(std::ldexp(1.0, -11));      // float16: 10 stored mantissa bits
  check_half_storage<Eigen::bfloat16>(std::ldexp(1.0, -8));   // bfloat16: 7
}

TEST(LatentCache, AppendingWithProjectionsEqualsCompressing) {
  const Index d = 24;
  const auto kp = random_projection(d, 16, 10), vp = random_projection(d, 8, 20);
  const FloatRows k = random_rows(300, d, 5), v = random_rows(300, d, 6);
  kqsvd::LatentCache<float> cache(kp, vp);
  cache.append(kp, vp, k.topRows(5), v.topRows(5));
  cache.append(kp, vp, k.bottomRows(295), v.bottomRows(295));
  const FloatRows expected_keys = kp.compress(k), expected_values = vp.compress(v);
  EXPECT_LT((cache.keys() - expected_keys).cwiseAbs().maxCoeff(), 1e-5 * expected_keys.cwiseAbs().maxCoeff());
  EXPECT_LT((cache.values() - expected_values).cwiseAbs().maxCoeff(), 1e-5 * expected_values.cwiseAbs().maxCoeff());

  // compress_into a caller's half buffer: the float product, rounded once.
  StorageRows<Eigen::half> latents(300, 16);
  kqsvd::compress_into(kp, k, latents);
  const FloatRows widened = latents.cast<float>();
  EXPECT_LE(max_relative_rounding(widened, expected_keys), std::ldexp(1.0, -11) * 1.01);
}

TEST(LatentCache, ResultsDoNotDependOnTheThreadCount) {
  const Index d = 32;
  const auto kp = random_projection(d, 16, 30), vp = random_projection(d, 32, 40);
  const FloatRows k = random_rows(1500, d, 7), v = random_rows(1500, d, 8);
  FloatRows keys[2], values[2];
  StorageRows<Eigen::half> compressed[2];
  for (int run = 0; run < 2; ++run) {
    with_threads(run == 0 ? 1 : 2, [&] {
      kqsvd::LatentCache<Eigen::half> cache(kp, vp);
      cache.append(kp, vp, k.topRows(37), v.topRows(37));
      cache.append(kp, vp, k.bottomRows(1463), v.bottomRows(1463));
      keys[run] = cache.keys();
      values[run] = cache.values();
      compressed[run].resize(1500, 16);
      kqsvd::compress_into(kp, k, compressed[run]);
    });
  }
  EXPECT_EQ(keys[0], keys[1]);
  EXPECT_EQ(values[0], values[1]);
  EXPECT_TRUE(compressed[0].cast<float>() == compressed[1].cast<float>());
}

TEST(LatentCache, RejectsBadInputByNameAndStaysUnchanged) {
  kqsvd::LatentCache<Eigen::half> cache(4, 3);
  cache.append(random_rows(10, 4, 9), random_rows(10, 3, 10));
  const FloatRows keys_before = cache.keys();
  expect_invalid([&] { cache.append(random_rows(2, 5, 1), random_rows(2, 3, 1)); },
                          "kqsvd::LatentCache::append: argument 'key_latents' has 5 columns, expected 4");
  expect_invalid([&] { cache.append(random_rows(2, 4, 1), random_rows(3, 3, 1)); }, "argument 'values' has 3 rows");
  FloatRows bad = random_rows(100, 4, 2);
  bad(70, 1) = std::numeric_limits<float>::quiet_NaN();
  expect_invalid([&] { cache.append(bad, random_rows(100, 3, 3)); },
                          "argument 'key_latents' contains a non-finite value (nan) at row 70, column 1");
  FloatRows too_large = random_rows(100, 3, 4);
  too_large(90, 2) = 1e5f;  // beyond float16's 65504, in the second internal block
  expect_invalid([&] { cache.append(random_rows(100, 4, 5), too_large); },
                          "argument 'value_latents' value 100000 at row 90, column 2 is beyond the range of float16");
  EXPECT_EQ(cache.size(), 10);
  EXPECT_EQ(cache.keys(), keys_before);

  const auto kp = random_projection(8, 4, 50), vp = random_projection(8, 3, 60);
  FloatRows k = random_rows(300, 8, 11);
  k(260, 5) = std::numeric_limits<float>::infinity();
  expect_invalid([&] { cache.append(kp, vp, k, random_rows(300, 8, 12)); },
                          "kqsvd::LatentCache::append: argument 'keys' contains a non-finite value (inf) at row 260, column 5");
  expect_invalid([&] { cache.append(kp, kp, random_rows(3, 8, 1), random_rows(3, 8, 1)); },
                          "argument 'value_projection' has 4 columns, expected 3");
  expect_invalid([&] { cache.append(kp, vp, random_rows(3, 7, 1), random_rows(3, 8, 1)); },
                          "argument 'keys' has 7 columns, expected 8");
  EXPECT_THROW(cache.append(kp, vp, (random_rows(3, 8, 1) * 1e6f).eval(), random_rows(3, 8, 1)), kqsvd::NumericalError);
  EXPECT_EQ(cache.size(), 10);
  EXPECT_EQ(cache.keys(), keys_before);

  expect_invalid([] { kqsvd::LatentCache<float>(0, 3); }, "argument 'key_width' must be positive");
  expect_invalid([&] { cache.reserve(-1); }, "argument 'tokens' must be >= 0");

  StorageRows<Eigen::half> latents(300, 4);
  expect_invalid([&] { kqsvd::compress_into(kp, k, latents); },
                          "kqsvd::compress_into: argument 'rows' contains a non-finite value (inf) at row 260, column 5");
  StorageRows<Eigen::half> wrong(299, 4);
  expect_invalid([&] { kqsvd::compress_into(kp, random_rows(300, 8, 13), wrong); },
                          "argument 'latents' is 299 x 4, expected 300 x 4");
  EXPECT_THROW(kqsvd::compress_into(kp, (random_rows(300, 8, 14) * 1e6f).eval(), latents), kqsvd::NumericalError);
}

}  // namespace
