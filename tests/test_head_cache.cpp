// HeadCache and compress_into: what goes in comes back -- in every storage format exactly what
// encode_row / decode_row give for that row, across the cache's 128-token blocks and uneven appends; its
// bytes are the format's exact accounting; appending through projections equals compressing first;
// results do not depend on the number of threads; bad input is rejected by name and leaves the cache
// unchanged.
#include <gtest/gtest.h>

#include <kqsvd/kqsvd.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace kqsvd_test_head_cache {

using Eigen::Index;
using kqsvd::RowMatrix;
using kqsvd::StorageFormat;
using kqsvd::test::expect_invalid;
using kqsvd::test::gaussian;
using kqsvd::test::with_threads;

RowMatrix<float> random_rows(Index rows, Index cols, unsigned seed) { return gaussian(rows, cols, seed).cast<float>(); }

// Each row as the format stores it, through the row codec: the independent reading of the cache.
RowMatrix<float> through_codec(const StorageFormat& format, const RowMatrix<float>& rows) {
  RowMatrix<float> result(rows.rows(), rows.cols());
  for (Index i = 0; i < rows.rows(); ++i) {
    result.row(i) = kqsvd::decode_row(format, kqsvd::encode_row(format, rows.row(i)), rows.cols());
  }
  return result;
}

kqsvd::LowRankProjection<float> random_projection(Index d, Index r, unsigned seed) {
  kqsvd::GramAccumulator keys(d), queries(d);
  keys.add(gaussian(4 * d, d, seed) * gaussian(d, d, seed + 1));
  queries.add(gaussian(4 * d, d, seed + 2));
  return kqsvd::fit_projection<float>(kqsvd::Method::kq_svd, keys, queries, kqsvd::RankSelection::fixed(r));
}

const char* const all_formats[] = {"f32", "f16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8",
                                   "q8_0", "q4_0", "int4", "int2", "int4/16", "int2/64"};

TEST(HeadCache, EveryFormatStoresWhatItsRowCodecStoresAcrossBlocks) {
  const Index kw = 128, vw = 64;
  const RowMatrix<float> keys = random_rows(333, kw, 1), values = random_rows(333, vw, 2);
  for (const char* name : all_formats) {
    SCOPED_TRACE(name);
    const StorageFormat format = StorageFormat::parse(name);
    kqsvd::HeadCache cache(kw, vw, format);
    // Pieces that start and end inside and on the cache's blocks (128 tokens).
    Index first = 0;
    for (Index count : {1, 126, 1, 128, 70, 7}) {
      cache.append(keys.middleRows(first, count), values.middleRows(first, count).cast<double>());
      first += count;
    }
    ASSERT_EQ(first, 333);
    EXPECT_EQ(cache.size(), 333);
    EXPECT_GE(cache.capacity(), 333);
    EXPECT_EQ(cache.format(), format);
    EXPECT_EQ(cache.bytes_per_token(), format.bytes_per_row(kw) + format.bytes_per_row(vw));
    EXPECT_EQ(cache.bytes(), static_cast<std::size_t>(333 * (format.bytes_per_row(kw) + format.bytes_per_row(vw))));
    EXPECT_EQ(cache.keys(), through_codec(format, keys));
    EXPECT_EQ(cache.values(), through_codec(format, values));
    // Cleared and refilled, old codes (nibbles, crumbs) do not leak into new rows.
    cache.clear();
    EXPECT_TRUE(cache.empty());
    EXPECT_EQ(cache.bytes(), 0u);
    cache.append(-keys.topRows(200), values.topRows(200));
    EXPECT_EQ(cache.keys(), through_codec(format, -keys.topRows(200)));
  }
  // Float storage gives back exactly what was appended.
  kqsvd::HeadCache exact(kw, vw);
  exact.append(keys, values);
  EXPECT_EQ(exact.keys(), keys);
  EXPECT_EQ(exact.values(), values);
}

TEST(HeadCache, AppendingWithProjectionsEqualsCompressingFirst) {
  const Index d = 48;
  const auto kp = random_projection(d, 32, 10), vp = random_projection(d, 32, 20);
  const RowMatrix<float> k = random_rows(300, d, 5), v = random_rows(300, d, 6);
  for (const char* name : {"f32", "f16", "q8_0", "int4/16"}) {
    SCOPED_TRACE(name);
    const StorageFormat format = StorageFormat::parse(name);
    kqsvd::HeadCache cache(kp, vp, format);
    cache.append(kp, vp, k.topRows(5), v.topRows(5));
    cache.append(kp, vp, k.bottomRows(295), v.bottomRows(295));
    kqsvd::HeadCache from_latents(kp, vp, format);
    from_latents.append(kp.compress(k), vp.compress(v));
    // The same float products, blocked differently: equal to float rounding, then stored alike.
    const RowMatrix<float> expected_keys = through_codec(format, kp.compress(k));
    const double scale = expected_keys.cwiseAbs().maxCoeff();
    EXPECT_LT((cache.keys() - from_latents.keys()).cwiseAbs().maxCoeff(), 0.2 * scale);
    EXPECT_LT((cache.keys() - expected_keys).cwiseAbs().maxCoeff(), 0.2 * scale);
    if (format.kind() == kqsvd::StorageKind::f32) {
      EXPECT_LT((cache.keys() - expected_keys).cwiseAbs().maxCoeff(), 1e-5 * scale);
      EXPECT_LT((cache.values() - vp.compress(v)).cwiseAbs().maxCoeff(), 1e-5 * vp.compress(v).cwiseAbs().maxCoeff());
    }
  }

  // compress_into a caller's half buffer: the float product, rounded once.
  RowMatrix<Eigen::half> latents(300, 32);
  kqsvd::compress_into(kp, k, latents);
  const RowMatrix<float> expected = kp.compress(k);
  const RowMatrix<float> widened = latents.cast<float>();
  for (Index i = 0; i < 300; ++i) {
    for (Index j = 0; j < 32; ++j) {
      if (std::abs(expected(i, j)) > 1e-4f) {
        EXPECT_LE(std::abs(widened(i, j) - expected(i, j)) / std::abs(expected(i, j)), std::ldexp(1.0, -11) * 1.01);
      }
    }
  }
}

