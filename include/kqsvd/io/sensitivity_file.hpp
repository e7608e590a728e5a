// kqsvd/io/sensitivity_file.hpp -- how much the loss feels each layer's compression error: the weights of
// the loss-aware rank allocation (solvers/budget_allocation.hpp), as a small JSON file.
//
//   {"format": "kqsvd.sensitivity", "version": 1, "method": "kqsvd", "model": "tinyllama-h64",
//    "rope": "applied", "probe": "...",
//    "layers": [{"key": 0.41, "value": 0.12}, {"key": [0.2, 0.3], "value": 0.05}, ...]}
//
// One entry per layer; "key" and "value" are w = loss (KL, nats per token) per unit of that layer's
// squared relative error (tail energy over total, summed over its KV heads), a number for the whole layer
// or an array with one weight per KV head. "method" is the method whose spectra the weights go with
// (kqsvd, ksvd, eigen); "rope" the activations' RoPE mode in the activation files' spelling ("applied":
// post-RoPE, "none": pre-RoPE); "model" and "probe" are free text ("probe" says how the weights were
// measured). docs/sensitivity.md describes the format and how to measure it.
//
//   kqsvd::io::Sensitivity s = kqsvd::io::read_sensitivity_file("sens.json", projections.shape());
//   auto allocation = kqsvd::loss_aware_allocation(projections, s.weights, kqsvd::MemoryBudget::fraction_of_full_cache(0.25));
//   kqsvd::io::write_sensitivity_file("copy.json", s, /*overwrite=*/false);
#pragma once

#include <nlohmann/json.hpp>

#include <cmath>
#include <string>

#include "kqsvd/core/error.hpp"
#include "kqsvd/core/model_shape.hpp"
#include "kqsvd/core/rope.hpp"
#include "kqsvd/io/activation_file.hpp"
#include "kqsvd/io/atomic_file.hpp"
#include "kqsvd/io/detail/file_contents.hpp"
#include "kqsvd/solvers/budget_allocation.hpp"
#include "kqsvd/solvers/method.hpp"

namespace kqsvd::io {

struct Sensitivity {
  Method method = Method::kq_svd;
  RopeMode rope = RopeMode::post_rope;
  std::string model;  // free text; empty when unknown
  std::string probe;  // how the weights were measured; free text
  LossWeights weights;
};

inline constexpr const char* sensitivity_format_name = "kqsvd.sensitivity";

}  // namespace kqsvd::io

namespace kqsvd::detail {

inline nlohmann::ordered_json weights_json(const LossWeights& weights, Eigen::Index layer, bool key) {
  const Eigen::Index heads = weights.shape().kv_heads;
  const auto weight = [&](Eigen::Index h) { return key ? weights.key(layer, h) : weights.value(layer, h); };
  bool same = true;
  for (Eigen::Index h = 1; h < heads; ++h) same = same && weight(h) == weight(0);
  if (same) return weight(0);
  nlohmann::ordered_json list = nlohmann::ordered_json::array();
  for (Eigen::Index h = 0; h < heads; ++h) list.push_back(weight(h));
  return list;
}

}  // namespace kqsvd::detail

