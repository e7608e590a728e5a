// Spending a memory budget over heads (solvers/budget_allocation.hpp). The loss-aware allocator is checked
// against exhaustive search over every rank combination of small models, its objective against direct SVDs
// of Q K^T, and the authors' per-layer rule against ranks counted here from the spectra.
#include <gtest/gtest.h>

#include <kqsvd/kqsvd.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "test_support.hpp"

namespace kqsvd_test_budget_allocation {

using Eigen::Index;
using Eigen::MatrixXd;
using Eigen::VectorXd;
using kqsvd::BudgetSharing;
using kqsvd::LossAwareOptions;
using kqsvd::LossWeights;
using kqsvd::MemoryBudget;
using kqsvd::Method;
using kqsvd::ModelShape;
using kqsvd::StorageFormat;
using Projection = kqsvd::LowRankProjection<double>;
using Projections = kqsvd::ModelProjections<double>;

// Projections with chosen spectra (identity encoders: the allocator reads only the spectra).
Projections with_spectra(const ModelShape& shape, const std::vector<VectorXd>& keys, const std::vector<VectorXd>& values) {
  std::vector<Projection> k, v;
  const MatrixXd identity = MatrixXd::Identity(shape.head_dim, shape.head_dim);
  for (std::size_t i = 0; i < keys.size(); ++i) {
    k.emplace_back(Method::kq_svd, identity, identity, keys[i]);
    v.emplace_back(Method::kq_svd, identity, identity, values[i]);
  }
  return Projections(shape, std::move(k), std::move(v));
}

// Descending, non-negative, with ties and an all-zero head among them.
std::vector<VectorXd> random_spectra(std::size_t count, Index d, unsigned seed) {
  std::mt19937 engine(seed);
  std::exponential_distribution<double> exponential(1.0);
  std::vector<VectorXd> spectra;
  for (std::size_t i = 0; i < count; ++i) {
    VectorXd s(d);
    for (Index j = 0; j < d; ++j) s(j) = exponential(engine) * (i % 3 == 0 ? 10.0 : 1.0);
    std::sort(s.data(), s.data() + d, std::greater<double>());
    if (i == 1) s(2) = s(1);    // a tie inside a head
    if (i == 5) s.setZero();    // nothing to keep
    spectra.push_back(s);
  }
  return spectra;
}

// The objective counted here: per layer and kind, sum_h w_h * (tail energy at r_h) / (sum_h total energy).
double objective(const ModelShape& shape, const std::vector<VectorXd>& keys, const std::vector<VectorXd>& values,
                 const std::vector<double>& key_weights, const std::vector<double>& value_weights,
                 const std::vector<Index>& key_ranks, const std::vector<Index>& value_ranks) {
  double sum = 0.0;
  for (Index l = 0; l < shape.layers; ++l) {
    for (int kind = 0; kind < 2; ++kind) {
      const auto& spectra = kind == 0 ? keys : values;
      const auto& weights = kind == 0 ? key_weights : value_weights;
      const auto& ranks = kind == 0 ? key_ranks : value_ranks;
      double total = 0.0, tail = 0.0;
      for (Index h = 0; h < shape.kv_heads; ++h) {
        const auto i = static_cast<std::size_t>(l * shape.kv_heads + h);
        for (Index j = 0; j < shape.head_dim; ++j) {
          const double energy = spectra[i](j) * spectra[i](j);
          total += energy;
          if (j >= ranks[i]) tail += weights[i] * energy;
        }
      }
      if (total > 0.0) sum += tail / total;
    }
  }
  return sum;
}

// Every combination of ranks in {step, 2 step, ..., d} for the heads of `kinds` (keys, values or both),
// those of the other kind fixed; the least objective whose bytes fit.
double exhaustive_best(const ModelShape& shape, const std::vector<VectorXd>& keys, const std::vector<VectorXd>& values,
                       const std::vector<double>& kw, const std::vector<double>& vw, const StorageFormat& format,
                       std::int64_t budget, bool search_keys, bool search_values, std::vector<Index> key_ranks,
                       std::vector<Index> value_ranks) {
  const Index step = format.width_multiple();
  const Index options = shape.head_dim / step;
  std::vector<Index*> free;
  for (auto& r : key_ranks) if (search_keys) free.push_back(&r);
  for (auto& r : value_ranks) if (search_values) free.push_back(&r);
  std::int64_t combinations = 1;
  for (std::size_t i = 0; i < free.size(); ++i) combinations *= options;
  double best = std::numeric_limits<double>::infinity();
  for (std::int64_t c = 0; c < combinations; ++c) {
    std::int64_t rest = c, bytes = 0;
    for (Index* r : free) {
      *r = step * (1 + rest % options);
      rest /= options;
      bytes += format.bytes_per_row(*r);
    }
    if (bytes > budget) continue;
    best = std::min(best, objective(shape, keys, values, kw, vw, key_ranks, value_ranks));
  }
  return best;
}

TEST(LossAwareAllocation, MatchesExhaustiveSearchForEveryBudget) {
  const ModelShape shape{/*layers=*/2, /*query_heads=*/2, /*kv_heads=*/2, /*head_dim=*/4};
  const std::vector<VectorXd> keys = random_spectra(4, 4, 11), values = random_spectra(4, 4, 12);
  const Projections projections = with_spectra(shape, keys, values);
  std::vector<double> kw = {1.0, 0.5, 3.0, 2.0}, vw = {0.0, 1.5, 0.25, 4.0};
  LossWeights weights(shape);
  for (Index l = 0; l < 2; ++l) {
    for (Index h = 0; h < 2; ++h) {
      weights.set_key(l, h, kw[static_cast<std::size_t>(l * 2 + h)]);
      weights.set_value(l, h, vw[static_cast<std::size_t>(l * 2 + h)]);
    }
  }
  const StorageFormat f32;
  // 8 projections at rank 1..4, 4 bytes per dimension: 32 to 128 bytes per token.
  for (std::int64_t budget = 32; budget <= 130; budget += 3) {
    const auto result = kqsvd::loss_aware_allocation(projections, weights, MemoryBudget::bytes_per_token(budget));
    std::vector<Index> kr, vr;
    for (Index l = 0; l < 2; ++l) {
      for (Index h = 0; h < 2; ++h) {
        kr.push_back(result.ranks.key(l, h));
        vr.push_back(result.ranks.value(l, h));
      }
    }
    const double best = exhaustive_best(shape, keys, values, kw, vw, f32, budget, true, true, kr, vr);
    const double got = objective(shape, keys, values, kw, vw, kr, vr);
    EXPECT_NEAR(got, best, 1e-12) << "budget " << budget;
    EXPECT_NEAR(result.predicted_loss, got, 1e-12);
    EXPECT_EQ(result.bytes_per_token, kqsvd::latent_cache_footprint(result.ranks, f32).bytes_per_token);
    EXPECT_LE(result.bytes_per_token, budget);
    // Short of the budget by less than one rank's bytes, unless every projection is at full rank.
    if (result.ranks.latent_elements() < 32) {
      EXPECT_LT(budget - result.bytes_per_token, 4) << "budget " << budget;
    }
  }
}

TEST(LossAwareAllocation, SeparateBudgetsSolveKeysAndValuesEachOnHalf) {
  const ModelShape shape{2, 2, 2, 4};
  const std::vector<VectorXd> keys = random_spectra(4, 4, 21), values = random_spectra(4, 4, 22);
  const Projections projections = with_spectra(shape, keys, values);
  const std::vector<double> ones(4, 1.0);
  LossAwareOptions options;
  options.sharing = BudgetSharing::separate;
  for (std::int64_t budget = 32; budget <= 128; budget += 8) {
    const auto result = kqsvd::loss_aware_allocation(projections, LossWeights(shape), MemoryBudget::bytes_per_token(budget), options);
    std::vector<Index> kr, vr;
    for (Index l = 0; l < 2; ++l) {
      for (Index h = 0; h < 2; ++h) {
        kr.push_back(result.ranks.key(l, h));
        vr.push_back(result.ranks.value(l, h));
      }
    }
    Index key_elements = 0, value_elements = 0;
    for (std::size_t i = 0; i < 4; ++i) {
      key_elements += kr[i];
      value_elements += vr[i];
    }
    EXPECT_LE(4 * key_elements, budget / 2);
    EXPECT_LE(4 * value_elements, budget / 2);
    // Keys searched with the values as chosen and vice versa: each half is optimal on its own.
    const double got = objective(shape, keys, values, ones, ones, kr, vr);
    const StorageFormat f32;
    EXPECT_NEAR(got, exhaustive_best(shape, keys, values, ones, ones, f32, budget / 2, true, false, kr, vr), 1e-12);
    EXPECT_NEAR(got, exhaustive_best(shape, keys, values, ones, ones, f32, budget / 2, false, true, kr, vr), 1e-12);
    // A joint budget is never worse.
    const auto joint = kqsvd::loss_aware_allocation(projections, LossWeights(shape), MemoryBudget::bytes_per_token(budget));
    EXPECT_LE(joint.predicted_loss, result.predicted_loss + 1e-12);
  }
}

TEST(LossAwareAllocation, BlockFormatsGrowInWholeBlocksAndCountTheirScales) {
  const ModelShape shape{2, 2, 2, 8};
  const std::vector<VectorXd> keys = random_spectra(4, 8, 31), values = random_spectra(4, 8, 32);
  const Projections projections = with_spectra(shape, keys, values);
  const std::vector<double> kw = {2.0, 1.0, 0.5, 1.0}, vw = {1.0, 3.0, 1.0, 0.1};
  LossWeights weights(shape);
  for (std::size_t i = 0; i < 4; ++i) {
    weights.set_key(static_cast<Index>(i / 2), static_cast<Index>(i % 2), kw[i]);
    weights.set_value(static_cast<Index>(i / 2), static_cast<Index>(i % 2), vw[i]);
  }
  for (const char* name : {"int4/4", "int8"}) {
    const StorageFormat format = StorageFormat::parse(name);
    LossAwareOptions options;
    options.format = format;
    if (format.width_multiple() == 1) options.min_rank = 4;  // keeps the exhaustive search small
    for (const double fraction : {0.6, 0.7, 0.75, 0.9, 1.0}) {
      const MemoryBudget budget = MemoryBudget::fraction_of_full_cache(fraction);
      const std::int64_t bytes = budget.bytes_for(shape, format);
      EXPECT_EQ(bytes, static_cast<std::int64_t>(std::floor(fraction * 8 * format.bytes_per_row(8))));
      const auto result = kqsvd::loss_aware_allocation(projections, weights, budget, options);
      std::vector<Index> kr, vr;
      for (std::size_t i = 0; i < 4; ++i) {
        kr.push_back(result.ranks.key(static_cast<Index>(i / 2), static_cast<Index>(i % 2)));
        vr.push_back(result.ranks.value(static_cast<Index>(i / 2), static_cast<Index>(i % 2)));
        EXPECT_EQ(kr.back() % format.width_multiple(), 0);
      }
      EXPECT_EQ(result.bytes_per_token, kqsvd::latent_cache_footprint(result.ranks, format).bytes_per_token);
      EXPECT_LE(result.bytes_per_token, bytes);
      if (format.width_multiple() > 1) {
        // Ranks 4 or 8 only: the exhaustive search over them is the whole problem.
        const double best = exhaustive_best(shape, keys, values, kw, vw, format, bytes, true, true, kr, vr);
        EXPECT_NEAR(objective(shape, keys, values, kw, vw, kr, vr), best, 1e-12) << name << " " << fraction;
      } else {
        // int8: one byte per dimension plus a 2-byte scale per row, every rank from 4 to 8: steps of one
        // byte fill the budget exactly unless every projection is at full rank.
        if (result.ranks.latent_elements() < 64) {
          EXPECT_EQ(result.bytes_per_token, bytes) << fraction;
        }
        EXPECT_GE(result.ranks.latent_elements(), 32);
      }
    }
  }
}

// With unit key weights and zero value weights, the predicted loss is the squared relative error of
// Q K^T summed over the layer's heads -- from direct SVDs of each head's n x n score matrix.
TEST(LossAwareAllocation, ObjectiveIsTheScoreErrorOfQueriesTimesKeys) {
  const ModelShape shape{1, 2, 2, 8};
  kqsvd::ModelCalibration calibration(shape);
  const MatrixXd q = kqsvd::test::gaussian(40, 16, 3), k = kqsvd::test::gaussian(40, 16, 4) * kqsvd::test::gaussian(16, 16, 5);
  const MatrixXd v = kqsvd::test::gaussian(40, 16, 6);
  calibration.add(0, q, k, v);
  const auto full = Projections::fit(calibration, std::vector<MatrixXd>{kqsvd::test::gaussian(16, 16, 7)}, Method::kq_svd, kqsvd::RankSelection::fixed(8),
                                     kqsvd::RankSelection::fixed(8));
  LossWeights weights(shape);
  weights.set_layer(0, 1.0, 0.0);
  const auto ranks = kqsvd::RankAllocation::uniform(shape, 3, 8);
  double tail = 0.0, total = 0.0;
  for (Index h = 0; h < 2; ++h) {
    const MatrixXd scores = q.middleCols(h * 8, 8) * k.middleCols(h * 8, 8).transpose();
    const VectorXd s = kqsvd::test::direct_singular_values(scores);
    total += s.squaredNorm();
    tail += s.tail(s.size() - 3).squaredNorm();
  }
  EXPECT_NEAR(kqsvd::predicted_loss(full, weights, ranks), tail / total, 1e-9);
}

TEST(LossAwareAllocation, RejectsBudgetsAndWeightsItCannotUse) {
  const ModelShape shape{2, 2, 2, 4};
  const Projections projections = with_spectra(shape, random_spectra(4, 4, 41), random_spectra(4, 4, 42));
  EXPECT_THROW(MemoryBudget::fraction_of_full_cache(0.0), kqsvd::InvalidArgument);
  EXPECT_THROW(MemoryBudget::fraction_of_full_cache(1.5), kqsvd::InvalidArgument);
  EXPECT_THROW(MemoryBudget::fraction_of_full_cache(std::nan("")), kqsvd::InvalidArgument);
  EXPECT_THROW(MemoryBudget::bytes_per_token(0), kqsvd::InvalidArgument);
  EXPECT_THROW(LossWeights(shape, -1.0), kqsvd::InvalidArgument);
  LossWeights weights(shape);
  EXPECT_THROW(weights.set_key(0, 0, std::numeric_limits<double>::infinity()), kqsvd::InvalidArgument);
  EXPECT_THROW(weights.set_value(2, 0, 1.0), kqsvd::InvalidArgument);
  // 8 projections at rank 1 cost 32 bytes in f32.
  try {
    kqsvd::loss_aware_allocation(projections, weights, MemoryBudget::bytes_per_token(31));
    FAIL() << "a budget below one rank per projection was accepted";
  } catch (const kqsvd::InvalidArgument& error) {
    EXPECT_NE(std::string(error.what()).find("budget"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("32"), std::string::npos) << error.what();
  }
  EXPECT_NO_THROW(kqsvd::loss_aware_allocation(projections, weights, MemoryBudget::bytes_per_token(32)));
  EXPECT_THROW(kqsvd::loss_aware_allocation(projections, LossWeights(ModelShape{3, 2, 2, 4}), MemoryBudget::bytes_per_token(64)),
               kqsvd::InvalidArgument);
  LossAwareOptions options;
  options.format = StorageFormat::parse("q4_0");  // blocks of 32 cannot hold head_dim 4
  EXPECT_THROW(kqsvd::loss_aware_allocation(projections, weights, MemoryBudget::fraction_of_full_cache(0.5), options),
               kqsvd::InvalidArgument);
  options = LossAwareOptions{};
  options.max_rank = 5;
  EXPECT_THROW(kqsvd::loss_aware_allocation(projections, weights, MemoryBudget::bytes_per_token(64), options),
               kqsvd::InvalidArgument);
  options.max_rank = 2;
  const auto capped = kqsvd::loss_aware_allocation(projections, weights, MemoryBudget::bytes_per_token(1000), options);
  EXPECT_EQ(capped.ranks, kqsvd::RankAllocation::uniform(shape, 2, 2));
}

TEST(UniformAllocation, TakesTheLargestRankThatFits) {
  const ModelShape shape{2, 4, 2, 64};  // 8 rows per token
  // f32: 8 x 64 x 4 = 2048 bytes full; a quarter is 512 bytes = rank 16.
  EXPECT_EQ(kqsvd::uniform_allocation(shape, MemoryBudget::fraction_of_full_cache(0.25)), kqsvd::RankAllocation::uniform(shape, 16, 16));
  EXPECT_EQ(kqsvd::uniform_allocation(shape, MemoryBudget::bytes_per_token(511)), kqsvd::RankAllocation::uniform(shape, 15, 15));
  // int4 in blocks of 32: a row of 64 costs 32 + 2 x 4 = 40 bytes, of 32: 20; half of 320 bytes holds 32.
  const StorageFormat int4 = StorageFormat::parse("int4");
  EXPECT_EQ(kqsvd::uniform_allocation(shape, MemoryBudget::fraction_of_full_cache(0.5), int4), kqsvd::RankAllocation::uniform(shape, 32, 32));
  EXPECT_EQ(kqsvd::uniform_allocation(shape, MemoryBudget::fraction_of_full_cache(0.9), int4), kqsvd::RankAllocation::uniform(shape, 32, 32));
  EXPECT_THROW(kqsvd::uniform_allocation(shape, MemoryBudget::fraction_of_full_cache(0.4), int4), kqsvd::InvalidArgument);
  EXPECT_THROW(kqsvd::uniform_allocation(shape, MemoryBudget::bytes_per_token(31)), kqsvd::InvalidArgument);
}

TEST(LayerErrorBudgetAllocation, OneRankPerLayerAndKindFromTheMeanError) {
  const ModelShape shape{3, 4, 2, 8};
  std::vector<VectorXd> keys = random_spectra(6, 8, 51), values = random_spectra(6, 8, 52);
  const Projections projections = with_spectra(shape, keys, values);
  for (const double target : {0.25, 0.5, 0.75}) {
    const kqsvd::ErrorBudgetAllocation fit = kqsvd::layer_error_budget_allocation(projections, target);
    // 6 keys and 6 values of 8 dimensions, moving together in pairs: steps of 2/96 in the ratio.
    EXPECT_NEAR(fit.ranks.compression_ratio(), target, 0.05) << target;
    for (Index l = 0; l < 3; ++l) {
      for (int kind = 0; kind < 2; ++kind) {
        const auto& spectra = kind == 0 ? keys : values;
        Index expected = 8;
        for (Index r = 1; r < 8; ++r) {
          double mean = 0.0;
          for (Index h = 0; h < 2; ++h) {
            const VectorXd& s = spectra[static_cast<std::size_t>(l * 2 + h)];
            const double all = s.squaredNorm();
            mean += all == 0.0 ? 0.0 : std::sqrt(s.tail(8 - r).squaredNorm() / all);
          }
          if (mean / 2 <= fit.epsilon) {
            expected = r;
            break;
          }
        }
        for (Index h = 0; h < 2; ++h) {
          EXPECT_EQ(kind == 0 ? fit.ranks.key(l, h) : fit.ranks.value(l, h), expected) << l << " " << kind;
        }
      }
    }
  }
  EXPECT_THROW(kqsvd::layer_error_budget_allocation(projections, 0.0), kqsvd::InvalidArgument);
}

}  // namespace kqsvd_test_budget_allocation
