// The fused kernels (decode_attention, prefill_attention, partial_attention) against the reference path
// (kqsvd::causal_attention and its compressed forms, which materialise all scores, in double): on every
// storage format equal, to float rounding, to the reference on the rows the cache decodes to; within the
// storage rounding of the exact rows; partial states of disjoint rows and layers merge exactly;
// bit-identical on any thread count; strict about their arguments.
#include <gtest/gtest.h>

#include <kqsvd/kqsvd.hpp>

#include <array>
#include <cmath>
#include <limits>
#include <string>

#include "test_support.hpp"

namespace kqsvd_test_kernels {

using Eigen::Index;
using Eigen::MatrixXd;
using kqsvd::RowMatrix;
using kqsvd::StorageFormat;
using kqsvd::VisibleRows;
using kqsvd::test::expect_invalid;
using kqsvd::test::gaussian;
using kqsvd::test::with_threads;

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

const char* const all_formats[] = {"f32", "f16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8", "q8_0", "q4_0", "int4", "int2"};

// ---- full rows ------------------------------------------------------------------------------------

TEST(DecodeAttention, FullRowsInCallerMemoryEqualReferenceAcrossTilesAndTasks) {
  const Index d = 16;
  // 1 token; around one 64-token tile; several parallel tasks of 2048 tokens with a partial last one.
  for (Index n : {1, 63, 64, 65, 4200}) {
    const Head head = make_head(n, d, static_cast<unsigned>(n));
    const MatrixXd expected = kqsvd::causal_attention(head.q.bottomRows(1), head.k, head.v);
    const RowMatrix<float> k = head.k.cast<float>(), v = head.v.cast<float>();
    const Eigen::RowVectorXf q = head.q.bottomRows(1).cast<float>();
    EXPECT_LT(relative_error(kqsvd::decode_attention(q, k, v), expected), float_tolerance) << n;
    EXPECT_LT(relative_error(kqsvd::decode_attention(q.transpose(), k, v), expected), float_tolerance) << n;
  }
}

TEST(DecodeAttention, ReadsOneHeadOfAMultiHeadRowMajorCache) {
  const Index n = 300, d = 16, heads = 3;
  const MatrixXd all_k = gaussian(n, heads * d, 1), all_v = gaussian(n, heads * d, 2), q = gaussian(1, d, 3);
  const RowMatrix<float> k = all_k.cast<float>(), v = all_v.cast<float>();
  const MatrixXd expected = kqsvd::causal_attention(q, all_k.middleCols(d, d), all_v.middleCols(d, d));
  const Eigen::RowVectorXf qf = q.cast<float>();
  EXPECT_LT(relative_error(kqsvd::decode_attention(qf, k.middleCols(d, d), v.middleCols(d, d)), expected),
            float_tolerance);
}

template <typename Storage>
void check_half_rows(Index d, double rounding_bound) {
  SCOPED_TRACE("d = " + std::to_string(d));
  const Head head = make_head(700, d, 7);
  const RowMatrix<Storage> k = head.k.cast<float>().cast<Storage>(), v = head.v.cast<float>().cast<Storage>();
  const Eigen::RowVectorXf q = head.q.bottomRows(1).cast<float>();
  // Against attention on the rounded values: float accumulation is the only difference.
  const MatrixXd rounded = kqsvd::causal_attention(head.q.bottomRows(1), k.template cast<float>().template cast<double>(),
                                                   v.template cast<float>().template cast<double>());
  EXPECT_LT(relative_error(kqsvd::decode_attention(q, k, v), rounded), float_tolerance);
  // Against the exact values: the storage rounding, amplified at most by the score spread.
  const MatrixXd exact = kqsvd::causal_attention(head.q.bottomRows(1), head.k, head.v);
  EXPECT_LT(relative_error(kqsvd::decode_attention(q, k, v), exact), rounding_bound);
}

TEST(DecodeAttention, HalfPrecisionRowsInCallerMemoryWithinRoundingBound) {
  // d = 32 converts whole 64-token tiles; d = 128 converts them 16 rows at a time, and 700 tokens end
  // in a partial tile of 60 (16 + 16 + 16 + 12 rows).
  for (Index d : {32, 128}) {
    check_half_rows<Eigen::half>(d, 0.01);
    check_half_rows<Eigen::bfloat16>(d, 0.05);
  }
}

// How far attention on a format's rows may be from attention on the exact rows (d = 64, O(1) rows).
double storage_bound(const StorageFormat& format) {
  switch (format.kind()) {
    case kqsvd::StorageKind::f32: return 1e-5;
    case kqsvd::StorageKind::f16: return 0.01;
    case kqsvd::StorageKind::bf16: return 0.05;
    case kqsvd::StorageKind::int8:
    case kqsvd::StorageKind::q8_0: return 0.05;
    case kqsvd::StorageKind::fp8_e4m3:
    case kqsvd::StorageKind::fp8_e5m2:
    case kqsvd::StorageKind::q4_0:
    case kqsvd::StorageKind::int4: return 0.5;
    default: return 1.5;  // int2: four levels
  }
}

TEST(DecodeAttention, FullRowsInEveryFormatEqualReferenceOnTheStoredRows) {
  const Index d = 64;
  for (Index n : {1, 127, 128, 129, 2048 + 128 + 3}) {
    const Head head = make_head(n, d, static_cast<unsigned>(n) + 100);
    const RowMatrix<float> k = head.k.cast<float>(), v = head.v.cast<float>();
    const Eigen::RowVectorXf q = head.q.bottomRows(1).cast<float>();
    const MatrixXd exact = kqsvd::causal_attention(head.q.bottomRows(1), head.k, head.v);
    for (const char* name : all_formats) {
      SCOPED_TRACE(std::string(name) + ", n = " + std::to_string(n));
      const StorageFormat format = StorageFormat::parse(name);
      kqsvd::HeadCache cache(d, d, format);
      cache.append(k, v);
      const MatrixXd on_stored = kqsvd::causal_attention(head.q.bottomRows(1), cache.keys().cast<double>(),
                                                         cache.values().cast<double>());
      const Eigen::RowVectorXf out = kqsvd::decode_attention(q, cache);
      EXPECT_LT(relative_error(out, on_stored), float_tolerance);
      EXPECT_LT(relative_error(out, exact), storage_bound(format));
    }
  }
}

// ---- latents --------------------------------------------------------------------------------------

TEST(DecodeAttention, LatentsInEveryFormatEqualReferenceCompressedAttentionOnTheStoredLatents) {
  const Index d = 64;
  for (Index rank : {16, 32, 64, 8}) {
    for (Index n : {50, 2048 + 128 + 5}) {
      const Head head = make_head(n, d, 11);
      const Projections p = fit(head, rank, rank);
      const RowMatrix<float> k = head.k.cast<float>(), v = head.v.cast<float>();
      const RowMatrix<float> q = head.q.bottomRows(1).cast<float>();
      const RowMatrix<float> exact =
          kqsvd::compressed_causal_attention(p.keys, p.values, q, p.keys.compress(k), p.values.compress(v));
      for (const char* name : all_formats) {
        const StorageFormat format = StorageFormat::parse(name);
        if (rank % format.group_size(rank) != 0) continue;  // q8_0 / q4_0 / int4 / int2 need rank % 32 == 0
        SCOPED_TRACE(std::string(name) + ", rank " + std::to_string(rank) + ", n = " + std::to_string(n));
        kqsvd::HeadCache cache(p.keys, p.values, format);
        cache.append(p.keys, p.values, k, v);
        const RowMatrix<float> on_stored =
            kqsvd::compressed_causal_attention(p.keys, p.values, q, cache.keys(), cache.values());
        const Eigen::RowVectorXf out = kqsvd::decode_attention(p.keys, p.values, q, cache);
        EXPECT_LT(relative_error(out, on_stored), float_tolerance);
        EXPECT_LT(relative_error(out, exact), storage_bound(format));
      }
    }
  }
}

TEST(PrefillAttention, FullAndLatentCachesEqualReferenceWithCausalMask) {
  const Index n = 230, d = 32;
  const Head head = make_head(n, d, 21);
  const RowMatrix<float> q = head.q.cast<float>(), k = head.k.cast<float>(), v = head.v.cast<float>();
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const Projections p = fit(head, 32, 32);
  // Whole prompt; the last 70 tokens; 1 token; a block of queries placed before the end of the cache.
  const std::array<std::array<Index, 3>, 4> cases = {{{0, n, -1}, {n - 70, 70, -1}, {n - 1, 1, -1}, {40, 100, 40}}};
  for (const auto& [first, count, offset] : cases) {
    SCOPED_TRACE(std::to_string(first) + " " + std::to_string(count));
    const Index at = offset == -1 ? n - count : offset;
    const MatrixXd expected = kqsvd::causal_attention(head.q.middleRows(first, count), head.k, head.v, at, scale);
    EXPECT_LT(relative_error(kqsvd::prefill_attention(q.middleRows(first, count), k, v, offset), expected),
              float_tolerance);
    for (const char* name : {"f32", "bf16", "q4_0", "int8"}) {
      SCOPED_TRACE(name);
      const StorageFormat format = StorageFormat::parse(name);
      kqsvd::HeadCache full(d, d, format);
      full.append(k, v);
      const MatrixXd on_stored = kqsvd::causal_attention(head.q.middleRows(first, count), full.keys().cast<double>(),
                                                         full.values().cast<double>(), at, scale);
      EXPECT_LT(relative_error(kqsvd::prefill_attention(q.middleRows(first, count), full, offset), on_stored),
                float_tolerance);
      kqsvd::HeadCache latents(p.keys, p.values, format);
      latents.append(p.keys, p.values, k, v);
      const RowMatrix<float> on_latents = kqsvd::compressed_causal_attention(
          p.keys, p.values, q.middleRows(first, count), latents.keys(), latents.values(), at);
      EXPECT_LT(relative_error(kqsvd::prefill_attention(p.keys, p.values, q.middleRows(first, count), latents, offset),
                               on_latents),
                float_tolerance);
    }
  }
}

// ---- partial attention: pre-RoPE, layers, merges --------------------------------------------------

TEST(PartialAttention, PreRopeLatentsEqualReferencePreRopeAttention) {
  const Index n = 300, d = 32;
  const Head head = make_head(n, d, 41);
  const Projections p = fit(head, 16, 32);
  const kqsvd::RotaryEmbedding rope(d, 10000.0, kqsvd::RopeStyle::rotate_half);
  const RowMatrix<float> k = head.k.cast<float>(), v = head.v.cast<float>();
  RowMatrix<float> rotated_q = head.q.cast<float>();
  rope.rotate(rotated_q, 0);
  for (const char* name : {"f32", "f16", "int4/16"}) {
    SCOPED_TRACE(name);
    kqsvd::HeadCache cache(p.keys, p.values, StorageFormat::parse(name));
    cache.append(p.keys, p.values, k, v);
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    // Every query (tile strategy, causal), and the last four queries seeing everything.
    const RowMatrix<float> expected =
        kqsvd::pre_rope_causal_attention(p.keys, p.values, rope, rotated_q, cache.keys(), cache.values());
    const RowMatrix<float> scaled = rotated_q * static_cast<float>(scale);
    const auto state = kqsvd::partial_attention(scaled, VisibleRows::causal(n, 0), cache, p.keys, rope, 0);
    EXPECT_LT(relative_error(state.decompressed(p.values).result(), expected), float_tolerance);
  }
}

TEST(PartialAttention, StatesOfDisjointRowsAndOfLatentAndExactLayersMergeExactly) {
  const Index n = 500, d = 32, window = 40;
  const Head head = make_head(n, d, 51);
  const Projections p = fit(head, 16, 16);
  const RowMatrix<float> k = head.k.cast<float>(), v = head.v.cast<float>();
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const RowMatrix<float> q = (head.q.bottomRows(3) * scale).cast<float>();

  // Rows [0, 260) and [260, 500) of one source give the state of all 500.
  const auto whole = kqsvd::partial_attention(q, VisibleRows::all(3, n), k, v);
  auto split = kqsvd::partial_attention(q, VisibleRows(VisibleRows::Indices::Zero(3), VisibleRows::Indices::Constant(3, 260)), k, v);
  split.merge(kqsvd::partial_attention(q, VisibleRows(VisibleRows::Indices::Constant(3, 260), VisibleRows::Indices::Constant(3, n)), k, v));
  EXPECT_LT(relative_error(split.result(), whole.result()), 1e-6);

  // A layered cache: latents of rows [0, n - window), exact rows for the last `window`; against the
  // reference: scores from latents for old rows and exact scores for recent ones, one softmax.
  kqsvd::HeadCache latents(p.keys, p.values, StorageFormat::parse("f16"));
  latents.append(p.keys, p.values, k, v);
  const RowMatrix<float> mapped = q * p.keys.decoder();
  auto layered = kqsvd::partial_attention(mapped, VisibleRows::all(3, n - window), latents).decompressed(p.values);
  layered.merge(kqsvd::partial_attention(q, VisibleRows::all(3, window), k.bottomRows(window), v.bottomRows(window)));
  const MatrixXd key_latents = latents.keys().cast<double>(), value_latents = latents.values().cast<double>();
  MatrixXd expected(3, d);
  for (Index i = 0; i < 3; ++i) {
    Eigen::VectorXd scores(n);
    const Eigen::RowVectorXd qi = q.row(i).cast<double>();
    for (Index j = 0; j < n; ++j) {
      scores(j) = j < n - window ? (qi * p.keys.decoder().cast<double>()).dot(key_latents.row(j)) : qi.dot(head.k.row(j));
    }
    const Eigen::VectorXd weights = (scores.array() - scores.maxCoeff()).exp().matrix() / (scores.array() - scores.maxCoeff()).exp().sum();
    Eigen::RowVectorXd out = Eigen::RowVectorXd::Zero(d);
    for (Index j = 0; j < n; ++j) {
      out += weights(j) * (j < n - window ? Eigen::RowVectorXd(value_latents.row(j) * p.values.decoder().cast<double>().transpose())
                                          : Eigen::RowVectorXd(head.v.row(j)));
    }
    expected.row(i) = out;
  }
  EXPECT_LT(relative_error(layered.result(), expected), float_tolerance);

  // The decode strategy (a few queries sharing one range) and the tile strategy (ranges per query)
  // agree on the same rows.
  const VisibleRows uniform = VisibleRows::all(3, n);
  VisibleRows::Indices ends = VisibleRows::Indices::Constant(3, n);
  ends(0) = n - 1;  // not uniform: the tile strategy
  const auto decoded = kqsvd::partial_attention(mapped, uniform, latents).decompressed(p.values).result();
  const auto tiled = kqsvd::partial_attention(mapped, VisibleRows(VisibleRows::Indices::Zero(3), ends), latents)
                         .decompressed(p.values).result();
  EXPECT_LT(relative_error(decoded.bottomRows(2), tiled.bottomRows(2)), 1e-6);
}

TEST(FusedAttention, BitIdenticalOnAnyThreadCount) {
  const Index n = 5000, d = 32;
  const Head head = make_head(n, d, 31);
  const Projections p = fit(head, 32, 32);
  const RowMatrix<float> q = head.q.cast<float>(), k = head.k.cast<float>(), v = head.v.cast<float>();
  kqsvd::HeadCache cache(p.keys, p.values, StorageFormat::parse("q4_0"));
  cache.append(p.keys, p.values, k, v);
  Eigen::RowVectorXf full[3], compressed[3];
  RowMatrix<float> prefill[3], compressed_prefill[3];
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
  const RowMatrix<float> q = head.q.cast<float>(), k = head.k.cast<float>(), v = head.v.cast<float>();
  const Projections p = fit(head, 4, 3);
  kqsvd::HeadCache cache(p.keys, p.values);

  expect_invalid([&] { kqsvd::decode_attention(q.row(0).head(7), k, v); },
                 "kqsvd::decode_attention: argument 'query' is 1 x 7, expected 1 x 8");
  expect_invalid([&] { kqsvd::decode_attention(q.topRows(2), k, v); }, "argument 'query' is 2 x 8");
  expect_invalid([&] { kqsvd::decode_attention(q.row(0), k, v.topRows(19)); }, "argument 'values' has 19 rows, keys have 20");
  expect_invalid([&] { kqsvd::decode_attention(q.row(0), k.topRows(0), v.topRows(0)); },
                 "argument 'keys' must hold at least one token");
  Eigen::RowVectorXf bad_query = q.row(0);
  bad_query(3) = std::numeric_limits<float>::quiet_NaN();
  expect_invalid([&] { kqsvd::decode_attention(bad_query, k, v); },
                 "argument 'query' contains a non-finite value (nan) at row 0, column 3");

  expect_invalid([&] { kqsvd::decode_attention(p.keys, p.values, q.row(0), cache); }, "argument 'cache' holds no tokens");
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
  expect_invalid([&] { kqsvd::prefill_attention(q, k.topRows(10), v.topRows(10)); }, "argument 'query_offset'");
  expect_invalid([&] { kqsvd::prefill_attention(p.keys, p.values, q.leftCols(6), cache); },
                 "argument 'queries' has 6 columns, expected 8");
  expect_invalid([&] { kqsvd::prefill_attention(p.keys, p.keys, q, cache); },
                 "argument 'value_projection' has 4 columns, expected 3");

  expect_invalid([&] { kqsvd::partial_attention(q.leftCols(4), VisibleRows::all(20, 21), cache); },
                 "kqsvd::partial_attention: argument 'visible' gives query 0 rows up to 21, but the source holds 20");
  expect_invalid([&] { kqsvd::partial_attention(q.leftCols(4), VisibleRows::all(3, 20), cache); },
                 "argument 'visible' has 3 ranges for 20 queries");
  expect_invalid([] { VisibleRows(VisibleRows::Indices::Constant(2, 5), VisibleRows::Indices::Constant(2, 4)); },
                 "kqsvd::VisibleRows: argument 'begin/end' give query 0 the rows [5, 4)");
  const auto empty = kqsvd::partial_attention(q.leftCols(4), VisibleRows(VisibleRows::Indices::Zero(20), VisibleRows::Indices::Zero(20)), cache);
  expect_invalid([&] { empty.result(); }, "kqsvd::PartialAttention::result: query 0 saw no cached row");
  auto state = kqsvd::partial_attention(q.leftCols(4), VisibleRows::all(20, 20), cache);
  expect_invalid([&] { state.merge(state.decompressed(p.values)); },
                 "argument 'other' holds 20 queries of value width 8, this one 20 of 3");
}

}  // namespace kqsvd_test_kernels
