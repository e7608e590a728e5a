// kqsvd/io/activations.hpp -- saved attention activations: the file layout, its reader and writer, and
// the two things done with them (calibrate projections, measure their fidelity).
//
// One safetensors file holds one batch of sequences of one model, in the layout of Hugging Face
// past_key_values (docs/activations.md):
//   layers.{l}.q       [batch, query_heads, T, head_dim]
//   layers.{l}.k, .v   [batch, kv_heads,    T, head_dim]
//   layers.{l}.o_proj  [hidden, query_heads * head_dim]   optional: the output-projection weight
//   __metadata__       rope = applied | none, rope_style = adjacent | half, rope_theta, model
// 3-D tensors (no batch axis) are one sequence. Every sequence is causal, starts at position 0 and is
// independent of the others. Tensors whose names do not start with "layers." are ignored.
//
//   kqsvd::io::ActivationFile calib("calib.safetensors");      // validates the whole layout
//   kqsvd::ModelCalibration calibration(calib.shape());
//   kqsvd::io::calibrate(calibration, calib);                   // one file at a time: O(d^2) memory
//   auto model = kqsvd::ModelProjections<float>::fit(calibration, calib.output_weights(),
//                                                    kqsvd::Method::kq_svd, kqsvd::RankSelection::fixed(16),
//                                                    kqsvd::RankSelection::fixed(16));
//   kqsvd::io::ActivationFile held_out("eval.safetensors");
//   std::vector<kqsvd::FidelityTotals> per_layer = kqsvd::io::measure(model, held_out, calib.output_weights());
//
//   kqsvd::io::ActivationWriter out(shape, /*tokens=*/128, {"stories260K", kqsvd::io::RopeMode::applied,
//                                                          kqsvd::RopeStyle::adjacent_pairs, 10000.0});
//   out.add(layer, queries, keys, values);   // one sequence of one layer, heads side by side in columns
//   out.write("calib.safetensors");
//
// A malformed file throws kqsvd::FormatError naming the file and the tensor or metadata entry.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <locale>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "kqsvd/error.hpp"
#include "kqsvd/fidelity.hpp"
#include "kqsvd/io/detail/shape.hpp"
#include "kqsvd/io/dtype.hpp"
#include "kqsvd/io/safetensors.hpp"
#include "kqsvd/model_calibration.hpp"
#include "kqsvd/model_projections.hpp"
#include "kqsvd/model_shape.hpp"
#include "kqsvd/rope.hpp"

namespace kqsvd::io {

// Whether the saved queries and keys have been rotated by RoPE (what attention scores with) or not
// (what a pre-RoPE cache compresses).
enum class RopeMode { applied, none };

inline const char* to_string(RopeMode mode) { return mode == RopeMode::applied ? "applied" : "none"; }

inline RopeMode parse_rope_mode(const std::string& name) {
  if (name == "applied") return RopeMode::applied;
  if (name == "none") return RopeMode::none;
  throw InvalidArgument("kqsvd::io::parse_rope_mode: unknown RoPE mode '" + name + "' (expected 'applied' or 'none')");
}

// The "__metadata__" entries the layout requires.
struct ActivationMetadata {
  std::string model;
  RopeMode rope = RopeMode::applied;
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

namespace detail {

inline std::string layer_tensor_name(Eigen::Index layer, const char* part) {
  return "layers." + std::to_string(layer) + "." + part;
}

// The whole string as a finite double, or nullopt. Always with a '.' decimal point, whatever the
// program's locale: metadata is written and read on different machines.
inline std::optional<double> parse_number(const std::string& text) {
  if (text.empty() || std::isspace(static_cast<unsigned char>(text.front())) != 0) return std::nullopt;
  std::istringstream in(text);
  in.imbue(std::locale::classic());
  double value = 0.0;
  in >> value;
  if (in.fail() || !in.eof() || !std::isfinite(value)) return std::nullopt;
  return value;
}

// Shortest text that reads back as the same double ("10000", "500000", "0.05").
inline std::string format_number(double value) {
  if (std::isfinite(value) && value == std::floor(value) && std::fabs(value) < 1e15) {
    return std::to_string(static_cast<std::int64_t>(value));
  }
  std::string text;
  for (int precision = 1; precision <= 17; ++precision) {
    std::ostringstream out;
    out.imbue(std::locale::classic());
    out.precision(precision);
    out << value;
    text = out.str();
    if (parse_number(text) == value) break;
  }
  return text;
}

// The whole string as a non-negative integer, or nullopt.
inline std::optional<std::int64_t> parse_count(const std::string& text) {
  if (text.empty() || text.size() > 18) return std::nullopt;
  std::int64_t value = 0;
  for (const char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
    value = value * 10 + (c - '0');
  }
  return value;
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

}  // namespace detail

class ActivationFile {
 public:
  using Index = Eigen::Index;
  using Matrix = RowMajorMatrix<float>;

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
      fail("has rope = " + std::string(to_string(metadata_.rope)) + versus + "has rope = " + to_string(other.rope));
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
      kqsvd::detail::throw_invalid(("kqsvd::io::ActivationFile::" + std::string(function)).c_str(), argument,
                                   "is " + std::to_string(head) + ", outside [0, " + std::to_string(heads) + ")");
    }
  }

