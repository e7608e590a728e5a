// kqsvd/llama/heavy_hitter_kv_cache.hpp -- H2O heavy-hitter eviction for the reference model, alone or on
// a low-rank latent cache: per layer and KV head a kqsvd::HeavyHitterCache (cache/heavy_hitter_cache.hpp)
// that keeps `heavy` heavy hitters and the `recent` newest tokens, evicting the rest after every step.
//
// Eviction makes attention depend on the order of steps, so this cache runs every query as its own
// decode step, in position order: a block of T tokens appended at once (a prefill) is attended one
// position at a time -- token t enters the cache, the KV group's queries at t attend, their softmax
// weights are added to the held tokens' scores, the cache evicts down to its budget -- which is exactly
// what token-by-token decoding does. The block's rows wait, rotated and uncompressed, until their
// step: working memory of the block, not counted by bytes(), like CompressedKvCache's.
//
// With projections (post-RoPE only: evicted positions leave gaps, so pre-RoPE latents, reconstructed and
// rotated by a position computed from their row, are refused), the held rows are key latents k A and
// value latents v A_v, scored as (q B)(k A)^T and decompressed by B_v^T.
//
//   kqsvd::llama::HeavyHitterKvCache cache(model.shape(), model.rotary_embedding(),
//                                          kqsvd::HeavyHitterBudget::fraction(0.2, 256),
//                                          kqsvd::StorageFormat::parse("f16"));       // H2O alone
//   kqsvd::llama::HeavyHitterKvCache latent(model.shape(), model.rotary_embedding(), budget, format,
//                                           projections);                            // H2O on latents
//   auto logits = model.forward(prompt, cache);
//   cache.bytes();   // held rows (or latents) plus one float of accumulated attention per held token
#pragma once

#include <Eigen/Core>

#include <cstddef>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kqsvd/cache/head_cache.hpp"
#include "kqsvd/cache/heavy_hitter_cache.hpp"
#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/core/rope.hpp"
#include "kqsvd/core/storage_format.hpp"
#include "kqsvd/kernels/attention_weights.hpp"
#include "kqsvd/kernels/decode_attention.hpp"
#include "kqsvd/kernels/partial_attention.hpp"
#include "kqsvd/llama/kv_cache.hpp"
#include "kqsvd/solvers/model_projections.hpp"

namespace kqsvd::llama {

class HeavyHitterKvCache : public KvCache {
 public:
  using Projections = ModelProjections<float>;

  // Full rows in `format`.
  HeavyHitterKvCache(const ModelShape& shape, const RotaryEmbedding& rope, HeavyHitterBudget budget,
                     StorageFormat format = StorageFormat())
      : KvCache(shape, rope) {
    build(budget, format);
  }

  // Post-RoPE latents of `projections` (fitted on rotated queries and keys) in `format`.
  HeavyHitterKvCache(const ModelShape& shape, const RotaryEmbedding& rope, HeavyHitterBudget budget, StorageFormat format,
                     Projections projections)
      : KvCache(shape, rope) {
    if (projections.shape() != shape) {
      detail::throw_invalid("kqsvd::llama::HeavyHitterKvCache", "projections",
                            "were fitted for " + to_string(projections.shape()) + ", but the model has " +
                                to_string(shape));
    }
    projections_ = std::move(projections);
    build(budget, format);
  }

  const HeavyHitterBudget& budget() const { return layers_.front().heads.front().budget(); }
  bool low_rank() const { return projections_.has_value(); }

  // The H2O cache of one KV head of one layer.
  const HeavyHitterCache& head(Index layer, Index kv_head) const {
    constexpr const char* where = "kqsvd::llama::HeavyHitterKvCache::head";
    const std::size_t l = checked_layer(where, layer);
    shape().require_kv_head(where, kv_head);
    return layers_[l].heads[static_cast<std::size_t>(kv_head)];
  }

  std::size_t bytes() const override {
    std::size_t total = 0;
    for (const Layer& layer : layers_)
      for (const HeavyHitterCache& head : layer.heads) total += head.bytes();
    return total;
  }

