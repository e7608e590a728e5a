// kqsvd/io/activation_file.hpp -- saved attention activations: the file layout and its reader.
//
// One safetensors file holds one batch of sequences of one model, in the layout of Hugging Face
// past_key_values (docs/activations.md):
//   layers.{l}.q       [batch, query_heads, T, head_dim]
//   layers.{l}.k, .v   [batch, kv_heads,    T, head_dim]
//   layers.{l}.o_proj  [hidden, query_heads * head_dim]   optional: the output-projection weight
//   __metadata__       rope = applied | none, rope_style = adjacent | half, rope_theta, model
// 3-D tensors (no batch axis) are one sequence. Every sequence is causal, starts at position 0 and is
// independent of the others. Tensors whose names do not start with "layers." are ignored. "rope =
// applied" is kqsvd::RopeMode::post_rope (queries and keys saved after the rotation), "none" pre_rope.
//
//   kqsvd::io::ActivationFile calib("calib.safetensors");      // validates the whole layout
//   calib.shape();  calib.metadata().rope;                      // ModelShape, RopeMode
//   kqsvd::RowMatrix<float> k = calib.keys(/*layer=*/0, /*sequence=*/0, /*kv_head=*/1);   // T x head_dim
//
// io/activation_writer.hpp writes the layout; io/activation_evaluation.hpp calibrates and measures
// projections on it. A malformed file throws kqsvd::FormatError naming the file and the tensor or
// metadata entry.
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

#include "kqsvd/core/error.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/core/model_shape.hpp"
#include "kqsvd/core/rope.hpp"
#include "kqsvd/io/detail/number_text.hpp"
#include "kqsvd/io/detail/shape.hpp"
#include "kqsvd/io/dtype.hpp"
#include "kqsvd/io/safetensors.hpp"

namespace kqsvd::io {

// The files' spelling of the RoPE mode: "applied" (queries and keys saved after the rotation, what a
// post-RoPE cache compresses) or "none" (before it, pre-RoPE).
inline const char* rope_spelling(RopeMode mode) { return mode == RopeMode::post_rope ? "applied" : "none"; }

inline RopeMode parse_rope_spelling(const std::string& text) {
  if (text == "applied") return RopeMode::post_rope;
  if (text == "none") return RopeMode::pre_rope;
  throw InvalidArgument("kqsvd::io::parse_rope_spelling: unknown RoPE spelling '" + text + "' (expected 'applied' or 'none')");
}

// The "__metadata__" entries the layout requires.
struct ActivationMetadata {
  std::string model;
  RopeMode rope = RopeMode::post_rope;
  RopeStyle rope_style = RopeStyle::adjacent_pairs;
  double rope_theta = 10000.0;
};

// What must agree between the files of one data set (and between projections and the data they are
// evaluated on): the attention geometry and how the activations were captured.
struct ActivationLayout {
  ModelShape shape;
  ActivationMetadata metadata;
  std::string source;  // the file it describes, for messages
};

}  // namespace kqsvd::io

namespace kqsvd::detail {

inline std::string layer_tensor_name(Eigen::Index layer, const char* part) {
  return "layers." + std::to_string(layer) + "." + part;
}

// Splits "layers.{l}.{part}" into l and part; nullopt for any other name under "layers.", including
// layer numbers with leading zeros (two spellings of one layer would make the layout ambiguous).
inline std::optional<std::pair<Eigen::Index, std::string>> split_layer_tensor_name(const std::string& name) {
  constexpr std::size_t prefix = 7;  // "layers."
  const std::size_t dot = name.find('.', prefix);
  if (dot == std::string::npos || dot == prefix) return std::nullopt;
  const std::string number = name.substr(prefix, dot - prefix);
  if (number.size() > 1 && number.front() == '0') return std::nullopt;
  const auto layer = parse_count(number);
  if (!layer || *layer > 1'000'000) return std::nullopt;
  return std::make_pair(static_cast<Eigen::Index>(*layer), name.substr(dot + 1));
}

}  // namespace kqsvd::detail

namespace kqsvd::io {

class ActivationFile {
 public:
  using Index = Eigen::Index;
  using Matrix = RowMatrix<float>;

  explicit ActivationFile(std::string path) : file_(std::move(path)) {
    read_metadata();
    read_layout();
  }

  const std::string& path() const { return file_.path(); }
  const SafetensorsFile& tensors() const { return file_; }

  const ModelShape& shape() const { return shape_; }
  Index batch() const { return batch_; }                // sequences in this file
  Index tokens() const { return tokens_; }              // tokens per sequence (T)
  Index token_count() const { return batch_ * tokens_; }
  const ActivationMetadata& metadata() const { return metadata_; }
  ActivationLayout layout() const { return {shape_, metadata_, path()}; }

