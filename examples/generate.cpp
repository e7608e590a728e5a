// generate -- greedy text generation with a llama2.c checkpoint, as `run model.bin -t 0` in llama2.c,
// with the exact KV cache or a compressed one, so that the effect of compression can be read.
//
//   generate --model stories260K.bin --tokenizer tok512.bin --prompt "Once upon a time" --steps 64
//   generate --model model.bin --tokenizer tok512.bin --prompt "Once upon a time" --steps 100
//            --method kqsvd --rank 16 --rope post --window 0
//            --calib-text tinystories_sample.txt --calib-stories 0:100 --compare
//
// Prints the prompt and its continuation. With --method other than full, projections are fitted on the
// fly on the --calib-stories of --calib-text (each story BOS + encode, truncated to the model's
// seq_len), at uniform rank --rank or with per-head ranks from the error budget --eps, and the cache
// keeps only latents (plus the exact rows of the last --window tokens). The cache's bytes are printed
// next to what the full cache holds for the same tokens; --compare also prints the full-cache
// continuation and where the two first differ. --steps is the number of new tokens (default: up to the
// model's seq_len). Exit codes: 0 success, 1 unreadable or malformed model/tokenizer/text, 2 bad arguments.
#include <kqsvd/fit.hpp>
#include <kqsvd/llama/calibration.hpp>
#include <kqsvd/llama/compressed_kv_cache.hpp>
#include <kqsvd/llama/full_kv_cache.hpp>
#include <kqsvd/llama/generation.hpp>
#include <kqsvd/llama/story_text.hpp>
#include <kqsvd/llama/tokenizer.hpp>
#include <kqsvd/llama/transformer.hpp>
#include <kqsvd/method.hpp>
#include <kqsvd/model_projections.hpp>

#include <cctype>
#include <chrono>
#include <exception>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "command_line.hpp"

