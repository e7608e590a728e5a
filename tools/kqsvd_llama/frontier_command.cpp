// kqsvd-llama frontier: which KV cache gives the best quality for the bytes a user can spend, measured on
// the user's own model -- full caches in every storage format, low-rank latents (each method, uniform and
// loss-aware ranks, each latent format, with and without a recent window), H2O eviction alone and on
// latents, and the calibration-free online SVD -- with the Pareto front of KL against bits per element,
// and, for a budget, the best configuration and its projection file.
#include <kqsvd/kqsvd.hpp>
#include <kqsvd/io/atomic_file.hpp>
#include <kqsvd/io/projection_file.hpp>
#include <kqsvd/io/sensitivity_file.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iomanip>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
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

constexpr const char* frontier_usage = R"(usage: kqsvd-llama frontier --model M.bin --tokenizer tok.bin --text stories.txt
           --calib-stories A:B --eval-stories C:D [--probe-stories E:F] [--max-tokens T]
           [--ratios 0.25,0.5] [--methods kqsvd,ksvd,eigen] [--latent-formats f16,int8,int4,int4/16,int2/16]
           [--full-formats f16,bf16,fp8_e4m3,fp8_e5m2,int8,q8_0,q4_0,int4,int2] [--window W]
           [--h2o 0.1,0.2,0.5] [--decode-arithmetic float32,int8_dot_products] [--decode-tokens N]
           [--json OUT.json] [--plot OUT.svg]
           [--budget-bits B [--out PROJECTIONS.safetensors [--force]]]

The quality-per-byte frontier of KV caches on held-out text: every configuration below is run on the
--eval-stories and compared with the full float32 cache (KL(full || cache), NLL, top-1 agreement), its
bits per cached element measured from the cache's bytes (scales, minimums, windows, bases and eviction
scores included) and its decode speed timed on the library's kernels:
  full-F                  the full cache stored in format F, for each of --full-formats
  M-uniform-R%-F          low rank: method M, every projection at rank round(R * head_dim), latents in F
  M-loss-aware-R%-F       ranks of kqsvd::loss_aware_allocation for R of the full cache's bytes in F
                          (weights probed on --probe-stories; only when they are given)
  ...+wW                  the same for kqsvd with the most recent W tokens exact (float32; --window > 0)
  h2o-R%-F                H2O: R of the context (--max-tokens) kept per head, half heavy hitters, half
                          recent tokens, in F (f16 and q4_0 where the head dimension allows)
  h2o-R%+kqsvd-uniform-S%-F   H2O on KQ-SVD latents (R = the largest --h2o, S each ratio)
  ...+int8                the same q4_0, int4 or int2 full cache or latents decoded with integer dot
                          products (--decode-arithmetic int8_dot_products; kqsvd::DecodeArithmetic): the
                          evaluation stories decoded token by token, as the arithmetic applies to decode
                          steps only
  online-svd-R%-F         no calibration: each story's own SVD of its pre-RoPE keys and its values at rank
                          round(R * head_dim), fitted on its first half (the prompt), the rest projected
                          on it (as ShadowKV); the bases are counted
Low-rank latents are post-RoPE, calibrated on the --calib-stories. A configuration whose format cannot
hold its row width is skipped (listed on stderr). The Pareto front: configurations no other beats in
both bits and KL.

  --decode-arithmetic A,...  float32 (default) and/or int8_dot_products: how decode steps multiply 4- and
                         2-bit codes; one configuration per choice where it applies
  --budget-bits B        also name the best configuration measured within B bits per element; with --out,
                         write its projection file (low-rank configurations; the others need none)
  --json OUT.json        {"model", "eval_stories", "max_tokens", "configs": [{"config", "bits_per_element",
                         "kl", "nll", "top1", "tokens_per_s", "decode_arithmetic", "pareto", ...}],
                         "best_per_budget": [...]}
  --plot OUT.svg         KL against bits per element, the Pareto front marked

Exit codes: 0 success, 1 unusable data or files, 2 bad command line (a budget below every configuration).
)";

struct Candidate {
  std::string name, family;
  CacheConfiguration cache;
  std::optional<ModelProjections<float>> projections;
  std::string ranks;       // how per-head ranks were chosen, for the projection file
  double nominal_bits = 0.0;  // bits per element before measuring (latents or rows, window excluded)
  // Measured.
  QualityRow row;
  double bits = 0.0;
  bool pareto = false;
};

