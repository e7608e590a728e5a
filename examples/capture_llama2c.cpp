// capture_llama2c -- save a llama2.c checkpoint's attention activations on text, in the activation layout
// of docs/activations.md (the files `kqsvd fit / eval / compare / analyze` read).
//
//   capture_llama2c --model model.bin --tokenizer tok512.bin --text tinystories_sample.txt
//                   --stories 0:8 --max-tokens 128 --dtype f16 --out calib.safetensors
//
// The text is split into stories on "<|endoftext|>"; each is stripped and empty ones are dropped, so
// story i is the i-th non-empty story (the numbering of the models' READMEs). Stories A .. B-1 are
// encoded as BOS + tokens and truncated to T tokens (--max-tokens, default the model's seq_len).
// Sequences in one file all have T tokens, so stories shorter than T are skipped (and listed on
// stderr); the file is one batch, with no padding. The stories used are recorded in the file's
// metadata ("stories"). Each story runs through Transformer::forward from position 0 with an empty cache.
// Queries and keys are saved after RoPE (rope = applied) unless --pre-rope is given. The checkpoint's
// output projections are saved as layers.{l}.o_proj unless --no-o-proj is given.
//
// Exit codes: 0 success, 1 unreadable or malformed input or output, 2 bad arguments.
#include <kqsvd/io/activations.hpp>
#include <kqsvd/llama/activation_recorder.hpp>
#include <kqsvd/llama/full_kv_cache.hpp>
#include <kqsvd/llama/story_text.hpp>
#include <kqsvd/llama/tokenizer.hpp>
#include <kqsvd/llama/transformer.hpp>

#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "command_line.hpp"

namespace {

using example::exit_data_error;
using example::exit_usage;
using example::parse_integer;

struct Arguments {
  std::string model;
  std::string tokenizer;
  std::string text;
  long first_story = 0;
  long end_story = 0;
  std::optional<long> max_tokens;
  bool pre_rope = false;
  kqsvd::io::DType dtype = kqsvd::io::DType::f32;
  std::string out;
  std::string name;
  bool force = false;
  bool output_weights = true;
  bool help = false;
};

void print_usage(std::ostream& out) {
  out << "usage: capture_llama2c --model M.bin --tokenizer tok.bin --text stories.txt --stories A:B\n"
         "                       [--max-tokens T] [--pre-rope] [--dtype f32|f16|bf16] [--name NAME]\n"
         "                       [--no-o-proj] --out FILE.safetensors [--force]\n"
         "  --model       llama2.c checkpoint (legacy v0 .bin)\n"
         "  --tokenizer   llama2.c tokenizer (.bin) matching the model\n"
         "  --text        text file of stories separated by <|endoftext|>\n"
         "  --stories     A:B, the stories A .. B-1 (0-based, empty stories not counted)\n"
         "  --max-tokens  tokens per sequence T, BOS included (default: the model's seq_len); shorter stories\n"
         "                are skipped so that every sequence has exactly T tokens\n"
         "  --pre-rope    save queries and keys before RoPE (metadata rope = none); default after RoPE\n"
         "  --dtype       storage type of the saved tensors (default f32)\n"
         "  --name        model name for the metadata (default: the checkpoint's file name, or its\n"
         "                directory's name when the file is called model.bin)\n"
         "  --no-o-proj   leave out the output-projection weights (layers.{l}.o_proj), e.g. from a held-out\n"
         "                set whose weights the calibration file already carries\n"
         "  --out         output file, written atomically; an existing file is kept unless --force\n";
}

std::optional<Arguments> parse_arguments(int argc, char** argv) {
  Arguments arguments;
  bool have_stories = false;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      arguments.help = true;
      return arguments;
    }
    if (flag == "--pre-rope") {
      arguments.pre_rope = true;
      continue;
    }
    if (flag == "--force") {
      arguments.force = true;
      continue;
    }
    if (flag == "--no-o-proj") {
      arguments.output_weights = false;
      continue;
    }
    if (i + 1 >= argc) {
      std::cerr << "capture_llama2c: " << flag
                << (flag.rfind("--", 0) == 0 ? " needs a value\n" : ": unexpected argument\n");
      return std::nullopt;
    }
    const std::string value = argv[++i];
    if (flag == "--model") {
      arguments.model = value;
    } else if (flag == "--tokenizer") {
      arguments.tokenizer = value;
    } else if (flag == "--text") {
      arguments.text = value;
    } else if (flag == "--out") {
      arguments.out = value;
    } else if (flag == "--name") {
      arguments.name = value;
    } else if (flag == "--stories") {
      const auto range = example::parse_story_range(value);
      if (!range) {
        std::cerr << "capture_llama2c: --stories must be A:B with 0 <= A < B, got '" << value << "'\n";
        return std::nullopt;
      }
      arguments.first_story = static_cast<long>(range->first);
      arguments.end_story = static_cast<long>(range->last);
      have_stories = true;
    } else if (flag == "--max-tokens") {
      const auto tokens = parse_integer(value);
      if (!tokens || *tokens < 1) {
        std::cerr << "capture_llama2c: --max-tokens must be a positive integer, got '" << value << "'\n";
        return std::nullopt;
      }
      arguments.max_tokens = *tokens;
    } else if (flag == "--dtype") {
      const auto dtype = kqsvd::io::parse_dtype(value);
      if (!dtype || *dtype == kqsvd::io::DType::f64) {
        std::cerr << "capture_llama2c: --dtype must be f32, f16 or bf16, got '" << value << "'\n";
        return std::nullopt;
      }
      arguments.dtype = *dtype;
    } else {
      std::cerr << "capture_llama2c: unknown option " << flag << "\n";
      return std::nullopt;
    }
  }
  if (arguments.model.empty() || arguments.tokenizer.empty() || arguments.text.empty() || arguments.out.empty() ||
      !have_stories) {
    std::cerr << "capture_llama2c: --model, --tokenizer, --text, --stories and --out are required\n";
    return std::nullopt;
  }
  return arguments;
}

