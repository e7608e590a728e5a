// kqsvd/core/error.hpp -- the library's one exception hierarchy.
//
// Every public entry point reports bad input by throwing a subclass of kqsvd::Error whose message names
// the function, the argument (or file and tensor) and what was wrong, e.g.
//   "kqsvd::GramAccumulator::add: argument 'rows' has 63 columns, expected 64 (the head dimension)".
//
//   try { accumulator.add(keys); }
//   catch (const kqsvd::InvalidArgument& e) { std::cerr << e.what() << '\n'; }
//
// InvalidArgument  -- wrong shapes, non-finite values, ranks or budgets out of range, bad options.
// NumericalError   -- the input was valid but a result could not be computed finitely (overflow).
// FormatError      -- a file is malformed: truncated, corrupt header, unsupported dtype, bad offsets.
// IoError          -- the operating system refused: a file cannot be opened, read, written or renamed.
#pragma once

#include <stdexcept>
#include <string>

namespace kqsvd {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class InvalidArgument : public Error {
 public:
  using Error::Error;
};

class NumericalError : public Error {
 public:
  using Error::Error;
};

class FormatError : public Error {
 public:
  using Error::Error;
};

class IoError : public Error {
 public:
  using Error::Error;
};

}  // namespace kqsvd
