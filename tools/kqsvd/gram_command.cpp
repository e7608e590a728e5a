// kqsvd gram: a model's calibration Grams from activation files, saved as a Gram file (io/gram_file.hpp)
// that kqsvd fit --grams merges with any number of others -- calibration shards computed anywhere.
#include <kqsvd/io/gram_file.hpp>

#include <cstdint>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "arguments.hpp"
#include "commands.hpp"
#include "data_set.hpp"
#include "distributed_calibration.hpp"
#include "errors.hpp"
#include "process_group.hpp"
#include "tool_main.hpp"

namespace kqsvd::cli {

namespace {

constexpr const char* gram_usage = R"(usage: kqsvd gram --calib FILES... --out GRAMS.safetensors [--weights FILE] [--force]

Streams calibration activation files (docs/activations.md) into every head's d x d Grams -- keys,
values, each query head's queries -- and writes them, with their token counts and what a fit needs to
know (model, shape, RoPE mode, the output-projection weights when the files or --weights hold them), to
GRAMS.safetensors. kqsvd fit --grams G1 G2 ... merges any number of Gram files exactly (sums of x^T x)
and fits as from the activations themselves. The Python module writes the same files.

  --calib FILES    activation files of one model (all with the same layout and RoPE mode)
  --weights FILE   output-projection weights to store (default: those in the calibration files, if any)
  --out FILE       the Gram file, written atomically (never left half-written)
  --force          replace --out if it exists (otherwise that is an error)

Under MPI (mpirun -np N kqsvd gram ...), each rank reads a contiguous share of the files and rank 0
writes the Grams summed in a fixed order (see kqsvd fit --help).

Exit codes: 0 success, 1 unusable data or files, 2 bad command line.
)";

}  // namespace

int gram_command(const std::vector<std::string>& words, const ProcessGroup& group) {
  std::vector<std::string> calib;
  std::optional<std::string> weights_path;
  std::string out;
  bool force = false;
  io::ActivationLayout layout;
  bool help = false;
  group.together([&] {
    const Arguments args(words, {{"--calib", OptionKind::list},
                                 {"--weights", OptionKind::value},
                                 {"--out", OptionKind::value},
                                 {"--force", OptionKind::flag}});
    help = args.help();
    if (help) return;
    calib = args.required_list("--calib");
    weights_path = args.value("--weights");
    out = args.required_value("--out");
    force = args.flag("--force");
    if (!force && path_exists(out)) throw DataError("'" + out + "' already exists; pass --force to replace it");
    layout = first_layout(calib, CalibrationFiles::activations);
  });
  if (help) {
    if (group.rank() == 0) std::cout << gram_usage;
    return exit_success;
  }
  Calibration calibration = calibrate_together(group, calib, CalibrationFiles::activations, layout);
  group.together([&] {
    if (group.rank() != 0) return;
    const std::vector<WeightMatrix> weights =
        choose_output_weights(weights_path, {calibration.output_weights}, calibration.layout.shape);
    io::GramFileInfo info;
    info.model = calibration.layout.metadata.model;
    info.rope = calibration.layout.metadata.rope;
    info.rope_style = calibration.layout.metadata.rope_style;
    info.rope_theta = calibration.layout.metadata.rope_theta;
    info.producer = tool_version();
    const std::int64_t tokens = calibration.tokens;
    io::GramFile(std::move(calibration.statistics), info, weights).save(out, force);
    std::cout << "wrote " << out << ": Grams of " << describe_model(calibration.layout.shape, info.model, info.rope)
              << " over " << tokens << " tokens from " << calib.size() << (calib.size() == 1 ? " file" : " files")
              << (weights.empty() ? ", no output-projection weights (KQ-SVD fits of values will need --weights)" : "")
              << "\n";
  });
  return exit_success;
}

}  // namespace kqsvd::cli
