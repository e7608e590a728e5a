// tools/kqsvd/data_set.hpp -- what every subcommand does with activation files: stream them into
// calibration statistics, find the output-projection weights, fit, truncate and evaluate projections.
//
//   Calibration calib = calibrate_files(paths);                    // one file in memory at a time
//   auto weights = choose_output_weights(weights_option, calib.output_weights, {}, calib.layout.shape);
//   EvaluationData data(data_paths, calib.layout);                  // opened (mapped), checked
//   std::vector<FidelityTotals> per_layer = data.measure(projections, weights);
#pragma once

#include <kqsvd/core/storage_format.hpp>
#include <kqsvd/calibration/model_calibration.hpp>
#include <kqsvd/io/activation_evaluation.hpp>
#include <kqsvd/io/activation_file.hpp>
#include <kqsvd/io/gram_file.hpp>
#include <kqsvd/solvers/model_projections.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "progress.hpp"
#include "report.hpp"

namespace kqsvd::cli {

using WeightMatrix = RowMatrix<float>;

struct Calibration {
  ModelCalibration statistics;
  io::ActivationLayout layout;
  std::int64_t tokens = 0;                   // tokens per head
  std::vector<WeightMatrix> output_weights;  // from the first file that holds them; empty if none did
};

// Whether anything (a file, a link, a directory) exists at `path`.
bool path_exists(const std::string& path);

// "model (L layers, Q query / K KV heads, head_dim d, rope R)", for messages.
std::string describe_model(const ModelShape& shape, const std::string& model, RopeMode rope);

// Streams the files into Gram accumulators; every file must match the first one's layout, and that
// one `expected` when given.
Calibration calibrate_files(const std::vector<std::string>& paths,
                            const std::optional<io::ActivationLayout>& expected = std::nullopt);

// Gram files (kqsvd gram, the Python module) merged in order into one calibration; every file must be of
// the first one's model, shape and RoPE mode (a DataError naming the file otherwise).
Calibration merge_gram_files(const std::vector<std::string>& paths);

// What a Gram file's shape and info say, as the layout activation files of the same data would have.
io::ActivationLayout gram_layout(const ModelShape& shape, const io::GramFileInfo& info, const std::string& source);

// The layout of an activation file (to check arguments such as --rank before the long work).
io::ActivationLayout read_layout(const std::string& path);

// --weights FILE if given, else the first non-empty candidate; empty when there is none.
std::vector<WeightMatrix> choose_output_weights(const std::optional<std::string>& weights_file,
                                                const std::vector<std::vector<WeightMatrix>>& candidates,
                                                const ModelShape& shape);

// Held-out activation files, opened once (memory-mapped) and checked against a layout.
class EvaluationData {
 public:
  // require_same_model: the files must also carry expected's model name (otherwise a difference is
  // reported on stderr as a warning: projections may be tried on another model of the same shape).
  EvaluationData(const std::vector<std::string>& paths, const io::ActivationLayout& expected, bool require_same_model);

  const std::vector<io::ActivationFile>& files() const { return files_; }
  long tokens() const;  // per head, over all files
  // The output weights the files themselves hold (of the first file that has them), or empty.
  std::vector<WeightMatrix> output_weights() const;

  // Per-layer fidelity totals summed over every file; advances `progress` (if given) once per file.
  // latent_format: the latents' storage format (FidelityOptions::latent_format), unset: exact.
  std::vector<FidelityTotals> measure(const ModelProjections<float>& projections,
                                      const std::vector<WeightMatrix>& output_weights,
                                      const std::optional<StorageFormat>& latent_format,
                                      ProgressBar* progress = nullptr) const;

 private:
  std::vector<io::ActivationFile> files_;
};

// The table/JSON row of per-layer totals: relative errors, the layer's compressed / full cache size and
// its bits per element with the latents in latent_format.
MethodReport make_report(const ModelProjections<float>& projections, const std::vector<FidelityTotals>& per_layer,
                         std::optional<double> epsilon, long tokens, const StorageFormat& latent_format);

// --latents FORMAT: the format, checked against every rank of `ranks` (a UsageError naming the rank a
// block format cannot hold); absent: f32, with the latents kept exact.
std::optional<StorageFormat> parse_latent_format(const std::optional<std::string>& name, const RankAllocation& ranks);

}  // namespace kqsvd::cli
