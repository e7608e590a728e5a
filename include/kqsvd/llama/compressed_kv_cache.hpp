// kqsvd/llama/compressed_kv_cache.hpp -- a KV cache that stores low-rank latents instead of keys and
// values, optionally keeping the most recent W tokens exact.
//
// Per layer and KV head it holds a LatentCache<Storage> of key latents k A and value latents v A_v
// (ranks may differ from head to head), with the projections of a kqsvd::ModelProjections<float>:
//   RopeMode::post_rope  keys are rotated, then compressed; a query scores (q B)(k A)^T / sqrt(d)
//                        directly against the latents.
//   RopeMode::pre_rope   un-rotated keys are compressed; attend() reconstructs (k A) B^T, rotates it by
//                        its position and scores it with the rotated query.
// Values are always latents: the softmax-weighted sum of v A_v is decompressed once by B_v^T.
//
// Recent window W >= 0: a query at position p scores keys at positions p-W+1 .. p exactly (rotated
// float keys and float values) and older keys from their latents. This is decided per query, so a
// whole-block prefill gives exactly what token-by-token decoding gives. Every token's latents are
// written when it is appended (compression happens once, at write time); the exact rows of the last W
// tokens are kept alongside.
//
// bytes() is what the cache stores: every token's latents in Storage plus the float rows of the last
// min(tokens, W) tokens, per layer. While a block of T > 1 tokens is being attended, the cache also
// holds the exact rows of up to T - 1 older tokens of that block (their queries' windows need them);
// these are working memory of the block, like the forward pass's own activations, released at the
// next append, and bytes() does not count them. With token-by-token decoding nothing extra is held.
// If append() throws (a latent beyond float16's range), some heads may hold the block: reset the cache.
//
//   kqsvd::llama::Transformer model(kqsvd::llama::Checkpoint::load("model.bin"));
//   kqsvd::ModelProjections<float> projections = ...;   // calibrated on rotated q, k (calibration.hpp)
//   kqsvd::llama::CompressedKvCache<Eigen::half> cache(model.attention_shape(), projections,
//                                                      kqsvd::llama::RopeMode::post_rope, /*window=*/32);
//   auto logits = model.forward(prompt, cache);          // as with FullKvCache
//   cache.bytes();                                       // latents + the window's exact rows
//   cache.latent_bytes_per_token_per_layer();            // what one more token costs, per layer
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "kqsvd/detail/storage_conversion.hpp"
#include "kqsvd/detail/validation.hpp"
#include "kqsvd/error.hpp"
#include "kqsvd/latent_cache.hpp"
#include "kqsvd/llama/kv_cache.hpp"
#include "kqsvd/llama/rope_mode.hpp"
#include "kqsvd/llama/row_matrix.hpp"
#include "kqsvd/model_projections.hpp"
#include "kqsvd/rope.hpp"

namespace kqsvd::llama {

namespace detail {

// The first `rows` rows of a latent side (a LatentCache map) as float. Converts half/bfloat16 and
// copies float, so that the attention arithmetic has one float code path.
template <typename LatentRows>
RowMatrix latents_as_float(const LatentRows& latents, Eigen::Index rows) {
  RowMatrix result(rows, latents.cols());
  if (rows > 0) kqsvd::detail::to_float(latents.data(), result.data(), rows * latents.cols());
  return result;
}

// In place: turns the scores of a block of queries into softmax weights, each query choosing, per key
// position, its latent score or its exact one. Query row i sits at position p = first_query + i; it
// takes latent scores for positions j < c and exact scores for c <= j <= p, where c = p - window + 1
// (c = p + 1 when window == 0: everything from latents). `latent` holds positions 0, 1, ... and
// `exact` positions exact_first, exact_first + 1, ...; entries a query does not use become 0.
inline void windowed_softmax(RowMatrix& latent, RowMatrix& exact, Eigen::Index first_query, Eigen::Index window,
                             Eigen::Index exact_first) {
  using Index = Eigen::Index;
  for (Index i = 0; i < latent.rows(); ++i) {
    const Index p = first_query + i;
    const Index boundary = window == 0 ? p + 1 : std::max<Index>(0, p - window + 1);
    const Index latent_used = std::min(boundary, latent.cols());
    const Index exact_from = boundary - exact_first;   // first used column of `exact`
    const Index exact_used = window == 0 ? 0 : p + 1 - boundary;
    float max_score = -std::numeric_limits<float>::infinity();
    if (latent_used > 0) max_score = latent.row(i).head(latent_used).maxCoeff();
    if (exact_used > 0) max_score = std::max(max_score, exact.row(i).segment(exact_from, exact_used).maxCoeff());
    float sum = 0.0f;
    if (latent.cols() > 0) {
      auto row = latent.row(i);
      row.head(latent_used) = (row.head(latent_used).array() - max_score).exp().matrix();
      row.tail(row.size() - latent_used).setZero();
      sum += row.head(latent_used).sum();
    }
    if (exact.cols() > 0) {
      auto row = exact.row(i);
      row.head(exact_from).setZero();
      row.segment(exact_from, exact_used) = (row.segment(exact_from, exact_used).array() - max_score).exp().matrix();
      row.tail(row.size() - exact_from - exact_used).setZero();
      sum += row.segment(exact_from, exact_used).sum();
    }
    if (latent.cols() > 0) latent.row(i) /= sum;
    if (exact.cols() > 0) exact.row(i) /= sum;
  }
}

}  // namespace detail

template <typename Storage = float>
class CompressedKvCache : public KvCache {
 public:
  using Projections = ModelProjections<float>;

