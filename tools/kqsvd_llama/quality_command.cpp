// kqsvd-llama quality: what KV-cache compression costs a real model -- next-token loss, perplexity,
// agreement with the uncompressed model and KL divergence -- per method, compression ratio, RoPE mode,
// rank allocation and recent window; with the cache's measured bytes and decode speed.
#include <kqsvd/kqsvd.hpp>
#include <kqsvd/llama/likelihood.hpp>

#include <nlohmann/json.hpp>

#include <kqsvd/io/atomic_file.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "arguments.hpp"
#include "commands.hpp"
#include "errors.hpp"
#include "model_data.hpp"
#include "parallel.hpp"
#include "quality.hpp"
#include "svg_plot.hpp"

namespace kqsvd::cli {

namespace {

constexpr const char* quality_usage = R"(usage: kqsvd-llama quality --model M.bin --tokenizer tok.bin --text stories.txt
           --calib-stories A:B --eval-stories C:D [--max-tokens T] [--ratios 0.25,0.5,0.75]
           [--window W] [--format f32] [--rotate none,hadamard] [--methods kqsvd,ksvd,eigen]
           [--rope post,pre] [--allocations uniform,eps,layer-eps,loss-aware,loss-aware-separate]
           [--probe-stories E:F] [--decode-arithmetic float32] [--decode-tokens N] [--json OUT.json]
           [--plot OUT.svg]

What compressing the KV cache costs the model on held-out text. Projections are calibrated on the
--calib-stories (one prefill per story, exact cache; rotated queries and keys for post-RoPE, un-rotated
for pre-RoPE) and fitted at full rank once per method and RoPE mode; each compression ratio then
truncates them, per --allocations:
  uniform  every key and value projection at rank round(ratio * head_dim);
  eps      per-head ranks from one error budget epsilon (each projection's predicted relative error
           <= epsilon), epsilon bisected so that the ratio matches the target;
  layer-eps  the authors' rule: one rank per layer for keys and one for values, the smallest whose
           mean predicted relative error over the layer's KV heads is <= epsilon, epsilon bisected;
  loss-aware  the ranks that minimise sum_{layer, kind} w * err^2 within the budget (the ratio's share
           of the full cache's bytes in --format; kqsvd::loss_aware_allocation), keys and values on one
           budget, with weights w measured on the --probe-stories (as kqsvd-llama probe does, at the
           ratio's uniform rank);
  loss-aware-separate  the same with keys and values each on half the budget.
Each --eval-stories story runs as one prefill block through the compressed cache (the per-query window
makes that identical to token-by-token decoding) and through the exact cache. Per predicted token: NLL
of the true next token; top-1 agreement with the full-cache model; KL(full || compressed). Decode speed:
the first evaluation story decoded token by token with the cache (--decode-tokens of it), the library's
kernels doing the attention; run with OMP_NUM_THREADS=1 for stable numbers.

  --model, --tokenizer   a llama2.c checkpoint and its tokenizer
  --text                 stories separated by <|endoftext|>
  --calib-stories A:B    stories [A, B) calibrate the projections
  --eval-stories C:D     stories [C, D) are evaluated (keep them disjoint from the calibration)
  --probe-stories E:F    stories [E, F) measure the loss sensitivity for the loss-aware allocations
                         (keep them disjoint from the evaluation stories)
  --max-tokens T         tokens per story, BOS included (default: the model's seq_len)
  --ratios R,...         target ratios in (0, 1]: latent elements / full-cache elements, window excluded
  --window W             also evaluate with the most recent W tokens exact (default 32; 0: only W = 0)
  --format F             how latents are stored (default f32; f16, bf16, fp8_e4m3, int8, q8_0, ...)
  --rotate R,...         none (default) and/or hadamard: rotate the truncated projections' latents by
                         a Hadamard matrix before storing them (same scores, flatter latents for a
                         quantized --format; kqsvd::hadamard_rotated); one row per choice
  --decode-arithmetic A  float32 (default) or int8_dot_products: how decode steps multiply the codes of
                         q4_0, int4 and int2 latents (kqsvd::DecodeArithmetic; post-RoPE rows only,
                         pre-RoPE keys are reconstructed in float). With int8_dot_products the evaluation
                         stories are decoded token by token, since a prefill block computes in float
  --decode-tokens N      tokens decoded one by one to time each cache (default 64; 0: no timing)
  --json OUT.json        every row, with the command line, as JSON
  --plot OUT.svg         NLL and KL against the compression ratio

Exit codes: 0 success, 1 unusable data or files, 2 bad command line.
)";

std::string rank_label(const QualityRow& row) {
  if (row.allocation == "uniform") return "r=" + std::to_string(row.rank);
  if (row.allocation == "eps" || row.allocation == "layer-eps") {
    std::ostringstream out;
    out << (row.allocation == "eps" ? "eps=" : "leps=") << std::setprecision(3) << row.epsilon;
    return out.str();
  }
  if (row.allocation == "loss-aware") return "loss-aware";
  if (row.allocation == "loss-aware-separate") return "loss-aw-sep";
  return "-";
}

void print_table(std::ostream& out, const std::vector<QualityRow>& rows, const QualityRow& full) {
  const std::vector<std::pair<std::string, int>> columns = {
      {"rope", 5}, {"method", 7}, {"ranks", 12}, {"W", 4},      {"rotate", 9}, {"target", 7}, {"ratio", 7},
      {"NLL", 7},  {"PPL", 7},    {"dNLL", 8},   {"+-se", 6},   {"top1%", 7},  {"KL", 8},     {"B/tok/L", 8},
      {"tok/s", 8}};
  for (const auto& [name, width] : columns) out << std::setw(width) << name << ' ';
  out << '\n';
  const auto print = [&](const QualityRow& row) {
    const NextTokenComparison& m = row.comparison;
    const std::vector<std::string> cells = {row.rope,
                                            row.method,
                                            rank_label(row),
                                            std::to_string(row.window),
                                            row.rotation,
                                            fixed(row.target, 2),
                                            fixed(row.ratio, 3),
                                            fixed(m.mean_nll(), 4),
                                            fixed(m.perplexity(), 3),
                                            fixed(m.nll_difference(), 4),
                                            fixed(std::isnan(m.nll_difference_standard_error()) ? 0.0 : m.nll_difference_standard_error(), 4),
                                            fixed(100.0 * m.top1_agreement(), 1),
                                            fixed(m.mean_kl(), 4),
                                            fixed(row.bytes_per_token_layer, 1),
                                            row.tokens_per_second > 0 ? fixed(row.tokens_per_second, 0) : "-"};
    for (std::size_t c = 0; c < cells.size(); ++c) out << std::setw(columns[c].second) << cells[c] << ' ';
    out << '\n';
  };
  print(full);
  std::string section;
  for (const QualityRow& row : rows) {
    const std::string key = row.rope + row.allocation + row.rotation + std::to_string(row.window);
    if (key != section) out << '\n';
    section = key;
    print(row);
  }
}

nlohmann::ordered_json row_json(const QualityRow& row) {
  const NextTokenComparison& m = row.comparison;
  const auto number = [](double value) -> nlohmann::ordered_json {
    if (!std::isfinite(value)) return nullptr;
    return value;
  };
  return {{"rope", row.rope},
          {"method", row.method},
          {"ranks", row.allocation},
          {"rank", row.rank},
          {"epsilon", number(row.epsilon)},
          {"key_ranks", row.key_ranks},
          {"value_ranks", row.value_ranks},
          {"window", row.window},
          {"format", row.format},
          {"rotation", row.rotation},
          {"decode_arithmetic", row.arithmetic},
          {"target_ratio", number(row.target)},
          {"ratio", number(row.ratio)},
          {"bits_per_element", number(row.bits_per_element)},
          {"nll", number(m.mean_nll())},
          {"perplexity", number(m.perplexity())},
          {"nll_difference", number(m.nll_difference())},
          {"nll_difference_se", number(m.nll_difference_standard_error())},
          {"top1_agreement", number(m.top1_agreement())},
          {"kl", number(m.mean_kl())},
          {"bytes_per_token_per_layer", number(row.bytes_per_token_layer)},
          {"tokens_per_s", number(row.tokens_per_second)}};
}

// Two metrics against the compression ratio, one row of panels per window: mean NLL and mean KL
// (log scale), each for every RoPE mode. One colour per method; solid lines and dots for uniform ranks,
// dashed lines and squares for the other allocations; the full cache's NLL dotted.
Plot quality_plot(const std::string& title, const std::vector<QualityRow>& rows, const QualityRow& full,
                  const std::vector<RopeMode>& modes, const std::vector<Eigen::Index>& windows,
                  const std::vector<Method>& methods, const std::vector<std::string>& allocations,
                  const std::vector<std::string>& rotations) {
  Plot plot;
  plot.title = title;
  plot.x_label = "compression ratio (latent / full cache, window excluded)";
  plot.subtitle = "lower is better; NLL in nats per token, KL(full || compressed) in nats on a log scale";
  plot.columns = static_cast<int>(2 * modes.size());
  std::vector<std::tuple<std::size_t, std::string, std::string>> curves;  // method, allocation, rotation
  for (std::size_t m = 0; m < methods.size(); ++m) {
    for (const std::string& allocation : allocations) {
      for (const std::string& rotation : rotations) curves.emplace_back(m, allocation, rotation);
    }
  }
  for (const Eigen::Index window : windows) {
    for (const bool kl : {false, true}) {
      for (const RopeMode mode : modes) {
        PlotPanel panel;
        panel.title = std::string(kl ? "KL" : "NLL") + ", " + (mode == RopeMode::post_rope ? "post" : "pre") +
                      "-RoPE, W = " + std::to_string(window);
        panel.y_label = kl ? "KL (nats)" : "NLL (nats)";
        panel.log_y = kl;
        panel.y_from_zero = false;
        if (!kl) {
          panel.reference_y = full.comparison.mean_nll();
          panel.reference_label = "full cache";
        }
        for (const auto& [m, allocation, rotation] : curves) {
          PlotSeries series;
          series.name = display_name(methods[m]) + (allocation == "uniform" ? "" : ", " + allocation) +
                        (rotation == "none" ? "" : ", " + rotation);
          series.colour = static_cast<int>(m);
          series.dashed = allocation != "uniform" || rotation != "none";
          series.marker = allocation == "uniform" ? Marker::circle : Marker::square;
          std::vector<std::pair<double, double>> points;
          for (const QualityRow& row : rows) {
            if (row.rope == to_string(mode) && row.window == window && row.allocation == allocation &&
                row.rotation == rotation && row.method == to_string(methods[m])) {
              points.emplace_back(row.ratio, kl ? row.comparison.mean_kl() : row.comparison.mean_nll());
            }
          }
          std::sort(points.begin(), points.end());
          for (const auto& [x, y] : points) {
            series.x.push_back(x);
            series.y.push_back(y);
          }
          if (!series.x.empty()) panel.series.push_back(std::move(series));
        }
        plot.panels.push_back(std::move(panel));
      }
    }
  }
  // Two panels per mode: NLL panels first, then KL, in each row.
  return plot;
}

}  // namespace

std::string fixed(double value, int digits) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(digits) << value;
  return out.str();
}

QualityEvaluator::QualityEvaluator(const llama::Transformer& model, Sequences stories) : model_(&model), stories_(std::move(stories)) {
  llama::FullKvCache cache(model.shape(), model.rotary_embedding());
  for (const std::vector<int>& story : stories_) {
    cache.reset();
    reference_.push_back(model.forward(story, cache));
  }
}

QualityRow QualityEvaluator::evaluate(const CacheConfiguration& configuration, const ModelProjections<float>* projections) const {
  QualityRow row;
  row.arithmetic = to_string(configuration.arithmetic);
  std::unique_ptr<llama::KvCache> cache = make_cache(*model_, configuration, projections);
  double bytes = 0.0, token_layers = 0.0;
  for (std::size_t s = 0; s < stories_.size(); ++s) {
    const std::vector<int>& tokens = stories_[s];
    cache->reset();
    // The online SVD fits its basis on a prompt: the first half of the story, then the rest is decoded
    // on it (one block: attention is per query, so that equals token-by-token decoding).
    // Token by token (block 1) for int8 dot products, which only decode steps use.
    const bool decode = configuration.arithmetic != DecodeArithmetic::float32 && configuration.online_rank == 0;
    const std::size_t prompt = decode ? 1
                               : configuration.online_rank > 0 ? std::max<std::size_t>(1, tokens.size() / 2)
                                                               : tokens.size();
    RowMatrix<float> logits = model_->forward(std::vector<int>(tokens.begin(), tokens.begin() + static_cast<long>(prompt)), *cache);
    const std::size_t block = decode ? 1 : tokens.size();
    if (prompt < tokens.size()) logits.conservativeResize(static_cast<Eigen::Index>(tokens.size()), Eigen::NoChange);
    for (std::size_t first = prompt; first < tokens.size(); first += block) {
      const std::size_t last = std::min(tokens.size(), first + block);
      logits.middleRows(static_cast<Eigen::Index>(first), static_cast<Eigen::Index>(last - first)) = model_->forward(
          std::vector<int>(tokens.begin() + static_cast<long>(first), tokens.begin() + static_cast<long>(last)), *cache);
    }
    const auto predicted = static_cast<Eigen::Index>(tokens.size()) - 1;
    row.comparison.add(reference_[s].topRows(predicted), logits.topRows(predicted),
                       std::vector<int>(tokens.begin() + 1, tokens.end()));
    bytes += static_cast<double>(cache->bytes());
    token_layers += static_cast<double>(tokens.size()) * static_cast<double>(model_->shape().layers);
  }
  row.bytes_per_token_layer = bytes / token_layers;
  return row;
}

double QualityEvaluator::decode_speed(const CacheConfiguration& configuration, const ModelProjections<float>* projections,
                                      Eigen::Index tokens) const {
  if (tokens <= 0 || stories_.empty()) return 0.0;
  std::unique_ptr<llama::KvCache> cache = make_cache(*model_, configuration, projections);
  const std::vector<int>& story = stories_.front();
  const auto count = std::min<std::size_t>(static_cast<std::size_t>(tokens), story.size());
  // Best of three runs: the machine's neighbours make single timings noisy.
  double best = 0.0;
  for (int run = 0; run < 3; ++run) {
    cache->reset();
    const auto start = std::chrono::steady_clock::now();
    for (std::size_t i = 0; i < count; ++i) model_->forward({story[i]}, *cache);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, static_cast<double>(count) / seconds);
  }
  return best;
}

SensitivityProbe measure_sensitivity(const QualityEvaluator& probe, const ModelProjections<float>& full_rank,
                                     const CacheConfiguration& configuration, Eigen::Index rank) {
  const ModelShape& shape = full_rank.shape();
  const auto layers = static_cast<std::size_t>(shape.layers);
  // Job 0: everything at full rank; then 2 l + 1 the keys of layer l, 2 l + 2 its values.
  std::vector<double> kl(1 + 2 * layers, 0.0);
  const auto ranks_of = [&](std::size_t job) {
    RankAllocation ranks = RankAllocation::uniform(shape, shape.head_dim, shape.head_dim);
    if (job == 0) return ranks;
    const auto layer = static_cast<Eigen::Index>((job - 1) / 2);
    for (Eigen::Index h = 0; h < shape.kv_heads; ++h) {
      (job % 2 == 1) ? ranks.set_key(layer, h, rank) : ranks.set_value(layer, h, rank);
    }
    return ranks;
  };
  parallel_jobs(kl.size(), [&](std::size_t job) {
    const ModelProjections<float> projections = full_rank.truncated(ranks_of(job));
    kl[job] = probe.evaluate(configuration, &projections).comparison.mean_kl();
  });
  SensitivityProbe result{LossWeights(shape), {}, {}, kl[0]};
  // w = KL increase / the layer's predicted squared error at `rank` (that term alone weighted 1).
  const auto weight = [&](std::size_t job, double increase) {
    LossWeights only(shape, 0.0);
    const auto layer = static_cast<Eigen::Index>((job - 1) / 2);
    job % 2 == 1 ? only.set_layer(layer, 1.0, 0.0) : only.set_layer(layer, 0.0, 1.0);
    const double error = predicted_loss(full_rank, only, ranks_of(job));
    return error > 0.0 ? increase / error : 0.0;
  };
  for (std::size_t l = 0; l < layers; ++l) {
    const std::size_t key_job = 1 + 2 * l, value_job = key_job + 1;
    result.key_kl.push_back(std::max(0.0, kl[key_job] - kl[0]));
    result.value_kl.push_back(std::max(0.0, kl[value_job] - kl[0]));
    result.weights.set_layer(static_cast<Eigen::Index>(l), weight(key_job, result.key_kl.back()),
                             weight(value_job, result.value_kl.back()));
  }
  return result;
}

int quality_command(const std::vector<std::string>& words) {
  const Arguments args(words, {{"--model", OptionKind::value},        {"--tokenizer", OptionKind::value},
                               {"--text", OptionKind::value},         {"--calib-stories", OptionKind::value},
                               {"--eval-stories", OptionKind::value}, {"--max-tokens", OptionKind::value},
                               {"--probe-stories", OptionKind::value},
                               {"--ratios", OptionKind::value},       {"--window", OptionKind::value},
                               {"--format", OptionKind::value},       {"--methods", OptionKind::value},
                               {"--rotate", OptionKind::value},
                               {"--rope", OptionKind::value},         {"--allocations", OptionKind::value},
                               {"--decode-tokens", OptionKind::value}, {"--json", OptionKind::value},
                               {"--decode-arithmetic", OptionKind::value},
                               {"--plot", OptionKind::value}});
  if (args.help()) {
    std::cout << quality_usage;
    return exit_success;
  }
  const auto start = std::chrono::steady_clock::now();
  const auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  const std::pair<long, long> calibration_range = required(args.range("--calib-stories"), "--calib-stories");
  const std::pair<long, long> evaluation_range = required(args.range("--eval-stories"), "--eval-stories");
  const std::vector<double> ratios = ratios_of(args, "--ratios", {0.25, 0.5, 0.75});
  const long window = args.integer("--window", 0, 1 << 20).value_or(32);
  const StorageFormat format = parse_format_name(args.value("--format").value_or("f32"), "--format");
  const DecodeArithmetic arithmetic =
      parse_arithmetic_name(args.value("--decode-arithmetic").value_or("float32"), "--decode-arithmetic");
  if (arithmetic != DecodeArithmetic::float32 && !int8_dot_products_apply(format)) {
    throw UsageError("--decode-arithmetic " + std::string(to_string(arithmetic)) + " applies to q4_0, int4 and int2 latents, not --format " +
                     format.name());
  }
  const std::vector<Method> methods = methods_of(args, "--methods");
  std::vector<RopeMode> modes(all_rope_modes.begin(), all_rope_modes.end());
  if (!args.items("--rope").empty()) {
    modes.clear();
    for (const std::string& item : args.items("--rope")) modes.push_back(parse_rope_name(item, "--rope"));
  }
  std::vector<std::string> allocations = {"uniform", "eps"};
  if (!args.items("--allocations").empty()) {
    allocations = args.items("--allocations");
    for (const std::string& allocation : allocations) {
      if (allocation != "uniform" && allocation != "eps" && allocation != "layer-eps" && allocation != "loss-aware" &&
          allocation != "loss-aware-separate") {
        throw UsageError("--allocations must list some of uniform, eps, layer-eps, loss-aware, loss-aware-separate, got '" +
                         allocation + "'");
      }
    }
  }
  std::vector<std::string> rotations = {"none"};
  if (!args.items("--rotate").empty()) {
    rotations = args.items("--rotate");
    for (const std::string& rotation : rotations) {
      if (rotation != "none" && rotation != "hadamard") {
        throw UsageError("--rotate must list none and/or hadamard, got '" + rotation + "'");
      }
    }
  }
  const long decode_tokens = args.integer("--decode-tokens", 0, 1 << 20).value_or(64);
  const bool loss_aware = std::any_of(allocations.begin(), allocations.end(),
                                      [](const std::string& a) { return a.rfind("loss-aware", 0) == 0; });
  const std::optional<std::pair<long, long>> probe_range = args.range("--probe-stories");
  if (loss_aware && !probe_range) throw UsageError("--allocations loss-aware needs --probe-stories E:F");

  const ModelData data = load_model_data(args, /*needs_text=*/true);
  const ModelShape& shape = data.model.shape();
  const auto max_tokens = static_cast<std::size_t>(
      args.integer("--max-tokens", 2, 1 << 20).value_or(data.model.config().seq_len));
  const Sequences calibration_stories = data.encode(calibration_range, max_tokens, "--calib-stories");
  const Sequences evaluation_stories = data.encode(evaluation_range, max_tokens, "--eval-stories");
  const Sequences probe_stories = probe_range ? data.encode(*probe_range, max_tokens, "--probe-stories") : Sequences{};
  if (probe_range && probe_range->first < evaluation_range.second && evaluation_range.first < probe_range->second) {
    std::cerr << "kqsvd-llama: warning: probe and evaluation stories overlap\n";
  }
  if (calibration_range.first < evaluation_range.second && evaluation_range.first < calibration_range.second) {
    std::cerr << "kqsvd-llama: warning: calibration and evaluation stories overlap\n";
  }
  for (const Method method : methods) {
    (void)method;
    for (const double ratio : ratios) {
      // Every latent width the sweep asks for must be storable in the format.
      const Eigen::Index rank = uniform_rank_for_ratio(shape.head_dim, ratio);
      if (rank % format.group_size(rank) != 0) {
        throw UsageError("--format " + format.name() + " cannot hold latents of rank " + std::to_string(rank) +
                         " (ratio " + fixed(ratio, 2) + " of head_dim " + std::to_string(shape.head_dim) + ")");
      }
    }
  }

  const Calibrations calibrations = calibrate(data.model, calibration_stories);
  std::cerr << "calibrated on " << calibrations.post_rope.token_count() << " tokens (" << calibration_stories.size()
            << " stories) in " << fixed(elapsed(), 1) << " s\n";
  const QualityEvaluator evaluator(data.model, evaluation_stories);
  QualityRow full = evaluator.evaluate(CacheConfiguration{}, nullptr);
  full.method = "full";
  full.rank = shape.head_dim;
  full.bits_per_element = 32.0;
  full.tokens_per_second = evaluator.decode_speed(CacheConfiguration{}, nullptr, decode_tokens);
  std::cerr << "full cache: NLL " << fixed(full.comparison.mean_nll(), 4) << " over " << full.comparison.tokens()
            << " predicted tokens\n";

  // Every configuration: projections chosen sequentially (fits and probes are cached), evaluated in parallel.
  FullRankProjections fitted(data.model, calibrations);
  std::optional<QualityEvaluator> prober;
  if (loss_aware) prober.emplace(data.model, probe_stories);
  std::map<std::tuple<Method, RopeMode, Eigen::Index>, LossWeights> sensitivities;
  const auto sensitivity = [&](Method method, RopeMode mode, Eigen::Index rank) -> const LossWeights& {
    const auto key = std::make_tuple(method, mode, rank);
    auto found = sensitivities.find(key);
    if (found == sensitivities.end()) {
      const SensitivityProbe probe =
          measure_sensitivity(*prober, fitted.get(method, mode), latent_configuration(method, mode, 0, format), rank);
      found = sensitivities.emplace(key, probe.weights).first;
      std::cerr << "probed " << to_string(method) << " " << to_string(mode) << " at rank " << rank << " ("
                << fixed(elapsed(), 0) << " s)\n";
    }
    return found->second;
  };
  std::vector<Eigen::Index> windows = {0};
  if (window > 0) windows.push_back(window);
  std::vector<QualityRow> rows;
  std::vector<ModelProjections<float>> chosen;
  std::vector<CacheConfiguration> configurations;
  for (const RopeMode mode : modes) {
    for (const Method method : methods) {
      const ModelProjections<float>& full_rank = fitted.get(method, mode);
      for (const double target : ratios) {
        for (const std::string& allocation : allocations) {
          QualityRow row;
          row.rope = to_string(mode);
          row.method = to_string(method);
          row.allocation = allocation;
          row.target = target;
          row.format = format.name();
          RankAllocation ranks = RankAllocation::uniform(shape, 1, 1);
          if (allocation == "uniform") {
            row.rank = uniform_rank_for_ratio(shape.head_dim, target);
            ranks = RankAllocation::uniform(shape, row.rank, row.rank);
          } else if (allocation == "eps" || allocation == "layer-eps") {
            const ErrorBudgetAllocation budget = allocation == "eps" ? error_budget_allocation(full_rank, target)
                                                                     : layer_error_budget_allocation(full_rank, target);
            row.epsilon = budget.epsilon;
            ranks = budget.ranks;
          } else {
            LossAwareOptions options;
            options.format = format;
            options.sharing = allocation == "loss-aware" ? BudgetSharing::joint : BudgetSharing::separate;
            const LossWeights& weights = sensitivity(method, mode, uniform_rank_for_ratio(shape.head_dim, target));
            ranks = loss_aware_allocation(full_rank, weights, MemoryBudget::fraction_of_full_cache(target), options).ranks;
          }
          row.key_ranks = ranks.describe_keys();
          row.value_ranks = ranks.describe_values();
          row.ratio = ranks.compression_ratio();
          row.bits_per_element = latent_cache_footprint(ranks, format).bits_per_element();
          const ModelProjections<float> truncated = full_rank.truncated(ranks);
          for (const std::string& rotation : rotations) {
            row.rotation = rotation;
            for (const Eigen::Index w : windows) {
              row.window = w;
              rows.push_back(row);
              chosen.push_back(rotation == "hadamard" ? hadamard_rotated(truncated) : truncated);
              configurations.push_back(latent_configuration(method, mode, w, format));
              if (takes_decode_arithmetic(configurations.back())) configurations.back().arithmetic = arithmetic;
            }
          }
        }
      }
    }
  }
  parallel_jobs(rows.size(), [&](std::size_t i) {
    const QualityRow measured = evaluator.evaluate(configurations[i], &chosen[i]);
    rows[i].comparison = measured.comparison;
    rows[i].arithmetic = measured.arithmetic;
    rows[i].bytes_per_token_layer = measured.bytes_per_token_layer;
  });
  std::cerr << "evaluated " << rows.size() << " configurations in " << fixed(elapsed(), 0) << " s\n";
  // Timings one at a time, so that they do not share the cores.
  for (std::size_t i = 0; i < rows.size(); ++i) {
    rows[i].tokens_per_second = evaluator.decode_speed(configurations[i], &chosen[i], decode_tokens);
  }
  std::stable_sort(rows.begin(), rows.end(), [](const QualityRow& a, const QualityRow& b) {
    return std::tie(a.rope, a.allocation, a.rotation, a.window) < std::tie(b.rope, b.allocation, b.rotation, b.window);
  });

  std::cout << "model " << data.name() << " (" << to_string(shape) << ")\n"
            << "calibration stories " << calibration_range.first << ":" << calibration_range.second << " ("
            << calibrations.post_rope.token_count() << " tokens), evaluation stories " << evaluation_range.first << ":"
            << evaluation_range.second << " (" << full.comparison.tokens() << " predicted tokens), max " << max_tokens
            << " tokens per story, latents " << format.name()
            << (arithmetic == DecodeArithmetic::float32
                    ? std::string()
                    : std::string(", post-RoPE rows decoded token by token with ") + to_string(arithmetic))
            << "\n"
            << "ratio = latent elements / full-cache elements, window excluded; dNLL = NLL - full-cache NLL, +-se its "
               "paired standard error over tokens; top1% = agreement with the full cache; KL = mean KL(full || "
               "compressed), nats; B/tok/L = measured cache bytes per token per layer (window included); tok/s = "
               "token-by-token decoding of the first "
            << std::min<std::size_t>(static_cast<std::size_t>(decode_tokens), evaluation_stories.front().size())
            << " tokens of the first evaluation story, best of 3\n\n";
  print_table(std::cout, rows, full);

  if (const auto json_path = args.value("--json")) {
    nlohmann::ordered_json report = nlohmann::ordered_json::object();
    std::string command = "kqsvd-llama quality";
    for (const std::string& word : words) command += " " + word;
    report["command"] = command;
    report["model"] = data.name();
    report["head_dim"] = shape.head_dim;
    report["layers"] = shape.layers;
    report["kv_heads"] = shape.kv_heads;
    report["format"] = format.name();
    report["eval_predicted_tokens"] = full.comparison.tokens();
    report["ratio_definition"] = "latent elements / full-cache elements, window excluded";
    nlohmann::ordered_json list = nlohmann::ordered_json::array();
    list.push_back(row_json(full));
    for (const QualityRow& row : rows) list.push_back(row_json(row));
    report["rows"] = std::move(list);
    io::AtomicFileWriter file(*json_path, /*overwrite=*/true);
    file.write(report.dump(2) + "\n");
    file.commit();
  }
  if (const auto plot_path = args.value("--plot")) {
    write_svg(*plot_path, render_svg(quality_plot(data.name() + ": quality vs KV-cache compression (" +
                                                      std::to_string(full.comparison.tokens()) + " held-out tokens)",
                                                  rows, full, modes, windows, methods, allocations, rotations)));
  }
  std::cerr << "total " << fixed(elapsed(), 1) << " s\n";
  return exit_success;
}

}  // namespace kqsvd::cli
