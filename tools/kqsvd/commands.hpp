// tools/kqsvd/commands.hpp -- the subcommands of the kqsvd tool. Each takes the words after its name,
// prints its results on stdout and returns the exit code; errors are thrown (errors.hpp) and turned
// into a message and an exit code by main().
#pragma once

#include <string>
#include <vector>

namespace kqsvd::cli {

int fit_command(const std::vector<std::string>& words);
int gram_command(const std::vector<std::string>& words);
int eval_command(const std::vector<std::string>& words);
int compare_command(const std::vector<std::string>& words);
int analyze_command(const std::vector<std::string>& words);

}  // namespace kqsvd::cli