  Matrix read(Index layer, const char* part, Index sequence, Index head) const {
    shape_.require_layer("kqsvd::io::ActivationFile::read", layer);
    if (sequence < 0 || sequence >= batch_) {
      kqsvd::detail::throw_invalid("kqsvd::io::ActivationFile::read", "sequence",
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
    metadata_.rope = parse_rope_mode(rope);
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
inline std::vector<RowMajorMatrix<float>> load_output_weights(const std::string& path, const ModelShape& shape) {
  shape.validate();
  const SafetensorsFile file(path);
  std::vector<RowMajorMatrix<float>> weights;
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
        calibration.keys(l, h).add(file.keys(l, b, h));
        calibration.values(l, h).add(file.values(l, b, h));
      }
      for (Eigen::Index h = 0; h < shape.query_heads; ++h) {
        calibration.query_head(l, h).add(file.queries(l, b, h));
      }
    }
  }
}

// The seven fidelity metrics of `projections` on every sequence of `file`, one FidelityTotals per layer
// (sum them for the whole model; add the results of several files). Computed per sequence, layer and KV
// head with kqsvd::measure_head_fidelity, causal within each sequence. Activations saved without RoPE
// (rope = none) are scored the pre-RoPE way: reconstructed keys and the queries are rotated first.
// output_weights: per layer, hidden x (query_heads * head_dim), e.g. file.output_weights().
template <typename Scalar, typename WeightMatrix>
std::vector<FidelityTotals> measure(const ModelProjections<Scalar>& projections, const ActivationFile& file,
                                    const std::vector<WeightMatrix>& output_weights) {
  constexpr const char* where = "kqsvd::io::measure";
  const ModelShape& shape = projections.shape();
  if (file.shape() != shape) {
    throw InvalidArgument(std::string(where) + ": '" + file.path() +
                          "' does not have the projections' shape (layers, heads, head_dim)");
  }
  if (static_cast<Eigen::Index>(output_weights.size()) != shape.layers) {
    kqsvd::detail::throw_invalid(where, "output_weights",
                                 "holds " + std::to_string(output_weights.size()) + " matrices, expected one per layer (" +
                                     std::to_string(shape.layers) + ")");
  }
  const Eigen::Index d = shape.head_dim;
  std::optional<RotaryEmbedding> rope;
  FidelityOptions options;
  if (file.metadata().rope == RopeMode::none) {
    rope = file.rotary_embedding();
    options.pre_rope = &*rope;
  }
  std::vector<FidelityTotals> per_layer(static_cast<std::size_t>(shape.layers));
  for (Eigen::Index l = 0; l < shape.layers; ++l) {
    const WeightMatrix& weight = output_weights[static_cast<std::size_t>(l)];
    kqsvd::detail::require_columns(where, "output_weights", weight.cols(), shape.query_heads * d,
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

// Builds one activation file in memory, a sequence at a time, and writes it atomically. All sequences
// have the same length `tokens`; each layer receives them in the same order.
class ActivationWriter {
 public:
  using Index = Eigen::Index;

  ActivationWriter(const ModelShape& shape, Index tokens, ActivationMetadata metadata, DType storage = DType::f32)
      : shape_(shape), tokens_(tokens), metadata_(std::move(metadata)), storage_(storage) {
    constexpr const char* where = "kqsvd::io::ActivationWriter";
    shape_.validate();
    if (tokens_ <= 0) kqsvd::detail::throw_invalid(where, "tokens", "must be positive, got " + std::to_string(tokens_));
    if (metadata_.model.empty()) kqsvd::detail::throw_invalid(where, "metadata.model", "is empty");
    if (!(metadata_.rope_theta > 1.0) || !std::isfinite(metadata_.rope_theta)) {
      kqsvd::detail::throw_invalid(where, "metadata.rope_theta",
                                   "must be finite and > 1, got " + std::to_string(metadata_.rope_theta));
    }
    layers_.resize(static_cast<std::size_t>(shape_.layers));
    output_weights_.resize(static_cast<std::size_t>(shape_.layers));
  }

  const ModelShape& shape() const { return shape_; }
  Index tokens() const { return tokens_; }

  // Sequences complete in every layer so far.
  Index sequences() const {
    std::size_t fewest = layers_.front().sequences;
    for (const LayerData& layer : layers_) fewest = std::min(fewest, layer.sequences);
    return static_cast<Index>(fewest);
  }

  // Appends one sequence of `layer`: queries tokens x (query_heads * head_dim), keys and values
  // tokens x (kv_heads * head_dim), heads side by side along the columns (as a forward pass computes them).
  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  void add(Index layer, const Eigen::MatrixBase<DerivedQ>& queries, const Eigen::MatrixBase<DerivedK>& keys,
           const Eigen::MatrixBase<DerivedV>& values) {
    constexpr const char* where = "kqsvd::io::ActivationWriter::add";
    shape_.require_layer(where, layer);
    const Index d = shape_.head_dim;
    kqsvd::detail::require_columns(where, "queries", queries.cols(), shape_.query_heads * d, "query_heads x head_dim");
    kqsvd::detail::require_columns(where, "keys", keys.cols(), shape_.kv_heads * d, "kv_heads x head_dim");
    kqsvd::detail::require_columns(where, "values", values.cols(), shape_.kv_heads * d, "kv_heads x head_dim");
    for (const Index rows : {queries.rows(), keys.rows(), values.rows()}) {
      if (rows != tokens_) {
        kqsvd::detail::throw_invalid(where, "queries/keys/values",
                                     "have " + std::to_string(rows) + " rows, expected " + std::to_string(tokens_) +
                                         " (the writer's tokens per sequence)");
      }
    }
    kqsvd::detail::require_finite(where, "queries", queries);
    kqsvd::detail::require_finite(where, "keys", keys);
    kqsvd::detail::require_finite(where, "values", values);
    LayerData& data = layers_[static_cast<std::size_t>(layer)];
    append_heads(data.queries, queries);
    append_heads(data.keys, keys);
    append_heads(data.values, values);
    ++data.sequences;
  }

  // layers.{layer}.o_proj: hidden x (query_heads * head_dim), the same hidden size in every layer.
  template <typename Derived>
  void set_output_weight(Index layer, const Eigen::MatrixBase<Derived>& weight) {
    constexpr const char* where = "kqsvd::io::ActivationWriter::set_output_weight";
    shape_.require_layer(where, layer);
    kqsvd::detail::require_columns(where, "weight", weight.cols(), shape_.query_heads * shape_.head_dim,
                                   "query_heads x head_dim");
    if (weight.rows() == 0) kqsvd::detail::throw_invalid(where, "weight", "has no rows");
    kqsvd::detail::require_finite(where, "weight", weight);
    output_weights_[static_cast<std::size_t>(layer)] = weight.template cast<float>();
  }

  // An extra "__metadata__" entry (e.g. where the text came from); the layout's own keys are set from
  // the metadata given to the constructor and cannot be replaced here.
  void set_metadata(const std::string& key, const std::string& value) {
    if (key == "rope" || key == "rope_style" || key == "rope_theta" || key == "model") {
      kqsvd::detail::throw_invalid("kqsvd::io::ActivationWriter::set_metadata", "key",
                                   "'" + key + "' is set from the constructor's metadata");
    }
    extra_metadata_[key] = value;
  }

  // Writes [batch, heads, tokens, head_dim] tensors; refuses to replace an existing file unless asked.
  void write(const std::string& path, bool overwrite = false) const {
    constexpr const char* where = "kqsvd::io::ActivationWriter::write";
    const Index batch = static_cast<Index>(layers_.front().sequences);
    if (batch == 0) throw InvalidArgument(std::string(where) + ": no sequences were added");
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      if (static_cast<Index>(layers_[l].sequences) != batch) {
        throw InvalidArgument(std::string(where) + ": layer " + std::to_string(l) + " has " +
                              std::to_string(layers_[l].sequences) + " sequences, layer 0 has " + std::to_string(batch));
      }
    }
    const std::size_t with_weights = static_cast<std::size_t>(
        std::count_if(output_weights_.begin(), output_weights_.end(), [](const auto& w) { return w.size() != 0; }));
    if (with_weights != 0 && with_weights != output_weights_.size()) {
      throw InvalidArgument(std::string(where) + ": output weights were set for some layers but not all");
    }
    for (const auto& weight : output_weights_) {
      if (weight.rows() != output_weights_.front().rows()) {
        throw InvalidArgument(std::string(where) + ": the output weights have different hidden sizes");
      }
    }

    SafetensorsWriter out;
    out.set_metadata("model", metadata_.model);
    out.set_metadata("rope", to_string(metadata_.rope));
    out.set_metadata("rope_style", to_string(metadata_.rope_style));
    out.set_metadata("rope_theta", detail::format_number(metadata_.rope_theta));
    for (const auto& [key, value] : extra_metadata_) out.set_metadata(key, value);
    for (Index l = 0; l < shape_.layers; ++l) {
      const LayerData& data = layers_[static_cast<std::size_t>(l)];
      out.add(detail::layer_tensor_name(l, "q"), storage_, {batch, shape_.query_heads, tokens_, shape_.head_dim},
              data.queries);
      out.add(detail::layer_tensor_name(l, "k"), storage_, {batch, shape_.kv_heads, tokens_, shape_.head_dim},
              data.keys);
      out.add(detail::layer_tensor_name(l, "v"), storage_, {batch, shape_.kv_heads, tokens_, shape_.head_dim},
              data.values);
      if (with_weights != 0) {
        out.add(detail::layer_tensor_name(l, "o_proj"), storage_, output_weights_[static_cast<std::size_t>(l)]);
      }
    }
    out.write(path, overwrite);
  }

 private:
  struct LayerData {
    std::vector<float> queries, keys, values;  // [sequence][head][token][head_dim], C order
    std::size_t sequences = 0;
  };

  // Appends a tokens x (heads * head_dim) block as [head][token][head_dim].
  template <typename Derived>
  void append_heads(std::vector<float>& buffer, const Eigen::MatrixBase<Derived>& block) const {
    const Index d = shape_.head_dim;
    for (Index h = 0; h < block.cols() / d; ++h) {
      for (Index t = 0; t < block.rows(); ++t) {
        for (Index j = 0; j < d; ++j) buffer.push_back(static_cast<float>(block(t, h * d + j)));
      }
    }
  }

  ModelShape shape_;
  Index tokens_;
  ActivationMetadata metadata_;
  DType storage_;
  std::vector<LayerData> layers_;
  std::vector<RowMajorMatrix<float>> output_weights_;
  std::map<std::string, std::string> extra_metadata_;
};

}  // namespace kqsvd::io
