// Helpers shared by the tests that read and write files: per-test scratch directories, whole-file
// reads and writes, names for corpus-driven tests.
#pragma once

#include <gtest/gtest.h>

#include <cctype>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

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

// A GoogleTest parameter name from a corpus file name: its stem with non-alphanumerics as '_'.
inline std::string corpus_test_name(const std::string& file) {
  std::string name = fs::path(file).stem().string();
  for (char& c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  return name;
}

}  // namespace kqsvd::test
