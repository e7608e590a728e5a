// tools/common/errors.hpp -- how the kqsvd tool fails: exit code 2 for a command line it cannot run,
// 1 for data it cannot use, always with a one-line message "kqsvd: ..." on stderr.
//
//   throw UsageError("--rank must be a positive integer, got 'x'");      // exit 2
//   throw DataError("the calibration files hold no output weights");     // exit 1
// kqsvd::Error (malformed files, I/O failures) also exits with 1.
#pragma once

#include <stdexcept>

namespace kqsvd::cli {

constexpr int exit_success = 0;
constexpr int exit_data_error = 1;
constexpr int exit_usage_error = 2;

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class DataError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace kqsvd::cli