// "model.bin" in directory "tinyllama-h64" names itself after the directory; "stories260K.bin" after itself.
std::string default_model_name(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  const std::string file = slash == std::string::npos ? path : path.substr(slash + 1);
  const std::string stem = file.substr(0, file.rfind('.'));
  if (stem != "model" || slash == std::string::npos || slash == 0) return stem;
  const std::string directory = path.substr(0, slash);
  const std::size_t parent = directory.find_last_of('/');
  return parent == std::string::npos ? directory : directory.substr(parent + 1);
}

// Hands each layer's activations of one forward pass to the writer, as one sequence.
class CaptureObserver : public kqsvd::llama::ActivationObserver {
 public:
  CaptureObserver(kqsvd::io::ActivationWriter& writer, bool pre_rope) : writer_(writer), pre_rope_(pre_rope) {}

  void observe(const kqsvd::llama::AttentionActivations& activations) override {
    if (activations.first_position != 0) {
      throw kqsvd::InvalidArgument("capture_llama2c: a sequence must run as one block from position 0");
    }
    writer_.add(activations.layer, pre_rope_ ? activations.queries_pre_rope : activations.queries,
                pre_rope_ ? activations.keys_pre_rope : activations.keys, activations.values);
  }

 private:
  kqsvd::io::ActivationWriter& writer_;
  bool pre_rope_;
};

int capture(const Arguments& arguments) {
  using namespace kqsvd::llama;
  const Transformer model(Checkpoint::load(arguments.model));
  const Tokenizer tokenizer = Tokenizer::load(arguments.tokenizer, model.config().vocab_size);
  const std::vector<std::string> stories = read_stories(arguments.text);
  if (arguments.end_story > static_cast<long>(stories.size())) {
    std::cerr << "capture_llama2c: --stories " << arguments.first_story << ":" << arguments.end_story << " but '"
              << arguments.text << "' has " << stories.size() << " stories\n";
    return exit_usage;
  }
  const long tokens = arguments.max_tokens.value_or(static_cast<long>(model.config().seq_len));

  const AttentionShape& attention = model.attention_shape();
  const kqsvd::ModelShape shape{attention.n_layers, attention.n_heads, attention.n_kv_heads, attention.head_dim};
  kqsvd::io::ActivationMetadata metadata;
  metadata.model = arguments.name.empty() ? default_model_name(arguments.model) : arguments.name;
  metadata.rope = arguments.pre_rope ? kqsvd::io::RopeMode::none : kqsvd::io::RopeMode::applied;
  metadata.rope_style = attention.rope_style;
  metadata.rope_theta = attention.rope_theta;
  kqsvd::io::ActivationWriter writer(shape, tokens, metadata, arguments.dtype);
  if (arguments.output_weights) {
    for (Eigen::Index l = 0; l < shape.layers; ++l) writer.set_output_weight(l, model.checkpoint().layer(l).wo);
  }

  CaptureObserver observer(writer, arguments.pre_rope);
  FullKvCache cache(attention);
  std::string used, skipped;
  for (long s = arguments.first_story; s < arguments.end_story; ++s) {
    std::vector<int> ids = tokenizer.encode(stories[static_cast<std::size_t>(s)], true, false);
    if (static_cast<long>(ids.size()) < tokens) {
      skipped += (skipped.empty() ? "" : ",") + std::to_string(s);
      continue;
    }
    ids.resize(static_cast<std::size_t>(tokens));
    cache.reset();
    model.forward(ids, cache, &observer);
    used += (used.empty() ? "" : ",") + std::to_string(s);
  }
  if (!skipped.empty()) std::cerr << "capture_llama2c: skipped stories shorter than " << tokens << " tokens: " << skipped << "\n";
  if (used.empty()) {
    std::cerr << "capture_llama2c: no story in " << arguments.first_story << ":" << arguments.end_story << " has "
              << tokens << " tokens\n";
    return exit_data_error;
  }
  writer.set_metadata("source", "capture_llama2c");
  writer.set_metadata("text", arguments.text.substr(arguments.text.find_last_of('/') + 1));
  writer.set_metadata("stories", used);
  writer.write(arguments.out, arguments.force);
  std::cerr << "capture_llama2c: wrote " << writer.sequences() << " sequences x " << tokens << " tokens of "
            << metadata.model << " (" << shape.layers << " layers, " << shape.query_heads << "/" << shape.kv_heads
            << " query/KV heads, head_dim " << shape.head_dim << ", rope " << to_string(metadata.rope) << ", "
            << kqsvd::io::to_string(arguments.dtype) << ") to " << arguments.out << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return example::run_command("capture_llama2c", parse_arguments(argc, argv), print_usage, capture);
}
