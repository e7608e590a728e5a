// generate -- greedy text generation with a llama2.c checkpoint, as `run model.bin -t 0` in llama2.c.
//
//   generate --model stories260K.bin --tokenizer tok512.bin --prompt "Once upon a time" --steps 64
//
// Prints the prompt and its continuation. --steps is the number of new tokens (default: up to the
// model's seq_len). Exit codes: 0 success, 1 unreadable or malformed model/tokenizer, 2 bad arguments.
#include <kqsvd/llama/full_kv_cache.hpp>
#include <kqsvd/llama/generation.hpp>
#include <kqsvd/llama/tokenizer.hpp>
#include <kqsvd/llama/transformer.hpp>

#include <cctype>
#include <chrono>
#include <exception>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

namespace {

constexpr int exit_data_error = 1;
constexpr int exit_usage = 2;

struct Arguments {
  std::string model;
  std::string tokenizer;
  std::string prompt;
  std::optional<long> steps;
  bool help = false;
};

void print_usage(std::ostream& out) {
  out << "usage: generate --model M.bin --tokenizer tok512.bin [--prompt TEXT] [--steps N]\n"
         "  --model      llama2.c checkpoint (legacy v0 .bin)\n"
         "  --tokenizer  llama2.c tokenizer (.bin) matching the model's vocabulary\n"
         "  --prompt     text to continue (default: empty, i.e. start from BOS)\n"
         "  --steps      new tokens to generate, >= 0 (default: up to the model's seq_len)\n"
         "Greedy decoding (temperature 0); stops early at BOS, as llama2.c does.\n";
}

// Returns nullopt (after printing why) if the command line is unusable.
std::optional<Arguments> parse_arguments(int argc, char** argv) {
  Arguments arguments;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      arguments.help = true;
      return arguments;
    }
    if (i + 1 >= argc) {
      std::cerr << "generate: " << flag << (flag.rfind("--", 0) == 0 ? " needs a value\n" : ": unexpected argument\n");
      return std::nullopt;
    }
    const std::string value = argv[++i];
    if (flag == "--model") {
      arguments.model = value;
    } else if (flag == "--tokenizer") {
      arguments.tokenizer = value;
    } else if (flag == "--prompt") {
      arguments.prompt = value;
    } else if (flag == "--steps") {
      std::size_t parsed = 0;
      long steps = -1;
      try {
        steps = std::stol(value, &parsed);
      } catch (const std::exception&) {
        parsed = 0;
      }
      if (parsed != value.size() || steps < 0) {
        std::cerr << "generate: --steps must be a non-negative integer, got '" << value << "'\n";
        return std::nullopt;
      }
      arguments.steps = steps;
    } else {
      std::cerr << "generate: unknown option " << flag << "\n";
      return std::nullopt;
    }
  }
  if (arguments.model.empty() || arguments.tokenizer.empty()) {
    std::cerr << "generate: --model and --tokenizer are required\n";
    return std::nullopt;
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

}  // namespace

int main(int argc, char** argv) {
  const std::optional<Arguments> arguments = parse_arguments(argc, argv);
  if (!arguments) {
    print_usage(std::cerr);
    return exit_usage;
  }
  if (arguments->help) {
    print_usage(std::cout);
    return 0;
  }
  try {
    using namespace kqsvd::llama;
    const Transformer model(Checkpoint::load(arguments->model));
    const Tokenizer tokenizer = Tokenizer::load(arguments->tokenizer, model.config().vocab_size);
    const std::vector<int> prompt = tokenizer.encode(arguments->prompt, true, false);
    const auto room = static_cast<long>(model.config().seq_len) - static_cast<long>(prompt.size());
    const long steps = arguments->steps.value_or(room > 0 ? room : 0);

    FullKvCache cache(model.attention_shape());
    const auto start = std::chrono::steady_clock::now();
    const std::vector<int> generated = generate_greedy(model, prompt, steps, cache);
    const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;

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
    std::cerr << generated.size() << " tokens in " << elapsed.count() << " s ("
              << static_cast<double>(prompt.size() + generated.size()) / elapsed.count() << " tok/s)\n";
    return 0;
  } catch (const kqsvd::Error& e) {
    std::cerr << "generate: " << e.what() << '\n';
    return exit_data_error;
  }
}
