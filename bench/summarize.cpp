// bench/summarize.cpp -- the summary tables of the benchmarks, with their targets, from the benchmark programs' JSON output.
//
//   kqsvd_bench_summary bench_gram.json bench_fit.json bench_compress.json bench_decode.json bench_prefill.json
//
// Takes the median of repeated runs (a single run where a benchmark ran once), prints Markdown tables
// of the results as ratios to the ceilings measured in the same run, and a PASS/MISS line per target.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <regex>
#include <sstream>
#include <tuple>
#include <string>
#include <vector>

namespace {

using nlohmann::json;

// Benchmark name without the suffixes Google Benchmark adds (real_time, iterations:N, repeats:N).
std::string base_name(const std::string& run_name) {
  std::stringstream in(run_name);
  std::string part, result;
  while (std::getline(in, part, '/')) {
    if (part == "real_time" || part == "manual_time" || part.rfind("iterations:", 0) == 0 ||
        part.rfind("repeats:", 0) == 0) {
      continue;
    }
    result += (result.empty() ? "" : "/") + part;
  }
  return result;
}

class Results {
 public:
  void load(const std::string& path) {
    std::ifstream file(path);
    if (!file) throw std::runtime_error("cannot open " + path);
    // Google Benchmark writes a counter it could not compute (the spread of a value measured once) as a
    // bare NaN, which is not JSON: read it as null.
    const std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    const json document = json::parse(std::regex_replace(text, std::regex(R"((:\s*)-?(NaN|nan|inf|Infinity)\b)"), "$1null"));
    if (context_.is_null()) context_ = document.at("context");
    std::map<std::string, json> single;
    for (const json& entry : document.at("benchmarks")) {
      const std::string name = base_name(entry.value("run_name", entry.at("name").get<std::string>()));
      if (entry.value("run_type", "iteration") == "aggregate") {
        if (entry.value("aggregate_name", "") == "median") medians_[name] = entry;
      } else if (!single.count(name)) {
        single[name] = entry;
      }
    }
    for (auto& [name, entry] : single) {
      if (!medians_.count(name)) medians_[name] = entry;
    }
  }

  const json* find(const std::string& name) const {
    const auto it = medians_.find(name);
    return it == medians_.end() ? nullptr : &it->second;
  }
  double value(const std::string& name, const std::string& field) const {
    const json* entry = find(name);
    return entry != nullptr && entry->contains(field) ? entry->at(field).get<double>() : NAN;
  }
  // Real (or CPU) time per iteration in seconds.
  double seconds(const std::string& name, const char* field = "real_time") const {
    const json* entry = find(name);
    if (entry == nullptr) return NAN;
    const std::string unit = entry->value("time_unit", "ns");
    const double scale = unit == "s" ? 1.0 : unit == "ms" ? 1e-3 : unit == "us" ? 1e-6 : 1e-9;
    return entry->at(field).get<double>() * scale;
  }
  const json& context() const { return context_; }

  // Every median's value of `field`, sorted.
  std::vector<double> all(const std::string& field) const {
    std::vector<double> values;
    for (const auto& [name, entry] : medians_) {
      if (entry.contains(field)) values.push_back(entry.at(field).get<double>());
    }
    std::sort(values.begin(), values.end());
    return values;
  }

 private:
  std::map<std::string, json> medians_;
  json context_;
};

std::string fixed(double x, int digits) {
  if (std::isnan(x)) return "n/a";
  std::ostringstream out;
  out.setf(std::ios::fixed);
  out.precision(digits);
  out << x;
  return out.str();
}
std::string percent(double fraction) { return std::isnan(fraction) ? "n/a" : fixed(100.0 * fraction, 0) + " %"; }

struct Target {
  std::string what, measured;
  bool met;
};

void table_header(const std::vector<std::string>& columns) {
  std::string line = "|", rule = "|";
  for (const std::string& c : columns) {
    line += " " + c + " |";
    rule += "---|";
  }
  std::cout << line << '\n' << rule << '\n';
}
void table_row(const std::vector<std::string>& cells) {
  std::string line = "|";
  for (const std::string& c : cells) line += " " + c + " |";
  std::cout << line << '\n';
}

std::string tokens_label(long tokens) { return tokens >= 1024 ? std::to_string(tokens / 1024) + "k" : std::to_string(tokens); }

}  // namespace

