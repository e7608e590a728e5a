// kqsvd fit and kqsvd eval: make a projection file from calibration activations, and measure one on
// held-out activations.
#include <kqsvd/io/projection_file.hpp>

#include <sys/stat.h>

#include <iostream>

#include "arguments.hpp"
#include "commands.hpp"
#include "data_set.hpp"
#include "errors.hpp"
#include "progress.hpp"
#include "tool_main.hpp"

namespace kqsvd::cli {

namespace {

constexpr const char* fit_usage = R"(usage: kqsvd fit --calib FILES... --method kqsvd|ksvd|eigen (--rank R | --eps E)
                 [--value-rank R] [--weights FILE] --out PROJ.safetensors [--force]

Fits a key and a value projection for every layer and KV head from calibration activations
(docs/activations.md) and writes them, with their spectra and metadata, to PROJ.safetensors.
The files are streamed one at a time: memory does not grow with their number or size.

  --calib FILES    activation files of one model (all with the same layout and RoPE mode)
  --method M       kqsvd (KQ-SVD), ksvd (K-SVD) or eigen (Eigen Attention)
  --rank R         keep R of head_dim dimensions in every head
  --eps E          per head, the smallest rank whose predicted relative error (of the method's own
                   objective on the calibration data) is <= E, 0 < E < 1
  --value-rank R   rank of the value projections (default: as chosen by --rank / --eps)
  --weights FILE   output-projection weights (layers.{l}.o_proj or a Hugging Face
                   model.layers.{l}.self_attn.o_proj.weight); default: those in the calibration
                   files. KQ-SVD needs them for values.
  --out FILE       the projection file, written atomically (never left half-written)
  --force          replace --out if it exists (otherwise that is an error)

Exit codes: 0 success, 1 unusable data or files, 2 bad command line.
)";

constexpr const char* eval_usage = R"(usage: kqsvd eval --proj PROJ.safetensors --data FILES... [--weights FILE] [--json]

Measures a projection file on held-out activations: the relative errors of K, Q, V, Q K^T, V W^T,
the causal softmax and the attention output (after the output projection), per layer and overall,
and the compressed cache's size relative to the full cache.

  --proj FILE      a projection file written by kqsvd fit
  --data FILES     activation files of the same model and RoPE mode
  --weights FILE   output-projection weights (default: those in the data files)
  --json           one JSON object instead of the table

Exit codes: 0 success, 1 unusable data or files, 2 bad command line.
)";

bool path_exists(const std::string& path) {
  struct stat status {};
  return ::lstat(path.c_str(), &status) == 0;
}

Method parse_method_option(const std::string& name) {
  try {
    return parse_method(name);
  } catch (const InvalidArgument&) {
    throw UsageError("--method must be kqsvd, ksvd or eigen, got '" + name + "'");
  }
}

void require_rank_within(const char* option, long rank, const io::ActivationLayout& layout) {
  if (rank > layout.shape.head_dim) {
    throw UsageError(std::string(option) + " " + std::to_string(rank) + " is more than head_dim " +
                     std::to_string(layout.shape.head_dim) + " of '" + layout.source + "'");
  }
}

std::string describe_model(const ModelShape& shape, const std::string& model, RopeMode rope) {
  return model + " (" + std::to_string(shape.layers) + " layers, " + std::to_string(shape.query_heads) + " query / " +
         std::to_string(shape.kv_heads) + " KV heads, head_dim " + std::to_string(shape.head_dim) + ", rope " +
         io::rope_spelling(rope) + ")";
}

}  // namespace

