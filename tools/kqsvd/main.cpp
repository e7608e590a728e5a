// kqsvd -- the command-line tool: fit, evaluate, compare and analyze KV-cache projections on saved
// attention activations (docs/activations.md).
//
//   kqsvd compare --calib calib.safetensors --data eval.safetensors --rank 16 --plot compare.svg
//   kqsvd fit --calib calib.safetensors --method kqsvd --rank 16 --out proj.safetensors
//   kqsvd eval --proj proj.safetensors --data eval.safetensors --json
//   kqsvd analyze --data calib.safetensors
//
// Exit codes: 0 success, 1 unusable data or files, 2 bad command line; errors are one line on stderr.
#include <kqsvd/error.hpp>

#include <exception>
#include <iostream>
#include <new>
#include <string>
#include <vector>

#include "commands.hpp"
#include "errors.hpp"

namespace {

constexpr const char* usage = R"(usage: kqsvd <command> [options]    (kqsvd <command> --help for its options)

Low-rank KV-cache compression with KQ-SVD and its baselines, on saved attention activations
(safetensors files in the layout of docs/activations.md).

commands:
  fit       fit projections for every layer and head from calibration files; write a projection file
  eval      measure a projection file on held-out activations: seven relative errors per layer
  compare   KQ-SVD vs. K-SVD vs. Eigen Attention at identical ranks, as a table, JSON or SVG plot
  analyze   spectra of K, Q, V, Q K^T and V W^T: how low-rank is this model's attention?

  --version  print the version
)";

// The message on one line, however the library worded it.
std::string one_line(std::string message) {
  for (char& c : message) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return message;
}

}  // namespace

namespace kqsvd::cli {

const char* tool_version() { return "kqsvd " KQSVD_VERSION; }

}  // namespace kqsvd::cli

int main(int argc, char** argv) {
  using namespace kqsvd::cli;
  if (argc < 2) {
    std::cerr << usage;
    return exit_usage_error;
  }
  const std::string command = argv[1];
  const std::vector<std::string> words(argv + 2, argv + argc);
  try {
    if (command == "--help" || command == "-h" || command == "help") {
      std::cout << usage;
      return exit_success;
    }
    if (command == "--version") {
      std::cout << tool_version() << "\n";
      return exit_success;
    }
    if (command == "fit") return fit_command(words);
    if (command == "eval") return eval_command(words);
    if (command == "compare") return compare_command(words);
    if (command == "analyze") return analyze_command(words);
    throw UsageError("unknown command '" + command + "' (expected fit, eval, compare or analyze; see kqsvd --help)");
  } catch (const UsageError& error) {
    std::cerr << "kqsvd: " << one_line(error.what()) << " (see kqsvd " << (command.rfind('-', 0) == 0 ? "" : command + " ")
              << "--help)\n";
    return exit_usage_error;
  } catch (const std::bad_alloc&) {
    std::cerr << "kqsvd: out of memory\n";
    return exit_data_error;
  } catch (const std::exception& error) {
    // kqsvd::Error (malformed or unreadable files, unusable values) and DataError.
    std::cerr << "kqsvd: " << one_line(error.what()) << "\n";
    return exit_data_error;
  }
}
