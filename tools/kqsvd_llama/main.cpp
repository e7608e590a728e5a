// kqsvd-llama -- the llama2.c reference model end to end: what KV-cache compression costs a real model,
// generation with a compressed cache, and activation capture for the kqsvd tool.
//
//   kqsvd-llama quality --model data/models/tinyllama-h64/model.bin --tokenizer data/models/tinyllama-h64/tok512.bin
//       --text data/text/tinystories/tinystories_sample.txt --calib-stories 0:200 --eval-stories 2100:2120
//   kqsvd-llama generate --model ... --tokenizer ... --prompt "Once upon a time" --method kqsvd --rank 16 --text ...
//   kqsvd-llama capture --model ... --tokenizer ... --text ... --stories 0:8 --out calib.safetensors
//   kqsvd-llama probe --model ... --tokenizer ... --text ... --calib-stories 0:200 --probe-stories 200:216
//       --method kqsvd --ratio 0.25 --out sensitivity.json
//   kqsvd-llama frontier --model ... --tokenizer ... --text ... --calib-stories 0:200 --eval-stories 2100:2120
//       --probe-stories 200:216 --max-tokens 256 --json frontier.json --plot frontier.svg --budget-bits 3
//
// Exit codes: 0 success, 1 unusable data or files, 2 bad command line; errors are one line on stderr.
#include "commands.hpp"
#include "tool_main.hpp"

namespace {

constexpr const char* tool_usage = R"(usage: kqsvd-llama <command> [options]    (kqsvd-llama <command> --help for its options)

The llama2.c reference model (the library's kernels doing its attention) end to end.

commands:
  quality    what compressing the KV cache costs the model: NLL, KL, top-1 agreement, bytes and decode
             speed, for every method, ratio, RoPE mode, rank allocation and recent window
  generate   greedy generation with the full cache or a compressed one
  capture    save attention activations of text for the kqsvd tool (docs/activations.md)
  probe      measure each layer's loss sensitivity: a sensitivity file for kqsvd fit --budget
  frontier   the quality-per-byte frontier of KV caches (full caches in every format, low rank, H2O,
             online SVD) and the best one within a budget of bits per element

  --version  print the version
)";

}  // namespace

int main(int argc, char** argv) {
  using namespace kqsvd::cli;
  return run_tool("kqsvd-llama", tool_usage,
                  {{"quality", quality_command}, {"generate", generate_command}, {"capture", capture_command},
                   {"probe", probe_command}, {"frontier", frontier_command}}, argc,
                  argv);
}
