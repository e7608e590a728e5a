// fuzz/libfuzzer_adapter.hpp -- turns the outcome of one fuzz input into what libFuzzer expects.
//
// A file rejected with kqsvd::Error is a correct answer: return 0. Any other exception escaping the
// reader is a finding: print it and abort, so that libFuzzer saves the input as crash-<sha1> and stops.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>

#include "fuzz_entry_points.hpp"

namespace kqsvd::fuzz {

inline int test_one_input(Target target, const std::uint8_t* data, std::size_t size) {
  try {
    (void)run(target, data, size);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "kqsvd fuzz target '%s': unexpected exception: %s\n", name(target), error.what());
    std::abort();
  } catch (...) {
    std::fprintf(stderr, "kqsvd fuzz target '%s': unexpected non-standard exception\n", name(target));
    std::abort();
  }
  return 0;
}

}  // namespace kqsvd::fuzz