  // The rotation the model applies to queries and keys (pre-RoPE evaluation re-applies it).
  RotaryEmbedding rotary_embedding() const {
    if (shape_.head_dim % 2 != 0) {
      fail("has head_dim " + std::to_string(shape_.head_dim) + ", which is odd: RoPE rotates pairs of dimensions");
    }
    return RotaryEmbedding(shape_.head_dim, metadata_.rope_theta, metadata_.rope_style);
  }

  // T x head_dim: the activations of one sequence, one head.
  Matrix queries(Index layer, Index sequence, Index query_head) const {
    require_head("queries", "query_head", query_head, shape_.query_heads);
    return read(layer, "q", sequence, query_head);
  }
  Matrix keys(Index layer, Index sequence, Index kv_head) const {
    require_head("keys", "kv_head", kv_head, shape_.kv_heads);
    return read(layer, "k", sequence, kv_head);
  }
  Matrix values(Index layer, Index sequence, Index kv_head) const {
    require_head("values", "kv_head", kv_head, shape_.kv_heads);
    return read(layer, "v", sequence, kv_head);
  }

  // (g T) x head_dim: the queries of the g query heads that read `kv_head`, stacked head by head -- the
  // group_queries argument of kqsvd::measure_head_fidelity.
  Matrix group_queries(Index layer, Index sequence, Index kv_head) const {
    require_head("group_queries", "kv_head", kv_head, shape_.kv_heads);
    const Index group = shape_.group_size();
    Matrix stacked(group * tokens_, shape_.head_dim);
    for (Index j = 0; j < group; ++j) {
      stacked.middleRows(j * tokens_, tokens_) = read(layer, "q", sequence, shape_.first_query_head_of(kv_head) + j);
    }
    return stacked;
  }

  bool has_output_weights() const { return hidden_size_ > 0; }
  Index hidden_size() const { return hidden_size_; }  // 0 without output weights

  // hidden x (query_heads * head_dim): layers.{l}.o_proj, PyTorch layout.
  Matrix output_weight(Index layer) const {
    shape_.require_layer("kqsvd::io::ActivationFile::output_weight", layer);
    if (!has_output_weights()) {
      throw InvalidArgument("kqsvd::io::ActivationFile::output_weight: '" + path() +
                            "' holds no output-projection weights (layers.{l}.o_proj)");
    }
    return file_.read_matrix<float>(detail::layer_tensor_name(layer, "o_proj"), {}, NonFinite::reject);
  }

  // Every layer's output_weight(), or an empty vector when the file has none.
  std::vector<Matrix> output_weights() const {
    std::vector<Matrix> weights;
    if (!has_output_weights()) return weights;
    for (Index l = 0; l < shape_.layers; ++l) weights.push_back(output_weight(l));
    return weights;
  }

  // Throws FormatError unless this file has the expected geometry and capture settings. The model name
  // must match too: files of different models sharing a shape are a mistake worth stopping for.
  void require_layout(const ActivationLayout& expected) const {
    const auto describe = [](const ModelShape& s) {
      return std::to_string(s.layers) + " layers, " + std::to_string(s.query_heads) + " query heads, " +
             std::to_string(s.kv_heads) + " KV heads, head_dim " + std::to_string(s.head_dim);
    };
    const std::string versus = " but '" + expected.source + "' ";
    if (shape_ != expected.shape) {
      fail("has " + describe(shape_) + versus + "has " + describe(expected.shape));
    }
    const ActivationMetadata& other = expected.metadata;
    if (metadata_.model != other.model) {
      fail("is of model '" + metadata_.model + "'" + versus + "is of model '" + other.model + "'");
    }
    if (metadata_.rope != other.rope) {
      fail("has rope = " + std::string(rope_spelling(metadata_.rope)) + versus + "has rope = " + rope_spelling(other.rope));
    }
    if (metadata_.rope_style != other.rope_style || metadata_.rope_theta != other.rope_theta) {
      fail("has RoPE style " + std::string(to_string(metadata_.rope_style)) + " theta " +
           detail::format_number(metadata_.rope_theta) + versus + "has style " + to_string(other.rope_style) +
           " theta " + detail::format_number(other.rope_theta));
    }
  }

 private:
  [[noreturn]] void fail(const std::string& problem) const {
    throw FormatError("kqsvd::io::ActivationFile: '" + path() + "' " + problem);
  }

  [[noreturn]] void fail_tensor(const std::string& tensor, const std::string& problem) const {
    fail("tensor '" + tensor + "' " + problem);
  }

