// bench/peak_memory.hpp -- peak resident memory of a piece of code, from Linux's own accounting.
//
// Writing "5" to /proc/self/clear_refs resets the process's peak resident set size (VmHWM) to its
// current one; VmHWM afterwards is the true peak, including memory Eigen allocates internally.
//
//   const double mib = kqsvd_bench::peak_memory_mib([&] { run_the_route(); });   // above the baseline
#pragma once

#include <fstream>

#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <string>

namespace kqsvd_bench {

// A field of /proc/self/status in KiB (VmRSS, VmHWM), or -1 if unavailable.
inline long status_kib(const std::string& field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stol(line.substr(field.size() + 1));
  }
  return -1;
}

// MiB by which `code` raised the resident set above what it was when called; -1 where Linux does not
// provide the counters.
template <typename Code>
double peak_memory_mib(Code&& code) {
#ifdef __GLIBC__
  // Free heap pages that malloc keeps would be reused by `code` without raising the resident set, and
  // hide its allocations (measured: after the whole-model fit, the QR route's 16 MiB at 16k tokens read
  // as 0). Returning them to the OS first makes every page `code` touches count.
  malloc_trim(0);
#endif
  std::ofstream("/proc/self/clear_refs") << "5";
  const long baseline = status_kib("VmRSS");
  code();
  const long peak = status_kib("VmHWM");
  return baseline < 0 || peak < 0 ? -1.0 : static_cast<double>(peak - baseline) / 1024.0;
}

}  // namespace kqsvd_bench