namespace {


struct Arguments {
  std::string model;
  std::string tokenizer;
  std::string prompt;
  std::optional<long> steps;
  std::optional<kqsvd::Method> method;  // empty: the full cache
  std::optional<long> rank;
  std::optional<double> epsilon;
  kqsvd::llama::RopeMode rope = kqsvd::llama::RopeMode::post_rope;
  long window = 0;
  bool half = false;
  std::string calibration_text;
  std::size_t calibration_first = 0, calibration_last = 100;
  bool compare = false;
  bool help = false;
};

void print_usage(std::ostream& out) {
  out << "usage: generate --model M.bin --tokenizer tok512.bin [--prompt TEXT] [--steps N]\n"
         "                [--method full|kqsvd|ksvd|eigen (--rank R | --eps E) --calib-text FILE\n"
         "                 [--calib-stories A:B] [--rope post|pre] [--window W] [--storage f32|f16] [--compare]]\n"
         "  --model          llama2.c checkpoint (legacy v0 .bin)\n"
         "  --tokenizer      llama2.c tokenizer (.bin) matching the model's vocabulary\n"
         "  --prompt         text to continue (default: empty, i.e. start from BOS)\n"
         "  --steps          new tokens to generate, >= 0 (default: up to the model's seq_len)\n"
         "  --method         KV cache: full (default) or compressed by kqsvd, ksvd or eigen\n"
         "  --rank / --eps   uniform rank 1..head_dim, or per-head ranks from an error budget in (0, 1)\n"
         "  --calib-text     stories separated by <|endoftext|> to fit the projections on\n"
         "  --calib-stories  which of them, A:B = stories [A, B) (default 0:100)\n"
         "  --rope           post: compress rotated keys (default); pre: un-rotated, rotated after reconstruction\n"
         "  --window         keep the most recent W tokens exact (default 0)\n"
         "  --storage        latent element type (default f32)\n"
         "  --compare        also print the full-cache continuation\n"
         "Greedy decoding (temperature 0); stops early at BOS, as llama2.c does.\n";
}

// Returns nullopt (after printing why) if the command line is unusable.
std::optional<Arguments> parse_arguments(int argc, char** argv) {
  Arguments arguments;
  const auto fail = [](const std::string& message) -> std::optional<Arguments> {
    std::cerr << "generate: " << message << "\n";
    return std::nullopt;
  };
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      arguments.help = true;
      return arguments;
    }
    if (flag == "--compare") {
      arguments.compare = true;
      continue;
    }
    if (i + 1 >= argc) return fail(flag + (flag.rfind("--", 0) == 0 ? " needs a value" : ": unexpected argument"));
    const std::string value = argv[++i];
    if (flag == "--model") {
      arguments.model = value;
    } else if (flag == "--tokenizer") {
      arguments.tokenizer = value;
    } else if (flag == "--prompt") {
      arguments.prompt = value;
    } else if (flag == "--steps") {
      const std::optional<long> steps = example::parse_integer(value);
      if (!steps || *steps < 0) return fail("--steps must be a non-negative integer, got '" + value + "'");
      arguments.steps = steps;
    } else if (flag == "--method") {
      if (value == "full") {
        arguments.method.reset();
      } else {
        try {
          arguments.method = kqsvd::parse_method(value);
        } catch (const kqsvd::InvalidArgument& e) {
          return fail(std::string(e.what()) + " (or full)");
        }
      }
    } else if (flag == "--rank") {
      const std::optional<long> rank = example::parse_integer(value);
      if (!rank || *rank < 1) return fail("--rank must be a positive integer, got '" + value + "'");
      arguments.rank = rank;
    } else if (flag == "--eps") {
      const std::optional<double> epsilon = example::parse_number(value);
      if (!epsilon || !(*epsilon > 0.0 && *epsilon < 1.0)) {
        return fail("--eps must be a number in (0, 1), got '" + value + "'");
      }
      arguments.epsilon = epsilon;
    } else if (flag == "--rope") {
      try {
        arguments.rope = kqsvd::llama::parse_rope_mode(value);
      } catch (const kqsvd::InvalidArgument& e) {
        return fail(e.what());
      }
    } else if (flag == "--window") {
      const std::optional<long> window = example::parse_integer(value);
      if (!window || *window < 0) return fail("--window must be a non-negative integer, got '" + value + "'");
      arguments.window = *window;
    } else if (flag == "--storage") {
      if (value != "f32" && value != "f16") return fail("--storage must be f32 or f16, got '" + value + "'");
      arguments.half = value == "f16";
    } else if (flag == "--calib-text") {
      arguments.calibration_text = value;
    } else if (flag == "--calib-stories") {
      const std::optional<example::StoryRange> range = example::parse_story_range(value);
      if (!range) return fail("--calib-stories must be A:B with 0 <= A < B, got '" + value + "'");
      arguments.calibration_first = range->first;
      arguments.calibration_last = range->last;
    } else {
      return fail("unknown option " + flag);
    }
  }
  if (arguments.model.empty() || arguments.tokenizer.empty()) return fail("--model and --tokenizer are required");
  if (arguments.method) {
    if (arguments.rank.has_value() == arguments.epsilon.has_value()) {
      return fail("a compressed cache needs exactly one of --rank and --eps");
    }
    if (arguments.calibration_text.empty()) return fail("a compressed cache needs --calib-text to fit projections on");
  }
  return arguments;
}

// llama2.c's safe_printf: single raw bytes that are control characters would garble a terminal.
void print_piece(const std::string& piece) {
  if (piece.size() == 1) {
    const auto byte = static_cast<unsigned char>(piece[0]);
    if (!(std::isprint(byte) || std::isspace(byte))) return;
  }
  std::cout << piece;
}

