// kqsvd/io/gram_file.hpp -- a model's calibration Grams saved to and loaded from a safetensors file:
// everything a fit needs, in d x d per head instead of the activations (a few hundred MB for a whole 7B
// model, whatever the number of calibration tokens). Gram files of shards of the calibration data merge
// exactly (sums of x^T x), so calibration runs wherever the data is -- other processes, other machines,
// PyTorch through the Python module -- and one fit reads them all.
//
// Tensors, per layer l (every Gram float64, summed, not averaged):
//   layers.{l}.kv_heads.{h}.keys.gram       [d, d]   K^T K of KV head h
//   layers.{l}.kv_heads.{h}.keys.largest    [d]      per column, the largest |k| added (underflow check)
//   layers.{l}.kv_heads.{h}.keys.tokens     [1]      tokens summed
//   layers.{l}.kv_heads.{h}.values.*                 the same for values
//   layers.{l}.query_heads.{j}.queries.*             the same for each query head's queries
//   layers.{l}.o_proj                       [hidden, query_heads * d]  F32, optional: the output projection
//                                                    weights KQ-SVD fits values to
// and "__metadata__": format ("kqsvd.grams"), format_version, model, layers, query_heads, kv_heads,
// head_dim, rope ("applied": Grams of rotated queries and keys, post-RoPE; "none": pre-RoPE),
// rope_style, rope_theta, producer.
//
//   kqsvd::io::GramFileInfo info;  info.model = "tinyllama-h64";  info.rope = kqsvd::RopeMode::post_rope;
//   kqsvd::io::GramFile(calibration, info, output_weights).save("shard0.grams.safetensors");
//   kqsvd::io::GramFile all = kqsvd::io::GramFile::load("shard0.grams.safetensors");
//   all.merge(kqsvd::io::GramFile::load("shard1.grams.safetensors"), "shard1.grams.safetensors");
//   auto projections = kqsvd::ModelProjections<float>::fit(all.calibration(), all.output_weights(), ...);
//
// load() validates everything -- metadata, the set of tensors, shapes, finiteness, symmetry -- and throws
// kqsvd::FormatError naming the file and the entry at fault; merge() refuses files of another model,
// shape or RoPE mode with an InvalidArgument naming the file and what differs.
#pragma once

#include <Eigen/Core>

#include <cstdint>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "kqsvd/calibration/gram_accumulator.hpp"
#include "kqsvd/calibration/model_calibration.hpp"
#include "kqsvd/core/error.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/core/rope.hpp"
#include "kqsvd/io/activation_file.hpp"
#include "kqsvd/io/detail/file_metadata.hpp"
#include "kqsvd/io/dtype.hpp"
#include "kqsvd/io/detail/number_text.hpp"
#include "kqsvd/io/detail/shape.hpp"
#include "kqsvd/io/safetensors.hpp"

namespace kqsvd::detail {

inline constexpr const char* gram_format = "kqsvd.grams";
inline constexpr int gram_format_version = 1;

inline std::string gram_kv_prefix(Eigen::Index layer, Eigen::Index kv_head, const char* side) {
  return "layers." + std::to_string(layer) + ".kv_heads." + std::to_string(kv_head) + "." + side;
}
inline std::string gram_query_prefix(Eigen::Index layer, Eigen::Index query_head) {
  return "layers." + std::to_string(layer) + ".query_heads." + std::to_string(query_head) + ".queries";
}

}  // namespace kqsvd::detail

namespace kqsvd::io {

struct GramFileInfo {
  std::string model;                        // as in the activation files' metadata
  RopeMode rope = RopeMode::post_rope;      // Grams of rotated (post-RoPE) or raw queries and keys
  RopeStyle rope_style = RopeStyle::adjacent_pairs;
  double rope_theta = 10000.0;
  std::string producer;                     // e.g. "kqsvd 0.2.0"
};


class GramFile {
 public:
  using Index = Eigen::Index;

  // output_weights: per layer o_proj.weight (hidden x query_heads * head_dim), or empty.
  GramFile(ModelCalibration calibration, GramFileInfo info, std::vector<RowMatrix<float>> output_weights = {})
      : calibration_(std::move(calibration)), info_(std::move(info)), output_weights_(std::move(output_weights)) {
    constexpr const char* where = "kqsvd::io::GramFile";
    const ModelShape& s = calibration_.shape();
    if (!output_weights_.empty() && static_cast<Index>(output_weights_.size()) != s.layers) {
      detail::throw_invalid(where, "output_weights",
                                   "holds " + std::to_string(output_weights_.size()) + " matrices, expected none or one per layer (" +
                                       std::to_string(s.layers) + ")");
    }
    for (const RowMatrix<float>& w : output_weights_) {
      if (w.cols() != s.query_width() || w.rows() == 0 || w.rows() != output_weights_.front().rows()) {
        detail::throw_invalid(where, "output_weights",
                                     "must all be hidden x " + std::to_string(s.query_width()) + " (one hidden size), got " +
                                         detail::shape_string(w.rows(), w.cols()));
      }
      detail::require_finite(where, "output_weights", w);
    }
    if (!(info_.rope_theta > 1.0) || !std::isfinite(info_.rope_theta)) {
      detail::throw_invalid(where, "info.rope_theta", "must be finite and > 1");
    }
  }

