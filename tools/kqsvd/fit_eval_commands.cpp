// kqsvd fit and kqsvd eval: make a projection file from calibration activations, and measure one on
// held-out activations.
#include <kqsvd/io/projection_file.hpp>
#include <kqsvd/io/sensitivity_file.hpp>
#include <kqsvd/solvers/latent_rotation.hpp>

#include <sys/stat.h>

#include <iostream>
#include <sstream>

#include "arguments.hpp"
#include "commands.hpp"
#include "data_set.hpp"
#include "distributed_calibration.hpp"
#include "errors.hpp"
#include "process_group.hpp"
#include "progress.hpp"
#include "tool_main.hpp"

namespace kqsvd::cli {

namespace {

constexpr const char* fit_usage = R"(usage: kqsvd fit (--calib FILES... | --grams FILES...) --method kqsvd|ksvd|eigen (--rank R | --eps E | --budget B)
                 [--value-rank R] [--sensitivity FILE] [--budget-sharing joint|separate]
                 [--latents FORMAT] [--weights FILE] [--rotate hadamard] --out PROJ.safetensors [--force]

Fits a key and a value projection for every layer and KV head from calibration activations
(docs/activations.md) and writes them, with their spectra and metadata, to PROJ.safetensors.
The files are streamed one at a time: memory does not grow with their number or size.

  --calib FILES    activation files of one model (all with the same layout and RoPE mode)
  --grams FILES    instead of --calib: Gram files (kqsvd gram, the Python module, other machines) of
                   one model and RoPE mode, merged exactly -- the same fit as from their activations
  --method M       kqsvd (KQ-SVD), ksvd (K-SVD) or eigen (Eigen Attention)
  --rank R         keep R of head_dim dimensions in every head
  --eps E          per head, the smallest rank whose predicted relative error (of the method's own
                   objective on the calibration data) is <= E, 0 < E < 1
  --value-rank R   rank of the value projections (default: as chosen by --rank / --eps)
  --budget B       spend B, in (0, 1], of the full cache's bytes per token (keys and values, all
                   layers, full rows in the --latents format) on per-head ranks. Without
                   --sensitivity: the same rank in every projection, the largest that fits -- it
                   needs no model and beat every spectrum-only per-head rule we measured
                   (docs/end-to-end.md). With --sensitivity: the loss-aware allocation
                   (kqsvd::loss_aware_allocation), optimal for the measured weights.
  --sensitivity FILE  loss weights per layer (docs/sensitivity.md; kqsvd-llama probe writes them) for
                   the same model, method and RoPE mode; needs --budget
  --budget-sharing S  with --sensitivity: joint (default), keys and values draw on one budget;
                   separate, half each
  --latents FORMAT the storage format the budget is counted in (default f32): ranks become multiples
                   of its block, bytes include its scales
  --weights FILE   output-projection weights (layers.{l}.o_proj or a Hugging Face
                   model.layers.{l}.self_attn.o_proj.weight); default: those in the calibration
                   files. KQ-SVD needs them for values.
  --rotate hadamard  rotate every projection's latents by a Hadamard matrix (kqsvd::hadamard_rotated):
                   the same scores and outputs, with outliers spread over the latent coordinates for
                   a quantized latent cache (see kqsvd eval --latents); the file cannot be truncated
  --out FILE       the projection file, written atomically (never left half-written)
  --force          replace --out if it exists (otherwise that is an error)

Under MPI (mpirun -np N kqsvd fit ..., the same arguments; a kqsvd built where CMake found MPI), each
rank reads a contiguous share of the --calib or --grams files, the Grams are summed in a fixed order
into rank 0, which fits and writes --out: the same spectra as one process to rounding, the same bytes
on every run with N ranks. If any rank fails, every rank exits non-zero and no file is written.

Exit codes: 0 success, 1 unusable data or files, 2 bad command line.
)";

constexpr const char* eval_usage = R"(usage: kqsvd eval --proj PROJ.safetensors --data FILES... [--weights FILE] [--latents FORMAT]
                  [--json]

Measures a projection file on held-out activations: the relative errors of K, Q, V, Q K^T, V W^T,
the causal softmax and the attention output (after the output projection), per layer and overall,
the compressed cache's size relative to the full cache, and its bits per element.

  --proj FILE        a projection file written by kqsvd fit
  --data FILES       activation files of the same model and RoPE mode
  --weights FILE     output-projection weights (default: those in the data files)
  --latents FORMAT   store the key and value latents in FORMAT before reconstructing: f32 f16 bf16
                     fp8_e4m3 fp8_e5m2 int8 q8_0 q4_0 int4 int2 (int4/B, int2/B: blocks of B, default
                     32); block formats need ranks their blocks divide. Default: exact float32 latents
  --json             one JSON object instead of the table