  // projections: fitted for this model's shape (layers, query heads, KV heads, head_dim), on rotated
  // queries and keys for post_rope, on un-rotated ones for pre_rope. window: recent tokens kept exact.
  CompressedKvCache(const AttentionShape& shape, Projections projections, RopeMode mode, Index window = 0)
      : KvCache(shape),
        projections_(validated(shape, std::move(projections))),
        mode_(mode),
        window_(validated_window(window)),
        rope_(shape.rotary_embedding()) {
    layers_.reserve(static_cast<std::size_t>(shape.n_layers));
    for (Index l = 0; l < shape.n_layers; ++l) {
      Layer layer;
      for (Index h = 0; h < shape.n_kv_heads; ++h) {
        layer.heads.emplace_back(projections_.keys(l, h), projections_.values(l, h));
      }
      layers_.push_back(std::move(layer));
    }
  }

  const Projections& projections() const { return projections_; }
  RopeMode rope_mode() const { return mode_; }
  Index window() const { return window_; }

  // Tokens held by `layer`.
  Index tokens(Index layer) const {
    return layers_[checked_layer("kqsvd::llama::CompressedKvCache::tokens", layer)].tokens;
  }

  // The latents of one KV head of one layer (size() tokens, key and value widths = the ranks).
  const LatentCache<Storage>& latents(Index layer, Index kv_head) const {
    constexpr const char* where = "kqsvd::llama::CompressedKvCache::latents";
    const std::size_t l = checked_layer(where, layer);
    if (kv_head < 0 || kv_head >= shape().n_kv_heads) {
      kqsvd::detail::throw_invalid(where, "kv_head",
                                   "is " + std::to_string(kv_head) + ", outside [0, " +
                                       std::to_string(shape().n_kv_heads) + ")");
    }
    return layers_[l].heads[static_cast<std::size_t>(kv_head)];
  }

  // Latents of every token, all layers and KV heads, in Storage.
  std::size_t latent_bytes() const {
    std::size_t total = 0;
    for (const Layer& layer : layers_)
      for (const LatentCache<Storage>& head : layer.heads) total += head.bytes();
    return total;
  }

  // The exact float keys and values of the last min(tokens, W) tokens of every layer.
  std::size_t window_bytes() const {
    std::size_t total = 0;
    for (const Layer& layer : layers_) total += window_rows(layer) * row_bytes();
    return total;
  }

  std::size_t bytes() const override { return latent_bytes() + window_bytes(); }

  // bytes() per token held per layer (0 when empty): the measured cost, the window amortised over the
  // tokens held. Compare FullKvCache: 2 * n_kv_heads * head_dim * sizeof(float).
  double bytes_per_token_per_layer() const {
    Index held = 0;
    for (const Layer& layer : layers_) held += layer.tokens;
    return held == 0 ? 0.0 : static_cast<double>(bytes()) / static_cast<double>(held);
  }

