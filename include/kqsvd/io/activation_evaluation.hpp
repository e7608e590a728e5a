// kqsvd/io/activation_evaluation.hpp -- what is done with saved activations: stream them into a model's
// calibration Grams, and measure fitted projections on them.
//
//   kqsvd::io::ActivationFile calib("calib.safetensors");
//   kqsvd::ModelCalibration calibration(calib.shape());
//   kqsvd::io::calibrate(calibration, calib);                   // one file at a time: O(d^2) memory
//   auto model = kqsvd::ModelProjections<float>::fit(calibration, calib.output_weights(),
//                                                    kqsvd::Method::kq_svd, kqsvd::RankSelection::fixed(16),
//                                                    kqsvd::RankSelection::fixed(16));
//   kqsvd::io::ActivationFile held_out("eval.safetensors");
//   std::vector<kqsvd::FidelityTotals> per_layer = kqsvd::io::measure(model, held_out, calib.output_weights());
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kqsvd/calibration/model_calibration.hpp"
#include "kqsvd/core/error.hpp"
#include "kqsvd/core/rope.hpp"
#include "kqsvd/io/activation_file.hpp"
#include "kqsvd/metrics/fidelity.hpp"
#include "kqsvd/solvers/model_projections.hpp"

namespace kqsvd::io {

// Adds every sequence of `file` to `calibration`: for each layer and KV head, the keys and values, and
// the queries of the heads that read it. Only one head of one sequence is in memory at a time.
inline void calibrate(ModelCalibration& calibration, const ActivationFile& file) {
  const ModelShape& shape = calibration.shape();
  if (file.shape() != shape) {
    throw InvalidArgument("kqsvd::io::calibrate: '" + file.path() + "' has " + std::to_string(file.shape().layers) +
                          " layers, " + std::to_string(file.shape().query_heads) + "/" +
                          std::to_string(file.shape().kv_heads) + " query/KV heads and head_dim " +
                          std::to_string(file.shape().head_dim) + ", not the calibration's shape");
  }
  for (Eigen::Index l = 0; l < shape.layers; ++l) {
    for (Eigen::Index b = 0; b < file.batch(); ++b) {
      for (Eigen::Index h = 0; h < shape.kv_heads; ++h) {
        calibration.add_keys(l, h, file.keys(l, b, h));
        calibration.add_values(l, h, file.values(l, b, h));
      }
      for (Eigen::Index h = 0; h < shape.query_heads; ++h) calibration.add_queries(l, h, file.queries(l, b, h));
    }
  }
}

// The seven fidelity metrics of `projections` on every sequence of `file`, one FidelityTotals per layer
// (sum them for the whole model; add the results of several files). Computed per sequence, layer and KV
// head with kqsvd::measure_head_fidelity, causal within each sequence. Activations saved without RoPE
// (rope = none) are scored the pre-RoPE way: reconstructed keys and the queries are rotated first.
// output_weights: per layer, hidden x (query_heads * head_dim), e.g. file.output_weights().
// latent_format: store the latents in this format first (FidelityOptions::latent_format); every rank
// must be a width it holds.
template <typename Scalar, typename WeightMatrix>
std::vector<FidelityTotals> measure(const ModelProjections<Scalar>& projections, const ActivationFile& file,
                                    const std::vector<WeightMatrix>& output_weights,
                                    const std::optional<StorageFormat>& latent_format = std::nullopt) {
  constexpr const char* where = "kqsvd::io::measure";
  const ModelShape& shape = projections.shape();
  if (file.shape() != shape) {
    throw InvalidArgument(std::string(where) + ": '" + file.path() +
                          "' does not have the projections' shape (layers, heads, head_dim)");
  }
  if (static_cast<Eigen::Index>(output_weights.size()) != shape.layers) {
    detail::throw_invalid(where, "output_weights",
                                 "holds " + std::to_string(output_weights.size()) + " matrices, expected one per layer (" +
                                     std::to_string(shape.layers) + ")");
  }
  const Eigen::Index d = shape.head_dim;
  std::optional<RotaryEmbedding> rope;
  FidelityOptions options;
  options.latent_format = latent_format;
  if (latent_format) {
    const RankAllocation ranks = projections.ranks();
    for (Eigen::Index l = 0; l < shape.layers; ++l) {
      for (Eigen::Index h = 0; h < shape.kv_heads; ++h) {
        const std::string head = " of layer " + std::to_string(l) + ", KV head " + std::to_string(h);
        latent_format->require_width(where, ("the key rank" + head).c_str(), ranks.key(l, h));
        latent_format->require_width(where, ("the value rank" + head).c_str(), ranks.value(l, h));
      }
    }
  }
  if (file.metadata().rope == RopeMode::pre_rope) {
    rope = file.rotary_embedding();
    options.pre_rope = &*rope;
  }
  std::vector<FidelityTotals> per_layer(static_cast<std::size_t>(shape.layers));
  for (Eigen::Index l = 0; l < shape.layers; ++l) {
    const WeightMatrix& weight = output_weights[static_cast<std::size_t>(l)];
    detail::require_columns(where, "output_weights", weight.cols(), shape.query_heads * d,
                                   "query_heads x head_dim");
    for (Eigen::Index b = 0; b < file.batch(); ++b) {
      for (Eigen::Index h = 0; h < shape.kv_heads; ++h) {
        per_layer[static_cast<std::size_t>(l)] += measure_head_fidelity(
            projections.keys(l, h), projections.values(l, h), file.keys(l, b, h).template cast<Scalar>(),
            file.values(l, b, h).template cast<Scalar>(), file.group_queries(l, b, h).template cast<Scalar>(),
            weight.middleCols(shape.first_query_head_of(h) * d, shape.group_size() * d), options);
      }
    }
  }
  return per_layer;
}

}  // namespace kqsvd::io
