// kqsvd/llama/online_svd_kv_cache.hpp -- the calibration-free low-rank baseline: each sequence's own SVD
// (as xKV, ShadowKV and the seed project's KVCacheSVD do). At the first block a layer receives -- the
// prompt's prefill -- every KV head takes the rank-r principal directions of that block's keys, and of
// its values, as its basis (kqsvd::fit_k_svd of the block's Gram: the right singular vectors of K);
// every token, the prompt's and all later ones, is stored as its coordinates on the basis. Later tokens
// are projected on the prompt's basis, never refitted. The keys are those of `mode`:
//   RopeMode::pre_rope   (default, as ShadowKV) un-rotated keys; attention reconstructs (k V_r) V_r^T,
//                        rotates it by its position and scores it with the rotated query -- the basis
//                        of un-rotated keys carries over to later positions;
//   RopeMode::post_rope  rotated keys, scored (q V_r)(k V_r)^T -- cheaper, but the prompt's rotated keys
//                        span later positions' keys poorly.
//
// bytes() counts the latents and the bases: 2 x head_dim x r floats per KV head and layer (keys and
// values), held for as long as the sequence is -- the price of not calibrating.
//
//   kqsvd::llama::OnlineSvdKvCache cache(model.shape(), model.rotary_embedding(), /*key_rank=*/16,
//                                        /*value_rank=*/16, kqsvd::StorageFormat::parse("f16"),
//                                        kqsvd::RopeMode::pre_rope);
//   model.forward(prompt, cache);        // fits the bases on the prompt, then stores its latents
//   model.forward({token}, cache);       // projected on the prompt's basis
#pragma once

#include <Eigen/Core>

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "kqsvd/cache/head_cache.hpp"
#include "kqsvd/calibration/gram_accumulator.hpp"
#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/core/rope.hpp"
#include "kqsvd/core/storage_format.hpp"
#include "kqsvd/kernels/decode_attention.hpp"
#include "kqsvd/kernels/partial_attention.hpp"
#include "kqsvd/llama/kv_cache.hpp"
#include "kqsvd/solvers/key_svd.hpp"
#include "kqsvd/solvers/low_rank_projection.hpp"
#include "kqsvd/solvers/rank_selection.hpp"

namespace kqsvd::llama {

class OnlineSvdKvCache : public KvCache {
 public:
  OnlineSvdKvCache(const ModelShape& shape, const RotaryEmbedding& rope, Index key_rank, Index value_rank,
                   StorageFormat format = StorageFormat(), RopeMode mode = RopeMode::pre_rope)
      : KvCache(shape, rope), key_rank_(key_rank), value_rank_(value_rank), format_(std::move(format)), mode_(mode) {
    constexpr const char* where = "kqsvd::llama::OnlineSvdKvCache";
    for (const auto& [argument, rank] : {std::pair<const char*, Index>{"key_rank", key_rank}, {"value_rank", value_rank}}) {
      if (rank < 1 || rank > shape.head_dim) {
        detail::throw_invalid(where, argument,
                              "must be in [1, head_dim = " + std::to_string(shape.head_dim) + "], got " + std::to_string(rank));
      }
      format_.require_width(where, argument, rank);
    }
    layers_.resize(static_cast<std::size_t>(shape.layers));
  }

  Index key_rank() const { return key_rank_; }
  Index value_rank() const { return value_rank_; }
  const StorageFormat& format() const { return format_; }
  RopeMode rope_mode() const { return mode_; }

  // Whether `layer` has fitted its bases (it has received its first block).
  bool fitted(Index layer) const { return !layers_[checked_layer("kqsvd::llama::OnlineSvdKvCache::fitted", layer)].heads.empty(); }

  std::size_t bytes() const override {
    std::size_t total = 0;
    for (const Layer& layer : layers_) {
      for (const HeadCache& head : layer.heads) total += head.bytes();
      total += layer.heads.size() * static_cast<std::size_t>(shape().head_dim * (key_rank_ + value_rank_)) * sizeof(float);
    }
    return total;
  }

 protected:
  void do_append(Index layer, const Eigen::Ref<const RowMatrix<float>>& keys, const Eigen::Ref<const RowMatrix<float>>& values,
                 Index first_position) override {
    Layer& state = layers_[static_cast<std::size_t>(layer)];
    const Index d = shape().head_dim;
    RowMatrix<float> cached = keys;  // the keys the basis is of: rotated post-RoPE, as they are pre-RoPE
    if (mode_ == RopeMode::post_rope) {
      for (Index h = 0; h < shape().kv_heads; ++h) rotary_embedding().rotate(cached.middleCols(h * d, d), first_position);
    }
    if (state.heads.empty()) {
      for (Index h = 0; h < shape().kv_heads; ++h) {
        state.keys.push_back(basis(cached.middleCols(h * d, d), key_rank_));
        state.values.push_back(basis(values.middleCols(h * d, d), value_rank_));
        state.heads.emplace_back(state.keys.back(), state.values.back(), format_);
      }
    }
    for (Index h = 0; h < shape().kv_heads; ++h) {
      const auto slot = static_cast<std::size_t>(h);
      state.heads[slot].append(state.keys[slot], state.values[slot], cached.middleCols(h * d, d), values.middleCols(h * d, d));
    }
  }

  RowMatrix<float> do_attend(Index layer, const Eigen::Ref<const RowMatrix<float>>& queries, Index first_position) override {
    const Layer& state = layers_[static_cast<std::size_t>(layer)];
    const float scale = detail::score_scale(shape().head_dim);
    const VisibleRows visible = detail::group_rows(shape().group_size(), VisibleRows::causal(queries.rows(), first_position));
    RowMatrix<float> output(queries.rows(), shape().query_width());
    for (Index h = 0; h < shape().kv_heads; ++h) {
      const auto slot = static_cast<std::size_t>(h);
      const RowMatrix<float> stacked = detail::group_queries(shape(), queries, h, scale);
      const PartialAttention attention =
          mode_ == RopeMode::post_rope
              ? partial_attention(stacked * state.keys[slot].decoder(), visible, state.heads[slot])
              : partial_attention(stacked, visible, state.heads[slot], state.keys[slot], rotary_embedding(), 0);
      detail::scatter_group(shape(), attention.decompressed(state.values[slot]).result(), h, output);
    }
    return output;
  }

  void do_reset() override {
    for (Layer& layer : layers_) layer = Layer();  // a new sequence fits new bases
  }

 private:
  struct Layer {
    std::vector<LowRankProjection<float>> keys, values;  // per KV head: the prompt's bases
    std::vector<HeadCache> heads;
  };

  // The rank-r principal directions of the rows (their Gram's top eigenvectors).
  static LowRankProjection<float> basis(const Eigen::Ref<const RowMatrix<float>>& rows, Index rank) {
    GramAccumulator gram(rows.cols());
    gram.add(rows);
    return fit_k_svd<float>(gram.gram(), RankSelection::fixed(rank));
  }

  Index key_rank_, value_rank_;
  StorageFormat format_;
  RopeMode mode_;
  std::vector<Layer> layers_;
};

}  // namespace kqsvd::llama