  void require_head(const char* function, const char* argument, Index head, Index heads) const {
    if (head < 0 || head >= heads) {
      detail::throw_invalid(("kqsvd::io::ActivationFile::" + std::string(function)).c_str(), argument,
                                   "is " + std::to_string(head) + ", outside [0, " + std::to_string(heads) + ")");
    }
  }

  Matrix read(Index layer, const char* part, Index sequence, Index head) const {
    shape_.require_layer("kqsvd::io::ActivationFile::read", layer);
    if (sequence < 0 || sequence >= batch_) {
      detail::throw_invalid("kqsvd::io::ActivationFile::read", "sequence",
                                   "is " + std::to_string(sequence) + ", outside [0, " + std::to_string(batch_) + ")");
    }
    const std::string name = detail::layer_tensor_name(layer, part);
    std::vector<std::int64_t> leading{head};
    if (file_.info(name).shape.size() == 4) leading.insert(leading.begin(), sequence);
    return file_.read_matrix<float>(name, leading, NonFinite::reject);
  }

  const std::string& required_metadata(const char* key, const char* expected) const {
    const auto found = file_.metadata().find(key);
    if (found == file_.metadata().end()) {
      fail(std::string("has no '") + key + "' entry in its __metadata__ (expected " + expected +
           "; see docs/activations.md)");
    }
    return found->second;
  }

  void read_metadata() {
    const std::string& rope = required_metadata("rope", "'applied' or 'none'");
    if (rope != "applied" && rope != "none") {
      fail("has __metadata__ rope = '" + rope + "', expected 'applied' or 'none'");
    }
    metadata_.rope = parse_rope_spelling(rope);
    const std::string& style = required_metadata("rope_style", "'adjacent' or 'half'");
    try {
      metadata_.rope_style = parse_rope_style(style);
    } catch (const InvalidArgument&) {
      fail("has __metadata__ rope_style = '" + style + "', expected 'adjacent' or 'half'");
    }
    const std::string& theta = required_metadata("rope_theta", "a number > 1, e.g. '10000'");
    const auto parsed_theta = detail::parse_number(theta);
    if (!parsed_theta || !(*parsed_theta > 1.0)) {
      fail("has __metadata__ rope_theta = '" + theta + "', expected a finite number > 1");
    }
    metadata_.rope_theta = *parsed_theta;
    metadata_.model = required_metadata("model", "the model's name");
    if (metadata_.model.empty()) fail("has an empty __metadata__ model entry");
  }

  // Dimensions of a q/k/v tensor as (batch, heads, T, head_dim), or a FormatError.
  std::vector<std::int64_t> activation_dimensions(const std::string& name) const {
    const std::vector<std::int64_t>& shape = file_.info(name).shape;
    if (shape.size() != 3 && shape.size() != 4) {
      fail_tensor(name, "has shape " + detail::format_shape(shape) +
                            ", expected [batch, heads, tokens, head_dim] or [heads, tokens, head_dim]");
    }
    std::vector<std::int64_t> dimensions = shape;
    if (dimensions.size() == 3) dimensions.insert(dimensions.begin(), 1);
    static const char* const axes[] = {"batch", "heads", "tokens", "head_dim"};
    for (std::size_t axis = 0; axis < 4; ++axis) {
      if (dimensions[axis] == 0) fail_tensor(name, "has shape " + detail::format_shape(shape) + ": its " + axes[axis] + " axis is empty");
    }
    return dimensions;
  }

