// quality_vs_compression -- what KV-cache compression costs a real model: next-token loss, perplexity,
// agreement with the uncompressed model and KL divergence, per method, compression ratio, RoPE mode,
// rank allocation and recent window; with the cache's measured bytes.
//
//   quality_vs_compression --model model.bin --tokenizer tok512.bin --text tinystories_sample.txt
//       --calib-stories 0:200 --eval-stories 2100:2120 --max-tokens 256 --ratios 0.25,0.5,0.75
//       --window 32 --storage f32 --json out.json --plot out.svg
//
// Protocol. Every story is BOS + encode(story), truncated to --max-tokens (default: the model's
// seq_len). Projections are calibrated on the --calib-stories (one prefill per story, exact cache;
// rotated queries/keys for post-RoPE, un-rotated for pre-RoPE) and fitted at full rank once per method
// and RoPE mode; each compression ratio then truncates them:
//   uniform  every key and value projection at rank round(ratio * head_dim);
//   eps      per-head ranks from one error budget epsilon (each projection's predicted relative error
//            <= epsilon), epsilon bisected so that the ratio matches the target.
// Each --eval-stories story runs as one prefill block through a CompressedKvCache (the per-query
// window makes that identical to token-by-token decoding) and, once, through the exact FullKvCache.
// Per predicted token: NLL of the true next token; top-1 agreement = argmax equal to the full-cache
// model's; KL(full || compressed) of the next-token distributions. Means are over all predicted tokens
// of all stories; "+-se" is the standard error of the mean NLL difference to the full cache over
// tokens (paired; tokens of a story are correlated, so it understates the uncertainty).
//
// Compression ratio = stored latent bytes / full-cache bytes at the same element size (keys and values,
// all layers and KV heads), excluding the recent window. "B/tok/L" is measured from the cache object:
// bytes() after each story (latents plus, with a window, the exact float rows of the last W tokens),
// summed over stories, divided by the tokens x layers held.
//
// Exit codes: 0 success, 1 unreadable or malformed input, 2 bad arguments.
#include <kqsvd/fit.hpp>
#include <kqsvd/llama/calibration.hpp>
#include <kqsvd/llama/compressed_kv_cache.hpp>
#include <kqsvd/llama/compression_target.hpp>
#include <kqsvd/llama/full_kv_cache.hpp>
#include <kqsvd/llama/generation.hpp>
#include <kqsvd/llama/likelihood.hpp>
#include <kqsvd/llama/story_text.hpp>
#include <kqsvd/llama/tokenizer.hpp>
#include <kqsvd/llama/transformer.hpp>
#include <kqsvd/method.hpp>
#include <kqsvd/model_projections.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "command_line.hpp"

namespace {

using Eigen::Index;
using kqsvd::Method;
using kqsvd::ModelProjections;
using kqsvd::llama::RopeMode;
using kqsvd::llama::RowMatrix;
using kqsvd::llama::Transformer;


// ------------------------------------------------------------------------------------------------
// Arguments

using example::StoryRange;

enum class Storage { f32, f16 };

struct Arguments {
  std::string model, tokenizer, text;
  StoryRange calibration, evaluation;
  std::optional<long> max_tokens;
  std::vector<double> ratios = {0.25, 0.5, 0.75};
  long window = 32;
  Storage storage = Storage::f32;
  std::vector<Method> methods = {kqsvd::all_methods.begin(), kqsvd::all_methods.end()};
  std::vector<RopeMode> rope_modes = {kqsvd::llama::all_rope_modes.begin(), kqsvd::llama::all_rope_modes.end()};
  std::string json, plot;
  bool help = false;
};

void print_usage(std::ostream& out) {
  out << "usage: quality_vs_compression --model M.bin --tokenizer tok.bin --text stories.txt\n"
         "           --calib-stories A:B --eval-stories C:D [--max-tokens T] [--ratios 0.25,0.5,0.75]\n"
         "           [--window W] [--storage f32|f16] [--methods kqsvd,ksvd,eigen] [--rope post,pre]\n"
         "           [--json OUT.json] [--plot OUT.svg]\n"
         "  --calib-stories  stories [A, B) of the text calibrate the projections\n"
         "  --eval-stories   stories [C, D) are evaluated (keep them disjoint from the calibration)\n"
         "  --max-tokens     tokens per story, BOS included (default: the model's seq_len)\n"
         "  --ratios         target compression ratios: latent bytes / full-cache bytes, window excluded\n"
         "  --window         also evaluate with the most recent W tokens exact (default 32; 0: only W = 0)\n"
         "  --storage        latent element type (default f32)\n";
}

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> items;
  std::istringstream in(text);
  for (std::string item; std::getline(in, item, ',');) items.push_back(item);
  return items;
}

