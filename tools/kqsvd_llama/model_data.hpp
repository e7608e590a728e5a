// tools/kqsvd_llama/model_data.hpp -- what every kqsvd-llama subcommand does with a llama2.c model: load
// it, encode story ranges of a TinyStories-style text, calibrate projections on them (both RoPE modes in
// one pass), and build the KV cache a configuration names.
//
//   ModelData data = load_model_data(args);                        // --model, --tokenizer, --text
//   auto calibration = data.encode(args.range("--calib-stories"), max_tokens, "--calib-stories");
//   Calibrations grams = calibrate(data.model, calibration);
//   CacheConfiguration config;  config.method = kqsvd::Method::kq_svd; ...
//   std::unique_ptr<kqsvd::llama::KvCache> cache = make_cache(data.model, config, projections);
#pragma once

#include <kqsvd/kqsvd.hpp>
#include <kqsvd/llama/calibration.hpp>
#include <kqsvd/llama/compressed_kv_cache.hpp>
#include <kqsvd/llama/full_kv_cache.hpp>
#include <kqsvd/llama/heavy_hitter_kv_cache.hpp>
#include <kqsvd/llama/online_svd_kv_cache.hpp>
#include <kqsvd/llama/story_text.hpp>
#include <kqsvd/llama/tokenizer.hpp>
#include <kqsvd/llama/transformer.hpp>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "arguments.hpp"
#include "errors.hpp"

namespace kqsvd::cli {

using Sequences = std::vector<std::vector<int>>;

struct ModelData {
  std::string model_path;
  llama::Transformer model;
  llama::Tokenizer tokenizer;
  std::vector<std::string> stories;  // empty when no --text was given

  // Stories [range.first, range.second) as BOS + tokens, each cut to max_tokens; `option` names the
  // range in errors (a range beyond the text is a UsageError).
  Sequences encode(const std::pair<long, long>& range, std::size_t max_tokens, const std::string& option) const;
  // The model's name for messages and files: its file name, or its folder's for "model.bin".
  std::string name() const;
};

// --model and --tokenizer (required), --text (when `needs_text`).
ModelData load_model_data(const Arguments& args, bool needs_text);

// Calibration Grams for both RoPE modes, from one pass over the sequences.
struct Calibrations {
  ModelCalibration post_rope, pre_rope;
  const ModelCalibration& of(RopeMode mode) const { return mode == RopeMode::post_rope ? post_rope : pre_rope; }
};

Calibrations calibrate(const llama::Transformer& model, const Sequences& sequences);

// Every (method, RoPE mode)'s projections at full rank, fitted once on first use.
class FullRankProjections {
 public:
  FullRankProjections(const llama::Transformer& model, const Calibrations& calibrations)
      : model_(&model), calibrations_(&calibrations) {}
  const ModelProjections<float>& get(Method method, RopeMode mode);

 private:
  const llama::Transformer* model_;
  const Calibrations* calibrations_;
  std::map<std::pair<Method, RopeMode>, ModelProjections<float>> fitted_;
};

// What a KV cache is made of: the full cache in a format, or latents of a method's projections (at
// per-head ranks) in a format, post- or pre-RoPE, optionally with the last `window` tokens exact; either
// of them under H2O eviction (`eviction`: the tokens kept per head; post-RoPE latents only). Or, with
// `online_rank` > 0, no calibration at all: each sequence's own SVD at that rank of its `rope` keys
// (llama::OnlineSvdKvCache), whose prompt is the first half of each story (QualityEvaluator).
struct CacheConfiguration {
  std::optional<Method> method;  // none: the full cache
  RopeMode rope = RopeMode::post_rope;
  Eigen::Index window = 0;
  StorageFormat format;
  std::optional<HeavyHitterBudget> eviction;
  Eigen::Index online_rank = 0;
  // How decode steps multiply 4- and 2-bit codes; see takes_decode_arithmetic.
  DecodeArithmetic arithmetic = DecodeArithmetic::float32;
};

// Low-rank latents of `method` (no eviction, no online SVD).
CacheConfiguration latent_configuration(Method method, RopeMode rope, Eigen::Index window, const StorageFormat& format);

// Whether the configuration's decode steps can use DecodeArithmetic::int8_dot_products: a q4_0, int4 or
// int2 full cache, or such post-RoPE latents (pre-RoPE keys are reconstructed in float; the eviction and
// online-SVD caches decode in float).
bool takes_decode_arithmetic(const CacheConfiguration& configuration);

// The cache of a configuration; `projections` (at the chosen ranks) when it is compressed.
std::unique_ptr<llama::KvCache> make_cache(const llama::Transformer& model, const CacheConfiguration& configuration,
                                           const ModelProjections<float>* projections);

// The value of a required option, or a UsageError naming it.
template <typename T>
T required(const std::optional<T>& value, const std::string& option) {
  if (!value) throw UsageError(option + " is required");
  return *value;
}

// Parsers of the subcommands' shared options, as UsageErrors.
Method parse_method_name(const std::string& text, const std::string& option);
RopeMode parse_rope_name(const std::string& text, const std::string& option);
StorageFormat parse_format_name(const std::string& text, const std::string& option);
DecodeArithmetic parse_arithmetic_name(const std::string& text, const std::string& option);
// A comma-separated list of ratios in (0, 1] (`defaults` when the option is absent), and of methods
// (every method when absent).
std::vector<double> ratios_of(const Arguments& args, const std::string& option, std::vector<double> defaults);
std::vector<Method> methods_of(const Arguments& args, const std::string& option);

}  // namespace kqsvd::cli
