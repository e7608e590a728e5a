// Eviction: HeadCache::retain keeps exactly the stored bits of the listed tokens in every format;
// attention_weights equals a softmax written out in double over the stored rows; HeavyHitterCache
// follows an independent step-by-step simulation of H2O (greedy eviction of the least-attended older
// token) in its held positions and outputs; budgets and bad input are refused by name.
#include <gtest/gtest.h>

#include <kqsvd/kqsvd.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace kqsvd_test_heavy_hitter {

using Eigen::Index;
using Eigen::MatrixXd;
using kqsvd::HeavyHitterBudget;
using kqsvd::HeavyHitterCache;
using kqsvd::RowMatrix;
using kqsvd::StorageFormat;
using kqsvd::VisibleRows;
using kqsvd::test::expect_invalid;
using kqsvd::test::gaussian;

RowMatrix<float> rows_of(Index rows, Index cols, unsigned seed) { return gaussian(rows, cols, seed).cast<float>(); }

const char* const formats[] = {"f32", "f16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8", "q8_0", "q4_0", "int4", "int2", "int2/16"};

// ---- HeadCache::retain --------------------------------------------------------------------------

TEST(HeadCacheRetain, KeepsTheListedTokensBitForBitInEveryFormat) {
  const Index kw = 64, vw = 32, n = 300;  // three blocks of 128
  const RowMatrix<float> keys = rows_of(n, kw, 1), values = rows_of(n, vw, 2);
  const RowMatrix<float> more_keys = rows_of(150, kw, 3), more_values = rows_of(150, vw, 4);
  std::mt19937 engine(5);
  for (const char* name : formats) {
    SCOPED_TRACE(name);
    kqsvd::HeadCache cache(kw, vw, StorageFormat::parse(name));
    cache.append(keys, values);
    const RowMatrix<float> stored_keys = cache.keys(), stored_values = cache.values();
    std::vector<Index> kept;
    for (Index i = 0; i < n; ++i) {
      if (std::bernoulli_distribution(0.3)(engine) || i == 129) kept.push_back(i);
    }
    cache.retain(kept);
    ASSERT_EQ(cache.size(), static_cast<Index>(kept.size()));
    const RowMatrix<float> after_keys = cache.keys(), after_values = cache.values();
    for (std::size_t i = 0; i < kept.size(); ++i) {
      const auto row = static_cast<Index>(i);
      ASSERT_TRUE((after_keys.row(row).array() == stored_keys.row(kept[i]).array()).all()) << "kept row " << i;
      ASSERT_TRUE((after_values.row(row).array() == stored_values.row(kept[i]).array()).all()) << "kept row " << i;
    }
    // Appending after an eviction writes over the freed slots: what reads back is the new rows alone.
    cache.append(more_keys, more_values);
    kqsvd::HeadCache fresh(kw, vw, StorageFormat::parse(name));
    fresh.append(more_keys, more_values);
    const RowMatrix<float> tail = cache.keys().bottomRows(150);
    EXPECT_TRUE((tail.array() == fresh.keys().array()).all());
    EXPECT_TRUE((cache.values().bottomRows(150).array() == fresh.values().array()).all());
    EXPECT_TRUE((cache.keys().topRows(static_cast<Index>(kept.size())).array() == after_keys.array()).all());
  }
}

TEST(HeadCacheRetain, RejectsRowsOutOfRangeOrOutOfOrderAndKeepsTheCache) {
  kqsvd::HeadCache cache(8, 8);
  cache.append(rows_of(10, 8, 1), rows_of(10, 8, 2));
  expect_invalid([&] { cache.retain({0, 10}); }, "rows");
  expect_invalid([&] { cache.retain({-1}); }, "outside the cache's tokens [0, 10)");
  expect_invalid([&] { cache.retain({3, 3}); }, "strictly increasing");
  expect_invalid([&] { cache.retain({4, 2}); }, "strictly increasing");
  EXPECT_EQ(cache.size(), 10);
  cache.retain({});
  EXPECT_EQ(cache.size(), 0);
}

// ---- attention_weights ---------------------------------------------------------------------------

// softmax(q K^T) over [begin, end) in double, on the rows the cache stores.
MatrixXd softmax_reference(const RowMatrix<float>& queries, const RowMatrix<float>& stored, const VisibleRows& visible) {
  MatrixXd weights = MatrixXd::Zero(queries.rows(), stored.rows());
  for (Index i = 0; i < queries.rows(); ++i) {
    const Index begin = visible.begin()(i), end = visible.end()(i);
    if (begin == end) continue;
    Eigen::VectorXd scores(end - begin);
    for (Index j = begin; j < end; ++j) scores(j - begin) = queries.row(i).cast<double>().dot(stored.row(j).cast<double>());
    const Eigen::ArrayXd e = (scores.array() - scores.maxCoeff()).exp();
    weights.row(i).segment(begin, end - begin) = (e / e.sum()).matrix().transpose();
  }
  return weights;
}