  void read_layout() {
    // Which layers and parts the file holds.
    std::map<Index, std::map<std::string, std::string>> layers;  // layer -> part -> tensor name
    for (const std::string& name : file_.names()) {
      if (name.rfind("layers.", 0) != 0) continue;
      const auto split = detail::split_layer_tensor_name(name);
      if (!split || (split->second != "q" && split->second != "k" && split->second != "v" && split->second != "o_proj")) {
        fail_tensor(name, "is not part of the activation layout (layers.{l}.q, .k, .v and .o_proj)");
      }
      layers[split->first][split->second] = name;
    }
    if (layers.empty()) fail("holds no activations: no tensors named layers.{l}.q, layers.{l}.k, layers.{l}.v");
    Index expected_layer = 0;
    for (const auto& [layer, parts] : layers) {
      if (layer != expected_layer) {
        fail("has tensors of layer " + std::to_string(layer) + " but none of layer " + std::to_string(expected_layer) +
             " (layers must be numbered 0, 1, 2, ...)");
      }
      for (const char* part : {"q", "k", "v"}) {
        if (parts.count(part) == 0) fail("has no tensor '" + detail::layer_tensor_name(layer, part) + "'");
      }
      ++expected_layer;
    }

    // Layer 0's queries and keys fix the geometry; everything else must agree with it.
    const std::vector<std::int64_t> q0 = activation_dimensions(detail::layer_tensor_name(0, "q"));
    const std::vector<std::int64_t> k0 = activation_dimensions(detail::layer_tensor_name(0, "k"));
    batch_ = q0[0];
    tokens_ = q0[2];
    shape_.layers = static_cast<Index>(layers.size());
    shape_.query_heads = q0[1];
    shape_.kv_heads = k0[1];
    shape_.head_dim = q0[3];
    if (shape_.query_heads % shape_.kv_heads != 0) {
      fail("has " + std::to_string(shape_.query_heads) + " query heads (layers.0.q) and " +
           std::to_string(shape_.kv_heads) + " KV heads (layers.0.k): the KV heads must divide the query heads");
    }
    for (Index l = 0; l < shape_.layers; ++l) {
      for (const char* part : {"q", "k", "v"}) {
        const std::string name = detail::layer_tensor_name(l, part);
        const std::vector<std::int64_t> dimensions = activation_dimensions(name);
        const Index heads = part[0] == 'q' ? shape_.query_heads : shape_.kv_heads;
        const std::vector<std::int64_t> expected{batch_, heads, tokens_, shape_.head_dim};
        if (dimensions != expected) {
          fail_tensor(name, "has shape " + detail::format_shape(file_.info(name).shape) + ", expected " +
                                detail::format_shape(expected) + " ([batch, " +
                                (part[0] == 'q' ? "query_heads" : "kv_heads") +
                                ", tokens, head_dim], as layers.0.q and layers.0.k)");
        }
      }
    }

    // Output-projection weights: in every layer or in none.
    const std::size_t with_weights =
        static_cast<std::size_t>(std::count_if(layers.begin(), layers.end(), [](const auto& entry) {
          return entry.second.count("o_proj") != 0;
        }));
    if (with_weights != 0 && with_weights != layers.size()) {
      for (Index l = 0; l < shape_.layers; ++l) {
        if (layers[l].count("o_proj") == 0) {
          fail("has output-projection weights for some layers but no '" + detail::layer_tensor_name(l, "o_proj") + "'");
        }
      }
    }
    if (with_weights == 0) return;
    for (Index l = 0; l < shape_.layers; ++l) {
      const std::string name = detail::layer_tensor_name(l, "o_proj");
      const std::vector<std::int64_t>& shape = file_.info(name).shape;
      const Index width = shape_.query_heads * shape_.head_dim;
      if (shape.size() != 2 || shape[1] != width || shape[0] == 0 || (l > 0 && shape[0] != hidden_size_)) {
        fail_tensor(name, "has shape " + detail::format_shape(shape) + ", expected [hidden, " + std::to_string(width) +
                              "] (hidden x query_heads * head_dim" +
                              (l > 0 ? ", hidden = " + std::to_string(hidden_size_) + " as in layers.0.o_proj" : "") +
                              ")");
      }
      hidden_size_ = shape[0];
    }
  }

  SafetensorsFile file_;
  ActivationMetadata metadata_;
  ModelShape shape_;
  Index batch_ = 0;
  Index tokens_ = 0;
  Index hidden_size_ = 0;
};

// The output-projection weights of every layer from a separate weights file: tensors named
// layers.{l}.o_proj (this layout) or model.layers.{l}.self_attn.o_proj.weight (a Hugging Face
// checkpoint's model.safetensors), each hidden x (query_heads * head_dim).
inline std::vector<RowMatrix<float>> load_output_weights(const std::string& path, const ModelShape& shape) {
  shape.validate();
  const SafetensorsFile file(path);
  std::vector<RowMatrix<float>> weights;
  for (Eigen::Index l = 0; l < shape.layers; ++l) {
    std::string name = detail::layer_tensor_name(l, "o_proj");
    if (!file.contains(name)) name = "model.layers." + std::to_string(l) + ".self_attn.o_proj.weight";
    if (!file.contains(name)) {
      throw FormatError("kqsvd::io::load_output_weights: '" + path + "' has neither 'layers." + std::to_string(l) +
                        ".o_proj' nor '" + name + "'");
    }
    const std::vector<std::int64_t>& tensor_shape = file.info(name).shape;
    const Eigen::Index width = shape.query_heads * shape.head_dim;
    if (tensor_shape.size() != 2 || tensor_shape[1] != width || tensor_shape[0] == 0) {
      throw FormatError("kqsvd::io::load_output_weights: '" + path + "': tensor '" + name + "' has shape " +
                        detail::format_shape(tensor_shape) + ", expected [hidden, " + std::to_string(width) + "]");
    }
    weights.push_back(file.read_matrix<float>(name, {}, NonFinite::reject));
  }
  return weights;
}

}  // namespace kqsvd::io