  // What each further token costs in latents, averaged over layers: sum over KV heads of
  // (key rank + value rank) * sizeof(Storage), divided by n_layers.
  double latent_bytes_per_token_per_layer() const {
    const CacheFootprint footprint = projections_.footprint(static_cast<Index>(sizeof(Storage)));
    return static_cast<double>(footprint.latent_bytes_per_token) / static_cast<double>(shape().n_layers);
  }

 protected:
  void do_append(Index layer, const Eigen::Ref<const RowMatrix>& keys, const Eigen::Ref<const RowMatrix>& values,
                 Index first_position) override {
    Layer& state = layers_[static_cast<std::size_t>(layer)];
    const Index d = shape().head_dim;
    // Rotated keys are what post-RoPE compresses and what the exact window keeps.
    RowMatrix rotated;
    if (mode_ == RopeMode::post_rope || window_ > 0) {
      rotated = keys;
      for (Index h = 0; h < shape().n_kv_heads; ++h) rope_.rotate(rotated.middleCols(h * d, d), first_position);
    }
    const auto append_latents = [&](const auto& cached_keys) {
      for (Index h = 0; h < shape().n_kv_heads; ++h) {
        state.heads[static_cast<std::size_t>(h)].append(projections_.keys(layer, h), projections_.values(layer, h),
                                                        cached_keys.middleCols(h * d, d), values.middleCols(h * d, d));
      }
    };
    if (mode_ == RopeMode::post_rope) {
      append_latents(rotated);
    } else {
      append_latents(keys);
    }
    if (window_ > 0) {
      // The first query of this block (position first_position) needs exact rows from
      // first_position - W + 1 on; nothing older is needed any more.
      release_recent_before(state, first_position - window_ + 1);
      append_recent(state, rotated, values, first_position);
    }
    state.tokens += keys.rows();
  }

  RowMatrix do_attend(Index layer, const Eigen::Ref<const RowMatrix>& queries, Index first_position) override {
    constexpr const char* where = "kqsvd::llama::CompressedKvCache::attend";
    const Layer& state = layers_[static_cast<std::size_t>(layer)];
    const Index d = shape().head_dim;
    const Index end = first_position + queries.rows();  // one past the last query's position
    // Positions scored from latents: j <= p - W for some query p; exact: p - W < j <= p.
    const Index latent_count = window_ == 0 ? end : std::max<Index>(0, end - window_);
    const Index exact_first = window_ == 0 ? end : std::max<Index>(0, first_position - window_ + 1);
    if (window_ > 0 && exact_first < end && exact_first < state.recent_first) {
      kqsvd::detail::throw_invalid(where, "first_position",
                                   "is " + std::to_string(first_position) + ": the exact rows of position " +
                                       std::to_string(exact_first) +
                                       " its window needs were released (attend queries of the last appended block)");
    }
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    RowMatrix output(queries.rows(), shape().query_width());

    for (Index g = 0; g < shape().n_kv_heads; ++g) {
      const LowRankProjection<float>& key_projection = projections_.keys(layer, g);
      const LowRankProjection<float>& value_projection = projections_.values(layer, g);
      const LatentCache<Storage>& cache = state.heads[static_cast<std::size_t>(g)];
      const RowMatrix key_latents = detail::latents_as_float(cache.keys(), latent_count);
      const RowMatrix value_latents = detail::latents_as_float(cache.values(), latent_count);
      RowMatrix rebuilt_keys;  // pre-RoPE: (k A) B^T, rotated by position
      if (mode_ == RopeMode::pre_rope && latent_count > 0) {
        rebuilt_keys.noalias() = key_latents * key_projection.decoder().transpose();
        rope_.rotate(rebuilt_keys, 0);
      }

      for (Index h = g * shape().group_size(); h < (g + 1) * shape().group_size(); ++h) {
        // Query blocks bound the score matrices to block x tokens.
        for (Index start = 0; start < queries.rows(); start += query_block) {
          const Index rows = std::min(query_block, queries.rows() - start);
          const auto block_queries = queries.block(start, h * d, rows, d);
          const Index block_first = first_position + start;
          const Index block_end = block_first + rows;
          const Index latent_used = window_ == 0 ? block_end : std::max<Index>(0, block_end - window_);
          const Index exact_from = window_ == 0 ? block_end : std::max<Index>(0, block_first - window_ + 1);
          const Index exact_used = block_end - exact_from;

          RowMatrix latent_scores(rows, latent_used), exact_scores(rows, exact_used);
          if (latent_used > 0) {
            if (mode_ == RopeMode::post_rope) {
              const RowMatrix mapped = (block_queries * key_projection.decoder()) * scale;  // q B / sqrt(d)
              latent_scores.noalias() = mapped * key_latents.topRows(latent_used).transpose();
            } else {
              latent_scores.noalias() = (block_queries * rebuilt_keys.topRows(latent_used).transpose()) * scale;
            }
          }
          // Exact rows of positions exact_from .. block_end - 1 (held when window_ > 0).
          const Index recent_row = exact_from - state.recent_first;
          if (exact_used > 0) {
            exact_scores.noalias() =
                (block_queries * state.recent_keys.block(recent_row, g * d, exact_used, d).transpose()) * scale;
          }
          detail::windowed_softmax(latent_scores, exact_scores, block_first, window_, exact_from);

          auto out = output.block(start, h * d, rows, d);
          out.setZero();
          if (latent_used > 0) {
            const RowMatrix weighted = latent_scores * value_latents.topRows(latent_used);  // P (V A_v)
            out.noalias() += weighted * value_projection.decoder().transpose();
          }
          if (exact_used > 0) {
            out.noalias() += exact_scores * state.recent_values.block(recent_row, g * d, exact_used, d);
          }
        }
      }
    }
    return output;
  }