namespace kqsvd::io {

// Writes atomically: the target is either untouched or the complete file.
inline void write_sensitivity_file(const std::string& path, const Sensitivity& sensitivity, bool overwrite = false) {
  nlohmann::ordered_json file;
  file["format"] = sensitivity_format_name;
  file["version"] = 1;
  file["method"] = to_string(sensitivity.method);
  file["model"] = sensitivity.model;
  file["rope"] = rope_spelling(sensitivity.rope);
  file["probe"] = sensitivity.probe;
  nlohmann::ordered_json layers = nlohmann::ordered_json::array();
  for (Eigen::Index l = 0; l < sensitivity.weights.shape().layers; ++l) {
    layers.push_back({{"key", detail::weights_json(sensitivity.weights, l, true)},
                      {"value", detail::weights_json(sensitivity.weights, l, false)}});
  }
  file["layers"] = std::move(layers);
  AtomicFileWriter out(path, overwrite);
  out.write(file.dump(2) + "\n");
  out.commit();
}

// Reads and validates a sensitivity file for a model of `shape` (its layer count and KV heads): anything
// else -- malformed JSON, another format, a wrong count of layers or heads, a weight that is negative, not
// finite or not a number -- is a FormatError naming the file and the entry. Whether the method, RoPE mode
// and model suit the projections is the caller's check (the fields are returned).
inline Sensitivity read_sensitivity_file(const std::string& path, const ModelShape& shape) {
  shape.validate();
  const kqsvd::detail::FileContents contents(path, "kqsvd::io::read_sensitivity_file");
  const auto fail = [&](const std::string& problem) -> void {
    throw FormatError("kqsvd::io::read_sensitivity_file: '" + path + "' " + problem);
  };
  nlohmann::json file;
  try {
    const auto* begin = reinterpret_cast<const char*>(contents.data());
    file = nlohmann::json::parse(begin, begin + contents.size());
  } catch (const nlohmann::json::exception& error) {
    fail(std::string("is not valid JSON: ") + error.what());
  }
  if (!file.is_object()) fail("is not a JSON object");
  const auto text = [&](const char* key, bool required) -> std::string {
    const auto entry = file.find(key);
    if (entry == file.end()) {
      if (required) fail(std::string("has no \"") + key + "\" entry");
      return "";
    }
    if (!entry->is_string()) fail(std::string("has a \"") + key + "\" that is not a string");
    return entry->get<std::string>();
  };
  if (text("format", true) != sensitivity_format_name) {
    fail("has \"format\" = \"" + text("format", true) + "\", expected \"" + sensitivity_format_name + "\"");
  }
  if (const auto version = file.find("version"); version != file.end() && !(version->is_number_integer() && *version == 1)) {
    fail("has \"version\" = " + version->dump() + "; this reader knows version 1");
  }
  Sensitivity result{Method::kq_svd, RopeMode::post_rope, text("model", false), text("probe", false), LossWeights(shape)};
  try {
    result.method = parse_method(text("method", true));
  } catch (const InvalidArgument&) {
    fail("has \"method\" = \"" + text("method", true) + "\", expected kqsvd, ksvd or eigen");
  }
  const std::string rope = text("rope", false);
  if (!rope.empty()) {
    try {
      result.rope = parse_rope_spelling(rope);
    } catch (const InvalidArgument&) {
      fail("has \"rope\" = \"" + rope + "\", expected \"applied\" (post-RoPE) or \"none\" (pre-RoPE)");
    }
  }
  const auto layers = file.find("layers");
  if (layers == file.end() || !layers->is_array()) fail("has no \"layers\" array");
  if (static_cast<Eigen::Index>(layers->size()) != shape.layers) {
    fail("has " + std::to_string(layers->size()) + " layers; the model has " + std::to_string(shape.layers));
  }
  for (Eigen::Index l = 0; l < shape.layers; ++l) {
    const nlohmann::json& layer = (*layers)[static_cast<std::size_t>(l)];
    if (!layer.is_object()) fail("layer " + std::to_string(l) + " is not an object");
    for (const bool key : {true, false}) {
      const char* name = key ? "key" : "value";
      const std::string where = "layer " + std::to_string(l) + " \"" + name + "\"";
      const auto entry = layer.find(name);
      if (entry == layer.end()) fail(where + " is missing");
      const auto weight_at = [&](const nlohmann::json& value, const std::string& which) {
        if (!value.is_number()) fail(which + " is not a number");
        const double w = value.get<double>();
        if (!std::isfinite(w) || w < 0.0) fail(which + " is " + value.dump() + "; weights are finite and >= 0");
        return w;
      };
      for (Eigen::Index h = 0; h < shape.kv_heads; ++h) {
        double w = 0.0;
        if (entry->is_array()) {
          if (static_cast<Eigen::Index>(entry->size()) != shape.kv_heads) {
            fail(where + " has " + std::to_string(entry->size()) + " weights; the model has " +
                 std::to_string(shape.kv_heads) + " KV heads");
          }
          w = weight_at((*entry)[static_cast<std::size_t>(h)], where + "[" + std::to_string(h) + "]");
        } else {
          w = weight_at(*entry, where);
        }
        key ? result.weights.set_key(l, h, w) : result.weights.set_value(l, h, w);
      }
    }
  }
  return result;
}

}  // namespace kqsvd::io
