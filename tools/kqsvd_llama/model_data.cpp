#include "model_data.hpp"

#include "errors.hpp"

namespace kqsvd::cli {

Sequences ModelData::encode(const std::pair<long, long>& range, std::size_t max_tokens, const std::string& option) const {
  if (static_cast<std::size_t>(range.second) > stories.size()) {
    throw UsageError(option + " " + std::to_string(range.first) + ":" + std::to_string(range.second) +
                     " reaches past the " + std::to_string(stories.size()) + " stories of the text");
  }
  return llama::encode_stories(tokenizer, stories, static_cast<std::size_t>(range.first),
                               static_cast<std::size_t>(range.second), max_tokens);
}

std::string ModelData::name() const {
  std::string name = model_path;
  const std::size_t slash = name.find_last_of('/');
  if (slash != std::string::npos && name.substr(slash + 1) == "model.bin" && slash > 0) name = name.substr(0, slash);
  name = name.substr(name.find_last_of('/') + 1);
  const std::size_t bin = name.rfind(".bin");
  return bin == std::string::npos ? name : name.substr(0, bin);
}

ModelData load_model_data(const Arguments& args, bool needs_text) {
  const std::string model_path = args.required_value("--model");
  const std::string tokenizer_path = args.required_value("--tokenizer");
  const std::optional<std::string> text = needs_text ? std::optional<std::string>(args.required_value("--text"))
                                                     : args.value("--text");
  llama::Transformer model(llama::Checkpoint::load(model_path));
  llama::Tokenizer tokenizer = llama::Tokenizer::load(tokenizer_path, model.config().vocab_size);
  std::vector<std::string> stories;
  if (text) stories = llama::read_stories(*text);
  return ModelData{model_path, std::move(model), std::move(tokenizer), std::move(stories)};
}

Calibrations calibrate(const llama::Transformer& model, const Sequences& sequences) {
  // One forward pass per sequence feeds both calibrations.
  struct BothModes : llama::ActivationObserver {
    explicit BothModes(const ModelShape& shape) : post(shape), pre(shape) {}
    void observe(const llama::AttentionActivations& a) override {
      post.add(a.layer, a.queries, a.keys, a.values);
      pre.add(a.layer, a.queries_pre_rope, a.keys_pre_rope, a.values);
    }
    ModelCalibration post, pre;
  } observer(model.shape());
  llama::observe_sequences(model, sequences, observer);
  return Calibrations{std::move(observer.post), std::move(observer.pre)};
}

const ModelProjections<float>& FullRankProjections::get(Method method, RopeMode mode) {
  const auto found = fitted_.find({method, mode});
  if (found != fitted_.end()) return found->second;
  const RankSelection full = RankSelection::fixed(model_->shape().head_dim);
  return fitted_
      .emplace(std::make_pair(method, mode),
               ModelProjections<float>::fit(calibrations_->of(mode), llama::output_weights(model_->checkpoint()), method,
                                            full, full))
      .first->second;
}

std::unique_ptr<llama::KvCache> make_cache(const llama::Transformer& model, const CacheConfiguration& configuration,
                                           const ModelProjections<float>* projections) {
  if (configuration.online_rank > 0) {
    return std::make_unique<llama::OnlineSvdKvCache>(model.shape(), model.rotary_embedding(), configuration.online_rank,
                                                     configuration.online_rank, configuration.format,
                                                     configuration.rope);
  }
  if (configuration.eviction) {
    if (!configuration.method) {
      return std::make_unique<llama::HeavyHitterKvCache>(model.shape(), model.rotary_embedding(), *configuration.eviction,
                                                         configuration.format);
    }
    return std::make_unique<llama::HeavyHitterKvCache>(model.shape(), model.rotary_embedding(), *configuration.eviction,
                                                       configuration.format, *projections);
  }
  if (!configuration.method) {
    return std::make_unique<llama::FullKvCache>(model.shape(), model.rotary_embedding(), configuration.format,
                                                configuration.arithmetic);
  }
  return std::make_unique<llama::CompressedKvCache>(model.shape(), model.rotary_embedding(), *projections,
                                                    configuration.rope, configuration.window, configuration.format,
                                                    configuration.arithmetic);
}

CacheConfiguration latent_configuration(Method method, RopeMode rope, Eigen::Index window, const StorageFormat& format) {
  CacheConfiguration configuration;
  configuration.method = method;
  configuration.rope = rope;
  configuration.window = window;
  configuration.format = format;
  return configuration;
}

bool takes_decode_arithmetic(const CacheConfiguration& configuration) {
  return int8_dot_products_apply(configuration.format) && !configuration.eviction && configuration.online_rank == 0 &&
         (!configuration.method || configuration.rope == RopeMode::post_rope);
}

Method parse_method_name(const std::string& text, const std::string& option) {
  try {
    return parse_method(text);
  } catch (const InvalidArgument&) {
    throw UsageError(option + " must be kqsvd, ksvd or eigen, got '" + text + "'");
  }
}

RopeMode parse_rope_name(const std::string& text, const std::string& option) {
  try {
    return parse_rope_mode(text);
  } catch (const InvalidArgument&) {
    throw UsageError(option + " must be post or pre, got '" + text + "'");
  }
}

StorageFormat parse_format_name(const std::string& text, const std::string& option) {
  try {
    return StorageFormat::parse(text);
  } catch (const InvalidArgument& error) {
    throw UsageError(option + ": " + error.what());
  }
}

DecodeArithmetic parse_arithmetic_name(const std::string& text, const std::string& option) {
  try {
    return parse_decode_arithmetic(text);
  } catch (const InvalidArgument&) {
    throw UsageError(option + " must be float32 or int8_dot_products, got '" + text + "'");
  }
}

std::vector<double> ratios_of(const Arguments& args, const std::string& option, std::vector<double> defaults) {
  if (args.items(option).empty()) return defaults;
  std::vector<double> ratios;
  for (const std::string& item : args.items(option)) {
    ratios.push_back(*Arguments({option, item}, {{option, OptionKind::value}}).number_above(option, 0.0, 1.0));
  }
  return ratios;
}

std::vector<Method> methods_of(const Arguments& args, const std::string& option) {
  if (args.items(option).empty()) return std::vector<Method>(all_methods.begin(), all_methods.end());
  std::vector<Method> methods;
  for (const std::string& item : args.items(option)) methods.push_back(parse_method_name(item, option));
  return methods;
}

}  // namespace kqsvd::cli