std::optional<Arguments> parse_arguments(int argc, char** argv) {
  Arguments arguments;
  const auto fail = [](const std::string& message) -> std::optional<Arguments> {
    std::cerr << "quality_vs_compression: " << message << "\n";
    return std::nullopt;
  };
  bool have_calibration = false, have_evaluation = false;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      arguments.help = true;
      return arguments;
    }
    if (i + 1 >= argc) return fail(flag + (flag.rfind("--", 0) == 0 ? " needs a value" : ": unexpected argument"));
    const std::string value = argv[++i];
    if (flag == "--model") {
      arguments.model = value;
    } else if (flag == "--tokenizer") {
      arguments.tokenizer = value;
    } else if (flag == "--text") {
      arguments.text = value;
    } else if (flag == "--calib-stories" || flag == "--eval-stories") {
      const std::optional<StoryRange> range = example::parse_story_range(value);
      if (!range) return fail(flag + " must be A:B with 0 <= A < B, got '" + value + "'");
      (flag == "--calib-stories" ? arguments.calibration : arguments.evaluation) = *range;
      (flag == "--calib-stories" ? have_calibration : have_evaluation) = true;
    } else if (flag == "--max-tokens") {
      const std::optional<long> tokens = example::parse_integer(value);
      if (!tokens || *tokens < 2) return fail("--max-tokens must be an integer >= 2, got '" + value + "'");
      arguments.max_tokens = *tokens;
    } else if (flag == "--ratios") {
      arguments.ratios.clear();
      for (const std::string& item : split_list(value)) {
        const std::optional<double> ratio = example::parse_number(item);
        if (!ratio || !(*ratio > 0.0 && *ratio <= 1.0)) return fail("--ratios must be numbers in (0, 1], got '" + item + "'");
        arguments.ratios.push_back(*ratio);
      }
      if (arguments.ratios.empty()) return fail("--ratios is empty");
    } else if (flag == "--window") {
      const std::optional<long> window = example::parse_integer(value);
      if (!window || *window < 0) return fail("--window must be an integer >= 0, got '" + value + "'");
      arguments.window = *window;
    } else if (flag == "--storage") {
      if (value != "f32" && value != "f16") return fail("--storage must be f32 or f16, got '" + value + "'");
      arguments.storage = value == "f32" ? Storage::f32 : Storage::f16;
    } else if (flag == "--methods") {
      arguments.methods.clear();
      try {
        for (const std::string& item : split_list(value)) arguments.methods.push_back(kqsvd::parse_method(item));
      } catch (const kqsvd::InvalidArgument& e) {
        return fail(e.what());
      }
      if (arguments.methods.empty()) return fail("--methods is empty");
    } else if (flag == "--rope") {
      arguments.rope_modes.clear();
      try {
        for (const std::string& item : split_list(value)) arguments.rope_modes.push_back(kqsvd::llama::parse_rope_mode(item));
      } catch (const kqsvd::InvalidArgument& e) {
        return fail(e.what());
      }
      if (arguments.rope_modes.empty()) return fail("--rope is empty");
    } else if (flag == "--json") {
      arguments.json = value;
    } else if (flag == "--plot") {
      arguments.plot = value;
    } else {
      return fail("unknown option " + flag);
    }
  }
  if (arguments.model.empty() || arguments.tokenizer.empty() || arguments.text.empty() || !have_calibration ||
      !have_evaluation) {
    return fail("--model, --tokenizer, --text, --calib-stories and --eval-stories are required");
  }
  return arguments;
}

// ------------------------------------------------------------------------------------------------
// Measurement

// What the full-cache model predicts for one story: log-probabilities and argmax of each predicted row.
struct Reference {
  RowMatrix log_probs;  // (n - 1) x vocab
  std::vector<int> top1;
  std::vector<double> nll;  // of the true next token
};

Eigen::RowVectorXd log_softmax(const Eigen::Ref<const Eigen::RowVectorXf>& logits) {
  const Eigen::RowVectorXd row = logits.cast<double>();
  const double max_logit = row.maxCoeff();
  return row.array() - (max_logit + std::log((row.array() - max_logit).exp().sum()));
}

struct Metrics {
  double nll = 0.0, kl = 0.0;
  // Per-token differences to the full cache's NLL: their sum and sum of squares give the standard error
  // of the mean difference (tokens of a story are correlated, so it is a lower bound).
  double difference = 0.0, squared_difference = 0.0;
  Index agree = 0, tokens = 0;
  double bytes = 0.0, latent_bytes = 0.0, token_layers = 0.0;
  double seconds = 0.0;