Exit codes: 0 success, 1 unusable data or files, 2 bad command line.
)";

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

}  // namespace

namespace {

// What kqsvd fit was asked to do, checked before the long work starts.
struct FitRequest {
  std::vector<std::string> inputs;  // activation or Gram files
  CalibrationFiles kind = CalibrationFiles::activations;
  io::ActivationLayout layout;      // of inputs.front()
  Method method = Method::kq_svd;
  RankSelection key_selection = RankSelection::fixed(1);
  RankSelection value_selection = RankSelection::fixed(1);
  std::optional<MemoryBudget> budget;
  std::optional<io::Sensitivity> sensitivity;
  std::string sensitivity_path;
  BudgetSharing sharing = BudgetSharing::joint;
  StorageFormat latents;
  bool rotate = false;
  std::optional<std::string> weights_path;
  std::string out;
  bool force = false;
};

// Parses and checks the command line and whatever files the checks need; nullopt for --help.
std::optional<FitRequest> prepare_fit(const std::vector<std::string>& words) {
  const Arguments args(words, {{"--calib", OptionKind::list},
                               {"--grams", OptionKind::list},
                               {"--method", OptionKind::value},
                               {"--rank", OptionKind::value},
                               {"--eps", OptionKind::value},
                               {"--budget", OptionKind::value},
                               {"--sensitivity", OptionKind::value},
                               {"--budget-sharing", OptionKind::value},
                               {"--latents", OptionKind::value},
                               {"--value-rank", OptionKind::value},
                               {"--weights", OptionKind::value},
                               {"--rotate", OptionKind::value},
                               {"--out", OptionKind::value},
                               {"--force", OptionKind::flag}});
  if (args.help()) return std::nullopt;
  FitRequest request;
  args.require_one_of("--calib", "--grams");
  const bool from_grams = !args.list("--grams").empty();
  request.kind = from_grams ? CalibrationFiles::grams : CalibrationFiles::activations;
  request.inputs = from_grams ? args.list("--grams") : args.list("--calib");
  request.method = parse_method_option(args.required_value("--method"));
  const int rank_choices = (args.value("--rank") ? 1 : 0) + (args.value("--eps") ? 1 : 0) + (args.value("--budget") ? 1 : 0);
  if (rank_choices != 1) throw UsageError("give exactly one of --rank, --eps and --budget");
  const std::optional<long> rank = args.positive_integer("--rank");
  const std::optional<double> epsilon = args.fraction("--eps");
  const std::optional<double> budget_fraction = args.number_above("--budget", 0.0, 1.0);
  const std::optional<long> value_rank = args.positive_integer("--value-rank");
  const std::optional<std::string> sensitivity_path = args.value("--sensitivity");
  const std::optional<std::string> sharing_name = args.value("--budget-sharing");
  const std::optional<std::string> latents_name = args.value("--latents");
  if (sharing_name && *sharing_name != "joint" && *sharing_name != "separate") {
    throw UsageError("--budget-sharing must be joint or separate, got '" + *sharing_name + "'");
  }
  if (!budget_fraction) {
    for (const char* option : {"--sensitivity", "--budget-sharing", "--latents"}) {
      if (args.value(option)) throw UsageError(std::string(option) + " needs --budget");
    }
  } else if (value_rank) {
    throw UsageError("--value-rank goes with --rank or --eps; --budget chooses value ranks too");
  } else if (sharing_name && !sensitivity_path) {
    throw UsageError("--budget-sharing needs --sensitivity: without it every projection gets the same rank");
  }
  request.sharing = sharing_name && *sharing_name == "separate" ? BudgetSharing::separate : BudgetSharing::joint;
  if (latents_name) {
    try {
      request.latents = StorageFormat::parse(*latents_name);
    } catch (const InvalidArgument& error) {
      throw UsageError("--latents: " + std::string(error.what()));
    }
  }
  const std::optional<std::string> rotate = args.value("--rotate");
  if (rotate && *rotate != "hadamard") throw UsageError("--rotate must be hadamard, got '" + *rotate + "'");
  request.rotate = rotate.has_value();
  request.weights_path = args.value("--weights");
  request.out = args.required_value("--out");
  request.force = args.flag("--force");
  // Checked first so that a long fit is not thrown away at the end; the atomic write checks again.
  if (!request.force && path_exists(request.out)) {
    throw DataError("'" + request.out + "' already exists; pass --force to replace it");
  }

  request.layout = first_layout(request.inputs, request.kind);
  const io::ActivationLayout& layout = request.layout;
  if (rank) require_rank_within("--rank", *rank, layout);
  if (value_rank) require_rank_within("--value-rank", *value_rank, layout);
  if (budget_fraction) {
    const StorageFormat& latents = request.latents;
    request.budget = MemoryBudget::fraction_of_full_cache(*budget_fraction);
    if (latents.width_multiple() > 1 && layout.shape.head_dim % latents.width_multiple() != 0) {
      throw UsageError("--latents " + latents.name() + " stores blocks of " + std::to_string(latents.width_multiple()) +
                       ", which do not divide head_dim " + std::to_string(layout.shape.head_dim));
    }
    // The least a budget must hold: the smallest rank the format stores, in every projection.
    const std::int64_t least = 2 * layout.shape.layers * layout.shape.kv_heads * latents.bytes_per_row(latents.width_multiple());
    const std::int64_t full = 2 * layout.shape.layers * layout.shape.kv_heads * latents.bytes_per_row(layout.shape.head_dim);
    if (request.budget->bytes_for(layout.shape, latents) < least) {
      std::ostringstream smallest;
      smallest << static_cast<double>(least) / static_cast<double>(full);
      throw UsageError("--budget " + *args.value("--budget") + " is less than rank " + std::to_string(latents.width_multiple()) +
                       " in every key and value projection costs in " + latents.name() + ": at least " + smallest.str() +
                       " of the full cache");
    }
    if (sensitivity_path) {
      request.sensitivity_path = *sensitivity_path;
      request.sensitivity = io::read_sensitivity_file(*sensitivity_path, layout.shape);
      const io::Sensitivity& sensitivity = *request.sensitivity;
      const auto mismatch = [&](const std::string& what, const std::string& file_value, const std::string& ours) {
        throw DataError("--sensitivity '" + *sensitivity_path + "' was measured for " + what + " " + file_value + ", but " +
                        ours);
      };
      if (sensitivity.method != request.method) {
        mismatch("method", to_string(sensitivity.method), "--method is " + std::string(to_string(request.method)));
      }
      if (sensitivity.rope != layout.metadata.rope) {
        mismatch("rope", io::rope_spelling(sensitivity.rope),
                 "the calibration files have rope " + std::string(io::rope_spelling(layout.metadata.rope)));
      }
      if (!sensitivity.model.empty() && !layout.metadata.model.empty() && sensitivity.model != layout.metadata.model) {
        mismatch("model", "'" + sensitivity.model + "'", "the calibration files are of '" + layout.metadata.model + "'");
      }
    }
  }
  request.key_selection =
      rank ? RankSelection::fixed(*rank) : epsilon ? RankSelection::error_budget(*epsilon) : RankSelection::fixed(layout.shape.head_dim);
  request.value_selection = value_rank ? RankSelection::fixed(*value_rank) : request.key_selection;
  return request;
}

// Fits the request's projections to the calibration and writes the projection file.
void fit_and_write(const FitRequest& request, const Calibration& calibration) {
  const bool from_grams = request.kind == CalibrationFiles::grams;
  const io::ActivationLayout& layout = request.layout;
  const std::vector<WeightMatrix> weights =
      choose_output_weights(request.weights_path, {calibration.output_weights}, layout.shape);
  if (request.method == Method::kq_svd && weights.empty()) {
    throw DataError(std::string("KQ-SVD fits values to the output projection, but the ") + (from_grams ? "Gram" : "calibration") +
                    " files hold no layers.{l}.o_proj; give --weights FILE");
  }
  ModelProjections<float> fitted = ModelProjections<float>::fit(calibration.statistics, weights, request.method,
                                                                request.key_selection, request.value_selection);
  std::string rank_allocation;
  if (request.budget) {
    // Fitted at full rank above; every method orders its directions, so truncating is fitting lower.
    const std::string spent = request.budget->to_string() + " in " + request.latents.name();
    if (request.sensitivity) {
      LossAwareOptions options;
      options.format = request.latents;
      options.sharing = request.sharing;
      const LossAwareAllocation allocation = loss_aware_allocation(fitted, request.sensitivity->weights, *request.budget, options);
      fitted = fitted.truncated(allocation.ranks);
      rank_allocation = "loss-aware, " + spent + ", " + to_string(request.sharing) + " budget, sensitivity '" +
                        request.sensitivity_path + "'";
    } else {
      fitted = fitted.truncated(uniform_allocation(layout.shape, *request.budget, request.latents));
      rank_allocation = "uniform, " + spent;
    }
  }
  const ModelProjections<float> projections = request.rotate ? hadamard_rotated(fitted) : fitted;

  io::ProjectionInfo info;
  info.model = layout.metadata.model;
  info.rope = layout.metadata.rope;
  info.rope_style = layout.metadata.rope_style;
  info.rope_theta = layout.metadata.rope_theta;
  if (!request.budget) {
    info.key_rank = request.key_selection;
    info.value_rank = request.value_selection;
  }
  info.rank_allocation = rank_allocation;
  info.calibration_tokens = calibration.tokens;
  info.producer = tool_version();
  io::ProjectionFile(projections, info).save(request.out, request.force);

  const std::size_t files = request.inputs.size();
  std::cout << "wrote " << request.out << ": " << to_string(request.method) << " projections of "
            << describe_model(layout.shape, layout.metadata.model, layout.metadata.rope) << "; key rank "
            << projections.ranks().describe_keys() << ", value rank " << projections.ranks().describe_values()
            << ", compression " << projections.ranks().compression_ratio() << (request.rotate ? ", latents rotated" : "")
            << "; calibrated on " << calibration.tokens << " tokens from " << files << (from_grams ? " Gram" : "")
            << (files == 1 ? " file" : " files") << "\n";
}

}  // namespace

