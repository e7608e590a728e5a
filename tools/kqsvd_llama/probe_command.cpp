// kqsvd-llama probe: how much the model's loss feels each layer's compression error, written as a
// sensitivity file (docs/sensitivity.md) for kqsvd fit --budget --sensitivity.
#include <kqsvd/io/sensitivity_file.hpp>

#include <sys/stat.h>

#include <chrono>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "arguments.hpp"
#include "commands.hpp"
#include "errors.hpp"
#include "model_data.hpp"
#include "quality.hpp"

namespace kqsvd::cli {

namespace {

constexpr const char* probe_usage = R"(usage: kqsvd-llama probe --model M.bin --tokenizer tok.bin --text stories.txt
           --calib-stories A:B --probe-stories C:D --method kqsvd|ksvd|eigen [--rope post|pre]
           [--ratio R] [--format F] [--max-tokens T] [--name NAME] --out SENSITIVITY.json [--force]

Measures the loss sensitivity of every layer's keys and values. Projections are fitted at full rank on
the --calib-stories (as kqsvd-llama quality does); then, for each layer and kind, only that layer's keys
(or values) are compressed to the rank round(R x head_dim), every other projection kept exact, and the
--probe-stories run through that cache. The weight is

    w = (KL(full || that cache) - KL at full rank) / (the layer's predicted squared relative error)

in nats per token per unit of squared error: a first-order model KL ~ sum w err^2 that
kqsvd fit --budget B --sensitivity FILE (kqsvd::loss_aware_allocation) minimises. 2 x layers evaluations
of the probe stories. Probe near the budget you will spend (R = B for float latents).

  --calib-stories A:B  stories [A, B) calibrate the projections (use the stories the fit will use)
  --probe-stories C:D  stories [C, D) measure the KL (keep them disjoint from any evaluation)
  --method M           the method whose spectra the weights go with
  --rope R             post (default; keys after RoPE) or pre
  --ratio R            the probed rank as a fraction of head_dim, in (0, 1] (default 0.25)
  --format F           how the probed latents are stored (default f32)
  --name NAME          the model name written to the file (default: the checkpoint's file or folder
                       name, as kqsvd-llama capture writes into activation files)
  --out FILE           the sensitivity file, written atomically; --force replaces it

Exit codes: 0 success, 1 unusable data or files, 2 bad command line.
)";

}  // namespace

int probe_command(const std::vector<std::string>& words) {
  const Arguments args(words, {{"--model", OptionKind::value},        {"--tokenizer", OptionKind::value},
                               {"--text", OptionKind::value},         {"--calib-stories", OptionKind::value},
                               {"--probe-stories", OptionKind::value}, {"--method", OptionKind::value},
                               {"--rope", OptionKind::value},         {"--ratio", OptionKind::value},
                               {"--format", OptionKind::value},       {"--max-tokens", OptionKind::value},
                               {"--name", OptionKind::value},         {"--out", OptionKind::value},
                               {"--force", OptionKind::flag}});
  if (args.help()) {
    std::cout << probe_usage;
    return exit_success;
  }
  const auto start = std::chrono::steady_clock::now();
  const std::pair<long, long> calibration_range = required(args.range("--calib-stories"), "--calib-stories");
  const std::pair<long, long> probe_range = required(args.range("--probe-stories"), "--probe-stories");
  const Method method = parse_method_name(required(args.value("--method"), "--method"), "--method");
  const RopeMode mode = parse_rope_name(args.value("--rope").value_or("post"), "--rope");
  const double ratio = args.number_above("--ratio", 0.0, 1.0).value_or(0.25);
  const StorageFormat format = parse_format_name(args.value("--format").value_or("f32"), "--format");
  const std::string out = required(args.value("--out"), "--out");
  const bool force = args.flag("--force");
  struct stat status {};
  if (!force && ::lstat(out.c_str(), &status) == 0) throw DataError("'" + out + "' already exists; pass --force to replace it");

  const ModelData data = load_model_data(args, /*needs_text=*/true);
  const ModelShape& shape = data.model.shape();
  const Eigen::Index rank = uniform_rank_for_ratio(shape.head_dim, ratio);
  if (rank % format.group_size(rank) != 0) {
    throw UsageError("--format " + format.name() + " cannot hold latents of rank " + std::to_string(rank) + " (--ratio " +
                     fixed(ratio, 2) + " of head_dim " + std::to_string(shape.head_dim) + ")");
  }
  const auto max_tokens = static_cast<std::size_t>(
      args.integer("--max-tokens", 2, 1 << 20).value_or(data.model.config().seq_len));
  const Sequences calibration_stories = data.encode(calibration_range, max_tokens, "--calib-stories");
  const Sequences probe_stories = data.encode(probe_range, max_tokens, "--probe-stories");
  if (calibration_range.first < probe_range.second && probe_range.first < calibration_range.second) {
    std::cerr << "kqsvd-llama: warning: calibration and probe stories overlap\n";
  }
  const Calibrations calibrations = calibrate(data.model, calibration_stories);
  FullRankProjections fitted(data.model, calibrations);
  const QualityEvaluator prober(data.model, probe_stories);
  const SensitivityProbe probe =
      measure_sensitivity(prober, fitted.get(method, mode), latent_configuration(method, mode, 0, format), rank);

  io::Sensitivity sensitivity{method, mode, args.value("--name").value_or(data.name()), "", probe.weights};
  std::ostringstream description;
  description << "kqsvd-llama probe: each layer's keys or values alone at rank " << rank << " of " << shape.head_dim
              << " (" << format.name() << " latents), KL increase on stories " << probe_range.first << ":"
              << probe_range.second << " (max " << max_tokens << " tokens) over the predicted squared relative error; "
              << "projections calibrated on stories " << calibration_range.first << ":" << calibration_range.second;
  sensitivity.probe = description.str();
  io::write_sensitivity_file(out, sensitivity, force);

  std::cout << "wrote " << out << ": " << to_string(method) << " " << to_string(mode) << "-RoPE sensitivity of "
            << data.name() << " at rank " << rank << " (KL at full rank " << fixed(probe.exact_kl, 6) << ")\n\n"
            << "layer   key dKL   key w   value dKL   value w\n";
  for (Eigen::Index l = 0; l < shape.layers; ++l) {
    const auto i = static_cast<std::size_t>(l);
    std::cout << std::setw(5) << l << std::setw(10) << fixed(probe.key_kl[i], 4) << std::setw(8)
              << fixed(sensitivity.weights.key(l, 0), 3) << std::setw(12) << fixed(probe.value_kl[i], 4) << std::setw(10)
              << fixed(sensitivity.weights.value(l, 0), 3) << "\n";
  }
  std::cerr << "total " << fixed(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 1)
            << " s\n";
  return exit_success;
}

}  // namespace kqsvd::cli