 protected:
  void do_append(Index layer, const Eigen::Ref<const RowMatrix<float>>& keys, const Eigen::Ref<const RowMatrix<float>>& values,
                 Index first_position) override {
    Layer& state = layers_[static_cast<std::size_t>(layer)];
    // Rows of an earlier block nobody attended still enter the cache, in order, without attention.
    while (state.pending_next < state.pending_keys.rows()) {
      enter(layer, state);
      for (HeavyHitterCache& head : state.heads) head.evict();
    }
    const Index d = shape().head_dim;
    state.pending_keys = keys;
    for (Index h = 0; h < shape().kv_heads; ++h) rotary_embedding().rotate(state.pending_keys.middleCols(h * d, d), first_position);
    state.pending_values = values;
    state.pending_first = first_position;
    state.pending_next = 0;
  }

  RowMatrix<float> do_attend(Index layer, const Eigen::Ref<const RowMatrix<float>>& queries, Index first_position) override {
    constexpr const char* where = "kqsvd::llama::HeavyHitterKvCache::attend";
    Layer& state = layers_[static_cast<std::size_t>(layer)];
    if (first_position != state.pending_first + state.pending_next) {
      detail::throw_invalid(where, "first_position",
                            "is " + std::to_string(first_position) + ", expected " +
                                std::to_string(state.pending_first + state.pending_next) +
                                " (an H2O cache attends every position once, in order, right after its block is appended)");
    }
    const Index d = shape().head_dim;
    const float scale = detail::score_scale(d);
    RowMatrix<float> output(queries.rows(), shape().query_width());
    for (Index i = 0; i < queries.rows(); ++i) {
      enter(layer, state);
      RowMatrix<float> step(1, shape().query_width());
      for (Index h = 0; h < shape().kv_heads; ++h) {
        HeavyHitterCache& cache = state.heads[static_cast<std::size_t>(h)];
        RowMatrix<float> stacked = detail::group_queries(shape(), queries.row(i), h, scale);
        if (projections_) stacked = stacked * projections_->keys(layer, h).decoder();
        const VisibleRows all = VisibleRows::all(stacked.rows(), cache.rows().size());
        PartialAttention attention = partial_attention(stacked, all, cache.rows());
        if (projections_) attention = attention.decompressed(projections_->values(layer, h));
        detail::scatter_group(shape(), attention.result(), h, step);
        cache.observe(attention_weights(stacked, all, cache.rows()));
        cache.evict();
      }
      output.row(i) = step.row(0);
    }
    return output;
  }

  void do_reset() override {
    for (Layer& layer : layers_) {
      for (HeavyHitterCache& head : layer.heads) head.clear();
      layer.pending_keys.resize(0, 0);
      layer.pending_values.resize(0, 0);
      layer.pending_first = layer.pending_next = 0;
    }
  }

 private:
  struct Layer {
    std::vector<HeavyHitterCache> heads;  // per KV head
    // The appended block's rotated keys and values; rows before pending_next have entered the cache.
    RowMatrix<float> pending_keys, pending_values;
    Index pending_first = 0, pending_next = 0;
  };

  void build(HeavyHitterBudget budget, const StorageFormat& format) {
    budget.validate("kqsvd::llama::HeavyHitterKvCache");
    layers_.resize(static_cast<std::size_t>(shape().layers));
    for (Index l = 0; l < shape().layers; ++l) {
      for (Index h = 0; h < shape().kv_heads; ++h) {
        HeadCache rows = projections_ ? HeadCache(projections_->keys(l, h), projections_->values(l, h), format)
                                      : HeadCache(shape().head_dim, shape().head_dim, format);
        layers_[static_cast<std::size_t>(l)].heads.emplace_back(std::move(rows), budget);
      }
    }
  }

  // The next pending token enters every head's cache of `layer`.
  void enter(Index layer, Layer& state) {
    const Index d = shape().head_dim, row = state.pending_next;
    for (Index h = 0; h < shape().kv_heads; ++h) {
      HeavyHitterCache& cache = state.heads[static_cast<std::size_t>(h)];
      const auto keys = state.pending_keys.block(row, h * d, 1, d);
      const auto values = state.pending_values.block(row, h * d, 1, d);
      if (projections_) {
        cache.append(projections_->keys(layer, h), projections_->values(layer, h), keys, values);
      } else {
        cache.append(keys, values);
      }
    }
    ++state.pending_next;
  }

  std::optional<Projections> projections_;
  std::vector<Layer> layers_;
};

}  // namespace kqsvd::llama
