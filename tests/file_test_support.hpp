// Helpers shared by the tests that read and write files: per-test scratch directories, whole-file
// reads and writes, names for corpus-driven tests.
#pragma once

#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace kqsvd::test {

namespace fs = std::filesystem;

// A fresh directory per test, so that tests run in parallel by ctest never see each other's files.
inline fs::path scratch_directory() {
  const auto* test = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = std::string(test->test_suite_name()) + "." + test->name();
  for (char& c : name) {
    if (c == '/') c = '_';  // parameterised tests are named Suite/Test/0
  }
  const fs::path directory = fs::path(KQSVD_BINARY_DIR) / "io-scratch" / name;
  fs::remove_all(directory);
  fs::create_directories(directory);
  return directory;
}

inline std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

inline void write_file(const fs::path& path, const std::string& content) {
  std::ofstream(path, std::ios::binary) << content;
}

// A word for /bin/sh, in single quotes.
inline std::string shell_quote(const std::string& word) {
  std::string quoted = "'";
  for (const char c : word) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

struct CommandResult {
  int exit_code = -1;  // -1: killed by a signal
  std::string out;
  std::string err;
};

// Runs `command` (a shell command line, its words quoted by the caller) with stdin from /dev/null;
// stdout and stderr go through files in `directory`.
inline CommandResult run_command(const std::string& command, const fs::path& directory) {
  const fs::path out = directory / "stdout.txt", err = directory / "stderr.txt";
  const std::string line = command + " < /dev/null > " + shell_quote(out.string()) + " 2> " + shell_quote(err.string());
  const int status = std::system(line.c_str());
  CommandResult result;
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  result.out = read_file(out);
  result.err = read_file(err);
  fs::remove(out);
  fs::remove(err);
  return result;
}

// A GoogleTest parameter name from a corpus file name: its stem with non-alphanumerics as '_'.
inline std::string corpus_test_name(const std::string& file) {
  std::string name = fs::path(file).stem().string();
  for (char& c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  return name;
}

}  // namespace kqsvd::test