  void do_reset() override {
    for (Layer& layer : layers_) {
      for (LatentCache<Storage>& head : layer.heads) head.clear();
      layer.recent_first = 0;
      layer.recent_rows = 0;
      layer.tokens = 0;
    }
  }

 private:
  static constexpr Index query_block = 64;

  struct Layer {
    std::vector<LatentCache<Storage>> heads;  // per KV head
    // Exact rows of positions recent_first .. recent_first + recent_rows - 1: rotated keys and values,
    // n_kv_heads * head_dim wide; capacity grows by doubling, rows past recent_rows are spare.
    RowMatrix recent_keys, recent_values;
    Index recent_first = 0;
    Index recent_rows = 0;
    Index tokens = 0;
  };

  static Projections validated(const AttentionShape& shape, Projections projections) {
    const ModelShape& p = projections.shape();
    if (p.layers != shape.n_layers || p.query_heads != shape.n_heads || p.kv_heads != shape.n_kv_heads ||
        p.head_dim != shape.head_dim) {
      kqsvd::detail::throw_invalid(
          "kqsvd::llama::CompressedKvCache", "projections",
          "were fitted for " + std::to_string(p.layers) + " layers, " + std::to_string(p.query_heads) +
              " query heads, " + std::to_string(p.kv_heads) + " KV heads, head_dim " + std::to_string(p.head_dim) +
              ", but the model has " + to_string(shape));
    }
    return projections;
  }

  static Index validated_window(Index window) {
    if (window < 0) {
      kqsvd::detail::throw_invalid("kqsvd::llama::CompressedKvCache", "window",
                                   "must be >= 0 (0: every token from latents), got " + std::to_string(window));
    }
    return window;
  }

  std::size_t row_bytes() const { return 2 * static_cast<std::size_t>(shape().kv_width()) * sizeof(float); }
  std::size_t window_rows(const Layer& layer) const {
    return static_cast<std::size_t>(std::min(layer.tokens, window_));
  }

  // Drops exact rows of positions before `first_needed`, moving the rest to the front.
  void release_recent_before(Layer& layer, Index first_needed) {
    const Index drop = std::clamp<Index>(first_needed - layer.recent_first, 0, layer.recent_rows);
    if (drop == 0) return;
    const Index kept = layer.recent_rows - drop;
    const Index width = shape().kv_width();
    // Row-major with full-width rows: the kept rows are one contiguous run, moved to lower addresses.
    for (RowMatrix* rows : {&layer.recent_keys, &layer.recent_values}) {
      std::copy(rows->data() + drop * width, rows->data() + (drop + kept) * width, rows->data());
    }
    layer.recent_first += drop;
    layer.recent_rows = kept;
  }

  void append_recent(Layer& layer, const RowMatrix& rotated_keys, const Eigen::Ref<const RowMatrix>& values,
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
  RotaryEmbedding rope_;
  std::vector<Layer> layers_;
};

}  // namespace kqsvd::llama
