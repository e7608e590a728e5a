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
  std::string rope = "-", method = "full", allocation = "-", format = "f32";
  Eigen::Index rank = 0, window = 0;
  double epsilon = std::numeric_limits<double>::quiet_NaN();
  double target = 1.0, ratio = 1.0, bits_per_element = 0.0;
  NextTokenComparison comparison;
  double bytes_per_token_layer = 0.0;  // measured: bytes() after each story over tokens x layers held
  double tokens_per_second = 0.0;      // 0 when not timed
};

class QualityEvaluator {
 public:
  // Runs every story through the full cache once: the reference predictions.
  QualityEvaluator(const llama::Transformer& model, Sequences stories);

  // Every story as one prefill block through the configuration's cache, compared with the reference.
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

// "KQ-SVD", "K-SVD", "Eigen Attention": the names plots show.
std::string display_name(Method method);

}  // namespace kqsvd::cli