void print_text(const kqsvd::llama::Tokenizer& tokenizer, const std::vector<int>& prompt,
                const std::vector<int>& generated) {
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

// The compressed cache the arguments ask for, with projections fitted on the calibration stories.
std::unique_ptr<kqsvd::llama::KvCache> compressed_cache(const Arguments& arguments,
                                                        const kqsvd::llama::Transformer& model,
                                                        const kqsvd::llama::Tokenizer& tokenizer) {
  using namespace kqsvd::llama;
  const auto start = std::chrono::steady_clock::now();
  const std::vector<std::vector<int>> sequences =
      encode_stories(tokenizer, read_stories(arguments.calibration_text), arguments.calibration_first,
                     arguments.calibration_last, static_cast<std::size_t>(model.config().seq_len));
  const kqsvd::ModelCalibration calibration = calibrate(model, sequences, arguments.rope);
  const kqsvd::RankSelection ranks = arguments.rank ? kqsvd::RankSelection::fixed(*arguments.rank)
                                                    : kqsvd::RankSelection::error_budget(*arguments.epsilon);
  kqsvd::ModelProjections<float> projections = kqsvd::ModelProjections<float>::fit(
      calibration, output_weights(model.checkpoint()), *arguments.method, ranks, ranks);
  const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
  std::cerr << to_string(*arguments.method) << " " << ranks.to_string() << ", " << to_string(arguments.rope)
            << "-RoPE, window " << arguments.window << ": fitted on " << calibration.keys(0, 0).token_count()
            << " tokens in " << elapsed.count() << " s; latents are " << 100.0 * projections.footprint().ratio()
            << " % of the full cache\n";
  if (arguments.half) {
    return std::make_unique<CompressedKvCache<Eigen::half>>(model.attention_shape(), std::move(projections),
                                                           arguments.rope, arguments.window);
  }
  return std::make_unique<CompressedKvCache<float>>(model.attention_shape(), std::move(projections), arguments.rope,
                                                    arguments.window);
}

int generate(const Arguments& arguments) {
  using namespace kqsvd::llama;
  const Transformer model(Checkpoint::load(arguments.model));
  const Tokenizer tokenizer = Tokenizer::load(arguments.tokenizer, model.config().vocab_size);
  const std::vector<int> prompt = tokenizer.encode(arguments.prompt, true, false);
  const auto room = static_cast<long>(model.config().seq_len) - static_cast<long>(prompt.size());
  const long steps = arguments.steps.value_or(room > 0 ? room : 0);

  std::unique_ptr<KvCache> cache;
  if (arguments.method) {
    cache = compressed_cache(arguments, model, tokenizer);
  } else {
    cache = std::make_unique<FullKvCache>(model.attention_shape());
  }
  const auto start = std::chrono::steady_clock::now();
  const std::vector<int> generated = generate_greedy(model, prompt, steps, *cache);
  const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
  print_text(tokenizer, prompt, generated);
  std::cerr << generated.size() << " tokens in " << elapsed.count() << " s ("
            << static_cast<double>(prompt.size() + generated.size()) / elapsed.count() << " tok/s)\n";

  // The last generated token is never appended (generation stops after choosing it).
  const Eigen::Index held = cache->next_position(0);
  const std::size_t full_bytes =
      2 * static_cast<std::size_t>(model.config().n_layers * held * model.attention_shape().kv_width()) * sizeof(float);
  std::cerr << "KV cache: " << cache->bytes() << " bytes for " << held << " tokens; the full cache holds "
            << full_bytes << " bytes (" << 100.0 * static_cast<double>(cache->bytes()) / static_cast<double>(full_bytes)
            << " %)\n";

  if (arguments.compare && arguments.method) {
    FullKvCache full(model.attention_shape());
    const std::vector<int> reference = generate_greedy(model, prompt, steps, full);
    std::cout << "--- full cache:\n";
    print_text(tokenizer, prompt, reference);
    std::size_t same = 0;
    while (same < generated.size() && same < reference.size() && generated[same] == reference[same]) ++same;
    std::cerr << "the compressed cache follows the full cache for " << same << " of " << reference.size()
              << " generated tokens\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return example::run_command("generate", parse_arguments(argc, argv), print_usage, generate);
}
