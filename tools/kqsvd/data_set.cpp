#include "data_set.hpp"

#include <iostream>

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

Calibration calibrate_files(const std::vector<std::string>& paths) {
  if (paths.empty()) throw UsageError("no calibration files");
  std::optional<Calibration> result;
  ProgressBar progress("calibrating", paths.size());
  for (const std::string& path : paths) {
    // Only this file is open: memory does not grow with the number or size of the files.
    const io::ActivationFile file(path);
    if (!result) {
      result = Calibration{ModelCalibration(file.shape()), file.layout(), 0, {}};
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
                                                    ProgressBar* progress) const {
  std::vector<FidelityTotals> total(static_cast<std::size_t>(projections.shape().layers));
  for (const io::ActivationFile& file : files_) {
    const std::vector<FidelityTotals> per_layer = io::measure(projections, file, output_weights);
    for (std::size_t l = 0; l < total.size(); ++l) total[l] += per_layer[l];
    if (progress != nullptr) progress->advance(file_name(file.path()));
  }
  return total;
}

MethodReport make_report(const ModelProjections<float>& projections, const std::vector<FidelityTotals>& per_layer,
                         std::optional<double> epsilon, long tokens) {
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
  FidelityTotals overall;
  for (std::size_t l = 0; l < per_layer.size(); ++l) {
    FidelityRow row;
    for (std::size_t m = 0; m < all_fidelity_metrics.size(); ++m) row.errors[m] = per_layer[l].relative_error(all_fidelity_metrics[m]);
    long kept = 0;
    for (std::size_t h = 0; h < report.key_ranks[l].size(); ++h) kept += report.key_ranks[l][h] + report.value_ranks[l][h];
    row.compression = static_cast<double>(kept) / static_cast<double>(2 * shape.kv_heads * shape.head_dim);
    report.layers.push_back(row);
    overall += per_layer[l];
  }
  for (std::size_t m = 0; m < all_fidelity_metrics.size(); ++m) report.overall.errors[m] = overall.relative_error(all_fidelity_metrics[m]);
  report.overall.compression = ranks.compression_ratio();
  return report;
}

}  // namespace kqsvd::cli
