// tools/kqsvd/commands.hpp -- the subcommands of the kqsvd tool. Each takes the words after its name,
// prints its results on stdout and returns the exit code; errors are thrown (errors.hpp) and turned
// into a message and an exit code by main().
#pragma once

#include <string>
#include <vector>

#include "process_group.hpp"

namespace kqsvd::cli {

// fit and gram run on every rank of an MPI job (process_group.hpp); the others in one process.
int fit_command(const std::vector<std::string>& words, const ProcessGroup& group);
int gram_command(const std::vector<std::string>& words, const ProcessGroup& group);
int eval_command(const std::vector<std::string>& words);
int compare_command(const std::vector<std::string>& words);
int analyze_command(const std::vector<std::string>& words);

}  // namespace kqsvd::cli