std::string percent(double ratio) { return std::to_string(static_cast<int>(std::lround(100.0 * ratio))) + "%"; }

std::vector<StorageFormat> formats_of(const Arguments& args, const std::string& option, const std::string& defaults) {
  std::vector<std::string> names = args.items(option);
  if (names.empty()) {
    std::istringstream in(defaults);
    for (std::string name; std::getline(in, name, ',');) names.push_back(name);
  }
  std::vector<StorageFormat> formats;
  for (const std::string& name : names) formats.push_back(parse_format_name(name, option));
  return formats;
}

// Marks the configurations that no other has at most the bits and at most the KL of, one strictly.
void mark_pareto(std::vector<Candidate>& candidates) {
  for (Candidate& c : candidates) {
    c.pareto = std::none_of(candidates.begin(), candidates.end(), [&](const Candidate& other) {
      const double kl = c.row.comparison.mean_kl(), other_kl = other.row.comparison.mean_kl();
      return other.bits <= c.bits && other_kl <= kl && (other.bits < c.bits || other_kl < kl);
    });
  }
}

// The measured configuration of least KL within `bits`, or none.
const Candidate* best_within(const std::vector<Candidate>& candidates, double bits) {
  const Candidate* best = nullptr;
  for (const Candidate& c : candidates) {
    if (c.bits <= bits && (!best || c.row.comparison.mean_kl() < best->row.comparison.mean_kl())) best = &c;
  }
  return best;
}

Plot frontier_plot(const std::string& title, const std::vector<Candidate>& candidates) {
  Plot plot;
  plot.title = title;
  plot.x_label = "bits per cached element (measured: codes, scales, windows, bases)";
  plot.subtitle = "KL(full || cache) in nats, log scale; lower left is better; the line joins the Pareto front";
  PlotPanel panel;
  panel.title = "quality per byte";
  panel.y_label = "KL (nats)";
  panel.log_y = true;
  panel.y_from_zero = false;
  std::vector<std::string> families;
  for (const Candidate& c : candidates) {
    if (std::find(families.begin(), families.end(), c.family) == families.end()) families.push_back(c.family);
  }
  for (std::size_t f = 0; f < families.size(); ++f) {
    PlotSeries series;
    series.name = families[f];
    series.colour = static_cast<int>(f);
    series.line = false;
    series.marker = families[f].rfind("full", 0) == 0 ? Marker::square : Marker::circle;
    for (const Candidate& c : candidates) {
      if (c.family != families[f]) continue;
      series.x.push_back(c.bits);
      series.y.push_back(c.row.comparison.mean_kl());
    }
    panel.series.push_back(std::move(series));
  }
  PlotSeries front;
  front.name = "Pareto front";
  front.colour = static_cast<int>(families.size());
  front.dashed = true;
  front.marker = Marker::none;
  std::vector<std::pair<double, double>> points;
  for (const Candidate& c : candidates) {
    if (c.pareto) points.emplace_back(c.bits, c.row.comparison.mean_kl());
  }
  std::sort(points.begin(), points.end());
  for (const auto& [x, y] : points) {
    front.x.push_back(x);
    front.y.push_back(y);
  }
  panel.series.push_back(std::move(front));
  plot.panels.push_back(std::move(panel));
  return plot;
}

}  // namespace