TEST(HeadCache, ResultsDoNotDependOnTheThreadCount) {
  const Index d = 48;
  const auto kp = random_projection(d, 32, 30), vp = random_projection(d, 32, 40);
  const RowMatrix<float> k = random_rows(1500, d, 7), v = random_rows(1500, d, 8);
  RowMatrix<float> keys[2], values[2];
  RowMatrix<Eigen::half> compressed[2];
  for (int run = 0; run < 2; ++run) {
    with_threads(run == 0 ? 1 : 2, [&] {
      kqsvd::HeadCache cache(kp, vp, StorageFormat::parse("q4_0"));
      cache.append(kp, vp, k.topRows(37), v.topRows(37));
      cache.append(kp, vp, k.bottomRows(1463), v.bottomRows(1463));
      keys[run] = cache.keys();
      values[run] = cache.values();
      compressed[run].resize(1500, 32);
      kqsvd::compress_into(kp, k, compressed[run]);
    });
  }
  EXPECT_EQ(keys[0], keys[1]);
  EXPECT_EQ(values[0], values[1]);
  EXPECT_TRUE(compressed[0].cast<float>() == compressed[1].cast<float>());
}

TEST(HeadCache, RejectsBadInputByNameAndStaysUnchanged) {
  kqsvd::HeadCache cache(4, 3, StorageFormat::parse("f16"));
  cache.append(random_rows(10, 4, 9), random_rows(10, 3, 10));
  const RowMatrix<float> keys_before = cache.keys();
  expect_invalid([&] { cache.append(random_rows(2, 5, 1), random_rows(2, 3, 1)); },
                 "kqsvd::HeadCache::append: argument 'keys' has 5 columns, expected 4");
  expect_invalid([&] { cache.append(random_rows(2, 4, 1), random_rows(3, 3, 1)); }, "argument 'values' has 3 rows");
  RowMatrix<float> bad = random_rows(300, 4, 2);
  bad(270, 1) = std::numeric_limits<float>::quiet_NaN();
  expect_invalid([&] { cache.append(bad, random_rows(300, 3, 3)); },
                 "argument 'keys' contains a non-finite value (nan) at row 270, column 1");
  RowMatrix<float> too_large = random_rows(100, 3, 4);
  too_large(90, 2) = 1e5f;  // beyond float16's 65504
  expect_invalid([&] { cache.append(random_rows(100, 4, 5), too_large); },
                 "argument 'values' has the value 100000 at row 90, column 2, beyond the range of float16");
  EXPECT_EQ(cache.size(), 10);
  EXPECT_EQ(cache.keys(), keys_before);

  const auto kp = random_projection(8, 4, 50), vp = random_projection(8, 3, 60);
  RowMatrix<float> k = random_rows(300, 8, 11);
  k(260, 5) = std::numeric_limits<float>::infinity();
  expect_invalid([&] { cache.append(kp, vp, k, random_rows(300, 8, 12)); },
                 "kqsvd::HeadCache::append: argument 'keys' contains a non-finite value (inf) at row 260, column 5");
  expect_invalid([&] { cache.append(kp, kp, random_rows(3, 8, 1), random_rows(3, 8, 1)); },
                 "argument 'value_projection' has 4 columns, expected 3");
  expect_invalid([&] { cache.append(kp, vp, random_rows(3, 7, 1), random_rows(3, 8, 1)); },
                 "argument 'keys' has 7 columns, expected 8");
  // Finite rows whose latents float16 cannot hold: a NumericalError, the cache unchanged.
  EXPECT_THROW(cache.append(kp, vp, (random_rows(3, 8, 1) * 1e6f).eval(), random_rows(3, 8, 1)), kqsvd::NumericalError);
  EXPECT_EQ(cache.size(), 10);
  EXPECT_EQ(cache.keys(), keys_before);

  expect_invalid([] { kqsvd::HeadCache(0, 3); }, "argument 'key_width' must be positive");
  expect_invalid([] { kqsvd::HeadCache(16, 32, StorageFormat::parse("q8_0")); },
                 "kqsvd::HeadCache: argument 'key_width' is 16, which q8_0 cannot hold");
  expect_invalid([&] { cache.reserve(-1); }, "argument 'tokens' must be >= 0");

  RowMatrix<Eigen::half> latents(300, 4);
  expect_invalid([&] { kqsvd::compress_into(kp, k, latents); },
                 "kqsvd::compress_into: argument 'rows' contains a non-finite value (inf) at row 260, column 5");
  RowMatrix<Eigen::half> wrong(299, 4);
  expect_invalid([&] { kqsvd::compress_into(kp, random_rows(300, 8, 13), wrong); },
                 "argument 'latents' is 299 x 4, expected 300 x 4");
  EXPECT_THROW(kqsvd::compress_into(kp, (random_rows(300, 8, 14) * 1e6f).eval(), latents), kqsvd::NumericalError);
}

}  // namespace kqsvd_test_head_cache