  const ModelCalibration& calibration() const { return calibration_; }
  const GramFileInfo& info() const { return info_; }
  const ModelShape& shape() const { return calibration_.shape(); }
  const std::vector<RowMatrix<float>>& output_weights() const { return output_weights_; }

  // Adds another file's Grams (a shard of the same model's calibration); `name` says which in errors.
  // Output weights: this file's, or the other's when this one has none.
  GramFile& merge(const GramFile& other, const std::string& name = "other") {
    constexpr const char* where = "kqsvd::io::GramFile::merge";
    const auto differs = [&](const std::string& what, const std::string& mine, const std::string& theirs) {
      throw InvalidArgument(std::string(where) + ": '" + name + "' holds Grams of " + what + " " + theirs + ", these of " +
                            mine + " (calibrations of one model, one RoPE mode merge)");
    };
    if (other.shape() != shape()) differs("a model of shape", to_string(shape()), to_string(other.shape()));
    if (other.info_.model != info_.model) differs("model", "'" + info_.model + "'", "'" + other.info_.model + "'");
    if (other.info_.rope != info_.rope) differs("RoPE mode", rope_spelling(info_.rope), rope_spelling(other.info_.rope));
    if (other.info_.rope_style != info_.rope_style || other.info_.rope_theta != info_.rope_theta) {
      differs("RoPE", std::string(to_string(info_.rope_style)) + " theta " + detail::format_number(info_.rope_theta),
              std::string(to_string(other.info_.rope_style)) + " theta " + detail::format_number(other.info_.rope_theta));
    }
    calibration_.merge(other.calibration_);
    if (output_weights_.empty()) output_weights_ = other.output_weights_;
    return *this;
  }

  // Atomic: a reader never sees a half-written file, and a failed write leaves no file behind.
  void save(const std::string& path, bool overwrite = false) const {
    const ModelShape& s = shape();
    SafetensorsWriter out;
    out.set_metadata("format", detail::gram_format);
    out.set_metadata("format_version", std::to_string(detail::gram_format_version));
    out.set_metadata("model", info_.model);
    out.set_metadata("layers", std::to_string(s.layers));
    out.set_metadata("query_heads", std::to_string(s.query_heads));
    out.set_metadata("kv_heads", std::to_string(s.kv_heads));
    out.set_metadata("head_dim", std::to_string(s.head_dim));
    out.set_metadata("rope", rope_spelling(info_.rope));
    out.set_metadata("rope_style", to_string(info_.rope_style));
    out.set_metadata("rope_theta", detail::format_number(info_.rope_theta));
    out.set_metadata("producer", info_.producer);
    for (Index l = 0; l < s.layers; ++l) {
      for (Index h = 0; h < s.kv_heads; ++h) {
        add(out, detail::gram_kv_prefix(l, h, "keys"), calibration_.keys(l, h));
        add(out, detail::gram_kv_prefix(l, h, "values"), calibration_.values(l, h));
      }
      for (Index j = 0; j < s.query_heads; ++j) add(out, detail::gram_query_prefix(l, j), calibration_.query_head(l, j));
      if (!output_weights_.empty()) {
        out.add("layers." + std::to_string(l) + ".o_proj", DType::f32, output_weights_[static_cast<std::size_t>(l)]);
      }
    }
    out.write(path, overwrite);
  }

  static GramFile load(const std::string& path) {
    const SafetensorsFile file(path);
    Reader reader{file};
    return reader.read();
  }

  // A Gram file's model shape and info from its metadata alone, its tensors neither read nor checked:
  // for checks that come before the Grams are needed (load() validates the rest).
  struct Header {
    ModelShape shape;
    GramFileInfo info;
  };
  static Header read_header(const std::string& path) {
    const SafetensorsFile file(path);
    return Reader{file}.header();
  }

 private:
  static void add(SafetensorsWriter& out, const std::string& prefix, const GramAccumulator& accumulator) {
    const Eigen::MatrixXd gram = accumulator.gram();
    out.add(prefix + ".gram", DType::f64, gram);
    const Eigen::ArrayXd& largest = accumulator.largest_magnitudes();
    out.add(prefix + ".largest", DType::f64, {static_cast<std::int64_t>(largest.size())}, largest.data(),
            static_cast<std::size_t>(largest.size()));
    const double tokens = static_cast<double>(accumulator.token_count());
    out.add(prefix + ".tokens", DType::f64, {1}, &tokens, 1);
  }

