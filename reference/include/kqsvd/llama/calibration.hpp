// kqsvd/llama/calibration.hpp -- calibrating KV-cache projections on a llama2.c model.
//
// The forward pass reports every layer's queries, keys and values (ActivationObserver); a
// CalibrationObserver streams them into a kqsvd::ModelCalibration (d x d Grams per layer and KV head),
// rotated for RopeMode::post_rope, un-rotated for RopeMode::pre_rope. The value side of KQ-SVD also
// needs each layer's output projection wo, which output_weights() takes from the checkpoint.
//
//   kqsvd::llama::Transformer model(kqsvd::llama::Checkpoint::load("model.bin"));
//   std::vector<std::vector<int>> sequences = ...;   // token ids, each starting with BOS
//   kqsvd::ModelCalibration calibration = kqsvd::llama::calibrate(model, sequences, kqsvd::RopeMode::post_rope);
//   auto projections = kqsvd::ModelProjections<float>::fit(
//       calibration, kqsvd::llama::output_weights(model.checkpoint()), kqsvd::Method::kq_svd,
//       kqsvd::RankSelection::fixed(16), kqsvd::RankSelection::fixed(16));
//   kqsvd::llama::CompressedKvCache cache(model.shape(), model.rotary_embedding(), projections,
//                                         kqsvd::RopeMode::post_rope);
#pragma once

#include <Eigen/Core>

#include <string>
#include <vector>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/llama/activation_recorder.hpp"
#include "kqsvd/llama/checkpoint.hpp"
#include "kqsvd/llama/full_kv_cache.hpp"
#include "kqsvd/llama/kv_cache.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/llama/transformer.hpp"
#include "kqsvd/calibration/model_calibration.hpp"
#include "kqsvd/core/model_shape.hpp"

namespace kqsvd::llama {

// Adds each observed block's queries, keys and values to a ModelCalibration, which must outlive it.
class CalibrationObserver : public ActivationObserver {
 public:
  CalibrationObserver(ModelCalibration& calibration, RopeMode mode) : calibration_(&calibration), mode_(mode) {}

  void observe(const AttentionActivations& a) override {
    if (mode_ == RopeMode::post_rope) {
      calibration_->add(a.layer, a.queries, a.keys, a.values);
    } else {
      calibration_->add(a.layer, a.queries_pre_rope, a.keys_pre_rope, a.values);
    }
  }

  RopeMode rope_mode() const { return mode_; }

 private:
  ModelCalibration* calibration_;
  RopeMode mode_;
};

// Runs every sequence through `model` (one prefill block each, exact cache) and reports the
// activations to `observer`.
inline void observe_sequences(const Transformer& model, const std::vector<std::vector<int>>& sequences,
                              ActivationObserver& observer) {
  FullKvCache cache(model.shape(), model.rotary_embedding());
  for (std::size_t i = 0; i < sequences.size(); ++i) {
    if (sequences[i].empty()) {
      detail::throw_invalid("kqsvd::llama::observe_sequences", "sequences",
                                   "holds an empty sequence at index " + std::to_string(i));
    }
    cache.reset();
    model.forward(sequences[i], cache, &observer);
  }
}

// Calibration Grams of `model` on `sequences`, with queries and keys as `mode` sees them.
inline ModelCalibration calibrate(const Transformer& model, const std::vector<std::vector<int>>& sequences,
                                  RopeMode mode) {
  ModelCalibration calibration(model.shape());
  CalibrationObserver observer(calibration, mode);
  observe_sequences(model, sequences, observer);
  return calibration;
}

// Every layer's output projection wo (dim x n_heads * head_dim), as ModelProjections::fit takes them.
inline std::vector<RowMatrix<float>> output_weights(const Checkpoint& checkpoint) {
  std::vector<RowMatrix<float>> weights;
  weights.reserve(static_cast<std::size_t>(checkpoint.config().n_layers));
  for (Eigen::Index l = 0; l < checkpoint.config().n_layers; ++l) weights.push_back(checkpoint.layer(l).wo);
  return weights;
}

}  // namespace kqsvd::llama
