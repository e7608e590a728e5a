// tools/common/tool_main.hpp -- main() of the project's command-line tools: subcommands by name, --help,
// --version, and one-line error messages with the exit codes of errors.hpp.
//
//   int main(int argc, char** argv) {
//     return kqsvd::cli::run_tool("kqsvd", usage, {{"fit", fit_command}, {"eval", eval_command}}, argc, argv);
//   }
#pragma once

#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace kqsvd::cli {

using Command = std::function<int(const std::vector<std::string>&)>;

// "kqsvd 0.2.0": recorded in the files the tools write, as their producer.
std::string tool_version();

// Runs argv[1] as one of `commands` with the words after it. Errors print "<tool>: <message>" on one
// line: UsageError exits 2, every other failure 1. `signature` signs the error messages (default: the
// tool's name; "kqsvd (rank 1 of 3)" in an MPI job).
int run_tool(const std::string& tool, const std::string& usage, const std::vector<std::pair<std::string, Command>>& commands,
             int argc, char** argv, const std::string& signature = {});

}  // namespace kqsvd::cli
