// kqsvd/io/projection_file.hpp -- fitted projections of a whole model, saved to and loaded from a
// safetensors file, with what is needed to use them correctly (method, model shape, RoPE mode).
//
// Tensors, per layer l and KV head h (ranks may differ from head to head):
//   layers.{l}.kv_heads.{h}.key.encoder          [head_dim, r]  F32   A
//   layers.{l}.kv_heads.{h}.key.decoder          [head_dim, r]  F32   B
//   layers.{l}.kv_heads.{h}.key.singular_values  [head_dim]     F64   the objective's spectrum
//   layers.{l}.kv_heads.{h}.value.*              the same for the value projection
// and "__metadata__": format, format_version, method, layers, query_heads, kv_heads, head_dim, model,
// rope, rope_style, rope_theta, key_rank_selection, value_rank_selection, calibration_tokens, producer,
// latent_basis ("ordered_by_importance", or "rotated" for projections whose latents were rotated, e.g.
// by kqsvd::hadamard_rotated; a rotated file cannot be truncated; absent in older files: ordered), and
// optionally rank_allocation (free text: how per-head ranks were spent on a memory budget, e.g.
// "loss-aware, 0.25 of the full cache in f32, joint budget, sensitivity sens.json").
// float and double values are stored in full, so save() then load() gives back identical projections.
//
//   kqsvd::io::ProjectionInfo info;
//   info.model = "tinyllama-h64";  info.calibration_tokens = calibration.keys(0, 0).token_count();
//   info.key_rank = kqsvd::RankSelection::fixed(16);
//   kqsvd::io::ProjectionFile(projections, info).save("proj.safetensors");
//   kqsvd::io::ProjectionFile loaded = kqsvd::io::ProjectionFile::load("proj.safetensors");
//   const auto& key_proj = loaded.projections().keys(layer, kv_head);
//
// load() validates everything -- metadata, the set of tensor names, shapes, finiteness -- and throws
// kqsvd::FormatError naming the file and the entry or tensor at fault.
#pragma once

#include <Eigen/Core>

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "kqsvd/core/error.hpp"
#include "kqsvd/io/activation_file.hpp"
#include "kqsvd/io/detail/file_metadata.hpp"
#include "kqsvd/io/dtype.hpp"
#include "kqsvd/io/safetensors.hpp"
#include "kqsvd/solvers/low_rank_projection.hpp"
#include "kqsvd/solvers/method.hpp"
#include "kqsvd/solvers/fit.hpp"
#include "kqsvd/solvers/model_projections.hpp"
#include "kqsvd/solvers/rank_selection.hpp"

namespace kqsvd::io {

// How the projections were made and what data they apply to.
struct ProjectionInfo {
  std::string model;                         // as in the activation files' metadata
  RopeMode rope = RopeMode::post_rope;       // the projections act on rotated (post-RoPE) or raw keys
  RopeStyle rope_style = RopeStyle::adjacent_pairs;
  double rope_theta = 10000.0;
  std::optional<RankSelection> key_rank;     // how the ranks were chosen, when known
  std::optional<RankSelection> value_rank;
  std::string rank_allocation;               // how per-head ranks were spent on a budget; empty when not
  std::int64_t calibration_tokens = 0;       // tokens per head the Grams were built from
  std::string producer;                      // e.g. "kqsvd 0.1.0"
};

}  // namespace kqsvd::io

namespace kqsvd::detail {

constexpr const char* projection_format = "kqsvd.projections";
constexpr int projection_format_version = 1;

inline std::string projection_tensor_name(Eigen::Index layer, Eigen::Index kv_head, const char* side,
                                          const char* part) {
  return "layers." + std::to_string(layer) + ".kv_heads." + std::to_string(kv_head) + "." + side + "." + part;
}

// "rank:16" or "epsilon:0.05".
inline std::string format_rank_selection(const RankSelection& selection) {
  return selection.is_fixed() ? "rank:" + std::to_string(selection.rank())
                              : "epsilon:" + format_number(selection.epsilon());
}

inline std::optional<RankSelection> parse_rank_selection(const std::string& text) {
  try {
    if (text.rfind("rank:", 0) == 0) {
      const auto rank = parse_count(text.substr(5));
      if (rank) return RankSelection::fixed(static_cast<Eigen::Index>(*rank));
    } else if (text.rfind("epsilon:", 0) == 0) {
      const auto epsilon = parse_number(text.substr(8));
      if (epsilon) return RankSelection::error_budget(*epsilon);
    }
  } catch (const InvalidArgument&) {
  }
  return std::nullopt;
}

}  // namespace kqsvd::detail

namespace kqsvd::io {

class ProjectionFile {
 public:
  using Index = Eigen::Index;
  using Projections = ModelProjections<float>;

