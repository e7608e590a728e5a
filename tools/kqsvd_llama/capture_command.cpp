// kqsvd-llama capture: a llama2.c checkpoint's attention activations on text, saved in the activation
// layout of docs/activations.md (the files kqsvd fit / eval / compare / analyze read).
#include <kqsvd/io/activation_writer.hpp>
#include <kqsvd/llama/activation_recorder.hpp>

#include <iostream>
#include <string>
#include <vector>

#include "arguments.hpp"
#include "commands.hpp"
#include "errors.hpp"
#include "model_data.hpp"

namespace kqsvd::cli {

namespace {

constexpr const char* capture_usage = R"(usage: kqsvd-llama capture --model M.bin --tokenizer tok.bin --text stories.txt --stories A:B
           --out OUT.safetensors [--max-tokens T] [--pre-rope] [--dtype f32|f16|bf16] [--name NAME]
           [--no-o-proj] [--force]

Saves the queries, keys and values of every layer (and the output projections) of stories [A, B) of the
text, in the layout of docs/activations.md. Stories are split on <|endoftext|>, stripped, empty ones
dropped; each is BOS + tokens cut to T tokens (default: the model's seq_len). Sequences in one file all
have T tokens, so stories shorter than T are skipped (and listed on stderr); the stories used are
recorded in the file's metadata ("stories"). Queries and keys are saved after RoPE (rope = applied)
unless --pre-rope is given.

  --name NAME    the model name in the file's metadata (default: the checkpoint's file or folder name)
  --no-o-proj    leave out layers.{l}.o_proj
  --force        replace OUT if it exists

Exit codes: 0 success, 1 unusable data or files, 2 bad command line.
)";

// Hands each layer's activations of one forward pass to the writer, as one sequence.
class CaptureObserver : public llama::ActivationObserver {
 public:
  CaptureObserver(io::ActivationWriter& writer, bool pre_rope) : writer_(writer), pre_rope_(pre_rope) {}

  void observe(const llama::AttentionActivations& activations) override {
    if (activations.first_position != 0) throw InvalidArgument("a captured sequence runs as one block from position 0");
    writer_.add(activations.layer, pre_rope_ ? activations.queries_pre_rope : activations.queries,
                pre_rope_ ? activations.keys_pre_rope : activations.keys, activations.values);
  }

 private:
  io::ActivationWriter& writer_;
  bool pre_rope_;
};

}  // namespace

int capture_command(const std::vector<std::string>& words) {
  const Arguments args(words, {{"--model", OptionKind::value},  {"--tokenizer", OptionKind::value},
                               {"--text", OptionKind::value},   {"--stories", OptionKind::value},
                               {"--out", OptionKind::value},    {"--max-tokens", OptionKind::value},
                               {"--pre-rope", OptionKind::flag}, {"--dtype", OptionKind::value},
                               {"--name", OptionKind::value},   {"--no-o-proj", OptionKind::flag},
                               {"--force", OptionKind::flag}});
  if (args.help()) {
    std::cout << capture_usage;
    return exit_success;
  }
  const std::pair<long, long> range = required(args.range("--stories"), "--stories");
  const std::string out = args.required_value("--out");
  const std::string dtype_name = args.value("--dtype").value_or("f32");
  const auto dtype = io::parse_dtype(dtype_name);
  if (!dtype || *dtype == io::DType::f64) throw UsageError("--dtype must be f32, f16 or bf16, got '" + dtype_name + "'");
  const bool pre_rope = args.flag("--pre-rope");

  const ModelData data = load_model_data(args, /*needs_text=*/true);
  const long tokens = args.integer("--max-tokens", 2, 1 << 20).value_or(data.model.config().seq_len);
  if (static_cast<std::size_t>(range.second) > data.stories.size()) {
    throw UsageError("--stories " + std::to_string(range.first) + ":" + std::to_string(range.second) +
                     " reaches past the " + std::to_string(data.stories.size()) + " stories of the text");
  }
  const ModelShape& shape = data.model.shape();
  io::ActivationMetadata metadata;
  metadata.model = args.value("--name").value_or(data.name());
  metadata.rope = pre_rope ? RopeMode::pre_rope : RopeMode::post_rope;
  metadata.rope_style = data.model.rotary_embedding().style();
  metadata.rope_theta = data.model.rotary_embedding().theta();
  io::ActivationWriter writer(shape, tokens, metadata, *dtype);
  if (!args.flag("--no-o-proj")) {
    for (Eigen::Index l = 0; l < shape.layers; ++l) writer.set_output_weight(l, data.model.checkpoint().layer(l).wo);
  }

  CaptureObserver observer(writer, pre_rope);
  llama::FullKvCache cache(shape, data.model.rotary_embedding());
  std::string used, skipped;
  for (long s = range.first; s < range.second; ++s) {
    std::vector<int> ids = data.tokenizer.encode(data.stories[static_cast<std::size_t>(s)], true, false);
    if (static_cast<long>(ids.size()) < tokens) {
      skipped += (skipped.empty() ? "" : ",") + std::to_string(s);
      continue;
    }
    ids.resize(static_cast<std::size_t>(tokens));
    cache.reset();
    data.model.forward(ids, cache, &observer);
    used += (used.empty() ? "" : ",") + std::to_string(s);
  }
  if (!skipped.empty()) std::cerr << "kqsvd-llama: skipped stories shorter than " << tokens << " tokens: " << skipped << "\n";
  if (used.empty()) {
    throw DataError("no story in " + std::to_string(range.first) + ":" + std::to_string(range.second) + " has " +
                    std::to_string(tokens) + " tokens");
  }
  const std::string text = args.required_value("--text");
  writer.set_metadata("source", "kqsvd-llama capture");
  writer.set_metadata("text", text.substr(text.find_last_of('/') + 1));
  writer.set_metadata("stories", used);
  writer.write(out, args.flag("--force"));
  std::cerr << "kqsvd-llama: wrote " << writer.sequences() << " sequences x " << tokens << " tokens of " << metadata.model
            << " (" << to_string(shape) << ", rope " << io::rope_spelling(metadata.rope) << ", " << io::to_string(*dtype)
            << ") to " << out << "\n";
  return exit_success;
}

}  // namespace kqsvd::cli
