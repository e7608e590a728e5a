// kqsvd compare: KQ-SVD, K-SVD and Eigen Attention fitted on the same calibration data, given identical
// per-head ranks, and measured on the same held-out data; optionally the whole error/compression curve.
#include <kqsvd/solvers/spectrum.hpp>

#include <iostream>

#include "arguments.hpp"
#include "commands.hpp"
#include "data_set.hpp"
#include "errors.hpp"
#include "parallel.hpp"
#include "progress.hpp"
#include "svg_plot.hpp"

namespace kqsvd::cli {

namespace {

constexpr const char* compare_usage = R"(usage: kqsvd compare --calib FILES... --data FILES... (--rank R | --eps E) [--value-rank R]
                     [--weights FILE] [--latents FORMAT] [--json] [--plot OUT.svg]

Fits all three methods -- kqsvd (KQ-SVD), ksvd (K-SVD), eigen (Eigen Attention) -- on the calibration
files and measures them on the held-out --data files, with identical ranks in every head, so that
the errors compare methods and nothing else. One table (or a JSON list of eval's objects).

  --calib FILES    calibration activation files (docs/activations.md)
  --data FILES     held-out activation files of the same model
  --rank R         keys and values keep R of head_dim dimensions in every head
  --eps E          each head's key rank is the smallest at which KQ-SVD's predicted Q K^T error is
                   <= E, and its value rank the smallest at which KQ-SVD's V W^T error is <= E; the
                   baselines get the same per-head ranks (a fair comparison at equal cache size)
  --value-rank R   rank of every value projection instead
  --weights FILE   output-projection weights (default: those in the calibration or data files)
  --latents FORMAT store every method's key and value latents in FORMAT (f32 f16 bf16 fp8_e4m3
                   fp8_e5m2 int8 q8_0 q4_0 int4 int2, int4/B, int2/B) before reconstructing; block
                   formats need ranks their blocks divide. Default: exact float32 latents
  --json           a JSON list of objects, one per method, as kqsvd eval --json prints
  --plot OUT.svg   also draw Q K^T and output errors vs. cache size for a sweep of ranks (keys and
                   values at rank r in every head, r = head_dim/16 ... head_dim, 8 ranks; with --latents,
                   vs. bits per element, at the ranks FORMAT holds); OUT.svg is replaced

Exit codes: 0 success, 1 unusable data or files, 2 bad command line.
)";

// The ranks of the sweep, dense where the curves bend: head_dim times 1/16, 1/8, 3/16, 1/4, 3/8, 1/2,
// 3/4 and 1 (rounded up, at least 1, no repeats).
std::vector<long> sweep_ranks(long head_dim) {
  std::vector<long> ranks;
  for (const long sixteenths : {1L, 2L, 3L, 4L, 6L, 8L, 12L, 16L}) {
    const long rank = std::max(1L, (sixteenths * head_dim + 15) / 16);
    if (ranks.empty() || ranks.back() != rank) ranks.push_back(rank);
  }
  return ranks;
}

void write_plot(const std::string& path, const std::vector<ModelProjections<float>>& full, const EvaluationData& data,
                const std::vector<WeightMatrix>& weights, const Calibration& calibration,
                const std::optional<StorageFormat>& latent_format) {
  const ModelShape& shape = calibration.layout.shape;
  const StorageFormat format = latent_format.value_or(StorageFormat(StorageKind::f32));
  std::vector<long> ranks;
  for (const long rank : sweep_ranks(shape.head_dim)) {
    if (rank % format.group_size(rank) == 0) ranks.push_back(rank);
  }
  if (ranks.empty()) {
    throw UsageError("--plot: --latents " + format.name() + " holds none of the sweep's ranks");
  }
  const std::size_t points = full.size() * ranks.size();
  std::vector<FidelityRow> rows(points);
  ProgressBar progress("plot sweep", points);
  parallel_jobs(points, [&](std::size_t point) {
    const std::size_t method = point / ranks.size();
    const long rank = ranks[point % ranks.size()];
    const ModelProjections<float> projections = full[method].truncated(RankAllocation::uniform(shape, rank, rank));
    rows[point] =
        make_report(projections, data.measure(projections, weights, latent_format), std::nullopt, data.tokens(), format)
            .overall;
    progress.advance();
  });
  progress.finish();

  Plot plot;
  plot.title = "KQ-SVD vs. K-SVD vs. Eigen Attention on " + calibration.layout.metadata.model;
  plot.subtitle = std::to_string(calibration.tokens) + " calibration tokens, " + std::to_string(data.tokens()) +
                  " held-out tokens; keys and values at rank r of " + std::to_string(shape.head_dim) +
                  " in every head (r = " + std::to_string(ranks.front()) + " ... " + std::to_string(ranks.back()) + ")";
  plot.x_label = latent_format ? "bits per element of the full cache (" + format.name() + " latents)"
                               : "compressed KV cache size / full cache size";
  PlotPanel scores, outputs;
  scores.title = "Attention logits Q K^T";
  scores.y_label = "relative error (err_qk)";
  outputs.title = "Attention output after o_proj";
  outputs.y_label = "relative error (err_out)";
  constexpr std::size_t qk = 3, out = 6;  // positions in all_fidelity_metrics
  for (std::size_t m = 0; m < full.size(); ++m) {
    PlotSeries score_series;
    score_series.name = display_name(full[m].method());
    PlotSeries output_series = score_series;
    for (std::size_t r = 0; r < ranks.size(); ++r) {
      const FidelityRow& row = rows[m * ranks.size() + r];
      const double x = latent_format ? row.bits_per_element : row.compression;
      score_series.x.push_back(x);
      score_series.y.push_back(row.errors[qk]);
      output_series.x.push_back(x);
      output_series.y.push_back(row.errors[out]);
    }
    scores.series.push_back(std::move(score_series));
    outputs.series.push_back(std::move(output_series));
  }
  plot.panels = {scores, outputs};
  write_svg(path, render_svg(plot));
}

}  // namespace