  double mean_nll() const { return nll / static_cast<double>(tokens); }
  double perplexity() const { return std::exp(mean_nll()); }
  double top1() const { return static_cast<double>(agree) / static_cast<double>(tokens); }
  double mean_kl() const { return kl / static_cast<double>(tokens); }
  double difference_standard_error() const {
    const double n = static_cast<double>(tokens);
    const double mean = difference / n;
    return std::sqrt(std::max(0.0, squared_difference / n - mean * mean) / (n - 1.0));
  }
  double bytes_per_token_layer() const { return bytes / token_layers; }
  double latent_bytes_per_token_layer() const { return latent_bytes / token_layers; }
};

std::size_t latent_bytes_of(const kqsvd::llama::FullKvCache& cache) { return cache.bytes(); }
template <typename S>
std::size_t latent_bytes_of(const kqsvd::llama::CompressedKvCache<S>& cache) {
  return cache.latent_bytes();
}

// Runs every story as one prefill through `cache`. With `references`, also scores agreement and KL
// against them; without, fills them (the full-cache run).
template <typename Cache>
Metrics evaluate(const Transformer& model, const std::vector<std::vector<int>>& stories, Cache& cache,
                 std::vector<Reference>& references, bool fill_references) {
  const auto start = std::chrono::steady_clock::now();
  Metrics metrics;
  if (fill_references) references.assign(stories.size(), Reference{});
  for (std::size_t s = 0; s < stories.size(); ++s) {
    const std::vector<int>& tokens = stories[s];
    cache.reset();
    const RowMatrix logits = model.forward(tokens, cache);
    const auto predicted = static_cast<Index>(tokens.size()) - 1;
    Reference& reference = references[s];
    if (fill_references) {
      reference.log_probs.resize(predicted, logits.cols());
      reference.top1.resize(static_cast<std::size_t>(predicted));
      reference.nll.resize(static_cast<std::size_t>(predicted));
    }
    for (Index i = 0; i < predicted; ++i) {
      const Eigen::RowVectorXd log_probs = log_softmax(logits.row(i));
      const int top1 = kqsvd::llama::detail::argmax(logits.row(i));
      const double nll = -log_probs(tokens[static_cast<std::size_t>(i + 1)]);
      metrics.nll += nll;
      if (fill_references) {
        reference.log_probs.row(i) = log_probs.cast<float>();
        reference.top1[static_cast<std::size_t>(i)] = top1;
        reference.nll[static_cast<std::size_t>(i)] = nll;
        ++metrics.agree;
      } else {
        const double difference = nll - reference.nll[static_cast<std::size_t>(i)];
        metrics.difference += difference;
        metrics.squared_difference += difference * difference;
        const Eigen::RowVectorXd full = reference.log_probs.row(i).cast<double>();
        metrics.kl += (full.array().exp() * (full - log_probs).array()).sum();
        metrics.agree += top1 == reference.top1[static_cast<std::size_t>(i)] ? 1 : 0;
      }
    }
    metrics.tokens += predicted;
    metrics.bytes += static_cast<double>(cache.bytes());
    metrics.latent_bytes += static_cast<double>(latent_bytes_of(cache));
    metrics.token_layers += static_cast<double>(tokens.size()) * static_cast<double>(model.config().n_layers);
  }
  metrics.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return metrics;
}

struct Row {
  std::string rope;    // "post", "pre", or "-" for the full cache
  std::string method;  // "full", "kqsvd", "ksvd", "eigen"
  std::string ranks;   // "uniform", "eps", "-"
  Index rank = 0;      // uniform rank
  double epsilon = 0.0;
  double target = 1.0, ratio = 1.0;
  Index window = 0;
  Metrics metrics;
};

// ------------------------------------------------------------------------------------------------
// Output: table, JSON, SVG

std::string fixed(double value, int digits) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(digits) << value;
  return out.str();
}

std::string rank_label(const Row& row) {
  if (row.ranks == "uniform") return "r=" + std::to_string(row.rank);
  if (row.ranks == "eps") {
    std::ostringstream out;
    out << "eps=" << std::setprecision(3) << row.epsilon;
    return out.str();
  }
  return "-";
}