TEST(AttentionWeights, EqualTheSoftmaxOfTheStoredRowsOverEachQuerysRange) {
  const Index d = 32, n = 200;
  const RowMatrix<float> keys = rows_of(n, d, 11), values = rows_of(n, d, 12);
  const RowMatrix<float> queries = rows_of(4, d, 13) * 0.3f;
  VisibleRows::Indices begin(4), end(4);
  begin << 0, 5, 130, 40;
  end << 200, 129, 200, 40;  // the last query sees nothing
  const VisibleRows visible(begin, end);
  for (const char* name : formats) {
    SCOPED_TRACE(name);
    kqsvd::HeadCache cache(d, d, StorageFormat::parse(name));
    cache.append(keys, values);
    const RowMatrix<float> weights = kqsvd::attention_weights(queries, visible, cache);
    const MatrixXd expected = softmax_reference(queries, cache.keys(), visible);
    EXPECT_LT((weights.cast<double>() - expected).cwiseAbs().maxCoeff(), 1e-6);
    EXPECT_NEAR(weights.row(0).sum(), 1.0, 1e-5);
    EXPECT_EQ(weights.row(3).cwiseAbs().sum(), 0.0f);
  }
  // Latents: the scores are (q B)(k A)^T.
  kqsvd::GramAccumulator key_gram(d), query_gram(d);
  key_gram.add(keys);
  query_gram.add(rows_of(300, d, 14));
  const auto projection = kqsvd::fit_projection<float>(kqsvd::Method::kq_svd, key_gram, query_gram, kqsvd::RankSelection::fixed(8));
  kqsvd::HeadCache latents(projection, projection, StorageFormat::parse("f16"));
  latents.append(projection, projection, keys, values);
  const RowMatrix<float> mapped = queries * projection.decoder();
  const MatrixXd expected = softmax_reference(mapped, latents.keys(), visible);
  EXPECT_LT((kqsvd::attention_weights(mapped, visible, latents).cast<double>() - expected).cwiseAbs().maxCoeff(), 1e-6);
}

TEST(AttentionWeights, RejectsQueriesOfAnotherWidthAndRangesBeyondTheCache) {
  kqsvd::HeadCache cache(8, 8);
  cache.append(rows_of(10, 8, 1), rows_of(10, 8, 2));
  expect_invalid([&] { kqsvd::attention_weights(rows_of(1, 7, 3), VisibleRows::all(1, 10), cache); }, "queries");
  expect_invalid([&] { kqsvd::attention_weights(rows_of(1, 8, 3), VisibleRows::all(1, 11), cache); }, "visible");
  RowMatrix<float> nan = rows_of(1, 8, 3);
  nan(0, 2) = std::nanf("");
  expect_invalid([&] { kqsvd::attention_weights(nan, VisibleRows::all(1, 10), cache); }, "queries");
}

// ---- HeavyHitterCache ----------------------------------------------------------------------------

// H2O written out step by step in double: the new token enters, the step's queries attend over every
// held token, their weights are added to the held tokens' scores, and while more than heavy + recent
// are held the older token (outside the last `recent`) with the least score is evicted.
struct H2oReference {
  std::vector<Index> held;
  std::vector<double> score;

  MatrixXd step(const RowMatrix<float>& keys, const RowMatrix<float>& values, const RowMatrix<float>& queries,
                Index position, const HeavyHitterBudget& budget) {
    held.push_back(position);
    score.push_back(0.0);
    MatrixXd output = MatrixXd::Zero(queries.rows(), values.cols());
    for (Index q = 0; q < queries.rows(); ++q) {
      Eigen::VectorXd s(static_cast<Index>(held.size()));
      for (std::size_t j = 0; j < held.size(); ++j) {
        s(static_cast<Index>(j)) = queries.row(q).cast<double>().dot(keys.row(held[j]).cast<double>());
      }
      const Eigen::VectorXd w = ((s.array() - s.maxCoeff()).exp() / (s.array() - s.maxCoeff()).exp().sum()).matrix();
      for (std::size_t j = 0; j < held.size(); ++j) {
        score[j] += w(static_cast<Index>(j));
        output.row(q) += w(static_cast<Index>(j)) * values.row(held[j]).cast<double>();
      }
    }
    while (static_cast<Index>(held.size()) > budget.tokens()) {
      const std::size_t older = held.size() - static_cast<std::size_t>(budget.recent);
      std::size_t victim = 0;
      for (std::size_t j = 1; j < older; ++j) {
        if (score[j] <= score[victim]) victim = j;  // the newer of equal scores goes
      }
      held.erase(held.begin() + static_cast<long>(victim));
      score.erase(score.begin() + static_cast<long>(victim));
    }
    return output;
  }
};