  ProjectionFile(Projections projections, ProjectionInfo info)
      : projections_(std::move(projections)), info_(std::move(info)) {
    if (!(info_.rope_theta > 1.0) || !std::isfinite(info_.rope_theta)) {
      detail::throw_invalid("kqsvd::io::ProjectionFile", "info.rope_theta",
                                   "must be finite and > 1, got " + std::to_string(info_.rope_theta));
    }
    if (info_.calibration_tokens < 0) {
      detail::throw_invalid("kqsvd::io::ProjectionFile", "info.calibration_tokens", "is negative");
    }
    const ModelShape& s = projections_.shape();
    for (Index l = 0; l < s.layers; ++l) {
      for (Index h = 0; h < s.kv_heads; ++h) {
        if (projections_.keys(l, h).basis() != basis() || projections_.values(l, h).basis() != basis()) {
          detail::throw_invalid("kqsvd::io::ProjectionFile", "projections",
                                "mix rotated and unrotated heads (layer " + std::to_string(l) + ", KV head " +
                                    std::to_string(h) + "); rotate all of them or none");
        }
      }
    }
  }

  const Projections& projections() const { return projections_; }
  const ProjectionInfo& info() const { return info_; }
  const ModelShape& shape() const { return projections_.shape(); }
  // The method of the key projections (the value projections of K-SVD and Eigen Attention are V-SVD,
  // Method::k_svd: value_method(method())).
  Method method() const { return projections_.method(); }
  // Whether the latents were rotated (then every head is) or keep the method's order of importance.
  LatentBasis basis() const { return projections_.keys(0, 0).basis(); }

  // Atomic: a reader never sees a half-written file, and a failed write leaves no file behind.
  void save(const std::string& path, bool overwrite = false) const {
    const ModelShape& s = shape();
    SafetensorsWriter out;
    out.set_metadata("format", detail::projection_format);
    out.set_metadata("format_version", std::to_string(detail::projection_format_version));
    out.set_metadata("method", to_string(method()));
    out.set_metadata("layers", std::to_string(s.layers));
    out.set_metadata("query_heads", std::to_string(s.query_heads));
    out.set_metadata("kv_heads", std::to_string(s.kv_heads));
    out.set_metadata("head_dim", std::to_string(s.head_dim));
    out.set_metadata("model", info_.model);
    out.set_metadata("rope", rope_spelling(info_.rope));
    out.set_metadata("rope_style", to_string(info_.rope_style));
    out.set_metadata("rope_theta", detail::format_number(info_.rope_theta));
    if (info_.key_rank) out.set_metadata("key_rank_selection", detail::format_rank_selection(*info_.key_rank));
    if (info_.value_rank) out.set_metadata("value_rank_selection", detail::format_rank_selection(*info_.value_rank));
    if (!info_.rank_allocation.empty()) out.set_metadata("rank_allocation", info_.rank_allocation);
    out.set_metadata("calibration_tokens", std::to_string(info_.calibration_tokens));
    out.set_metadata("producer", info_.producer);
    out.set_metadata("latent_basis", to_string(basis()));
    for (Index l = 0; l < s.layers; ++l) {
      for (Index h = 0; h < s.kv_heads; ++h) {
        add_projection(out, projections_.keys(l, h), l, h, "key");
        add_projection(out, projections_.values(l, h), l, h, "value");
      }
    }
    out.write(path, overwrite);
  }

  static ProjectionFile load(const std::string& path) {
    const SafetensorsFile file(path);
    Reader reader{file};
    return reader.read();
  }

 private:
  static void add_projection(SafetensorsWriter& out, const LowRankProjection<float>& projection, Index layer,
                             Index kv_head, const char* side) {
    out.add(detail::projection_tensor_name(layer, kv_head, side, "encoder"), DType::f32, projection.encoder());
    out.add(detail::projection_tensor_name(layer, kv_head, side, "decoder"), DType::f32, projection.decoder());
    const Eigen::VectorXd& values = projection.singular_values();
    out.add(detail::projection_tensor_name(layer, kv_head, side, "singular_values"), DType::f64,
            {static_cast<std::int64_t>(values.size())}, values.data(), static_cast<std::size_t>(values.size()));
  }

  // Validates a file while turning it back into projections.
  struct Reader {
    const SafetensorsFile& file;
    std::set<std::string> expected_names{};
    detail::FileMetadata metadata{file, "kqsvd::io::ProjectionFile"};

    [[noreturn]] void fail(const std::string& problem) const { metadata.fail(problem); }
    const std::string& entry(const char* key) const { return metadata.entry(key); }

