// tools/kqsvd_llama/quality.hpp -- measuring what a cache configuration costs the model, shared by the
// quality, probe and frontier subcommands: the full cache's predictions on the evaluation stories are
// computed once; each configuration is then compared with them (kqsvd::NextTokenComparison), its bytes
// measured from the cache object, its decode speed timed on the library's kernels.
#pragma once

#include <kqsvd/kqsvd.hpp>
#include <kqsvd/llama/transformer.hpp>

#include <limits>
#include <string>
#include <vector>

#include "model_data.hpp"

namespace kqsvd::cli {

struct QualityRow {
  std::string rope = "-", method = "full", allocation = "-", format = "f32", rotation = "none";
  std::string arithmetic = "float32";  // the decode arithmetic (to_string(DecodeArithmetic))
  Eigen::Index rank = 0, window = 0;
  double epsilon = std::numeric_limits<double>::quiet_NaN();
  std::string key_ranks, value_ranks;  // RankAllocation::describe_keys() / describe_values()
  double target = 1.0, ratio = 1.0, bits_per_element = 0.0;
  NextTokenComparison comparison;
  double bytes_per_token_layer = 0.0;  // measured: bytes() after each story over tokens x layers held
  double tokens_per_second = 0.0;      // 0 when not timed
};

class QualityEvaluator {
 public:
  // Runs every story through the full cache once: the reference predictions.
  QualityEvaluator(const llama::Transformer& model, Sequences stories);

  // Every story as one prefill block through the configuration's cache (the online SVD's: its first half,
  // the prompt, then the rest), compared with the reference. With int8 dot products the stories are
  // decoded token by token instead: the arithmetic applies to decode steps only, and a prefill block
  // computes in float.
  QualityRow evaluate(const CacheConfiguration& configuration, const ModelProjections<float>* projections) const;

  // Tokens per second decoding the first story token by token (`tokens` of it), best of three runs.
  double decode_speed(const CacheConfiguration& configuration, const ModelProjections<float>* projections,
                      Eigen::Index tokens) const;

  const Sequences& stories() const { return stories_; }

 private:
  const llama::Transformer* model_;
  Sequences stories_;
  std::vector<RowMatrix<float>> reference_;
};

// The loss sensitivity of every layer and kind (keys, values), measured on the evaluator's stories: for
// each, only that layer's keys (or values) are compressed to `rank` -- every other projection kept at full
// rank, which reconstructs exactly -- and w = (KL of that cache - KL at full rank) / the layer's predicted
// squared relative error at `rank` (kqsvd::predicted_loss with that term's weight 1). A first-order model
// of the loss: KL ~ sum_{layer, kind} w * err^2. 2 x layers evaluations, in parallel.
struct SensitivityProbe {
  LossWeights weights;
  std::vector<double> key_kl, value_kl;  // per layer: the KL increase measured
  double exact_kl = 0.0;                  // every projection at full rank (rounding only)
};
SensitivityProbe measure_sensitivity(const QualityEvaluator& probe, const ModelProjections<float>& full_rank,
                                     const CacheConfiguration& configuration, Eigen::Index rank);

// `value` with `digits` digits after the point, for tables and messages.
std::string fixed(double value, int digits);

}  // namespace kqsvd::cli
