// kqsvd/llama/compressed_kv_cache.hpp -- a KV cache that stores low-rank latents instead of keys and
// values, optionally keeping the most recent W tokens exact.
//
// Per layer and KV head it holds a kqsvd::HeadCache of key latents k A and value latents v A_v (ranks
// may differ from head to head; any StorageFormat), with the projections of a
// kqsvd::ModelProjections<float>:
//   RopeMode::post_rope  keys are rotated, then compressed; a query scores (q B)(k A)^T / sqrt(d)
//                        directly against the latents;
//   RopeMode::pre_rope   un-rotated keys are compressed; attention reconstructs (k A) B^T, rotates it by
//                        its position and scores it with the rotated query.
// Values are always latents: the softmax-weighted sum of v A_v is decompressed once by B_v^T. The
// library's kernels (kqsvd::partial_attention) read the latents in place. `arithmetic` is how a decode
// step (up to 16 queries of a KV head's group at one position) multiplies 4- and 2-bit latent codes in
// post-RoPE mode (kernels/decode_arithmetic.hpp); prefill blocks, pre-RoPE reconstruction and the exact
// window always compute in float.
//
// Recent window W >= 0: a query at position p scores keys at positions p-W+1 .. p exactly (rotated float
// keys and float values) and older keys from their latents; the two parts are combined exactly as the
// online softmax combines tiles (PartialAttention::merge). This is decided per query, so a whole-block
// prefill gives what token-by-token decoding gives. Every token's latents are written when it is
// appended (compression happens once, at write time); the exact rows of the last W tokens are kept
// alongside.
//
// bytes() is what the cache stores: every token's latents in their format plus the float rows of the last
// min(tokens, W) tokens, per layer. While a block of T > 1 tokens is being attended, the cache also holds
// the exact rows of up to T - 1 older tokens of that block (their queries' windows need them); these are
// working memory of the block, like the forward pass's own activations, released at the next append,
// and bytes() does not count them. With token-by-token decoding nothing extra is held. If append()
// throws (a latent beyond its format's range), some heads may hold the block: reset the cache.
//
//   kqsvd::llama::Transformer model(kqsvd::llama::Checkpoint::load("model.bin"));
//   kqsvd::ModelProjections<float> projections = ...;   // calibrated on rotated q, k (calibration.hpp)
//   kqsvd::llama::CompressedKvCache cache(model.shape(), model.rotary_embedding(), projections,
//                                         kqsvd::RopeMode::post_rope, /*window=*/32,
//                                         kqsvd::StorageFormat::parse("f16"));
//   // int4 latents decoded with integer dot products (what the decode benchmark's "+int8" rows time):
//   kqsvd::llama::CompressedKvCache fast(model.shape(), model.rotary_embedding(), projections,
//                                        kqsvd::RopeMode::post_rope, 32, kqsvd::StorageFormat::parse("int4/32"),
//                                        kqsvd::DecodeArithmetic::int8_dot_products);
//   auto logits = model.forward(prompt, cache);          // as with FullKvCache
//   cache.bytes();                                       // latents + the window's exact rows
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "kqsvd/cache/head_cache.hpp"
#include "kqsvd/core/storage_format.hpp"
#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/error.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/core/rope.hpp"
#include "kqsvd/kernels/decode_arithmetic.hpp"
#include "kqsvd/kernels/decode_attention.hpp"
#include "kqsvd/kernels/partial_attention.hpp"
#include "kqsvd/llama/kv_cache.hpp"
#include "kqsvd/solvers/model_projections.hpp"

namespace kqsvd::llama {

class CompressedKvCache : public KvCache {
 public:
  using Projections = ModelProjections<float>;

  // projections: fitted for this model's shape, on rotated queries and keys for post_rope, on
  // un-rotated ones for pre_rope. window: recent tokens kept exact. format: how latents are stored.
  // arithmetic: how decode steps multiply 4- and 2-bit latents (post_rope).
  CompressedKvCache(const ModelShape& shape, const RotaryEmbedding& rope, Projections projections, RopeMode mode,
                    Index window = 0, StorageFormat format = StorageFormat(),
                    DecodeArithmetic arithmetic = DecodeArithmetic::float32)
      : KvCache(shape, rope), projections_(validated(shape, std::move(projections))), mode_(mode),
        window_(validated_window(window)), arithmetic_(arithmetic) {
    layers_.resize(static_cast<std::size_t>(shape.layers));
    for (Index l = 0; l < shape.layers; ++l) {
      for (Index h = 0; h < shape.kv_heads; ++h) {
        layers_[static_cast<std::size_t>(l)].heads.emplace_back(projections_.keys(l, h), projections_.values(l, h), format);
      }
    }
  }

