// kqsvd/core/detail/parallel_for.hpp -- the library's one OpenMP loop: independent tasks over a fixed index
// range, exceptions carried out of the parallel region.
//
// Determinism: callers split work into tasks whose boundaries depend on the problem size only, never on
// the number of threads, and combine task results afterwards in index order. Which thread runs a task
// then cannot change any result bit.
//
// Eigen parallelises its own matrix products with OpenMP unless it is called inside an active parallel
// region. Kernels that call Eigen products inside tasks therefore always open the region (even for one
// task): Eigen then runs single-threaded inside, with the same blocking for any thread count.
//
// Built without OpenMP (KQSVD_USE_OPENMP=OFF, or a compiler without -fopenmp) the loop is serial.
#pragma once

#include <Eigen/Core>

#include <exception>
#include <optional>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace kqsvd::detail {

// True when called from inside an active OpenMP parallel region (nested regions would then run on one
// thread anyway).
inline bool in_parallel_region() {
#ifdef _OPENMP
  return omp_in_parallel() != 0;
#else
  return false;
#endif
}

// Runs body(task, workspace) for task in [0, count). Each thread builds its workspace once with
// make_workspace() (scratch buffers, so that tasks do not allocate). If tasks throw, every task still
// runs and the exception of the lowest-numbered failing task is rethrown: the same one on any thread
// count. `always_open_region`: open the parallel region even for a single task (see above).
template <typename MakeWorkspace, typename Body>
void parallel_for(Eigen::Index count, MakeWorkspace&& make_workspace, Body&& body, bool always_open_region) {
  if (count <= 0) return;
  Eigen::Index first_failure = count;
  std::exception_ptr failure;
  [[maybe_unused]] const bool open_region = always_open_region || (count > 1 && !in_parallel_region());
#ifdef _OPENMP
#pragma omp parallel if (open_region)
#endif
  {
    using Workspace = decltype(make_workspace());
    std::optional<Workspace> workspace;
    try {
      workspace.emplace(make_workspace());
    } catch (...) {
#ifdef _OPENMP
#pragma omp critical(kqsvd_parallel_for_failure)
#endif
      {
        if (first_failure > 0) {
          first_failure = 0;
          failure = std::current_exception();
        }
      }
    }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (Eigen::Index task = 0; task < count; ++task) {
      if (!workspace) continue;
      try {
        body(task, *workspace);
      } catch (...) {
#ifdef _OPENMP
#pragma omp critical(kqsvd_parallel_for_failure)
#endif
        {
          if (task < first_failure) {
            first_failure = task;
            failure = std::current_exception();
          }
        }
      }
    }
  }
  if (failure) std::rethrow_exception(failure);
}

}  // namespace kqsvd::detail
