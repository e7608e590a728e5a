// kqsvd/io/activation_writer.hpp -- writes attention activations in the layout of activation_file.hpp.
//
//   kqsvd::io::ActivationWriter out(shape, /*tokens=*/128, {"stories260K", kqsvd::RopeMode::post_rope,
//                                                          kqsvd::RopeStyle::adjacent_pairs, 10000.0});
//   out.add(layer, queries, keys, values);   // one sequence of one layer, heads side by side in columns
//   out.set_output_weight(layer, wo);        // optional: layers.{l}.o_proj
//   out.write("calib.safetensors");          // atomically; refuses to replace a file unless asked
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

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/error.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/core/model_shape.hpp"
#include "kqsvd/io/activation_file.hpp"
#include "kqsvd/io/dtype.hpp"
#include "kqsvd/io/safetensors.hpp"

namespace kqsvd::io {

// Builds one activation file in memory, a sequence at a time, and writes it atomically. All sequences
// have the same length `tokens`; each layer receives them in the same order.
class ActivationWriter {
 public:
  using Index = Eigen::Index;

  ActivationWriter(const ModelShape& shape, Index tokens, ActivationMetadata metadata, DType storage = DType::f32)
      : shape_(shape), tokens_(tokens), metadata_(std::move(metadata)), storage_(storage) {
    constexpr const char* where = "kqsvd::io::ActivationWriter";
    shape_.validate();
    if (tokens_ <= 0) detail::throw_invalid(where, "tokens", "must be positive, got " + std::to_string(tokens_));
    if (metadata_.model.empty()) detail::throw_invalid(where, "metadata.model", "is empty");
    if (!(metadata_.rope_theta > 1.0) || !std::isfinite(metadata_.rope_theta)) {
      detail::throw_invalid(where, "metadata.rope_theta",
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
    shape_.require_layer_columns(where, queries.cols(), keys.cols(), values.cols());
    for (const Index rows : {queries.rows(), keys.rows(), values.rows()}) {
      if (rows != tokens_) {
        detail::throw_invalid(where, "queries/keys/values",
                                     "have " + std::to_string(rows) + " rows, expected " + std::to_string(tokens_) +
                                         " (the writer's tokens per sequence)");
      }
    }
    detail::require_finite(where, "queries", queries);
    detail::require_finite(where, "keys", keys);
    detail::require_finite(where, "values", values);
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
    detail::require_columns(where, "weight", weight.cols(), shape_.query_heads * shape_.head_dim,
                                   "query_heads x head_dim");
    if (weight.rows() == 0) detail::throw_invalid(where, "weight", "has no rows");
    detail::require_finite(where, "weight", weight);
    output_weights_[static_cast<std::size_t>(layer)] = weight.template cast<float>();
  }

  // An extra "__metadata__" entry (e.g. where the text came from); the layout's own keys are set from
  // the metadata given to the constructor and cannot be replaced here.
  void set_metadata(const std::string& key, const std::string& value) {
    if (key == "rope" || key == "rope_style" || key == "rope_theta" || key == "model") {
      detail::throw_invalid("kqsvd::io::ActivationWriter::set_metadata", "key",
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
    out.set_metadata("rope", rope_spelling(metadata_.rope));
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
  std::vector<RowMatrix<float>> output_weights_;
  std::map<std::string, std::string> extra_metadata_;
};

}  // namespace kqsvd::io
