// kqsvd-llama generate: greedy text generation with a llama2.c checkpoint, as `run model.bin -t 0` in
// llama2.c, with the exact KV cache or a compressed one, so that the effect of compression can be read.
#include <kqsvd/llama/generation.hpp>

#include <cctype>
#include <chrono>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "arguments.hpp"
#include "commands.hpp"
#include "errors.hpp"
#include "model_data.hpp"

namespace kqsvd::cli {

namespace {

constexpr const char* generate_usage = R"(usage: kqsvd-llama generate --model M.bin --tokenizer tok.bin [--prompt TEXT] [--steps N]
           [--format F] [--method kqsvd|ksvd|eigen (--rank R | --eps E) --text stories.txt
            [--calib-stories A:B] [--rope post|pre] [--window W] [--compare]]

Prints the prompt and its greedy continuation (temperature 0; stops early at BOS, as llama2.c does), and
the cache's bytes next to what the float32 full cache holds for the same tokens. Without --method the
cache is the full cache, in --format (default f32: exact). With --method, projections are fitted on the
fly on --calib-stories of --text (each story BOS + tokens, cut to the model's seq_len) at uniform rank
--rank, or with per-head ranks from the error budget --eps; the cache keeps only latents in --format
(plus the exact rows of the last --window tokens).

  --steps N      new tokens (default: up to the model's seq_len)
  --rope         post: compress rotated keys (default); pre: un-rotated, rotated after reconstruction
  --compare      also print the full-cache continuation and where the two first differ

Exit codes: 0 success, 1 unusable data or files, 2 bad command line.
)";

// llama2.c's safe_printf: single raw bytes that are control characters would garble a terminal.
void print_piece(const std::string& piece) {
  if (piece.size() == 1) {
    const auto byte = static_cast<unsigned char>(piece[0]);
    if (!(std::isprint(byte) || std::isspace(byte))) return;
  }
  std::cout << piece;
}

void print_text(const llama::Tokenizer& tokenizer, const std::vector<int>& prompt, const std::vector<int>& generated) {
  int previous = prompt.front();
  for (std::size_t i = 1; i < prompt.size(); ++i) {
    print_piece(tokenizer.decode(previous, prompt[i]));
    previous = prompt[i];
  }
  for (const int token : generated) {
    print_piece(tokenizer.decode(previous, token));
    previous = token;
  }
  std::cout << '\n';
}

}  // namespace

int generate_command(const std::vector<std::string>& words) {
  const Arguments args(words, {{"--model", OptionKind::value},  {"--tokenizer", OptionKind::value},
                               {"--prompt", OptionKind::value}, {"--steps", OptionKind::value},
                               {"--format", OptionKind::value}, {"--method", OptionKind::value},
                               {"--rank", OptionKind::value},   {"--eps", OptionKind::value},
                               {"--text", OptionKind::value},   {"--calib-stories", OptionKind::value},
                               {"--rope", OptionKind::value},   {"--window", OptionKind::value},
                               {"--compare", OptionKind::flag}});
  if (args.help()) {
    std::cout << generate_usage;
    return exit_success;
  }
  CacheConfiguration configuration;
  configuration.format = parse_format_name(args.value("--format").value_or("f32"), "--format");
  if (const auto method = args.value("--method")) configuration.method = parse_method_name(*method, "--method");
  configuration.rope = parse_rope_name(args.value("--rope").value_or("post"), "--rope");
  configuration.window = args.integer("--window", 0, 1 << 20).value_or(0);
  const ModelData data = load_model_data(args, /*needs_text=*/configuration.method.has_value());
  const ModelShape& shape = data.model.shape();
  std::optional<RankSelection> selection;
  if (configuration.method) {
    args.require_one_of("--rank", "--eps");
    if (const auto rank = args.integer("--rank", 1, shape.head_dim)) selection = RankSelection::fixed(*rank);
    if (const auto epsilon = args.fraction("--eps")) selection = RankSelection::error_budget(*epsilon);
  }
  const std::vector<int> prompt = data.tokenizer.encode(args.value("--prompt").value_or(""), true, false);
  const long room = data.model.config().seq_len - static_cast<long>(prompt.size());
  const long steps = args.integer("--steps", 0, 1 << 20).value_or(std::max(0L, room));

  std::optional<ModelProjections<float>> projections;
  if (configuration.method) {
    const auto start = std::chrono::steady_clock::now();
    const Sequences calibration = data.encode(args.range("--calib-stories").value_or(std::make_pair(0L, 100L)),
                                              static_cast<std::size_t>(data.model.config().seq_len), "--calib-stories");
    const ModelCalibration grams = llama::calibrate(data.model, calibration, configuration.rope);
    projections = ModelProjections<float>::fit(grams, llama::output_weights(data.model.checkpoint()),
                                               *configuration.method, *selection, *selection);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::cerr << to_string(*configuration.method) << " " << selection->to_string() << ", "
              << to_string(configuration.rope) << "-RoPE, window " << configuration.window << ", "
              << configuration.format.name() << " latents: fitted on " << grams.token_count() << " tokens in "
              << seconds << " s; latents are " << 100.0 * projections->ranks().compression_ratio()
              << " % of the full cache's elements\n";
  }
  std::unique_ptr<llama::KvCache> cache = make_cache(data.model, configuration, projections ? &*projections : nullptr);
  const auto start = std::chrono::steady_clock::now();
  const std::vector<int> generated = llama::generate_greedy(data.model, prompt, steps, *cache);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  print_text(data.tokenizer, prompt, generated);
  std::cerr << generated.size() << " tokens in " << seconds << " s ("
            << static_cast<double>(prompt.size() + generated.size()) / seconds << " tok/s)\n";

  // The last generated token is never appended (generation stops after choosing it).
  const Eigen::Index held = cache->next_position(0);
  const auto full_bytes = static_cast<std::size_t>(2 * shape.layers * held * shape.kv_width()) * sizeof(float);
  std::cerr << "KV cache: " << cache->bytes() << " bytes for " << held << " tokens; the float32 full cache holds "
            << full_bytes << " bytes (" << 100.0 * static_cast<double>(cache->bytes()) / static_cast<double>(full_bytes)
            << " %)\n";

  if (args.flag("--compare") && (configuration.method || configuration.format != StorageFormat())) {
    llama::FullKvCache full(shape, data.model.rotary_embedding());
    const std::vector<int> reference = llama::generate_greedy(data.model, prompt, steps, full);
    std::cout << "--- full cache:\n";
    print_text(data.tokenizer, prompt, reference);
    std::size_t same = 0;
    while (same < generated.size() && same < reference.size() && generated[same] == reference[same]) ++same;
    std::cerr << "the compressed cache follows the full cache for " << same << " of " << reference.size()
              << " generated tokens\n";
  }
  return exit_success;
}

}  // namespace kqsvd::cli
