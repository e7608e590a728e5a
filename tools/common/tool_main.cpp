#include "tool_main.hpp"

#include <kqsvd/core/error.hpp>

#include <Eigen/Core>
#include <kqsvd/version.hpp>

#include <exception>
#include <iostream>
#include <new>

#include "errors.hpp"

namespace kqsvd::cli {

namespace {

// The message on one line, however the library worded it.
std::string one_line(std::string message) {
  for (char& c : message) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return message;
}

// One write per message: the processes of an MPI job share one stderr, and pieces of their lines
// written separately interleave.
void report(const std::string& line) { std::cerr << (line + "\n") << std::flush; }

}  // namespace

std::string tool_version() { return std::string("kqsvd ") + version_string; }

int run_tool(const std::string& tool, const std::string& usage, const std::vector<std::pair<std::string, Command>>& commands,
             int argc, char** argv, const std::string& signature) {
  const std::string& speaker = signature.empty() ? tool : signature;
  if (argc < 2) {
    std::cerr << usage;
    return exit_usage_error;
  }
  const std::string command = argv[1];
  const std::vector<std::string> words(argv + 2, argv + argc);
  // The tools parallelise across heads, token blocks and jobs themselves (the library's OpenMP loops,
  // parallel.hpp); Eigen threading its own products inside those would oversubscribe the cores.
  Eigen::setNbThreads(1);
  try {
    if (command == "--help" || command == "-h" || command == "help") {
      std::cout << usage;
      return exit_success;
    }
    if (command == "--version") {
      std::cout << tool_version() << "\n";
      return exit_success;
    }
    for (const auto& [name, run] : commands) {
      if (name == command) return run(words);
    }
    std::string names;
    for (const auto& entry : commands) names += (names.empty() ? "" : ", ") + entry.first;
    throw UsageError("unknown command '" + command + "' (expected " + names + "; see " + tool + " --help)");
  } catch (const UsageError& error) {
    report(speaker + ": " + one_line(error.what()) + " (see " + tool + " " +
           (command.rfind('-', 0) == 0 ? "" : command + " ") + "--help)");
    return exit_usage_error;
  } catch (const std::bad_alloc&) {
    report(speaker + ": out of memory");
    return exit_data_error;
  } catch (const std::exception& error) {
    // kqsvd::Error (malformed or unreadable files, unusable values) and DataError.
    report(speaker + ": " + one_line(error.what()));
    return exit_data_error;
  }
}

}  // namespace kqsvd::cli