TEST(HeavyHitterCache, FollowsTheStepByStepH2oSimulationOnFullRowsAndLatents) {
  const Index d = 16, n = 160, group = 2;
  const RowMatrix<float> keys = rows_of(n, d, 21), values = rows_of(n, d, 22);
  const RowMatrix<float> queries = rows_of(n * group, d, 23) * 0.5f;
  for (const HeavyHitterBudget budget : {HeavyHitterBudget{10, 6}, HeavyHitterBudget{0, 4}, HeavyHitterBudget{200, 1}}) {
    SCOPED_TRACE("heavy " + std::to_string(budget.heavy) + ", recent " + std::to_string(budget.recent));
    HeavyHitterCache cache(kqsvd::HeadCache(d, d), budget);
    H2oReference reference;
    for (Index t = 0; t < n; ++t) {
      cache.append(keys.row(t), values.row(t));
      const RowMatrix<float> step_queries = queries.middleRows(t * group, group);
      const VisibleRows all = VisibleRows::all(group, cache.rows().size());
      const RowMatrix<float> out = kqsvd::partial_attention(step_queries, all, cache.rows()).result();
      cache.observe(kqsvd::attention_weights(step_queries, all, cache.rows()));
      cache.evict();
      const MatrixXd expected = reference.step(keys, values, step_queries, t, budget);
      ASSERT_LT((out.cast<double>() - expected).cwiseAbs().maxCoeff(), 1e-5) << "step " << t;
      ASSERT_EQ(cache.positions(), reference.held) << "step " << t;
      EXPECT_EQ(cache.bytes(), static_cast<std::size_t>(cache.rows().size() * (cache.rows().bytes_per_token() + 4)));
    }
    EXPECT_EQ(cache.rows().size(), std::min(n, budget.tokens()));
    EXPECT_EQ(cache.tokens_seen(), n);
  }
  // On latents, the held latents are those of the held positions, compressed once at append.
  kqsvd::GramAccumulator key_gram(d), query_gram(d);
  key_gram.add(keys);
  query_gram.add(queries);
  const auto projection = kqsvd::fit_projection<float>(kqsvd::Method::kq_svd, key_gram, query_gram, kqsvd::RankSelection::fixed(6));
  HeavyHitterCache latent(kqsvd::HeadCache(projection, projection), HeavyHitterBudget{8, 4});
  for (Index t = 0; t < 60; ++t) {
    latent.append(projection, projection, keys.row(t), values.row(t));
    const RowMatrix<float> mapped = queries.middleRows(t * group, group) * projection.decoder();
    latent.observe(kqsvd::attention_weights(mapped, VisibleRows::all(group, latent.rows().size()), latent.rows()));
    latent.evict();
  }
  ASSERT_EQ(latent.rows().size(), 12);
  const RowMatrix<float> all_latents = projection.compress(keys.topRows(60));
  for (std::size_t i = 0; i < latent.positions().size(); ++i) {
    EXPECT_LT((latent.rows().keys().row(static_cast<Index>(i)) - all_latents.row(latent.positions()[i])).cwiseAbs().maxCoeff(), 1e-5);
  }
}

TEST(HeavyHitterCache, BudgetsAreValidatedByName) {
  expect_invalid([] { HeavyHitterCache(kqsvd::HeadCache(8, 8), HeavyHitterBudget{4, 0}); }, "budget.recent");
  expect_invalid([] { HeavyHitterCache(kqsvd::HeadCache(8, 8), HeavyHitterBudget{-1, 4}); }, "budget.heavy");
  expect_invalid([] { HeavyHitterBudget::fraction(0.0, 256); }, "ratio");
  expect_invalid([] { HeavyHitterBudget::fraction(1.5, 256); }, "ratio");
  expect_invalid([] { HeavyHitterBudget::fraction(0.2, 1); }, "context");
  expect_invalid([] { HeavyHitterBudget{200, 100}.validate("test", 256); }, "more than the context of 256");
  const HeavyHitterBudget h2o = HeavyHitterBudget::fraction(0.2, 1000);
  EXPECT_EQ(h2o.heavy, 100);
  EXPECT_EQ(h2o.recent, 100);
  HeavyHitterCache cache(kqsvd::HeadCache(8, 8), HeavyHitterBudget{2, 2});
  cache.append(rows_of(3, 8, 1), rows_of(3, 8, 2));
  expect_invalid([&] { cache.observe(RowMatrix<float>::Ones(1, 2)); }, "weights");
  expect_invalid([&] { cache.observe(-RowMatrix<float>::Ones(1, 3)); }, "must be >= 0");
}

}  // namespace kqsvd_test_heavy_hitter