  const Projections& projections() const { return projections_; }
  RopeMode rope_mode() const { return mode_; }
  Index window() const { return window_; }
  const StorageFormat& format() const { return layers_.front().heads.front().format(); }
  DecodeArithmetic decode_arithmetic() const { return arithmetic_; }

  // Tokens held by `layer`.
  Index tokens(Index layer) const {
    return layers_[checked_layer("kqsvd::llama::CompressedKvCache::tokens", layer)].tokens;
  }

  // The latents of one KV head of one layer (widths = the ranks).
  const HeadCache& latents(Index layer, Index kv_head) const {
    constexpr const char* where = "kqsvd::llama::CompressedKvCache::latents";
    const std::size_t l = checked_layer(where, layer);
    shape().require_kv_head(where, kv_head);
    return layers_[l].heads[static_cast<std::size_t>(kv_head)];
  }

  // Latents of every token, all layers and KV heads: codes, scales and minimums.
  std::size_t latent_bytes() const {
    std::size_t total = 0;
    for (const Layer& layer : layers_)
      for (const HeadCache& head : layer.heads) total += head.bytes();
    return total;
  }

  // The exact float keys and values of the last min(tokens, W) tokens of every layer.
  std::size_t window_bytes() const {
    std::size_t total = 0;
    for (const Layer& layer : layers_) total += static_cast<std::size_t>(std::min(layer.tokens, window_)) * row_bytes();
    return total;
  }

  std::size_t bytes() const override { return latent_bytes() + window_bytes(); }

  // bytes() per token held per layer (0 when empty): the measured cost, the window amortised over the
  // tokens held. Compare FullKvCache: 2 * kv_heads * head_dim * 4 bytes in float32.
  double bytes_per_token_per_layer() const {
    Index held = 0;
    for (const Layer& layer : layers_) held += layer.tokens;
    return held == 0 ? 0.0 : static_cast<double>(bytes()) / static_cast<double>(held);
  }

  // What each further token costs in latents, averaged over layers (the window aside).
  double latent_bytes_per_token_per_layer() const {
    double total = 0.0;
    for (const Layer& layer : layers_)
      for (const HeadCache& head : layer.heads) total += static_cast<double>(head.bytes_per_token());
    return total / static_cast<double>(shape().layers);
  }

 protected:
  void do_append(Index layer, const Eigen::Ref<const RowMatrix<float>>& keys, const Eigen::Ref<const RowMatrix<float>>& values,
                 Index first_position) override {
    Layer& state = layers_[static_cast<std::size_t>(layer)];
    const Index d = shape().head_dim;
    // Rotated keys are what post-RoPE compresses and what the exact window keeps.
    RowMatrix<float> rotated;
    if (mode_ == RopeMode::post_rope || window_ > 0) {
      rotated = keys;
      for (Index h = 0; h < shape().kv_heads; ++h) rotary_embedding().rotate(rotated.middleCols(h * d, d), first_position);
    }
    for (Index h = 0; h < shape().kv_heads; ++h) {
      const auto cached_keys = mode_ == RopeMode::post_rope ? Eigen::Ref<const RowMatrix<float>>(rotated) : keys;
      state.heads[static_cast<std::size_t>(h)].append(projections_.keys(layer, h), projections_.values(layer, h),
                                                      cached_keys.middleCols(h * d, d), values.middleCols(h * d, d));
    }
    if (window_ > 0) {
      // The first query of this block (position first_position) needs exact rows from
      // first_position - W + 1 on; nothing older is needed any more.
      release_recent_before(state, first_position - window_ + 1);
      append_recent(state, rotated, values, first_position);
    }
    state.tokens += keys.rows();
  }