int main(int argc, char** argv) {
  Results r;
  try {
    for (int i = 1; i < argc; ++i) r.load(argv[i]);
  } catch (const std::exception& e) {
    std::cerr << "kqsvd_bench_summary: " << e.what() << '\n';
    return 1;
  }
  std::vector<Target> targets;
  const json& ctx = r.context();
  std::cout << "Machine: " << ctx.value("num_cpus", 0) << " CPUs at " << ctx.value("mhz_per_cpu", 0)
            << " MHz (as reported), " << ctx.value("host_name", std::string("?")) << "; bench/run_summary.sh builds kqsvd Release, -march=native (Google Benchmark's own library: "
            << ctx.value("library_build_type", std::string("?")) << " build, which does not time kqsvd's code)\n\n";

  // --- ceilings -------------------------------------------------------------------------------------
  const double bw = r.value("ceiling/bw", "bw_ceiling"), sgemm = r.value("ceiling/sgemm", "sgemm_ceiling"),
               dgemm = r.value("ceiling/dgemm", "dgemm_ceiling");
  std::cout << "### Ceilings (this run; every row below is judged against the ceiling measured around it)\n\n";
  table_header({"ceiling", "value"});
  table_row({"streaming read bandwidth", fixed(bw, 1) + " GB/s"});
  table_row({"float GEMM (Eigen, 1024^3, all threads)", fixed(sgemm, 1) + " GFLOP/s"});
  table_row({"double GEMM", fixed(dgemm, 1) + " GFLOP/s"});
  std::cout << '\n';
  const std::vector<double> shares = r.all("cpu_share");
  if (!shares.empty()) {
    std::cout << "Share of the " << fixed(r.value("ceiling/bw", "threads"), 0)
              << " cores this process got while benchmarks ran (CPU time / wall time / threads; 100 % = a quiet "
                 "machine): median "
              << percent(shares[shares.size() / 2]) << ", lowest " << percent(shares.front()) << ".\n\n";
  }

  // --- Gram accumulation ----------------------------------------------------------------------------
  std::cout << "### Calibration: Gram accumulation (float input, double accumulation; n d^2 flops)\n\n";
  table_header({"d", "tokens/block", "M tokens/s", "of float GEMM", "of double GEMM", "float SYRK reference"});
  double worst_gram = INFINITY;
  for (long d : {64, 128}) {
    for (long tokens : {4096, 16384, 65536}) {
      const std::string args = "/d:" + std::to_string(d) + "/tokens:" + std::to_string(tokens);
      const double frac = r.value("BM_GramAccumulate" + args, "frac_sgemm");
      worst_gram = std::min(worst_gram, std::isnan(frac) ? INFINITY : frac);
      table_row({std::to_string(d), tokens_label(tokens), fixed(r.value("BM_GramAccumulate" + args, "tokens_per_s") / 1e6, 2),
                 percent(frac), percent(r.value("BM_GramAccumulate" + args, "frac_dgemm")),
                 percent(r.value("BM_FloatSyrkReference" + args, "frac_sgemm"))});
    }
  }
  std::cout << '\n';
  targets.push_back({"Gram accumulation >= 70 % of float GEMM", "worst " + percent(worst_gram), worst_gram >= 0.70});

  // --- fit ------------------------------------------------------------------------------------------
  std::cout << "### Fit: closed-form solve from Grams\n\n";
  table_header({"d", "BDCSVD (default)", "JacobiSVD", "symmetric eigen"});
  for (long d : {64, 128}) {
    std::vector<std::string> row = {std::to_string(d)};
    for (int svd : {0, 1, 2}) {
      row.push_back(fixed(1e3 * r.seconds("BM_FitHead/d:" + std::to_string(d) + "/svd:" + std::to_string(svd)), 2) + " ms");
    }
    table_row(row);
  }
  std::cout << "\nWhole Llama-2-7B-shaped model (32 layers x 32 KV heads, d = 128, keys and values: 2048 solves, "
               "plus G_W = W_h^T W_h per head), ModelProjections::fit on "
            << fixed(r.value("BM_FitModel/svd:0", "threads"), 0) << " threads:\n\n";
  table_header({"SVD route", "wall time", "CPU time / threads (dedicated cores)", "share of the cores the run got"});
  for (int svd : {0, 2}) {
    const std::string name = "BM_FitModel/svd:" + std::to_string(svd);
    table_row({svd == 0 ? "BDCSVD (default)" : "symmetric_eigen", fixed(r.seconds(name), 2) + " s",
               fixed(r.value(name, "process_cpu_s") / r.value(name, "threads"), 2) + " s", percent(r.value(name, "cpu_share"))});
  }
  std::cout << '\n';
  const double model_wall = r.seconds("BM_FitModel/svd:2");
  const double model_dedicated = r.value("BM_FitModel/svd:2", "process_cpu_s") / r.value("BM_FitModel/svd:2", "threads");
  targets.push_back({"Whole-model fit < 5 s (symmetric_eigen), wall time", fixed(model_wall, 2) + " s", model_wall < 5.0});
  targets.push_back({"Whole-model fit < 5 s (symmetric_eigen), CPU time / threads", fixed(model_dedicated, 2) + " s",
                     model_dedicated < 5.0});

  std::cout << "Loss-aware rank allocation over 32 x 32 heads, keys and values (2048 projections, d = 128), a "
               "quarter of the full cache:\n\n";
  table_header({"latent format", "steps", "time"});
  double allocation_worst = 0.0;
  for (const auto& [format, name, steps] : {std::tuple{0, "f32", "1 dimension"}, std::tuple{1, "int4", "32 dimensions"}}) {
    const double seconds = r.seconds("BM_LossAwareAllocation/format:" + std::to_string(format));
    allocation_worst = std::isnan(seconds) ? seconds : std::max(allocation_worst, seconds);
    table_row({name, steps, fixed(1e3 * seconds, 2) + " ms"});
  }
  std::cout << '\n';
  targets.push_back({"Loss-aware allocation of 2048 projections (d = 128) < 50 ms", fixed(1e3 * allocation_worst, 2) + " ms",
                     allocation_worst < 0.05});

  std::cout << "Authors' route (QR of K and Q, n x 128 float, then SVD) vs ours, one head:\n\n";
  table_header({"tokens", "QR route", "Gram route (stream + solve)", "solve from Grams", "QR / solve", "QR / Gram route",
                "peak memory QR", "peak memory ours"});
  const double solve = r.seconds("BM_FitHead/d:128/svd:0");
  double ratio_256k = NAN, peak_small = NAN, peak_large = NAN;
  for (long tokens : {16384L, 65536L, 262144L, 1048576L}) {
    const std::string args = "/tokens:" + std::to_string(tokens);
    const double qr = r.seconds("BM_QrRoute" + args), ours = r.seconds("BM_GramRoute" + args);
    if (tokens == 262144) ratio_256k = qr / solve;
    const double peak_ours = r.value("BM_GramRoute" + args, "peak_MiB");
    if (tokens == 16384) peak_small = peak_ours;
    if (tokens == 1048576) peak_large = peak_ours;
    table_row({tokens_label(tokens), fixed(1e3 * qr, 1) + " ms", fixed(1e3 * ours, 1) + " ms", fixed(1e3 * solve, 2) + " ms",
               fixed(qr / solve, 0) + "x", fixed(qr / ours, 1) + "x", fixed(r.value("BM_QrRoute" + args, "peak_MiB"), 1) + " MiB",
               fixed(peak_ours, 1) + " MiB"});
  }
  std::cout << '\n';
  targets.push_back({">= 10x faster than the QR route at n = 256k (solve from Grams)", fixed(ratio_256k, 0) + "x",
                     ratio_256k >= 10.0});
  // Resident memory above the baseline: the 16k run allocates the stream's block buffers and the Grams
  // first; later runs reuse what the allocator kept, so their peak above baseline can be 0. The target is
  // that the peak does not grow with the token count.
  targets.push_back({"Fit memory independent of the token count (peak above baseline does not grow)",
                     "peak " + fixed(peak_small, 1) + " MiB at 16k, " + fixed(peak_large, 1) + " MiB at 1M",
                     peak_large <= peak_small + 4.0});

  // --- compress -------------------------------------------------------------------------------------
  std::cout << "### Compress: keys n x 128 float -> n x r latents (pool of 256 MiB of keys)\n\n";
  table_header({"tokens", "r", "latents", "GB/s", "of bandwidth", "of float GEMM", "roofline bound (of bandwidth)"});
  double worst_compress = INFINITY;
  for (const char* storage : {"float", "Eigen::half"}) {
    for (long tokens : {32768, 131072}) {
      for (long rank : {16, 32, 64}) {
        const std::string name = std::string("BM_Compress<") + storage + ">/tokens:" + std::to_string(tokens) + "/r:" +
                                 std::to_string(rank);
        const double bytes_per_token = 128 * 4.0 + static_cast<double>(rank) * (storage[0] == 'f' ? 4 : 2);
        const double flops_per_token = 2.0 * 128 * static_cast<double>(rank);
        const double bound = std::min(1.0, r.value(name, "sgemm_ceiling") * bytes_per_token / flops_per_token /
                                               r.value(name, "bw_ceiling"));
        const double frac = r.value(name, "frac_bw");
        worst_compress = std::min(worst_compress, std::isnan(frac) ? INFINITY : frac);
        table_row({tokens_label(tokens), std::to_string(rank), storage[0] == 'f' ? "float32" : "float16",
                   fixed(r.value(name, "GBps"), 1), percent(frac), percent(r.value(name, "frac_sgemm")), percent(bound)});
      }
    }
  }
  std::cout << '\n';
  targets.push_back({"Compression >= 70 % of bandwidth at n >= 32k", "worst " + percent(worst_compress),
                     worst_compress >= 0.70});

  // --- decode ---------------------------------------------------------------------------------------
  std::cout << "### Decode attention: one query per head, d = 128 (pool of 512 MiB of caches, parallel over heads)\n\n"
               "Time per head-step (x 1024 = all heads of a Llama-2-7B). \"compute bound\": the bandwidth the "
               "decode could reach if its arithmetic (measured alone, one head resident in L2) were its only "
               "limit.\n\n";
  const double threads = r.value("ceiling/bw", "threads");
  auto per_head = [&](const std::string& name) { return r.seconds(name) / r.value(name, "heads"); };
  // Bandwidth a decode could reach on `threads` cores if its compute cost per token were its only limit.
  auto compute_bound = [&](const std::string& compute_name, double bytes_per_token, const std::string& run) -> double {
    const json* entry = r.find(compute_name);
    if (entry == nullptr) return NAN;
    const double per_token = r.seconds(compute_name, "cpu_time") / entry->at("tokens").get<double>();
    return threads * bytes_per_token / per_token / 1e9 / r.value(run, "bw_ceiling");
  };

  std::cout << "Full rows in the caller's memory (kqsvd::decode_attention(q, K, V)):\n\n";
  table_header({"tokens", "cache", "us / head", "Llama-2-7B step", "of bandwidth", "compute bound (of bandwidth)"});
  double worst_full = INFINITY;
  for (long tokens : {1024, 4096, 16384, 32768, 131072}) {
    const std::string t = "/tokens:" + std::to_string(tokens);
    for (const char* storage : {"float", "Eigen::half"}) {
      const std::string name = std::string("BM_DecodeFull<") + storage + ">" + t;
      const double frac = r.value(name, "frac_bw");
      if (tokens >= 32768 && storage[0] == 'f') worst_full = std::min(worst_full, frac);
      const double bytes = 2.0 * 128 * (storage[0] == 'f' ? 4 : 2);
      table_row({tokens_label(tokens), std::string("full ") + (storage[0] == 'f' ? "float32" : "float16"),
                 fixed(1e6 * per_head(name), 2), fixed(1e3 * 1024 * per_head(name), 2) + " ms", percent(frac),
                 percent(compute_bound(std::string("BM_DecodeFullCompute<") + storage + ">", bytes, name))});
    }
    const std::string pattern = "BM_DecodeAccessPattern" + t;
    if (r.find(pattern) != nullptr) {
      table_row({tokens_label(tokens), "float32 read pattern only (no arithmetic)", fixed(1e6 * per_head(pattern), 2),
                 fixed(1e3 * 1024 * per_head(pattern), 2) + " ms", percent(r.value(pattern, "frac_bw")), ""});
    }
  }
  std::cout << '\n';

  // The library's HeadCache, every storage format; speedups are over the float16 full HeadCache at the
  // same length, and the ideal is its bytes per token over the cache's.
  // "F+int8": the 4- and 2-bit formats decoded with kqsvd::DecodeArithmetic::int8_dot_products. The
  // targets take, per format, the faster arithmetic: the float row of a format that has an int8 row
  // is shown but not counted.
  const std::vector<std::string> full_formats = {"f16",  "bf16",      "fp8_e4m3", "int8",      "q8_0",
                                                 "q4_0", "q4_0+int8", "int4",     "int4+int8", "int2", "int2+int8"};
  const std::vector<std::string> latent_formats = {
      "f32",  "f16",       "bf16",         "fp8_e4m3",     "int8",      "q8_0",         "q4_0",      "q4_0+int8",
      "int4/16", "int4/16+int8", "int4", "int4+int8", "int2/16", "int2/16+int8", "int2", "int2+int8"};
  const auto has_integer_row = [&](const std::string& name) { return r.find(name) != nullptr; };
  const auto is_quantized = [](const std::string& format) {
    return format != "f32" && format != "f16" && format != "bf16";
  };
  std::cout << "HeadCache of full rows (kqsvd::decode_attention(q, cache)), per storage format:\n\n";
  table_header({"tokens", "format", "bytes / token", "us / head", "of bandwidth", "compute bound (of bandwidth)",
                "speedup over f16", "ideal (bytes)", "speedup / ideal"});
  double worst_quantized_full = INFINITY;
  for (long tokens : {4096, 32768, 131072}) {
    const std::string t = "/tokens:" + std::to_string(tokens);
    const std::string f16 = "BM_DecodeFullCache/f16" + t;
    const double f16_bytes = r.value(f16, "bytes_per_token");
    for (const std::string& format : full_formats) {
      const std::string name = "BM_DecodeFullCache/" + format + t;
      if (r.find(name) == nullptr) continue;
      const double bytes = r.value(name, "bytes_per_token"), frac = r.value(name, "frac_bw");
      const bool superseded = has_integer_row("BM_DecodeFullCache/" + format + "+int8" + t);
      if (tokens >= 32768 && is_quantized(format) && !superseded) worst_quantized_full = std::min(worst_quantized_full, frac);
      const double speedup = per_head(f16) / per_head(name), ideal = f16_bytes / bytes;
      table_row({tokens_label(tokens), format, fixed(bytes, 0), fixed(1e6 * per_head(name), 2), percent(frac),
                 percent(compute_bound("BM_DecodeCacheCompute/" + format + "/width:128", bytes, name)),
                 fixed(speedup, 2) + "x", fixed(ideal, 2) + "x", fixed(speedup / ideal, 2)});
    }
  }
  std::cout << '\n';

  std::cout << "Latents (kqsvd::decode_attention(key_proj, value_proj, q, cache)), r_k = r_v = r, per storage "
               "format; speedup over the float16 full HeadCache:\n\n";
  table_header({"tokens", "r", "format", "bytes / token", "us / head", "of bandwidth", "compute bound (of bandwidth)",
                "speedup over f16 full", "ideal (bytes)", "speedup / ideal"});
  double worst_float_latent = INFINITY, worst_float_speedup = INFINITY, worst_quantized_speedup = INFINITY;
  for (long tokens : {4096, 32768, 131072}) {
    const std::string t = "/tokens:" + std::to_string(tokens);
    const std::string f16 = "BM_DecodeFullCache/f16" + t;
    const double f16_bytes = r.value(f16, "bytes_per_token");
    for (long rank : {16, 32, 64}) {
      for (const std::string& format : latent_formats) {
        const std::string name = "BM_DecodeLatent/" + format + t + "/r:" + std::to_string(rank);
        if (r.find(name) == nullptr) continue;
        const double bytes = r.value(name, "bytes_per_token"), frac = r.value(name, "frac_bw");
        const double speedup = per_head(f16) / per_head(name), ideal = f16_bytes / bytes;
        const bool superseded =
            has_integer_row("BM_DecodeLatent/" + format + "+int8" + t + "/r:" + std::to_string(rank));
        if (tokens >= 32768 && !superseded) {
          if (is_quantized(format)) {
            worst_quantized_speedup = std::min(worst_quantized_speedup, speedup / ideal);
          } else {
            worst_float_latent = std::min(worst_float_latent, frac);
            if (format != "f32") worst_float_speedup = std::min(worst_float_speedup, speedup / ideal);
          }
        }
        table_row({tokens_label(tokens), std::to_string(rank), format, fixed(bytes, 0), fixed(1e6 * per_head(name), 2),
                   percent(frac),
                   percent(compute_bound("BM_DecodeCacheCompute/" + format + "/width:" + std::to_string(rank), bytes, name)),
                   fixed(speedup, 2) + "x", fixed(ideal, 2) + "x", fixed(speedup / ideal, 2)});
      }
    }
  }
  std::cout << '\n';
  targets.push_back({"Full-cache decode (float32, caller memory) within 1.2x of bandwidth at n >= 32k (>= 83 %)",
                     "worst " + percent(worst_full), worst_full >= 1.0 / 1.2});
  targets.push_back({"Quantized full-cache decode >= 70 % of bandwidth at n >= 32k", "worst " + percent(worst_quantized_full),
                     worst_quantized_full >= 0.70});
  targets.push_back({"Float latents (f32, f16, bf16) decode >= 70 % of bandwidth at n >= 32k",
                     "worst " + percent(worst_float_latent), worst_float_latent >= 0.70});
  targets.push_back({"f16 / bf16 latents: speedup >= 0.8 x ideal byte ratio over the f16 full cache at n >= 32k",
                     "worst " + fixed(worst_float_speedup, 2) + " x ideal", worst_float_speedup >= 0.8});
  targets.push_back({"Quantized latents: speedup >= 0.8 x ideal byte ratio over the f16 full cache at n >= 32k",
                     "worst " + fixed(worst_quantized_speedup, 2) + " x ideal", worst_quantized_speedup >= 0.8});

  // --- prefill --------------------------------------------------------------------------------------
  std::cout << "### Prefill attention: T-token prompt, causal, d = 128\n\n";
  std::cout << "Full rows: in the caller's memory (float32, float16) and in a HeadCache per format; the share of "
               "the float GEMM ceiling counts the two causal products' flops.\n\n";
  // Prefill always computes in float: no "+int8" columns.
  const std::vector<std::string> prefill_full_formats = {"f16", "bf16", "fp8_e4m3", "int8", "q8_0", "q4_0", "int4", "int2"};
  std::vector<std::string> columns = {"T", "caller float32", "caller float16"};
  for (const std::string& format : prefill_full_formats) columns.push_back("cache " + format);
  table_header(columns);
  for (long tokens : {512, 2048, 8192}) {
    const std::string t = "/tokens:" + std::to_string(tokens);
    std::vector<std::string> row = {tokens_label(tokens)};
    for (const std::string& name : {"BM_PrefillFull<float>" + t, "BM_PrefillFull<Eigen::half>" + t}) {
      row.push_back(fixed(1e3 * r.seconds(name), 1) + " ms (" + percent(r.value(name, "frac_sgemm")) + ")");
    }
    for (const std::string& format : prefill_full_formats) {
      const std::string name = "BM_PrefillFullCache/" + format + t;
      row.push_back(fixed(1e3 * r.seconds(name), 1) + " ms (" + percent(r.value(name, "frac_sgemm")) + ")");
    }
    table_row(row);
  }
  std::cout << "\nLatents per format, r_k = r_v = r: time and speedup over the float16 full HeadCache.\n\n";
  const std::vector<std::string> prefill_latent_formats = {"f32", "f16", "int8", "q8_0", "q4_0", "int4", "int2"};
  columns = {"T", "r"};
  for (const std::string& format : prefill_latent_formats) columns.push_back(format);
  table_header(columns);
  for (long tokens : {512, 2048, 8192}) {
    const std::string t = "/tokens:" + std::to_string(tokens);
    const double full = r.seconds("BM_PrefillFullCache/f16" + t);
    for (long rank : {16, 32, 64}) {
      std::vector<std::string> row = {tokens_label(tokens), std::to_string(rank)};
      for (const std::string& format : prefill_latent_formats) {
        const std::string name = "BM_PrefillLatent/" + format + t + "/r:" + std::to_string(rank);
        const double latent = r.seconds(name);
        row.push_back(r.find(name) == nullptr ? "" : fixed(1e3 * latent, 1) + " ms (" + fixed(full / latent, 1) + "x)");
      }
      table_row(row);
    }
  }
  std::cout << '\n';

  // --- targets --------------------------------------------------------------------------------------
  std::cout << "### Targets\n\n";
  table_header({"target", "measured", ""});
  for (const Target& target : targets) table_row({target.what, target.measured, target.met ? "PASS" : "MISS"});
  return 0;
}
