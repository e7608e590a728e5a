// tools/common/parallel.hpp -- independent jobs on every core, for the tools' sweeps (methods, ranks,
// configurations): body(i) for i in [0, count), results written by index, so the output does not depend
// on the schedule. The first exception (by index) is rethrown once every job has finished.
//
//   std::vector<Report> reports(methods.size());
//   kqsvd::cli::parallel_jobs(methods.size(), [&](std::size_t i) { reports[i] = evaluate(methods[i]); });
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <thread>
#include <vector>

namespace kqsvd::cli {

template <typename Body>
void parallel_jobs(std::size_t count, const Body& body) {
  const std::size_t workers = std::min<std::size_t>(count, std::max(1u, std::thread::hardware_concurrency()));
  std::vector<std::exception_ptr> failures(count);
  std::atomic<std::size_t> next{0};
  const auto work = [&] {
    for (std::size_t i = next++; i < count; i = next++) {
      try {
        body(i);
      } catch (...) {
        failures[i] = std::current_exception();
      }
    }
  };
  std::vector<std::thread> threads;
  for (std::size_t t = 1; t < workers; ++t) threads.emplace_back(work);
  work();
  for (std::thread& thread : threads) thread.join();
  for (const std::exception_ptr& failure : failures) {
    if (failure) std::rethrow_exception(failure);
  }
}

}  // namespace kqsvd::cli