  RowMatrix<float> do_attend(Index layer, const Eigen::Ref<const RowMatrix<float>>& queries, Index first_position) override {
    constexpr const char* where = "kqsvd::llama::CompressedKvCache::attend";
    const Layer& state = layers_[static_cast<std::size_t>(layer)];
    const Index t = queries.rows(), d = shape().head_dim, g = shape().group_size();
    // Per query at position p: latents of positions [0, p - W + 1) (all up to p without a window), exact
    // rows of [p - W + 1, p + 1).
    VisibleRows::Indices latent_end(t), exact_begin(t), exact_end(t);
    for (Index i = 0; i < t; ++i) {
      const Index p = first_position + i;
      latent_end(i) = window_ == 0 ? p + 1 : std::max<Index>(0, p - window_ + 1);
      exact_begin(i) = latent_end(i) - state.recent_first;
      exact_end(i) = p + 1 - state.recent_first;
    }
    if (window_ > 0 && exact_begin(0) < 0) {
      detail::throw_invalid(where, "first_position",
                            "is " + std::to_string(first_position) + ": the exact rows of position " +
                                std::to_string(latent_end(0)) +
                                " its window needs were released (attend queries of the last appended block)");
    }
    const VisibleRows latent_rows = detail::group_rows(g, VisibleRows(VisibleRows::Indices::Zero(t), latent_end));
    const float scale = detail::score_scale(d);
    RowMatrix<float> output(t, shape().query_width());
    for (Index h = 0; h < shape().kv_heads; ++h) {
      const LowRankProjection<float>& key_projection = projections_.keys(layer, h);
      const LowRankProjection<float>& value_projection = projections_.values(layer, h);
      const HeadCache& cache = state.heads[static_cast<std::size_t>(h)];
      const RowMatrix<float> stacked = detail::group_queries(shape(), queries, h, scale);
      PartialAttention attention =
          mode_ == RopeMode::post_rope
              ? partial_attention(stacked * key_projection.decoder(), latent_rows, cache, arithmetic_).decompressed(value_projection)
              : partial_attention(stacked, latent_rows, cache, key_projection, rotary_embedding(), 0)
                    .decompressed(value_projection);
      if (window_ > 0) {
        const VisibleRows exact_rows = detail::group_rows(g, VisibleRows(exact_begin, exact_end));
        attention.merge(partial_attention(stacked, exact_rows, state.recent_keys.block(0, h * d, state.recent_rows, d),
                                          state.recent_values.block(0, h * d, state.recent_rows, d)));
      }
      detail::scatter_group(shape(), attention.result(), h, output);
    }
    return output;
  }

  void do_reset() override {
    for (Layer& layer : layers_) {
      for (HeadCache& head : layer.heads) head.clear();
      layer.recent_first = 0;
      layer.recent_rows = 0;
      layer.tokens = 0;
    }
  }

 private:
  struct Layer {
    std::vector<HeadCache> heads;  // per KV head
    // Exact rows of positions recent_first .. recent_first + recent_rows - 1: rotated keys and values,
    // kv_heads * head_dim wide; capacity grows by doubling, rows past recent_rows are spare.
    RowMatrix<float> recent_keys, recent_values;
    Index recent_first = 0;
    Index recent_rows = 0;
    Index tokens = 0;
  };

  static Projections validated(const ModelShape& shape, Projections projections) {
    if (projections.shape() != shape) {
      detail::throw_invalid("kqsvd::llama::CompressedKvCache", "projections",
                            "were fitted for " + to_string(projections.shape()) + ", but the model has " +
                                to_string(shape));
    }
    return projections;
  }

  static Index validated_window(Index window) {
    if (window < 0) {
      detail::throw_invalid("kqsvd::llama::CompressedKvCache", "window",
                            "must be >= 0 (0: every token from latents), got " + std::to_string(window));
    }
    return window;
  }

  std::size_t row_bytes() const { return 2 * static_cast<std::size_t>(shape().kv_width()) * sizeof(float); }

  // Drops exact rows of positions before `first_needed`, moving the rest to the front.
  void release_recent_before(Layer& layer, Index first_needed) {
    const Index drop = std::clamp<Index>(first_needed - layer.recent_first, 0, layer.recent_rows);
    if (drop == 0) return;
    const Index kept = layer.recent_rows - drop;
    const Index width = shape().kv_width();
    // Row-major with full-width rows: the kept rows are one contiguous run, moved to lower addresses.
    for (RowMatrix<float>* rows : {&layer.recent_keys, &layer.recent_values}) {
      std::copy(rows->data() + drop * width, rows->data() + (drop + kept) * width, rows->data());
    }
    layer.recent_first += drop;
    layer.recent_rows = kept;
  }

  void append_recent(Layer& layer, const RowMatrix<float>& rotated_keys, const Eigen::Ref<const RowMatrix<float>>& values,
                     Index first_position) {
    if (layer.recent_rows == 0) layer.recent_first = first_position;
    const Index needed = layer.recent_rows + rotated_keys.rows();
    if (layer.recent_keys.rows() < needed) {
      const Index capacity = std::max<Index>({needed, 2 * layer.recent_keys.rows(), Index(16)});
      layer.recent_keys.conservativeResize(capacity, shape().kv_width());
      layer.recent_values.conservativeResize(capacity, shape().kv_width());
    }
    layer.recent_keys.middleRows(layer.recent_rows, rotated_keys.rows()) = rotated_keys;
    layer.recent_values.middleRows(layer.recent_rows, values.rows()) = values;
    layer.recent_rows = needed;
  }

  Projections projections_;
  RopeMode mode_;
  Index window_;
  DecodeArithmetic arithmetic_;
  std::vector<Layer> layers_;
};

}  // namespace kqsvd::llama
