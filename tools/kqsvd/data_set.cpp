#include "data_set.hpp"

#include <sys/stat.h>

#include <kqsvd/cache/cache_footprint.hpp>

#include <iostream>
#include <utility>

#include "errors.hpp"
#include "progress.hpp"

namespace kqsvd::cli {

namespace {

std::string file_name(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

}  // namespace

io::ActivationLayout read_layout(const std::string& path) { return io::ActivationFile(path).layout(); }

bool path_exists(const std::string& path) {
  struct stat status {};
  return ::lstat(path.c_str(), &status) == 0;
}

std::string describe_model(const ModelShape& shape, const std::string& model, RopeMode rope) {
  return model + " (" + std::to_string(shape.layers) + " layers, " + std::to_string(shape.query_heads) + " query / " +
         std::to_string(shape.kv_heads) + " KV heads, head_dim " + std::to_string(shape.head_dim) + ", rope " +
         io::rope_spelling(rope) + ")";
}

Calibration calibrate_files(const std::vector<std::string>& paths, const std::optional<io::ActivationLayout>& expected) {
  if (paths.empty()) throw UsageError("no calibration files");
  std::optional<Calibration> result;
  ProgressBar progress("calibrating", paths.size());
  for (const std::string& path : paths) {
    // Only this file is open: memory does not grow with the number or size of the files.
    const io::ActivationFile file(path);
    if (!result) {
      if (expected) file.require_layout(*expected);
      result = Calibration{ModelCalibration(file.shape()), expected ? *expected : file.layout(), 0, {}};
    } else {
      file.require_layout(result->layout);
    }
    io::calibrate(result->statistics, file);
    result->tokens += file.token_count();
    if (result->output_weights.empty() && file.has_output_weights()) result->output_weights = file.output_weights();
    progress.advance(file_name(path));
  }
  return std::move(*result);
}

Calibration merge_gram_files(const std::vector<std::string>& paths) {
  if (paths.empty()) throw UsageError("no Gram files");
  std::optional<io::GramFile> merged;
  for (const std::string& path : paths) {
    io::GramFile file = io::GramFile::load(path);
    if (!merged) {
      merged.emplace(std::move(file));
      continue;
    }
    try {
      merged->merge(file, path);
    } catch (const InvalidArgument& error) {
      throw DataError(std::string(error.what()) + " (first file '" + paths.front() + "')");
    }
  }
  return Calibration{merged->calibration(), gram_layout(merged->shape(), merged->info(), paths.front()),
                     merged->calibration().token_count(), merged->output_weights()};
}

io::ActivationLayout gram_layout(const ModelShape& shape, const io::GramFileInfo& info, const std::string& source) {
  io::ActivationLayout layout;
  layout.shape = shape;
  layout.metadata.model = info.model;
  layout.metadata.rope = info.rope;
  layout.metadata.rope_style = info.rope_style;
  layout.metadata.rope_theta = info.rope_theta;
  layout.source = source;
  return layout;
}

std::vector<WeightMatrix> choose_output_weights(const std::optional<std::string>& weights_file,
                                                const std::vector<std::vector<WeightMatrix>>& candidates,
                                                const ModelShape& shape) {
  if (weights_file) return io::load_output_weights(*weights_file, shape);
  for (const auto& candidate : candidates) {
    if (!candidate.empty()) return candidate;
  }
  return {};
}

EvaluationData::EvaluationData(const std::vector<std::string>& paths, const io::ActivationLayout& expected,
                               bool require_same_model) {
  for (const std::string& path : paths) {
    files_.emplace_back(path);
    io::ActivationLayout layout = expected;
    if (!require_same_model && files_.back().metadata().model != expected.metadata.model) {
      std::cerr << "kqsvd: warning: '" << path << "' is of model '" << files_.back().metadata().model << "', '"
                << expected.source << "' of '" << expected.metadata.model << "'\n";
      layout.metadata.model = files_.back().metadata().model;
    }
    files_.back().require_layout(layout);
  }
}

long EvaluationData::tokens() const {
  long total = 0;
  for (const io::ActivationFile& file : files_) total += static_cast<long>(file.token_count());
  return total;
}

std::vector<WeightMatrix> EvaluationData::output_weights() const {
  for (const io::ActivationFile& file : files_) {
    if (file.has_output_weights()) return file.output_weights();
  }
  return {};
}

std::vector<FidelityTotals> EvaluationData::measure(const ModelProjections<float>& projections,
                                                    const std::vector<WeightMatrix>& output_weights,
                                                    const std::optional<StorageFormat>& latent_format,
                                                    ProgressBar* progress) const {
  std::vector<FidelityTotals> total(static_cast<std::size_t>(projections.shape().layers));
  for (const io::ActivationFile& file : files_) {
    const std::vector<FidelityTotals> per_layer = io::measure(projections, file, output_weights, latent_format);
    for (std::size_t l = 0; l < total.size(); ++l) total[l] += per_layer[l];
    if (progress != nullptr) progress->advance(file_name(file.path()));
  }
  return total;
}

std::optional<StorageFormat> parse_latent_format(const std::optional<std::string>& name, const RankAllocation& ranks) {
  if (!name) return std::nullopt;
  StorageFormat format = StorageFormat::parse("f32");
  try {
    format = StorageFormat::parse(*name);
  } catch (const InvalidArgument& error) {
    throw UsageError("--latents: " + std::string(error.what()));
  }
  const ModelShape& shape = ranks.shape();
  for (Eigen::Index l = 0; l < shape.layers; ++l) {
    for (Eigen::Index h = 0; h < shape.kv_heads; ++h) {
      for (const auto& [kind, rank] : {std::pair{"key", ranks.key(l, h)}, std::pair{"value", ranks.value(l, h)}}) {
        const Eigen::Index group = format.group_size(rank);
        if (rank % group != 0) {
          throw UsageError("--latents " + format.name() + " stores blocks of " + std::to_string(group) +
                           " elements, but the " + kind + " rank of layer " + std::to_string(l) + ", KV head " +
                           std::to_string(h) + " is " + std::to_string(rank) + "; use ranks that are multiples of " +
                           std::to_string(group) + " or a format without blocks (f16, bf16, fp8_e4m3, int8)");
        }
      }
    }
  }
  return format;
}

MethodReport make_report(const ModelProjections<float>& projections, const std::vector<FidelityTotals>& per_layer,
                         std::optional<double> epsilon, long tokens, const StorageFormat& latent_format) {
  const ModelShape& shape = projections.shape();
  MethodReport report;
  report.method = to_string(projections.method());
  const RankAllocation ranks = projections.ranks();
  report.key_ranks.assign(static_cast<std::size_t>(shape.layers), {});
  report.value_ranks.assign(static_cast<std::size_t>(shape.layers), {});
  for (Eigen::Index l = 0; l < shape.layers; ++l) {
    for (Eigen::Index h = 0; h < shape.kv_heads; ++h) {
      report.key_ranks[static_cast<std::size_t>(l)].push_back(ranks.key(l, h));
      report.value_ranks[static_cast<std::size_t>(l)].push_back(ranks.value(l, h));
    }
  }
  report.key_description = ranks.describe_keys();
  report.value_description = ranks.describe_values();
  report.epsilon = epsilon;
  report.tokens = tokens;
  report.latent_format = latent_format.name();
  FidelityTotals overall;
  for (std::size_t l = 0; l < per_layer.size(); ++l) {
    FidelityRow row;
    for (std::size_t m = 0; m < all_fidelity_metrics.size(); ++m) row.errors[m] = per_layer[l].relative_error(all_fidelity_metrics[m]);
    long kept = 0, bytes = 0;
    for (std::size_t h = 0; h < report.key_ranks[l].size(); ++h) {
      kept += report.key_ranks[l][h] + report.value_ranks[l][h];
      bytes += latent_format.bytes_per_row(report.key_ranks[l][h]) + latent_format.bytes_per_row(report.value_ranks[l][h]);
    }
    const auto full_elements = static_cast<double>(2 * shape.kv_heads * shape.head_dim);
    row.compression = static_cast<double>(kept) / full_elements;
    row.bits_per_element = 8.0 * static_cast<double>(bytes) / full_elements;
    report.layers.push_back(row);
    overall += per_layer[l];
  }
  for (std::size_t m = 0; m < all_fidelity_metrics.size(); ++m) report.overall.errors[m] = overall.relative_error(all_fidelity_metrics[m]);
  report.overall.compression = ranks.compression_ratio();
  report.overall.bits_per_element = latent_cache_footprint(ranks, latent_format).bits_per_element();
  return report;
}

}  // namespace kqsvd::cli