int compare_command(const std::vector<std::string>& words) {
  const Arguments args(words, {{"--calib", OptionKind::list},
                               {"--data", OptionKind::list},
                               {"--rank", OptionKind::value},
                               {"--eps", OptionKind::value},
                               {"--value-rank", OptionKind::value},
                               {"--weights", OptionKind::value},
                               {"--latents", OptionKind::value},
                               {"--json", OptionKind::flag},
                               {"--plot", OptionKind::value}});
  if (args.help()) {
    std::cout << compare_usage;
    return exit_success;
  }
  const std::vector<std::string> calib = args.required_list("--calib");
  const std::vector<std::string> data_paths = args.required_list("--data");
  args.require_one_of("--rank", "--eps");
  const std::optional<long> rank = args.positive_integer("--rank");
  const std::optional<double> epsilon = args.fraction("--eps");
  const std::optional<long> value_rank = args.positive_integer("--value-rank");
  const std::optional<std::string> plot_path = args.value("--plot");

  const io::ActivationLayout layout = read_layout(calib.front());
  const ModelShape& shape = layout.shape;
  for (const auto& [option, value] : {std::pair{"--rank", rank}, std::pair{"--value-rank", value_rank}}) {
    if (value && *value > shape.head_dim) {
      throw UsageError(std::string(option) + " " + std::to_string(*value) + " is more than head_dim " +
                       std::to_string(shape.head_dim) + " of '" + layout.source + "'");
    }
  }

  const Calibration calibration = calibrate_files(calib);
  const EvaluationData data(data_paths, calibration.layout, /*require_same_model=*/true);
  const std::vector<WeightMatrix> weights =
      choose_output_weights(args.value("--weights"), {calibration.output_weights, data.output_weights()}, shape);
  if (weights.empty()) {
    throw DataError("KQ-SVD for values, err_vo and err_out need the output projection, but no file holds "
                    "layers.{l}.o_proj; give --weights FILE");
  }

  // Each method fitted once at full rank; every rank below is a truncation, which equals fitting at that
  // rank directly (the methods order their dimensions by importance).
  const RankSelection full_rank = RankSelection::fixed(shape.head_dim);
  std::vector<ModelProjections<float>> full;
  for (const Method method : all_methods) {
    full.push_back(ModelProjections<float>::fit(calibration.statistics, weights, method, full_rank, full_rank));
  }

  RankAllocation ranks = RankAllocation::uniform(shape, rank.value_or(1), value_rank.value_or(rank.value_or(1)));
  if (epsilon) {
    for (Eigen::Index l = 0; l < shape.layers; ++l) {
      for (Eigen::Index h = 0; h < shape.kv_heads; ++h) {
        ranks.set_key(l, h, smallest_rank_within(full.front().keys(l, h).singular_values(), *epsilon));
        if (!value_rank) ranks.set_value(l, h, smallest_rank_within(full.front().values(l, h).singular_values(), *epsilon));
      }
    }
  }

  const std::optional<StorageFormat> latent_format = parse_latent_format(args.value("--latents"), ranks);
  const StorageFormat report_format = latent_format.value_or(StorageFormat(StorageKind::f32));
  std::vector<MethodReport> reports(full.size());
  {
    ProgressBar progress("evaluating", full.size());
    parallel_jobs(full.size(), [&](std::size_t m) {
      const ModelProjections<float> projections = full[m].truncated(ranks);
      reports[m] = make_report(projections, data.measure(projections, weights, latent_format), epsilon, data.tokens(),
                               report_format);
      progress.advance(to_string(all_methods[m]));
    });
  }
  if (plot_path) write_plot(*plot_path, full, data, weights, calibration, latent_format);

  if (args.flag("--json")) {
    nlohmann::ordered_json list = nlohmann::ordered_json::array();
    for (const MethodReport& report : reports) list.push_back(to_json(report));
    std::cout << list.dump(2) << "\n";
    return exit_success;
  }
  std::cout << "KQ-SVD vs. baselines on " << layout.metadata.model << " (" << shape.layers << " layers, "
            << shape.query_heads << " query / " << shape.kv_heads << " KV heads, head_dim " << shape.head_dim
            << ", rope " << io::rope_spelling(layout.metadata.rope) << ")\n"
            << "calibration: " << calibration.tokens << " tokens; evaluation: " << data.tokens()
            << " held-out tokens; identical ranks for every method: keys " << ranks.describe_keys() << ", values "
            << ranks.describe_values() << (epsilon ? " (chosen from KQ-SVD's spectra)" : "") << "; latents "
            << report_format.name() << (latent_format ? "" : " (exact)") << "\n"
            << "relative Frobenius errors (lower is better); compression = compressed / full KV cache\n\n";
  print_method_table(std::cout, reports);
  if (plot_path) std::cout << "\nplot: " << *plot_path << "\n";
  return exit_success;
}

}  // namespace kqsvd::cli
