// The fused single-pass kernels (decode_attention, prefill_attention) against the reference path
// (kqsvd::causal_attention / compressed_causal_attention, which materialise all scores): equal to float
// rounding on float caches, within a stated bound on half-precision ones, bit-identical on any thread
// count, and strict about their arguments.
#include <gtest/gtest.h>

#include <kqsvd/kqsvd.hpp>

#include <array>
#include <cmath>
#include <limits>
#include <string>


#include "test_support.hpp"

namespace {

using Eigen::Index;
using Eigen::MatrixXd;
using kqsvd::test::gaussian;
using kqsvd::test::with_threads;

using kqsvd::test::expect_invalid;
using FloatRows = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename Storage>
using StorageRows = Eigen::Matrix<Storage, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Float accumulation over a few thousand rows: relative error well below this.
constexpr double float_tolerance = 2e-5;

template <typename A, typename B>
double relative_error(const A& actual, const B& expected) {
  const MatrixXd a = actual.template cast<double>(), e = expected.template cast<double>();
  return (a - e).norm() / e.norm();
}

struct Head {
  MatrixXd q, k, v;  // scores of O(1) spread, so that the softmax is neither flat nor one-hot
};

Head make_head(Index n, Index d, unsigned seed) {
  return {gaussian(n, d, seed) * 1.5, gaussian(n, d, seed + 1), gaussian(n, d, seed + 2)};
}

struct Projections {
  kqsvd::LowRankProjection<float> keys, values;
};

Projections fit(const Head& head, Index rk, Index rv) {
  const Index d = head.k.cols();
  kqsvd::GramAccumulator k(d), q(d), v(d);
  k.add(head.k);
  q.add(head.q);
  v.add(head.v);
  const MatrixXd w = gaussian(3 * d, d, 99);
  return {kqsvd::fit_projection<float>(kqsvd::Method::kq_svd, k, q, kqsvd::RankSelection::fixed(rk)),
          kqsvd::fit_value_projection<float>(kqsvd::Method::kq_svd, v, w.transpose() * w,
                                             kqsvd::RankSelection::fixed(rv))};
}

TEST(DecodeAttention, FullCacheEqualsReferenceAttentionAcrossTilesAndTasks) {
  const Index d = 16;
  // 1 token; around one 64-token tile; several parallel tasks of 2048 tokens with a partial last one.
  for (Index n : {1, 63, 64, 65, 4200}) {
    const Head head = make_head(n, d, static_cast<unsigned>(n));
    const MatrixXd expected = kqsvd::causal_attention(head.q.bottomRows(1), head.k, head.v);
    const FloatRows k = head.k.cast<float>(), v = head.v.cast<float>();
    const Eigen::RowVectorXf q = head.q.bottomRows(1).cast<float>();
    EXPECT_LT(relative_error(kqsvd::decode_attention(q, k, v), expected), float_tolerance) << n;
    EXPECT_LT(relative_error(kqsvd::decode_attention(q.transpose(), k, v), expected), float_tolerance) << n;
  }
}

TEST(DecodeAttention, ReadsOneHeadOfAMultiHeadRowMajorCache) {
  const Index n = 300, d = 16, heads = 3;
  const MatrixXd all_k = gaussian(n, heads * d, 1), all_v = gaussian(n, heads * d, 2), q = gaussian(1, d, 3);
  const FloatRows k = all_k.cast<float>(), v = all_v.cast<float>();
  const MatrixXd expected = kqsvd::causal_attention(q, all_k.middleCols(d, d), all_v.middleCols(d, d));
  const Eigen::RowVectorXf qf = q.cast<float>();
  EXPECT_LT(relative_error(kqsvd::decode_attention(qf, k.middleCols(d, d), v.middleCols(d, d)), expected),
            float_tolerance);
}

template <typename Storage>
void check_half_full_cache(Index d, double rounding_bound) {
  SCOPED_TRACE("d = " + std::to_string(d));
  const Head head = make_head(700, d, 7);
  const StorageRows<Storage> k = head.k.cast<float>().cast<Storage>(), v = head.v.cast<float>().cast<Storage>();
  const Eigen::RowVectorXf q = head.q.bottomRows(1).cast<float>();
  // Against attention on the rounded values: float accumulation is the only difference.
  const MatrixXd rounded = kqsvd::causal_attention(head.q.bottomRows(1), k.template cast<float>().template cast<double>(),
                                                   v.template cast<float>().template cast<double>());
  EXPECT_LT(relative_error(kqsvd::decode_attention(q, k, v), rounded), float_tolerance);
  // Against the exact values: the storage rounding, amplified at most by the score spread.
  const MatrixXd exact = kqsvd::causal_attention(head.q.bottomRows(1), head.k, head.v);
  EXPECT_LT(relative_error(kqsvd::decode_attention(q, k, v), exact), rounding_bound);
}

TEST(DecodeAttention, HalfPrecisionFullCacheWithinRoundingBound) {
  // d = 32 converts whole 64-token tiles; d = 128 converts them 16 rows at a time, and 700 tokens end
  // in a partial tile of 60 (16 + 16 + 16 + 12 rows).
  for (Index d : {32, 128}) {
    check_half_full_cache<Eigen::half>(d, 0.01);
    check_half_full_cache<Eigen::bfloat16>(d, 0.05);
  }
}

// Wide latents: value rows converted in pieces smaller than a 128-token block (32 rows at r = 64, 42 at
// r = 48, so a block splits 42 + 42 + 42 + 2), keys one latent dimension at a time, over several
// parallel decode tasks and a partial last block.
TEST(DecodeAttention, HalfPrecisionLatentsAtWideRanksEqualReferenceOnTheRoundedLatents) {
  const Index d = 128, n = 2048 + 64 + 5;
  const Head head = make_head(n, d, 13);
  const FloatRows k = head.k.cast<float>(), v = head.v.cast<float>();
  const FloatRows q = head.q.bottomRows(1).cast<float>();
  for (Index rank : {64, 48}) {
    SCOPED_TRACE("rank " + std::to_string(rank));
    const Projections p = fit(head, rank, rank);
    kqsvd::LatentCache<Eigen::half> half_cache(p.keys, p.values);
    half_cache.append(p.keys, p.values, k, v);
    kqsvd::LatentCache<Eigen::bfloat16> brain_cache(p.keys, p.values);
    brain_cache.append(p.keys, p.values, k, v);
    const FloatRows on_half =
        kqsvd::compressed_causal_attention(p.keys, p.values, q, half_cache.keys(), half_cache.values());
    const FloatRows on_brain =
        kqsvd::compressed_causal_attention(p.keys, p.values, q, brain_cache.keys(), brain_cache.values());
    EXPECT_LT(relative_error(kqsvd::decode_attention(p.keys, p.values, q, half_cache), on_half), float_tolerance);
    EXPECT_LT(relative_error(kqsvd::decode_attention(p.keys, p.values, q, brain_cache), on_brain), float_tolerance);
  }
}

TEST(DecodeAttention, CompressedCacheEqualsReferenceCompressedAttention) {
  const Index d = 32;
  for (Index rank : {16, 32, 8}) {  // 16 and 32 take the fixed-width kernels, 8 the generic one
    for (Index n : {50, 2048 + 64 + 5}) {
      const Head head = make_head(n, d, 11);
      const Projections p = fit(head, rank, rank);
      const FloatRows k = head.k.cast<float>(), v = head.v.cast<float>();
      const FloatRows q = head.q.bottomRows(1).cast<float>();
      const FloatRows expected = kqsvd::compressed_causal_attention(p.keys, p.values, q, p.keys.compress(k),
                                                                    p.values.compress(v));
      kqsvd::LatentCache<float> cache(p.keys, p.values);
      cache.append(p.keys, p.values, k, v);
      EXPECT_LT(relative_error(kqsvd::decode_attention(p.keys, p.values, q, cache), expected), float_tolerance)
          << rank << " " << n;

      // Half latents: exact on the rounded latents; within the rounding bound of the unrounded ones.
      kqsvd::LatentCache<Eigen::half> half_cache(p.keys, p.values);
      half_cache.append(p.keys, p.values, k, v);
      const FloatRows on_rounded =
          kqsvd::compressed_causal_attention(p.keys, p.values, q, half_cache.keys(), half_cache.values());
      const Eigen::RowVectorXf half_out = kqsvd::decode_attention(p.keys, p.values, q, half_cache);
      EXPECT_LT(relative_error(half_out, on_rounded), float_tolerance);
      EXPECT_LT(relative_error(half_out, expected), 0.01);
    }
  }
}

TEST(PrefillAttention, FullAndCompressedEqualReferenceWithCausalMask) {
  const Index n = 230, d = 16;
  const Head head = make_head(n, d, 21);
  const FloatRows q = head.q.cast<float>(), k = head.k.cast<float>(), v = head.v.cast<float>();
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  // Whole prompt; the last 70 tokens; 1 token; a block of queries placed before the end of the cache.
  const std::array<std::array<Index, 3>, 4> cases = {{{0, n, -1}, {n - 70, 70, -1}, {n - 1, 1, -1}, {40, 100, 40}}};
  for (const auto& [first, count, offset] : cases) {
    const Index at = offset == -1 ? n - count : offset;
    const MatrixXd expected = kqsvd::causal_attention(head.q.middleRows(first, count), head.k, head.v, at, scale);
    EXPECT_LT(relative_error(kqsvd::prefill_attention(q.middleRows(first, count), k, v, offset), expected),
              float_tolerance)
        << first << " " << count;

    const Projections p = fit(head, 8, 16);
    const FloatRows compressed_expected = kqsvd::compressed_causal_attention(
        p.keys, p.values, q.middleRows(first, count), p.keys.compress(k), p.values.compress(v), at);
    kqsvd::LatentCache<float> cache(p.keys, p.values);
    cache.append(p.keys, p.values, k, v);
    EXPECT_LT(relative_error(kqsvd::prefill_attention(p.keys, p.values, q.middleRows(first, count), cache, offset),
                             compressed_expected),
              float_tolerance);
    kqsvd::LatentCache<Eigen::bfloat16> brain(p.keys, p.values);
    brain.append(p.keys, p.values, k, v);
    const FloatRows on_rounded = kqsvd::compressed_causal_attention(p.keys, p.values, q.middleRows(first, count),
                                                                    brain.keys(), brain.values(), at);
    EXPECT_LT(relative_error(kqsvd::prefill_attention(p.keys, p.values, q.middleRows(first, count), brain, offset),
                             on_rounded),
              float_tolerance);
  }
}

TEST(FusedAttention, BitIdenticalOnAnyThreadCount) {
  const Index n = 5000, d = 32;
  const Head head = make_head(n, d, 31);
  const Projections p = fit(head, 16, 16);
  const FloatRows q = head.q.cast<float>(), k = head.k.cast<float>(), v = head.v.cast<float>();
  kqsvd::LatentCache<Eigen::half> cache(p.keys, p.values);
  cache.append(p.keys, p.values, k, v);
  Eigen::RowVectorXf full[3], compressed[3];
  FloatRows prefill[3], compressed_prefill[3];
  for (int threads : {1, 2, 3}) {
    with_threads(threads, [&] {
      const auto i = static_cast<std::size_t>(threads - 1);
      full[i] = kqsvd::decode_attention(q.row(n - 1), k, v);
      compressed[i] = kqsvd::decode_attention(p.keys, p.values, q.row(n - 1), cache);
      prefill[i] = kqsvd::prefill_attention(q.bottomRows(200), k, v);
      compressed_prefill[i] = kqsvd::prefill_attention(p.keys, p.values, q.bottomRows(200), cache);
    });
  }
  for (std::size_t i = 1; i < 3; ++i) {
    EXPECT_EQ(full[i], full[0]);
    EXPECT_EQ(compressed[i], compressed[0]);
    EXPECT_EQ(prefill[i], prefill[0]);
    EXPECT_EQ(compressed_prefill[i], compressed_prefill[0]);
  }
}

TEST(FusedAttention, RejectsBadInputByName) {
  const Head head = make_head(20, 8, 41);
  const FloatRows q = head.q.cast<float>(), k = head.k.cast<float>(), v = head.v.cast<float>();
  const Projections p = fit(head, 4, 3);
  kqsvd::LatentCache<float> cache(p.keys, p.values);

  expect_invalid([&] { kqsvd::decode_attention(q.row(0).head(7), k, v); },
                          "kqsvd::decode_attention: argument 'query' is 1 x 7, expected 1 x 8");
  expect_invalid([&] { kqsvd::decode_attention(q.topRows(2), k, v); }, "argument 'query' is 2 x 8");
  expect_invalid([&] { kqsvd::decode_attention(q.row(0), k, v.topRows(19)); },
                          "argument 'values' has 19 rows, keys have 20");
  expect_invalid([&] { kqsvd::decode_attention(q.row(0), k.topRows(0), v.topRows(0)); },
                          "argument 'keys' must hold at least one token");
  Eigen::RowVectorXf bad_query = q.row(0);
  bad_query(3) = std::numeric_limits<float>::quiet_NaN();
  expect_invalid([&] { kqsvd::decode_attention(bad_query, k, v); },
                          "argument 'query' contains a non-finite value (nan) at row 0, column 3");

  expect_invalid([&] { kqsvd::decode_attention(p.keys, p.values, q.row(0), cache); },
                          "argument 'cache' holds no tokens");
  cache.append(p.keys, p.values, k, v);
  expect_invalid([&] { kqsvd::decode_attention(p.values, p.values, q.row(0), cache); },
                          "argument 'key_projection' has 3 columns, expected 4");
  expect_invalid([&] { kqsvd::decode_attention(p.keys, p.keys, q.row(0), cache); },
                          "argument 'value_projection' has 4 columns, expected 3");
  expect_invalid([&] { kqsvd::decode_attention(p.keys, p.values, q.row(0).head(5), cache); },
                          "argument 'query' is 1 x 5, expected 1 x 8");

  expect_invalid([&] { kqsvd::prefill_attention(q.leftCols(7), k, v); },
                          "kqsvd::prefill_attention: argument 'queries' has 7 columns, expected 8");
  expect_invalid([&] { kqsvd::prefill_attention(q.topRows(5), k, v, 16); }, "argument 'query_offset' is 16");
  expect_invalid([&] { kqsvd::prefill_attention(q, k.topRows(10), v.topRows(10)); },
                          "argument 'query_offset'");
  expect_invalid([&] { kqsvd::prefill_attention(p.keys, p.values, q.leftCols(6), cache); },
                          "argument 'queries' has 6 columns, expected 8");
  expect_invalid([&] { kqsvd::prefill_attention(p.keys, p.keys, q, cache); },
                          "argument 'value_projection' has 4 columns, expected 3");
}

}  // namespace
