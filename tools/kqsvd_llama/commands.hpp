// tools/kqsvd_llama/commands.hpp -- the subcommands of kqsvd-llama. Each takes the words after its name,
// prints its results on stdout and returns the exit code; errors are thrown (errors.hpp) and turned into
// a message and an exit code by run_tool().
#pragma once

#include <string>
#include <vector>

namespace kqsvd::cli {

int quality_command(const std::vector<std::string>& words);
int generate_command(const std::vector<std::string>& words);
int capture_command(const std::vector<std::string>& words);
int probe_command(const std::vector<std::string>& words);
int frontier_command(const std::vector<std::string>& words);

}  // namespace kqsvd::cli