int fit_command(const std::vector<std::string>& words) {
  const Arguments args(words, {{"--calib", OptionKind::list},
                               {"--method", OptionKind::value},
                               {"--rank", OptionKind::value},
                               {"--eps", OptionKind::value},
                               {"--value-rank", OptionKind::value},
                               {"--weights", OptionKind::value},
                               {"--out", OptionKind::value},
                               {"--force", OptionKind::flag}});
  if (args.help()) {
    std::cout << fit_usage;
    return exit_success;
  }
  const std::vector<std::string> calib = args.required_list("--calib");
  const Method method = parse_method_option(args.required_value("--method"));
  args.require_one_of("--rank", "--eps");
  const std::optional<long> rank = args.positive_integer("--rank");
  const std::optional<double> epsilon = args.fraction("--eps");
  const std::optional<long> value_rank = args.positive_integer("--value-rank");
  const std::string out = args.required_value("--out");
  const bool force = args.flag("--force");
  // Checked first so that a long fit is not thrown away at the end; the atomic write checks again.
  if (!force && path_exists(out)) throw DataError("'" + out + "' already exists; pass --force to replace it");

  const io::ActivationLayout layout = read_layout(calib.front());
  if (rank) require_rank_within("--rank", *rank, layout);
  if (value_rank) require_rank_within("--value-rank", *value_rank, layout);
  const RankSelection key_selection = rank ? RankSelection::fixed(*rank) : RankSelection::error_budget(*epsilon);
  const RankSelection value_selection = value_rank ? RankSelection::fixed(*value_rank) : key_selection;

  const Calibration calibration = calibrate_files(calib);
  const std::vector<WeightMatrix> weights =
      choose_output_weights(args.value("--weights"), {calibration.output_weights}, layout.shape);
  if (method == Method::kq_svd && weights.empty()) {
    throw DataError("KQ-SVD fits values to the output projection, but the calibration files hold no layers.{l}.o_proj; "
                    "give --weights FILE");
  }
  const auto projections =
      ModelProjections<float>::fit(calibration.statistics, weights, method, key_selection, value_selection);

  io::ProjectionInfo info;
  info.model = layout.metadata.model;
  info.rope = layout.metadata.rope;
  info.rope_style = layout.metadata.rope_style;
  info.rope_theta = layout.metadata.rope_theta;
  info.key_rank = key_selection;
  info.value_rank = value_selection;
  info.calibration_tokens = calibration.tokens;
  info.producer = tool_version();
  io::ProjectionFile(projections, info).save(out, force);

  std::cout << "wrote " << out << ": " << to_string(method) << " projections of "
            << describe_model(layout.shape, layout.metadata.model, layout.metadata.rope) << "; key rank "
            << projections.ranks().describe_keys() << ", value rank " << projections.ranks().describe_values()
            << ", compression " << projections.ranks().compression_ratio() << "; calibrated on " << calibration.tokens
            << " tokens from " << calib.size() << (calib.size() == 1 ? " file" : " files") << "\n";
  return exit_success;
}

int eval_command(const std::vector<std::string>& words) {
  const Arguments args(words, {{"--proj", OptionKind::value},
                               {"--data", OptionKind::list},
                               {"--weights", OptionKind::value},
                               {"--json", OptionKind::flag}});
  if (args.help()) {
    std::cout << eval_usage;
    return exit_success;
  }
  const std::string proj = args.required_value("--proj");
  const std::vector<std::string> data_paths = args.required_list("--data");

  const io::ProjectionFile projection_file = io::ProjectionFile::load(proj);
  const io::ProjectionInfo& info = projection_file.info();
  const io::ActivationLayout expected{projection_file.shape(),
                                      io::ActivationMetadata{info.model, info.rope, info.rope_style, info.rope_theta}, proj};
  const EvaluationData data(data_paths, expected, /*require_same_model=*/false);
  const std::vector<WeightMatrix> weights =
      choose_output_weights(args.value("--weights"), {data.output_weights()}, projection_file.shape());
  if (weights.empty()) {
    throw DataError("err_vo and err_out need the output projection, but the data files hold no layers.{l}.o_proj; "
                    "give --weights FILE (e.g. a calibration file)");
  }
  std::vector<FidelityTotals> per_layer;
  {
    ProgressBar progress("evaluating", data.files().size());
    per_layer = data.measure(projection_file.projections(), weights, &progress);
  }
  std::optional<double> epsilon;
  if (info.key_rank && !info.key_rank->is_fixed()) epsilon = info.key_rank->epsilon();
  const MethodReport report = make_report(projection_file.projections(), per_layer, epsilon, data.tokens());

  if (args.flag("--json")) {
    std::cout << to_json(report).dump(2) << "\n";
    return exit_success;
  }
  std::cout << report.method << " projections of " << describe_model(projection_file.shape(), info.model, info.rope)
            << "\nkey rank " << report.key_description << ", value rank " << report.value_description
            << "; evaluated on " << data.tokens() << " tokens from " << data_paths.size()
            << (data_paths.size() == 1 ? " file" : " files") << " (relative Frobenius errors)\n\n";
  print_layer_table(std::cout, report);
  return exit_success;
}

}  // namespace kqsvd::cli