  struct Reader {
    const SafetensorsFile& file;
    std::set<std::string> expected_names{};
    detail::FileMetadata metadata{file, "kqsvd::io::GramFile"};

    [[noreturn]] void fail(const std::string& problem) const { metadata.fail(problem); }
    const std::string& entry(const char* key) const { return metadata.entry(key); }

    const TensorInfo& tensor(const std::string& name, const std::vector<std::int64_t>& shape) {
      if (!file.contains(name)) fail("has no tensor '" + name + "'");
      expected_names.insert(name);
      const TensorInfo& info = file.info(name);
      if (info.shape != shape) {
        fail("has tensor '" + name + "' of shape " + detail::format_shape(info.shape) + ", expected " +
             detail::format_shape(shape));
      }
      return info;
    }

    GramAccumulator accumulator(const std::string& prefix, Index d) {
      tensor(prefix + ".gram", {d, d});
      tensor(prefix + ".largest", {d});
      tensor(prefix + ".tokens", {1});
      const std::vector<double> gram = file.read<double>(prefix + ".gram", NonFinite::reject);
      const std::vector<double> largest = file.read<double>(prefix + ".largest", NonFinite::reject);
      const double tokens = file.read<double>(prefix + ".tokens", NonFinite::reject).front();
      if (!(tokens >= 0.0) || tokens > 9.0e15 || tokens != static_cast<double>(static_cast<std::int64_t>(tokens))) {
        fail("has tensor '" + prefix + ".tokens' = " + std::to_string(tokens) + ", expected a whole count");
      }
      try {
        return GramAccumulator::restored(Eigen::Map<const Eigen::MatrixXd>(gram.data(), d, d), static_cast<std::int64_t>(tokens),
                                         Eigen::Map<const Eigen::ArrayXd>(largest.data(), d));
      } catch (const InvalidArgument& error) {
        fail("has an invalid Gram at '" + prefix + "': " + error.what());
      }
    }

    Header header() const {
      metadata.require_format(detail::gram_format, detail::gram_format_version, "Gram file",
                              "is it an activation or projection file?");
      Header result{metadata.shape(), {}};
      result.info.model = entry("model");
      metadata.rope(result.info);
      result.info.producer = entry("producer");
      return result;
    }

    GramFile read() {
      auto [shape, info] = header();

      const Index d = shape.head_dim;
      ModelCalibration calibration(shape);
      std::vector<RowMatrix<float>> weights;
      for (Index l = 0; l < shape.layers; ++l) {
        for (Index h = 0; h < shape.kv_heads; ++h) {
          calibration.merge_keys(l, h, accumulator(detail::gram_kv_prefix(l, h, "keys"), d));
          calibration.merge_values(l, h, accumulator(detail::gram_kv_prefix(l, h, "values"), d));
        }
        for (Index j = 0; j < shape.query_heads; ++j) calibration.merge_queries(l, j, accumulator(detail::gram_query_prefix(l, j), d));
        const std::string o_proj = "layers." + std::to_string(l) + ".o_proj";
        if (file.contains(o_proj)) {
          const TensorInfo& info_o = file.info(o_proj);
          if (info_o.shape.size() != 2 || info_o.shape[1] != shape.query_width() || info_o.shape[0] < 1) {
            fail("has tensor '" + o_proj + "' of shape " + detail::format_shape(info_o.shape) + ", expected [hidden, " +
                 std::to_string(shape.query_width()) + "]");
          }
          expected_names.insert(o_proj);
          weights.push_back(file.read_matrix<float>(o_proj, {}, NonFinite::reject));
        } else if (!weights.empty()) {
          fail("has layers.0.o_proj but no '" + o_proj + "' (output weights are for every layer or none)");
        }
      }
      if (!weights.empty() && static_cast<Index>(weights.size()) != shape.layers) {
        fail("has o_proj for some layers only (output weights are for every layer or none)");
      }
      for (const std::string& name : file.names()) {
        if (expected_names.count(name) == 0) fail("has tensor '" + name + "', which is not part of a Gram file of this shape");
      }
      try {
        return GramFile(std::move(calibration), std::move(info), std::move(weights));
      } catch (const InvalidArgument& error) {
        fail(std::string("is inconsistent: ") + error.what());
      }
    }
  };

  ModelCalibration calibration_;
  GramFileInfo info_;
  std::vector<RowMatrix<float>> output_weights_;
};

}  // namespace kqsvd::io