int frontier_command(const std::vector<std::string>& words) {
  const Arguments args(words, {{"--model", OptionKind::value},          {"--tokenizer", OptionKind::value},
                               {"--text", OptionKind::value},           {"--calib-stories", OptionKind::value},
                               {"--eval-stories", OptionKind::value},   {"--probe-stories", OptionKind::value},
                               {"--max-tokens", OptionKind::value},     {"--ratios", OptionKind::value},
                               {"--methods", OptionKind::value},        {"--latent-formats", OptionKind::value},
                               {"--full-formats", OptionKind::value},   {"--window", OptionKind::value},
                               {"--h2o", OptionKind::value},            {"--decode-tokens", OptionKind::value},
                               {"--json", OptionKind::value},           {"--plot", OptionKind::value},
                               {"--budget-bits", OptionKind::value},    {"--out", OptionKind::value},
                               {"--decode-arithmetic", OptionKind::value},
                               {"--force", OptionKind::flag}});
  if (args.help()) {
    std::cout << frontier_usage;
    return exit_success;
  }
  const auto start = std::chrono::steady_clock::now();
  const auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  const std::pair<long, long> calibration_range = required(args.range("--calib-stories"), "--calib-stories");
  const std::pair<long, long> evaluation_range = required(args.range("--eval-stories"), "--eval-stories");
  const std::optional<std::pair<long, long>> probe_range = args.range("--probe-stories");
  const std::vector<double> ratios = ratios_of(args, "--ratios", {0.25, 0.5});
  const std::vector<double> h2o_ratios = ratios_of(args, "--h2o", {0.1, 0.2, 0.5});
  const std::vector<Method> methods = methods_of(args, "--methods");
  const std::vector<StorageFormat> latent_formats = formats_of(args, "--latent-formats", "f16,int8,int4,int4/16,int2/16");
  const std::vector<StorageFormat> full_formats =
      formats_of(args, "--full-formats", "f16,bf16,fp8_e4m3,fp8_e5m2,int8,q8_0,q4_0,int4,int2");
  const long window = args.integer("--window", 0, 1 << 20).value_or(32);
  const long decode_tokens = args.integer("--decode-tokens", 0, 1 << 20).value_or(64);
  std::vector<DecodeArithmetic> arithmetics = {DecodeArithmetic::float32};
  if (!args.items("--decode-arithmetic").empty()) {
    arithmetics.clear();
    for (const std::string& item : args.items("--decode-arithmetic")) {
      const DecodeArithmetic arithmetic = parse_arithmetic_name(item, "--decode-arithmetic");
      if (std::find(arithmetics.begin(), arithmetics.end(), arithmetic) == arithmetics.end()) arithmetics.push_back(arithmetic);
    }
  }
  const std::optional<double> budget_bits = args.number_above("--budget-bits", 0.0, 64.0);
  const std::optional<std::string> out = args.value("--out");
  if (out && !budget_bits) throw UsageError("--out needs --budget-bits: the projection file is the best configuration's");

  const ModelData data = load_model_data(args, /*needs_text=*/true);
  const ModelShape& shape = data.model.shape();
  const Eigen::Index d = shape.head_dim;
  const auto max_tokens = static_cast<std::size_t>(
      args.integer("--max-tokens", 2, 1 << 20).value_or(data.model.config().seq_len));
  const auto context = static_cast<Eigen::Index>(max_tokens);
  if (calibration_range.first < evaluation_range.second && evaluation_range.first < calibration_range.second) {
    std::cerr << "kqsvd-llama: warning: calibration and evaluation stories overlap\n";
  }

  // Every configuration, with what it is expected to cost before measuring.
  std::vector<Candidate> candidates;
  std::vector<std::string> skipped;
  const auto holds = [&](const StorageFormat& format, Eigen::Index width, const std::string& name) {
    if (width % format.group_size(width) == 0) return true;
    skipped.push_back(name + " (" + format.name() + " cannot hold rows of " + std::to_string(width) + ")");
    return false;
  };
  for (const StorageFormat& format : full_formats) {
    const std::string name = "full-" + format.name();
    if (!holds(format, d, name)) continue;
    Candidate c;
    c.name = name;
    c.family = "full cache";
    c.cache.format = format;
    c.nominal_bits = format.bits_per_element(d);
    candidates.push_back(std::move(c));
  }
  // H2O's budget is checked here, before any work: every ratio must keep fewer tokens than the context.
  for (const double ratio : h2o_ratios) {
    const HeavyHitterBudget budget = HeavyHitterBudget::fraction(ratio, context);
    if (budget.tokens() >= context) {
      throw UsageError("--h2o " + fixed(ratio, 2) + " keeps " + std::to_string(budget.tokens()) + " of the " +
                       std::to_string(context) + "-token context (--max-tokens): nothing would be evicted");
    }
  }
  for (const double ratio : h2o_ratios) {
    for (const char* format_name : {"f16", "q4_0"}) {
      const StorageFormat format = StorageFormat::parse(format_name);
      const std::string name = "h2o-" + percent(ratio) + "-" + format.name();
      if (!holds(format, d, name)) continue;
      Candidate c;
      c.name = name;
      c.family = "H2O eviction";
      c.cache.format = format;
      c.cache.eviction = HeavyHitterBudget::fraction(ratio, context);
      c.nominal_bits = ratio * format.bits_per_element(d);
      candidates.push_back(std::move(c));
    }
  }
  for (const double ratio : ratios) {
    const Eigen::Index rank = uniform_rank_for_ratio(d, ratio);
    for (const StorageFormat& format : latent_formats) {
      const std::string name = "online-svd-" + percent(ratio) + "-" + format.name();
      if (!holds(format, rank, name)) continue;
      Candidate c;
      c.name = name;
      c.family = "online SVD";
      c.cache.format = format;
      c.cache.online_rank = rank;
      c.cache.rope = RopeMode::pre_rope;  // as ShadowKV: a basis of un-rotated keys holds at later positions
      c.nominal_bits = static_cast<double>(rank) / static_cast<double>(d) * format.bits_per_element(rank);
      candidates.push_back(std::move(c));
    }
  }
  if (budget_bits) {
    // Before the sweep: a budget below every configuration's own bits cannot be met (measured bits only
    // add windows, bases and eviction scores). Low-rank caches start at the smallest ratio and format.
    double smallest = std::numeric_limits<double>::infinity();
    for (const Candidate& c : candidates) smallest = std::min(smallest, c.nominal_bits);
    for (const double ratio : ratios) {
      for (const StorageFormat& format : latent_formats) {
        const Eigen::Index rank = uniform_rank_for_ratio(d, ratio);
        if (rank % format.group_size(rank) == 0) {
          smallest = std::min(smallest, static_cast<double>(rank) / static_cast<double>(d) * format.bits_per_element(rank));
        }
      }
    }
    if (*budget_bits < 0.999 * smallest) {
      throw UsageError("--budget-bits " + fixed(*budget_bits, 2) + " is below every configuration of the sweep (the smallest costs " +
                       fixed(smallest, 2) + " bits per element): add smaller --ratios, --h2o or formats");
    }
  }

  const Sequences calibration_stories = data.encode(calibration_range, max_tokens, "--calib-stories");
  const Sequences evaluation_stories = data.encode(evaluation_range, max_tokens, "--eval-stories");
  const Calibrations calibrations = calibrate(data.model, calibration_stories);
  std::cerr << "calibrated on " << calibrations.post_rope.token_count() << " tokens in " << fixed(elapsed(), 1) << " s\n";
  FullRankProjections fitted(data.model, calibrations);
  const QualityEvaluator evaluator(data.model, evaluation_stories);
  std::optional<QualityEvaluator> prober;
  if (probe_range) prober.emplace(data.model, data.encode(*probe_range, max_tokens, "--probe-stories"));
  std::map<std::pair<Method, Eigen::Index>, LossWeights> sensitivities;

  const RopeMode mode = RopeMode::post_rope;
  for (const Method method : methods) {
    const ModelProjections<float>& full_rank = fitted.get(method, mode);
    for (const double ratio : ratios) {
      const Eigen::Index rank = uniform_rank_for_ratio(d, ratio);
      for (const StorageFormat& format : latent_formats) {
        std::vector<std::string> allocations = {"uniform"};
        if (prober) allocations.push_back("loss-aware");
        for (const std::string& allocation : allocations) {
          const std::string base = std::string(to_string(method)) + "-" + allocation + "-" + percent(ratio) + "-" + format.name();
          RankAllocation ranks = RankAllocation::uniform(shape, rank, rank);
          std::string description = "uniform rank " + std::to_string(rank) + " of " + std::to_string(d);
          if (allocation == "uniform") {
            if (!holds(format, rank, base)) continue;
          } else {
            const auto key = std::make_pair(method, rank);
            if (!sensitivities.count(key)) {
              sensitivities.emplace(key, measure_sensitivity(*prober, full_rank, latent_configuration(method, mode, 0, format), rank).weights);
              std::cerr << "probed " << to_string(method) << " at rank " << rank << " (" << fixed(elapsed(), 0) << " s)\n";
            }
            LossAwareOptions options;
            options.format = format;
            try {
              ranks = loss_aware_allocation(full_rank, sensitivities.at(key), MemoryBudget::fraction_of_full_cache(ratio), options).ranks;
            } catch (const InvalidArgument& error) {
              skipped.push_back(base + " (" + error.what() + ")");
              continue;
            }
            description = "loss-aware, " + fixed(ratio, 2) + " of the full cache in " + format.name() +
                          ", joint budget, probed on stories " + std::to_string(probe_range->first) + ":" +
                          std::to_string(probe_range->second);
          }
          const ModelProjections<float> truncated = full_rank.truncated(ranks);
          const double latent_bits = latent_cache_footprint(ranks, format).bits_per_element();
          std::vector<long> windows = {0};
          if (window > 0 && method == Method::kq_svd) windows.push_back(window);
          for (const long w : windows) {
            Candidate c;
            c.name = base + (w > 0 ? "+w" + std::to_string(w) : "");
            c.family = display_name(method) + (w > 0 ? " + window" : "") + ", " +
                       (format.code_bits() >= 16 ? "16-bit" : std::to_string(format.code_bits()) + "-bit") + " latents";
            c.cache = latent_configuration(method, mode, w, format);
            c.projections = truncated;
            c.ranks = description;
            c.nominal_bits = latent_bits;
            candidates.push_back(std::move(c));
          }
          // H2O on KQ-SVD latents: uniform ranks, the largest H2O budget.
          if (method == Method::kq_svd && allocation == "uniform" && !h2o_ratios.empty()) {
            const double h2o = *std::max_element(h2o_ratios.begin(), h2o_ratios.end());
            Candidate c;
            c.name = "h2o-" + percent(h2o) + "+" + base;
            c.family = "H2O on KQ-SVD latents";
            c.cache = latent_configuration(method, mode, 0, format);
            c.cache.eviction = HeavyHitterBudget::fraction(h2o, context);
            c.projections = truncated;
            c.ranks = description;
            c.nominal_bits = h2o * latent_bits;
            candidates.push_back(std::move(c));
          }
        }
      }
    }
  }
  // One configuration per decode arithmetic where it applies (the others decode in float); without
  // float32 in the list, the configurations it applies to are measured with the other arithmetic only.
  {
    std::vector<Candidate> expanded;
    for (Candidate& c : candidates) {
      if (!takes_decode_arithmetic(c.cache)) {
        expanded.push_back(std::move(c));
        continue;
      }
      for (const DecodeArithmetic arithmetic : arithmetics) {
        Candidate variant = c;
        variant.cache.arithmetic = arithmetic;
        if (arithmetic == DecodeArithmetic::int8_dot_products) variant.name += "+int8";
        expanded.push_back(std::move(variant));
      }
    }
    candidates = std::move(expanded);
  }
  for (const std::string& s : skipped) std::cerr << "skipped " << s << "\n";
  std::cerr << "measuring " << candidates.size() << " configurations\n";

  QualityRow full = evaluator.evaluate(CacheConfiguration{}, nullptr);
  parallel_jobs(candidates.size(), [&](std::size_t i) {
    Candidate& c = candidates[i];
    c.row = evaluator.evaluate(c.cache, c.projections ? &*c.projections : nullptr);
    c.bits = 8.0 * c.row.bytes_per_token_layer / static_cast<double>(2 * shape.kv_width());
  });
  std::cerr << "evaluated in " << fixed(elapsed(), 0) << " s\n";
  for (Candidate& c : candidates) {
    c.row.tokens_per_second = evaluator.decode_speed(c.cache, c.projections ? &*c.projections : nullptr, decode_tokens);
  }
  mark_pareto(candidates);
  std::stable_sort(candidates.begin(), candidates.end(), [](const Candidate& a, const Candidate& b) { return a.bits < b.bits; });

  std::cout << "model " << data.name() << " (" << to_string(shape) << "), evaluation stories " << evaluation_range.first
            << ":" << evaluation_range.second << " (" << full.comparison.tokens() << " predicted tokens, max " << max_tokens
            << " per story), calibration stories " << calibration_range.first << ":" << calibration_range.second
            << "; full float32 cache NLL " << fixed(full.comparison.mean_nll(), 4) << "\n"
            << "bits = measured cache bits per cached element; KL = mean KL(full || cache), nats; top1% = agreement "
               "with the full cache; tok/s = token-by-token decoding of "
            << std::min<std::size_t>(static_cast<std::size_t>(decode_tokens), evaluation_stories.front().size())
            << " tokens, best of 3; * = on the Pareto front\n\n";
  std::cout << std::left << std::setw(44) << "config" << std::right << std::setw(7) << "bits" << std::setw(9) << "KL"
            << std::setw(8) << "NLL" << std::setw(8) << "top1%" << std::setw(9) << "tok/s" << "\n";
  for (const Candidate& c : candidates) {
    const NextTokenComparison& m = c.row.comparison;
    std::cout << std::left << std::setw(44) << ((c.pareto ? "* " : "  ") + c.name) << std::right << std::setw(7)
              << fixed(c.bits, 2) << std::setw(9) << fixed(m.mean_kl(), 4) << std::setw(8) << fixed(m.mean_nll(), 4)
              << std::setw(8) << fixed(100.0 * m.top1_agreement(), 1) << std::setw(9)
              << (c.row.tokens_per_second > 0 ? fixed(c.row.tokens_per_second, 0) : "-") << "\n";
  }
  const std::vector<double> budgets = {1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 16.0};
  std::cout << "\nbest measured configuration within each budget (bits per element):\n";
  nlohmann::ordered_json best_per_budget = nlohmann::ordered_json::array();
  for (const double b : budgets) {
    const Candidate* best = best_within(candidates, b);
    std::cout << std::setw(6) << fixed(b, 1) << "  " << (best ? best->name + " (KL " + fixed(best->row.comparison.mean_kl(), 4) + ", " + fixed(best->bits, 2) + " bits)" : "none") << "\n";
    best_per_budget.push_back({{"bits", b}, {"config", best ? nlohmann::ordered_json(best->name) : nlohmann::ordered_json(nullptr)}});
  }

  if (const auto json_path = args.value("--json")) {
    nlohmann::ordered_json report = nlohmann::ordered_json::object();
    std::string command = "kqsvd-llama frontier";
    for (const std::string& word : words) command += " " + word;
    report["command"] = command;
    report["model"] = data.name();
    report["eval_stories"] = std::to_string(evaluation_range.first) + ":" + std::to_string(evaluation_range.second);
    report["max_tokens"] = max_tokens;
    report["predicted_tokens"] = full.comparison.tokens();
    report["full_cache_nll"] = full.comparison.mean_nll();
    nlohmann::ordered_json list = nlohmann::ordered_json::array();
    for (const Candidate& c : candidates) {
      const NextTokenComparison& m = c.row.comparison;
      nlohmann::ordered_json entry = {{"config", c.name},
                                      {"family", c.family},
                                      {"bits_per_element", c.bits},
                                      {"kl", m.mean_kl()},
                                      {"nll", m.mean_nll()},
                                      {"top1", m.top1_agreement()},
                                      {"tokens_per_s", c.row.tokens_per_second},
                                      {"decode_arithmetic", to_string(c.cache.arithmetic)},
                                      {"pareto", c.pareto}};
      if (c.projections) entry["ranks"] = c.ranks;
      list.push_back(std::move(entry));
    }
    report["configs"] = std::move(list);
    report["best_per_budget"] = std::move(best_per_budget);
    io::AtomicFileWriter file(*json_path, /*overwrite=*/true);
    file.write(report.dump(2) + "\n");
    file.commit();
  }
  if (const auto plot_path = args.value("--plot")) {
    write_svg(*plot_path, render_svg(frontier_plot(data.name() + ": KV caches, quality per bit (" +
                                                       std::to_string(full.comparison.tokens()) + " held-out tokens)",
                                                   candidates)));
  }
  if (budget_bits) {
    const Candidate* best = best_within(candidates, *budget_bits);
    if (!best) {
      throw UsageError("--budget-bits " + fixed(*budget_bits, 2) + ": no configuration measured within it (the smallest measured " +
                       fixed(candidates.front().bits, 2) + " bits: " + candidates.front().name + ")");
    }
    std::cout << "\nrecommended within " << fixed(*budget_bits, 2) << " bits per element: " << best->name << " (KL "
              << fixed(best->row.comparison.mean_kl(), 4) << ", " << fixed(best->bits, 2) << " bits measured)\n";
    if (out) {
      if (!best->projections) {
        std::cout << "no projection file written: " << best->name << " needs no calibrated projections\n";
      } else {
        io::ProjectionInfo info;
        info.model = data.name();
        info.rope = mode;
        info.rope_style = data.model.rotary_embedding().style();
        info.rope_theta = data.model.rotary_embedding().theta();
        info.rank_allocation = best->ranks + " (kqsvd-llama frontier --budget-bits " + fixed(*budget_bits, 2) + ": " + best->name + ")";
        info.calibration_tokens = calibrations.post_rope.token_count();
        info.producer = std::string("kqsvd-llama ") + version_string;
        io::ProjectionFile(*best->projections, info).save(*out, args.flag("--force"));
        std::cout << "wrote " << *out << "\n";
      }
    }
  }
  std::cerr << "total " << fixed(elapsed(), 1) << " s\n";
  return exit_success;
}

}  // namespace kqsvd::cli
