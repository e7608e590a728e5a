// kqsvd/cache/heavy_hitter_cache.hpp -- H2O heavy-hitter eviction (Zhang et al., NeurIPS 2023) on a
// HeadCache of full rows or of latents: a fixed budget of tokens per head, the most recent ones and the
// "heavy hitters" that have received the most attention so far.
//
// Every held token carries the attention it has accumulated: the sum, over the queries that attended
// since it arrived (a step's query heads of a KV group all count), of its softmax weight. When the cache
// holds more than heavy + recent tokens, it keeps the last `recent` tokens and, among the older ones,
// the `heavy` with the largest accumulated attention (ties: the older token), and evicts the rest from
// the cache itself. Evicting after every decode step, as H2O does, removes one token at a time. On a
// latent HeadCache the evicted tokens' latents leave with them: H2O composes with low rank.
//
//   kqsvd::HeavyHitterCache cache(kqsvd::HeadCache(d, d, kqsvd::StorageFormat::parse("f16")),
//                                 kqsvd::HeavyHitterBudget::fraction(0.2, context));   // H2O's 10 % + 10 %
//   cache.append(k_new, v_new);                                 // 1 x d rows (or append(A, A_v, k, v))
//   const auto all = kqsvd::VisibleRows::all(1, cache.rows().size());
//   auto out = kqsvd::partial_attention(q / std::sqrt(d), all, cache.rows()).result();  // kernels/
//   cache.observe(kqsvd::attention_weights(q / std::sqrt(d), all, cache.rows()));       // kernels/
//   cache.evict();                                              // back to heavy + recent tokens
//   cache.positions();                                          // which tokens are still held
//
// Bytes: the rows' bytes plus one float of accumulated attention per held token.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "kqsvd/cache/head_cache.hpp"
#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/error.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/solvers/low_rank_projection.hpp"

namespace kqsvd {

// Tokens an H2O cache keeps per head: `heavy` heavy hitters plus the `recent` most recent tokens.
struct HeavyHitterBudget {
  using Index = Eigen::Index;
  Index heavy = 0;
  Index recent = 0;

  Index tokens() const { return heavy + recent; }

  // The H2O paper's defaults for a cache of `ratio` of a `context`-token sequence: half heavy hitters,
  // half recent tokens (its 20 % budget: 10 % + 10 %), each at least one token.
  static HeavyHitterBudget fraction(double ratio, Index context) {
    constexpr const char* where = "kqsvd::HeavyHitterBudget::fraction";
    if (!(ratio > 0.0 && ratio <= 1.0)) {
      detail::throw_invalid(where, "ratio", "must be in (0, 1], got " + std::to_string(ratio));
    }
    if (context < 2) detail::throw_invalid(where, "context", "must be at least 2 tokens, got " + std::to_string(context));
    const auto half = std::max<Index>(1, static_cast<Index>(std::llround(0.5 * ratio * static_cast<double>(context))));
    return HeavyHitterBudget{half, half};
  }

  // Throws InvalidArgument naming `function` unless heavy >= 0, recent >= 1 (the token being decoded
  // must stay) and, when `context` > 0, heavy + recent <= context.
  void validate(const char* function, Index context = 0) const {
    if (heavy < 0) detail::throw_invalid(function, "budget.heavy", "must be >= 0, got " + std::to_string(heavy));
    if (recent < 1) {
      detail::throw_invalid(function, "budget.recent",
                            "must be >= 1 (the newest token always stays), got " + std::to_string(recent));
    }
    if (context > 0 && tokens() > context) {
      detail::throw_invalid(function, "budget",
                            "keeps " + std::to_string(heavy) + " heavy + " + std::to_string(recent) + " recent = " +
                                std::to_string(tokens()) + " tokens, more than the context of " +
                                std::to_string(context) + " (nothing would ever be evicted)");
    }
  }
};

class HeavyHitterCache {
 public:
  using Index = Eigen::Index;

  // `rows`: an empty HeadCache of full rows or of latents, in any format.
  HeavyHitterCache(HeadCache rows, HeavyHitterBudget budget) : rows_(std::move(rows)), budget_(budget) {
    budget_.validate("kqsvd::HeavyHitterCache");
    if (!rows_.empty()) {
      detail::throw_invalid("kqsvd::HeavyHitterCache", "rows", "must be empty, holds " + std::to_string(rows_.size()) + " tokens");
    }
  }