void print_table(std::ostream& out, const std::vector<Row>& rows, const Row& full) {
  const std::vector<std::pair<std::string, int>> columns = {
      {"rope", 5}, {"method", 7}, {"ranks", 12}, {"W", 4}, {"target", 7}, {"ratio", 7}, {"NLL", 7},
      {"PPL", 7},  {"dNLL", 8},   {"+-se", 6}, {"top1%", 7},  {"KL", 8}, {"B/tok/L", 8}, {"lat B/tok/L", 12}};
  for (const auto& [name, width] : columns) out << std::setw(width) << name << ' ';
  out << '\n';
  const auto print = [&](const Row& row) {
    const Metrics& m = row.metrics;
    const std::vector<std::string> cells = {row.rope,
                                            row.method,
                                            rank_label(row),
                                            std::to_string(row.window),
                                            fixed(row.target, 2),
                                            fixed(row.ratio, 3),
                                            fixed(m.mean_nll(), 4),
                                            fixed(m.perplexity(), 3),
                                            fixed(m.mean_nll() - full.metrics.mean_nll(), 4),
                                            fixed(m.difference_standard_error(), 4),
                                            fixed(100.0 * m.top1(), 1),
                                            fixed(m.mean_kl(), 4),
                                            fixed(m.bytes_per_token_layer(), 1),
                                            fixed(m.latent_bytes_per_token_layer(), 1)};
    for (std::size_t c = 0; c < cells.size(); ++c) out << std::setw(columns[c].second) << cells[c] << ' ';
    out << '\n';
  };
  print(full);
  std::string section;
  for (const Row& row : rows) {
    const std::string key = row.rope + row.ranks + std::to_string(row.window);
    if (key != section) out << '\n';
    section = key;
    print(row);
  }
}

