// kqsvd -- the command-line tool: fit, evaluate, compare and analyze KV-cache projections on saved
// attention activations (docs/activations.md).
//
//   kqsvd compare --calib calib.safetensors --data eval.safetensors --rank 16 --plot compare.svg
//   kqsvd fit --calib calib.safetensors --method kqsvd --rank 16 --out proj.safetensors
//   kqsvd eval --proj proj.safetensors --data eval.safetensors --json
//   kqsvd analyze --data calib.safetensors
//
// Exit codes: 0 success, 1 unusable data or files, 2 bad command line; errors are one line on stderr.
#include <string>
#include <vector>

#include "commands.hpp"
#include "errors.hpp"
#include "tool_main.hpp"

namespace {

constexpr const char* tool_usage = R"(usage: kqsvd <command> [options]    (kqsvd <command> --help for its options)

Low-rank KV-cache compression with KQ-SVD and its baselines, on saved attention activations
(safetensors files in the layout of docs/activations.md).

commands:
  fit       fit projections for every layer and head from calibration (or Gram) files; write a projection file
  gram      save calibration files' Grams (d x d per head) as a Gram file: fit --grams merges any number
  eval      measure a projection file on held-out activations: seven relative errors per layer
  compare   KQ-SVD vs. K-SVD vs. Eigen Attention at identical ranks, as a table, JSON or SVG plot
  analyze   spectra of K, Q, V, Q K^T and V W^T: how low-rank is this model's attention?

  --version  print the version

mpirun -np N kqsvd fit|gram ... shares the calibration files among N processes (kqsvd fit --help).
)";

}  // namespace

int main(int argc, char** argv) {
  using namespace kqsvd::cli;
  const ProcessGroup group;
  // fit and gram share their work among the ranks of an MPI job; the other commands would only repeat
  // one another's work (and race on their outputs), so they refuse to run in a job of several.
  const auto alone = [&group](const char* name, int (*command)(const std::vector<std::string>&)) {
    return [&group, name, command](const std::vector<std::string>& words) {
      if (group.size() > 1) {
        throw UsageError(std::string("kqsvd ") + name + " runs in one process; under mpirun only fit and gram share work");
      }
      return command(words);
    };
  };
  const auto shared = [&group](int (*command)(const std::vector<std::string>&, const ProcessGroup&)) {
    return [&group, command](const std::vector<std::string>& words) { return command(words, group); };
  };
  return run_tool("kqsvd", tool_usage,
                  {{"fit", shared(fit_command)},
                   {"gram", shared(gram_command)},
                   {"eval", alone("eval", eval_command)},
                   {"compare", alone("compare", compare_command)},
                   {"analyze", alone("analyze", analyze_command)}},
                  argc, argv, group.signature("kqsvd"));
}