  const HeadCache& rows() const { return rows_; }
  const HeavyHitterBudget& budget() const { return budget_; }
  // The sequence position of every held token (0 = the first appended), increasing.
  const std::vector<Index>& positions() const { return positions_; }
  // The attention each held token has accumulated.
  const Eigen::VectorXf& accumulated() const { return accumulated_; }
  // Tokens appended so far, evicted ones included.
  Index tokens_seen() const { return tokens_seen_; }

  std::size_t bytes() const { return rows_.bytes() + static_cast<std::size_t>(rows_.size()) * sizeof(float); }

  // Appends full rows (or latents already compressed), as HeadCache::append does.
  template <typename DerivedK, typename DerivedV>
  void append(const Eigen::MatrixBase<DerivedK>& keys, const Eigen::MatrixBase<DerivedV>& values) {
    rows_.append(keys, values);
    appended(keys.rows());
  }

  // Compresses and appends, as HeadCache::append(key_projection, value_projection, keys, values) does.
  template <typename DerivedK, typename DerivedV>
  void append(const LowRankProjection<float>& key_projection, const LowRankProjection<float>& value_projection,
              const Eigen::MatrixBase<DerivedK>& keys, const Eigen::MatrixBase<DerivedV>& values) {
    rows_.append(key_projection, value_projection, keys, values);
    appended(keys.rows());
  }

  // Adds attention weights to the held tokens: m x rows().size(), one row per query (each a softmax
  // over the rows it saw; kqsvd::attention_weights gives them).
  void observe(const Eigen::Ref<const RowMatrix<float>>& weights) {
    constexpr const char* where = "kqsvd::HeavyHitterCache::observe";
    detail::require_columns(where, "weights", weights.cols(), rows_.size(), "the tokens held");
    detail::require_finite(where, "weights", weights);
    if ((weights.array() < 0.0f).any()) detail::throw_invalid(where, "weights", "must be >= 0 (softmax weights)");
    accumulated_ += weights.colwise().sum().transpose();
  }

  // Evicts down to the budget: keeps the last `recent` tokens and the `heavy` older ones with the most
  // accumulated attention. Returns the number of tokens evicted.
  Index evict() {
    const Index held = rows_.size();
    if (held <= budget_.tokens()) return 0;
    const Index older = held - budget_.recent;
    std::vector<Index> order(static_cast<std::size_t>(older));
    std::iota(order.begin(), order.end(), Index(0));
    // The heavy hitters among the older tokens: largest accumulated attention first, the older on ties.
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return accumulated_(a) > accumulated_(b); });
    std::vector<Index> kept(order.begin(), order.begin() + budget_.heavy);
    std::sort(kept.begin(), kept.end());
    for (Index i = older; i < held; ++i) kept.push_back(i);
    rows_.retain(kept);
    Eigen::VectorXf accumulated(static_cast<Index>(kept.size()));
    std::vector<Index> positions(kept.size());
    for (std::size_t i = 0; i < kept.size(); ++i) {
      accumulated(static_cast<Index>(i)) = accumulated_(kept[i]);
      positions[i] = positions_[static_cast<std::size_t>(kept[i])];
    }
    accumulated_ = std::move(accumulated);
    positions_ = std::move(positions);
    return held - static_cast<Index>(kept.size());
  }

  // Forgets every token (a new sequence); keeps the budget and the row storage.
  void clear() {
    rows_.clear();
    positions_.clear();
    accumulated_.resize(0);
    tokens_seen_ = 0;
  }

 private:
  void appended(Index count) {
    const Index held = static_cast<Index>(positions_.size());
    for (Index i = 0; i < count; ++i) positions_.push_back(tokens_seen_ + i);
    accumulated_.conservativeResize(held + count);
    accumulated_.tail(count).setZero();
    tokens_seen_ += count;
  }

  HeadCache rows_;
  HeavyHitterBudget budget_;
  std::vector<Index> positions_;
  Eigen::VectorXf accumulated_;
  Index tokens_seen_ = 0;
};

}  // namespace kqsvd