std::string json_string(const std::string& text) {
  std::string out = "\"";
  for (const char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

std::string json_number(double value) {
  if (!std::isfinite(value)) return "null";
  std::ostringstream out;
  out << std::setprecision(10) << value;
  return out.str();
}

void write_json(const std::string& path, const Arguments& arguments, const std::string& command,
                const Transformer& model, Index eval_tokens, const Row& full, const std::vector<Row>& rows) {
  std::ofstream out(path);
  if (!out) throw kqsvd::IoError("quality_vs_compression: cannot write '" + path + "'");
  out << "{\n  \"command\": " << json_string(command) << ",\n  \"model\": " << json_string(arguments.model)
      << ",\n  \"head_dim\": " << model.attention_shape().head_dim << ",\n  \"layers\": " << model.config().n_layers
      << ",\n  \"kv_heads\": " << model.config().n_kv_heads << ",\n  \"storage\": \""
      << (arguments.storage == Storage::f32 ? "f32" : "f16") << "\",\n  \"eval_predicted_tokens\": " << eval_tokens
      << ",\n  \"ratio_definition\": \"stored latent bytes / full-cache bytes at the same element size, window "
         "excluded\",\n  \"rows\": [\n";
  const auto write_row = [&](const Row& row, bool last) {
    const Metrics& m = row.metrics;
    out << "    {\"rope\": " << json_string(row.rope) << ", \"method\": " << json_string(row.method)
        << ", \"ranks\": " << json_string(row.ranks) << ", \"rank\": " << row.rank
        << ", \"epsilon\": " << json_number(row.epsilon) << ", \"window\": " << row.window
        << ", \"target_ratio\": " << json_number(row.target) << ", \"ratio\": " << json_number(row.ratio)
        << ", \"nll\": " << json_number(m.mean_nll()) << ", \"perplexity\": " << json_number(m.perplexity())
        << ", \"nll_difference_se\": " << json_number(m.difference_standard_error())
        << ", \"top1_agreement\": " << json_number(m.top1()) << ", \"kl\": " << json_number(m.mean_kl())
        << ", \"bytes_per_token_per_layer\": " << json_number(m.bytes_per_token_layer())
        << ", \"latent_bytes_per_token_per_layer\": " << json_number(m.latent_bytes_per_token_layer())
        << ", \"seconds\": " << json_number(m.seconds) << "}" << (last ? "\n" : ",\n");
  };
  write_row(full, rows.empty());
  for (std::size_t i = 0; i < rows.size(); ++i) write_row(rows[i], i + 1 == rows.size());
  out << "  ]\n}\n";
  if (!out) throw kqsvd::IoError("quality_vs_compression: cannot write '" + path + "'");
}

// Tick positions covering [low, high] at a step of 1, 2 or 5 times a power of ten.
std::vector<double> nice_ticks(double low, double high, int target_count) {
  const double raw = (high - low) / target_count;
  const double power = std::pow(10.0, std::floor(std::log10(raw)));
  double step = power;
  for (const double multiple : {1.0, 2.0, 5.0, 10.0}) {
    step = multiple * power;
    if (raw <= step) break;
  }
  std::vector<double> ticks;
  for (double t = std::ceil(low / step - 1e-9) * step; t <= high + 1e-9 * step; t += step) ticks.push_back(t);
  return ticks;
}

std::string tick_label(double value, double step) {
  if (std::abs(value) < 1e-6 * step) value = 0.0;  // not "-0.0"
  const int digits = std::max(0, static_cast<int>(std::ceil(-std::log10(step) - 1e-9)));
  return fixed(value, digits);
}

// A value axis of one panel: linear (NLL) or log10 (KL, which spans orders of magnitude).
struct ValueAxis {
  bool log = false;
  double low = 0.0, high = 1.0;  // in plotted units (log10 of the value for a log axis)
  std::vector<double> ticks;     // in plotted units
  double step = 0.1;

  double plotted(double value) const { return log ? std::log10(std::max(value, 1e-12)) : value; }
  std::string label(double tick) const {
    if (!log) return tick_label(tick, step);
    std::ostringstream out;
    out << std::pow(10.0, tick);
    return out.str();
  }
};

ValueAxis linear_axis(double low, double high) {
  ValueAxis axis;
  axis.ticks = nice_ticks(low, std::max(high, low + 1e-3), 6);
  if (axis.ticks.size() > 1) axis.step = axis.ticks[1] - axis.ticks[0];
  const double pad = 0.04 * (high - low + 1e-3);
  axis.low = std::min(low - pad, axis.ticks.front());
  axis.high = high + pad;
  return axis;
}

ValueAxis log_axis(double low, double high) {
  ValueAxis axis;
  axis.log = true;
  axis.low = std::floor(std::log10(std::max(low, 1e-12)));
  axis.high = std::max(axis.low + 1.0, std::ceil(std::log10(std::max(high, 1e-12))));
  for (double t = axis.low; t <= axis.high + 1e-9; t += 1.0) axis.ticks.push_back(t);
  return axis;
}

// Two metrics against the compression ratio, one row of panels per window: mean NLL (linear, its own
// range per row: with a window everything sits close to the full cache) and mean KL(full ||
// compressed) (log scale, one range for all rows), each for every RoPE mode. One colour per method;
// solid lines and dots for uniform ranks, dashed lines and squares for eps-chosen ranks; the full
// cache's NLL as a dotted line.
std::string render_plot(const std::string& title, const std::vector<Row>& rows, const Row& full,
                        const std::vector<RopeMode>& rope_modes, const std::vector<Index>& windows,
                        const std::vector<Method>& methods) {
  constexpr double panel_width = 330, panel_height = 240, left = 64, right = 16, top = 40, bottom = 46;
  constexpr double header = 58, legend_height = 30;
  const std::size_t columns = 2 * rope_modes.size();
  const double width = static_cast<double>(columns) * (left + panel_width + right);
  const double height = header + static_cast<double>(windows.size()) * (top + panel_height + bottom) + legend_height;
  const std::vector<std::string> colours = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd"};
  double kl_low = 1.0, kl_high = 1e-3;
  for (const Row& row : rows) {
    kl_low = std::min(kl_low, row.metrics.mean_kl());
    kl_high = std::max(kl_high, row.metrics.mean_kl());
  }
  const ValueAxis kl_axis = log_axis(kl_low, kl_high);

  std::ostringstream svg;
  svg << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << height
      << "\" viewBox=\"0 0 " << width << ' ' << height << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
      << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      << "<text x=\"" << width / 2 << "\" y=\"22\" text-anchor=\"middle\" font-size=\"16\">" << title << "</text>\n"
      << "<text x=\"" << width / 2 << "\" y=\"42\" text-anchor=\"middle\" fill=\"#555\">x: compression ratio "
      << "(latent / full-cache bytes, window excluded). Left: mean next-token NLL (nats; y range per row). "
      << "Right: mean KL(full || compressed) (nats, log scale). Lower is better.</text>\n";
  for (std::size_t wi = 0; wi < windows.size(); ++wi) {
    double nll_low = full.metrics.mean_nll(), nll_high = full.metrics.mean_nll();
    for (const Row& row : rows) {
      if (row.window != windows[wi]) continue;
      nll_low = std::min(nll_low, row.metrics.mean_nll());
      nll_high = std::max(nll_high, row.metrics.mean_nll());
    }
    const ValueAxis nll_axis = linear_axis(nll_low, nll_high);
    for (std::size_t column = 0; column < columns; ++column) {
      const bool kl = column >= rope_modes.size();
      const RopeMode mode = rope_modes[column % rope_modes.size()];
      const ValueAxis& axis = kl ? kl_axis : nll_axis;
      const auto value_of = [&](const Row& row) { return kl ? row.metrics.mean_kl() : row.metrics.mean_nll(); };
      const double x0 = static_cast<double>(column) * (left + panel_width + right) + left;
      const double y0 = header + static_cast<double>(wi) * (top + panel_height + bottom) + top;
      const auto px = [&](double x) { return x0 + x * panel_width; };  // ratios in [0, 1]
      const auto py = [&](double value) {
        return y0 + panel_height - (axis.plotted(value) - axis.low) / (axis.high - axis.low) * panel_height;
      };
      const auto py_tick = [&](double tick) {
        return y0 + panel_height - (tick - axis.low) / (axis.high - axis.low) * panel_height;
      };
      svg << "<text x=\"" << x0 + panel_width / 2 << "\" y=\"" << y0 - 8 << "\" text-anchor=\"middle\" font-size=\"13\">"
          << (kl ? "KL, " : "NLL, ") << (mode == RopeMode::post_rope ? "post-RoPE" : "pre-RoPE") << ", W = " << windows[wi]
          << "</text>\n<rect x=\"" << x0 << "\" y=\"" << y0 << "\" width=\"" << panel_width << "\" height=\""
          << panel_height << "\" fill=\"none\" stroke=\"#333\"/>\n";
      for (const double t : axis.ticks) {
        if (t > axis.high + 1e-9 || t < axis.low - 1e-9) continue;
        svg << "<line x1=\"" << x0 << "\" x2=\"" << x0 + panel_width << "\" y1=\"" << py_tick(t) << "\" y2=\""
            << py_tick(t) << "\" stroke=\"#e5e5e5\"/>\n<text x=\"" << x0 - 6 << "\" y=\"" << py_tick(t) + 4
            << "\" text-anchor=\"end\">" << axis.label(t) << "</text>\n";
      }
      for (const double t : nice_ticks(0.0, 1.0, 5)) {
        svg << "<line x1=\"" << px(t) << "\" x2=\"" << px(t) << "\" y1=\"" << y0 << "\" y2=\"" << y0 + panel_height
            << "\" stroke=\"#e5e5e5\"/>\n<text x=\"" << px(t) << "\" y=\"" << y0 + panel_height + 16
            << "\" text-anchor=\"middle\">" << tick_label(t, 0.2) << "</text>\n";
      }
      svg << "<text x=\"" << x0 + panel_width / 2 << "\" y=\"" << y0 + panel_height + 34
          << "\" text-anchor=\"middle\">compression ratio</text>\n<text transform=\"translate(" << x0 - 48 << ','
          << y0 + panel_height / 2 << ") rotate(-90)\" text-anchor=\"middle\">" << (kl ? "KL (nats)" : "NLL (nats)")
          << "</text>\n";
      if (!kl) {
        svg << "<line x1=\"" << px(0.0) << "\" x2=\"" << px(1.0) << "\" y1=\"" << py(full.metrics.mean_nll())
            << "\" y2=\"" << py(full.metrics.mean_nll()) << "\" stroke=\"#777\" stroke-dasharray=\"2,3\"/>\n";
      }
      for (std::size_t k = 0; k < methods.size(); ++k) {
        for (const std::string ranks : {"uniform", "eps"}) {
          std::vector<std::pair<double, double>> points;
          for (const Row& row : rows) {
            if (row.rope == to_string(mode) && row.window == windows[wi] && row.ranks == ranks &&
                row.method == to_string(methods[k])) {
              points.emplace_back(row.ratio, value_of(row));
            }
          }
          if (points.empty()) continue;
          std::sort(points.begin(), points.end());
          const std::string& colour = colours[k % colours.size()];
          const bool dashed = ranks == "eps";
          svg << "<polyline fill=\"none\" stroke=\"" << colour << "\" stroke-width=\"2\""
              << (dashed ? " stroke-dasharray=\"6,4\"" : "") << " points=\"";
          for (const auto& [x, y] : points) svg << px(x) << ',' << py(y) << ' ';
          svg << "\"/>\n";
          for (const auto& [x, y] : points) {
            if (dashed) {
              svg << "<rect x=\"" << px(x) - 3.5 << "\" y=\"" << py(y) - 3.5
                  << "\" width=\"7\" height=\"7\" fill=\"white\" stroke=\"" << colour << "\" stroke-width=\"1.5\"/>\n";
            } else {
              svg << "<circle cx=\"" << px(x) << "\" cy=\"" << py(y) << "\" r=\"3.5\" fill=\"" << colour << "\"/>\n";
            }
          }
        }
      }
    }
  }
  // Legend: methods by colour, rank allocation by line style, the full-cache line.
  double x = 20;
  const double y = height - legend_height / 2;
  for (std::size_t k = 0; k < methods.size(); ++k) {
    svg << "<line x1=\"" << x << "\" x2=\"" << x + 24 << "\" y1=\"" << y << "\" y2=\"" << y << "\" stroke=\""
        << colours[k % colours.size()] << "\" stroke-width=\"3\"/>\n<text x=\"" << x + 30 << "\" y=\"" << y + 4 << "\">"
        << (methods[k] == Method::kq_svd ? "KQ-SVD" : methods[k] == Method::k_svd ? "K-SVD" : "Eigen Attention")
        << "</text>\n";
    x += 140;
  }
  svg << "<line x1=\"" << x << "\" x2=\"" << x + 24 << "\" y1=\"" << y << "\" y2=\"" << y
      << "\" stroke=\"#333\" stroke-width=\"2\"/><circle cx=\"" << x + 12 << "\" cy=\"" << y
      << "\" r=\"3.5\" fill=\"#333\"/>\n<text x=\"" << x + 30 << "\" y=\"" << y + 4 << "\">uniform ranks</text>\n";
  x += 130;
  svg << "<line x1=\"" << x << "\" x2=\"" << x + 24 << "\" y1=\"" << y << "\" y2=\"" << y
      << "\" stroke=\"#333\" stroke-width=\"2\" stroke-dasharray=\"6,4\"/><rect x=\"" << x + 8.5 << "\" y=\"" << y - 3.5
      << "\" width=\"7\" height=\"7\" fill=\"white\" stroke=\"#333\"/>\n<text x=\"" << x + 30 << "\" y=\"" << y + 4
      << "\">eps-chosen ranks</text>\n";
  x += 150;
  svg << "<line x1=\"" << x << "\" x2=\"" << x + 24 << "\" y1=\"" << y << "\" y2=\"" << y
      << "\" stroke=\"#777\" stroke-dasharray=\"2,3\"/>\n<text x=\"" << x + 30 << "\" y=\"" << y + 4
      << "\">full cache (NLL)</text>\n</svg>\n";
  return svg.str();
}

// ------------------------------------------------------------------------------------------------

template <typename S>
Metrics evaluate_compressed(const Transformer& model, const std::vector<std::vector<int>>& stories,
                            std::vector<Reference>& references, const ModelProjections<float>& projections,
                            RopeMode mode, Index window) {
  kqsvd::llama::CompressedKvCache<S> cache(model.attention_shape(), projections, mode, window);
  return evaluate(model, stories, cache, references, false);
}

int run(const Arguments& arguments, const std::string& command) {
  using namespace kqsvd::llama;
  const auto start = std::chrono::steady_clock::now();
  const auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  const Transformer model(Checkpoint::load(arguments.model));
  const Tokenizer tokenizer = Tokenizer::load(arguments.tokenizer, model.config().vocab_size);
  const std::vector<std::string> stories = read_stories(arguments.text);
  const auto max_tokens = static_cast<std::size_t>(arguments.max_tokens.value_or(model.config().seq_len));
  const auto calibration_stories = encode_stories(tokenizer, stories, arguments.calibration.first,
                                                  arguments.calibration.last, max_tokens);
  const auto evaluation_stories =
      encode_stories(tokenizer, stories, arguments.evaluation.first, arguments.evaluation.last, max_tokens);
  if (arguments.calibration.first < arguments.evaluation.last && arguments.evaluation.first < arguments.calibration.last) {
    std::cerr << "quality_vs_compression: warning: calibration and evaluation stories overlap\n";
  }
  const Index d = model.attention_shape().head_dim;

  // Both RoPE modes' Grams from one pass over the calibration stories.
  struct BothModes : ActivationObserver {
    explicit BothModes(const kqsvd::ModelShape& shape) : post(shape), pre(shape) {}
    void observe(const AttentionActivations& a) override {
      CalibrationObserver(post, RopeMode::post_rope).observe(a);
      CalibrationObserver(pre, RopeMode::pre_rope).observe(a);
    }
    kqsvd::ModelCalibration post, pre;
  } calibration(model_shape(model.attention_shape()));
  observe_sequences(model, calibration_stories, calibration);
  const std::vector<RowMatrix> wo = output_weights(model.checkpoint());
  std::cerr << "calibrated on " << calibration.post.keys(0, 0).token_count() << " tokens ("
            << calibration_stories.size() << " stories) in " << fixed(elapsed(), 1) << " s\n";

  std::vector<Reference> references;
  FullKvCache full_cache(model.attention_shape());
  Row full{"-", "full", "-", d, 0.0, 1.0, 1.0, 0, evaluate(model, evaluation_stories, full_cache, references, true)};
  std::cerr << "full cache: NLL " << fixed(full.metrics.mean_nll(), 4) << " over " << full.metrics.tokens
            << " predicted tokens in " << fixed(full.metrics.seconds, 1) << " s\n";

  std::vector<Index> windows = {0};
  if (arguments.window > 0) windows.push_back(arguments.window);
  std::vector<Row> rows;
  for (const RopeMode mode : arguments.rope_modes) {
    for (const Method method : arguments.methods) {
      const kqsvd::ModelCalibration& grams = mode == RopeMode::post_rope ? calibration.post : calibration.pre;
      const ModelProjections<float> full_rank = ModelProjections<float>::fit(
          grams, wo, method, kqsvd::RankSelection::fixed(d), kqsvd::RankSelection::fixed(d));
      for (const double target : arguments.ratios) {
        for (const std::string ranks : {"uniform", "eps"}) {
          Row row;
          row.rope = to_string(mode);
          row.method = to_string(method);
          row.ranks = ranks;
          row.target = target;
          std::optional<ModelProjections<float>> projections;
          if (row.ranks == "uniform") {
            row.rank = uniform_rank_for_ratio(d, target);
            projections = truncate_projections(full_rank, kqsvd::RankSelection::fixed(row.rank));
            row.ratio = projections->footprint().ratio();
          } else {
            ErrorBudgetFit fit = error_budget_for_ratio(full_rank, target);
            row.epsilon = fit.epsilon;
            row.ratio = fit.ratio;
            projections = std::move(fit.projections);
          }
          for (const Index window : windows) {
            row.window = window;
            row.metrics = arguments.storage == Storage::f32
                              ? evaluate_compressed<float>(model, evaluation_stories, references, *projections, mode, window)
                              : evaluate_compressed<Eigen::half>(model, evaluation_stories, references, *projections,
                                                                 mode, window);
            rows.push_back(row);
            std::cerr << "[" << fixed(elapsed(), 0) << " s] " << row.rope << " " << row.method << " " << rank_label(row)
                      << " W=" << window << ": NLL " << fixed(row.metrics.mean_nll(), 4) << "\n";
          }
        }
      }
    }
  }
  std::stable_sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) {
    return std::tie(a.rope, a.ranks, a.window) < std::tie(b.rope, b.ranks, b.window);
  });

  std::cout << "model " << arguments.model << " (" << model.config().n_layers << " layers, " << model.config().n_heads
            << " query heads, " << model.config().n_kv_heads << " KV heads, head_dim " << d << ")\n"
            << "calibration stories " << arguments.calibration.first << ":" << arguments.calibration.last << " ("
            << calibration.post.keys(0, 0).token_count() << " tokens), evaluation stories "
            << arguments.evaluation.first << ":" << arguments.evaluation.last << " (" << full.metrics.tokens
            << " predicted tokens), max " << max_tokens << " tokens per story, latents "
            << (arguments.storage == Storage::f32 ? "float32" : "float16") << "\n"
            << "ratio = latent bytes / full-cache bytes at the same element size, window excluded; dNLL = NLL - "
               "full-cache NLL, +-se its paired standard error over tokens; top1% = agreement with the full cache; "
               "KL = mean KL(full || compressed), nats; B/tok/L = measured cache bytes per token per layer (window "
               "included), lat B/tok/L = its latents only\n\n";
  print_table(std::cout, rows, full);
  std::cout << "\ntotal " << fixed(elapsed(), 1) << " s\n";

  if (!arguments.json.empty()) {
    write_json(arguments.json, arguments, command, model, full.metrics.tokens, full, rows);
  }
  if (!arguments.plot.empty()) {
    std::string name = arguments.model;
    const std::size_t slash = name.find_last_of('/');
    if (slash != std::string::npos && name.substr(slash + 1) == "model.bin" && slash > 0) {
      name = name.substr(0, slash);
    }
    name = name.substr(name.find_last_of('/') + 1);
    name = name.substr(0, name.rfind(".bin"));
    std::ofstream out(arguments.plot);
    out << render_plot(name + ": quality vs KV-cache compression (" + std::to_string(full.metrics.tokens) +
                           " held-out tokens)",
                       rows, full, arguments.rope_modes, windows, arguments.methods);
    if (!out) throw kqsvd::IoError("quality_vs_compression: cannot write '" + arguments.plot + "'");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string command = "quality_vs_compression";
  for (int i = 1; i < argc; ++i) command += std::string(" ") + argv[i];
  return example::run_command("quality_vs_compression", parse_arguments(argc, argv), print_usage,
                              [&](const Arguments& arguments) { return run(arguments, command); });
}