int fit_command(const std::vector<std::string>& words, const ProcessGroup& group) {
  // Every step runs on every rank and is agreed on (ProcessGroup::together): an error anywhere stops
  // all ranks, each with a non-zero exit code, before rank 0 writes anything.
  std::optional<FitRequest> request;
  group.together([&] { request = prepare_fit(words); });
  if (!request) {
    if (group.rank() == 0) std::cout << fit_usage;
    return exit_success;
  }
  const Calibration calibration = calibrate_together(group, request->inputs, request->kind, request->layout);
  group.together([&] {
    if (group.rank() == 0) fit_and_write(*request, calibration);
  });
  return exit_success;
}

int eval_command(const std::vector<std::string>& words) {
  const Arguments args(words, {{"--proj", OptionKind::value},
                               {"--data", OptionKind::list},
                               {"--weights", OptionKind::value},
                               {"--latents", OptionKind::value},
                               {"--json", OptionKind::flag}});
  if (args.help()) {
    std::cout << eval_usage;
    return exit_success;
  }
  const std::string proj = args.required_value("--proj");
  const std::vector<std::string> data_paths = args.required_list("--data");

  const io::ProjectionFile projection_file = io::ProjectionFile::load(proj);
  const io::ProjectionInfo& info = projection_file.info();
  const std::optional<StorageFormat> latent_format =
      parse_latent_format(args.value("--latents"), projection_file.projections().ranks());
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
    per_layer = data.measure(projection_file.projections(), weights, latent_format, &progress);
  }
  std::optional<double> epsilon;
  if (info.key_rank && !info.key_rank->is_fixed()) epsilon = info.key_rank->epsilon();
  MethodReport report = make_report(projection_file.projections(), per_layer, epsilon, data.tokens(),
                                     latent_format.value_or(StorageFormat(StorageKind::f32)));
  report.rank_allocation = info.rank_allocation;

  if (args.flag("--json")) {
    std::cout << to_json(report).dump(2) << "\n";
    return exit_success;
  }
  std::cout << report.method << " projections of " << describe_model(projection_file.shape(), info.model, info.rope)
            << "\nkey rank " << report.key_description << ", value rank " << report.value_description
            << (report.rank_allocation.empty() ? "" : " (" + report.rank_allocation + ")") << ", latents " << report.latent_format << (latent_format ? "" : " (exact)") << "; evaluated on "
            << data.tokens() << " tokens from " << data_paths.size() << (data_paths.size() == 1 ? " file" : " files")
            << " (relative Frobenius errors)\n\n";
  print_layer_table(std::cout, report);
  return exit_success;
}

}  // namespace kqsvd::cli