    ProjectionFile read() {
      metadata.require_format(detail::projection_format, detail::projection_format_version, "projection file",
                              "is it an activation file?");
      Method method = Method::kq_svd;
      try {
        method = parse_method(entry("method"));
      } catch (const InvalidArgument&) {
        fail("has __metadata__ method = '" + entry("method") + "', expected kqsvd, ksvd or eigen");
      }
      const ModelShape shape = metadata.shape();

      ProjectionInfo info;
      info.model = entry("model");
      metadata.rope(info);
      for (auto [key, target] : {std::pair{"key_rank_selection", &info.key_rank},
                                 std::pair{"value_rank_selection", &info.value_rank}}) {
        const auto found = file.metadata().find(key);
        if (found == file.metadata().end()) continue;
        *target = detail::parse_rank_selection(found->second);
        if (!*target) fail(std::string("has __metadata__ ") + key + " = '" + found->second + "', expected rank:R or epsilon:E");
      }
      const auto tokens = detail::parse_count(entry("calibration_tokens"));
      if (!tokens) fail("has __metadata__ calibration_tokens = '" + entry("calibration_tokens") + "', expected a count");
      info.calibration_tokens = *tokens;
      info.producer = entry("producer");
      if (const auto found = file.metadata().find("rank_allocation"); found != file.metadata().end()) {
        info.rank_allocation = found->second;
      }
      LatentBasis basis = LatentBasis::ordered_by_importance;
      if (const auto found = file.metadata().find("latent_basis"); found != file.metadata().end()) {
        if (found->second == to_string(LatentBasis::rotated)) {
          basis = LatentBasis::rotated;
        } else if (found->second != to_string(LatentBasis::ordered_by_importance)) {
          fail("has __metadata__ latent_basis = '" + found->second + "', expected ordered_by_importance or rotated");
        }
      }

      try {
        std::vector<LowRankProjection<float>> keys, values;
        for (Index l = 0; l < shape.layers; ++l) {
          for (Index h = 0; h < shape.kv_heads; ++h) {
            keys.push_back(projection(method, shape.head_dim, l, h, "key", basis));
            // K-SVD and Eigen Attention both compress values with V-SVD (see solvers/fit.hpp).
            values.push_back(projection(value_method(method), shape.head_dim, l, h, "value", basis));
          }
        }
        for (const std::string& name : file.names()) {
          if (expected_names.count(name) == 0) {
            fail("has tensor '" + name + "', which is not part of a projection file of this shape");
          }
        }
        return ProjectionFile(ModelProjections<float>(shape, std::move(keys), std::move(values)), std::move(info));
      } catch (const InvalidArgument& error) {
        fail(std::string("is inconsistent: ") + error.what());
      }
    }

    const TensorInfo& tensor(const std::string& name, std::size_t rank) {
      if (!file.contains(name)) fail("has no tensor '" + name + "'");
      expected_names.insert(name);
      const TensorInfo& info = file.info(name);
      if (info.shape.size() != rank) {
        fail("has tensor '" + name + "' of shape " + detail::format_shape(info.shape) + ", expected rank " +
             std::to_string(rank));
      }
      return info;
    }

    LowRankProjection<float> projection(Method method, Index d, Index layer, Index kv_head, const char* side,
                                        LatentBasis basis) {
      const std::string encoder_name = detail::projection_tensor_name(layer, kv_head, side, "encoder");
      const std::string decoder_name = detail::projection_tensor_name(layer, kv_head, side, "decoder");
      const std::string spectrum_name = detail::projection_tensor_name(layer, kv_head, side, "singular_values");
      const TensorInfo& encoder = tensor(encoder_name, 2);
      const std::int64_t rank = encoder.shape[1];
      if (encoder.shape[0] != d || rank < 1 || rank > d) {
        fail("has tensor '" + encoder_name + "' of shape " + detail::format_shape(encoder.shape) + ", expected [" +
             std::to_string(d) + ", r] with 1 <= r <= " + std::to_string(d));
      }
      const TensorInfo& decoder = tensor(decoder_name, 2);
      if (decoder.shape != encoder.shape) {
        fail("has tensor '" + decoder_name + "' of shape " + detail::format_shape(decoder.shape) +
             ", not the encoder's " + detail::format_shape(encoder.shape));
      }
      const TensorInfo& spectrum = tensor(spectrum_name, 1);
      if (spectrum.shape[0] != d) {
        fail("has tensor '" + spectrum_name + "' of shape " + detail::format_shape(spectrum.shape) + ", expected [" +
             std::to_string(d) + "]");
      }
      const std::vector<double> singular_values = file.read<double>(spectrum_name, NonFinite::reject);
      for (std::size_t i = 0; i < singular_values.size(); ++i) {
        if (singular_values[i] < 0.0) {
          fail("has tensor '" + spectrum_name + "' with a negative singular value at index " + std::to_string(i));
        }
      }
      return LowRankProjection<float>(method, file.read_matrix<float>(encoder_name, {}, NonFinite::reject),
                                      file.read_matrix<float>(decoder_name, {}, NonFinite::reject),
                                      Eigen::Map<const Eigen::VectorXd>(singular_values.data(), d), basis);
    }
  };

  Projections projections_;
  ProjectionInfo info_;
};

}  // namespace kqsvd::io
