// kqsvd gram: a model's calibration Grams from activation files, saved as a Gram file (io/gram_file.hpp)
// that kqsvd fit --grams merges with any number of others -- calibration shards computed anywhere.
#include <kqsvd/io/gram_file.hpp>

#include <iostream>
#include <string>
#include <vector>

#include "arguments.hpp"
#include "commands.hpp"
#include "data_set.hpp"
#include "errors.hpp"
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

Exit codes: 0 success, 1 unusable data or files, 2 bad command line.
)";

}  // namespace

int gram_command(const std::vector<std::string>& words) {
  const Arguments args(words, {{"--calib", OptionKind::list},
                               {"--weights", OptionKind::value},
                               {"--out", OptionKind::value},
                               {"--force", OptionKind::flag}});
  if (args.help()) {
    std::cout << gram_usage;
    return exit_success;
  }
  const std::vector<std::string> calib = args.required_list("--calib");
  const std::string out = args.required_value("--out");
  const bool force = args.flag("--force");
  if (!force && path_exists(out)) throw DataError("'" + out + "' already exists; pass --force to replace it");

  Calibration calibration = calibrate_files(calib);
  const std::vector<WeightMatrix> weights =
      choose_output_weights(args.value("--weights"), {calibration.output_weights}, calibration.layout.shape);
  io::GramFileInfo info;
  info.model = calibration.layout.metadata.model;
  info.rope = calibration.layout.metadata.rope;
  info.rope_style = calibration.layout.metadata.rope_style;
  info.rope_theta = calibration.layout.metadata.rope_theta;
  info.producer = tool_version();
  io::GramFile(std::move(calibration.statistics), info, weights).save(out, force);
  std::cout << "wrote " << out << ": Grams of "
            << describe_model(calibration.layout.shape, info.model, info.rope) << " over " << calibration.tokens
            << " tokens from " << calib.size() << (calib.size() == 1 ? " file" : " files")
            << (weights.empty() ? ", no output-projection weights (KQ-SVD fits of values will need --weights)" : "")
            << "\n";
  return exit_success;
}

}  // namespace kqsvd::cli
