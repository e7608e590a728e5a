// tools/kqsvd/process_group.hpp -- the processes one kqsvd command runs on: the ranks of an MPI job
// when an MPI launcher started the tool (mpirun -np N kqsvd fit ...), otherwise this process alone.
//
//   ProcessGroup group;                            // joins the MPI job, if launched by one
//   group.together([&] { share = calibrate(...); }); // a failure on any rank stops every rank
//   if (group.rank() == 0) write(...);
//
// Built with MPI when CMake finds it (process_group_mpi.cpp), else for one process
// (process_group_single.cpp). A binary built with MPI but started without a launcher never calls MPI.
#pragma once

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "errors.hpp"

namespace kqsvd::cli {

class ProcessGroup {
 public:
  ProcessGroup();
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  // "kqsvd" alone, "kqsvd (rank 1 of 3)" in a job of several: how this process signs its messages.
  std::string signature(const std::string& tool) const;

  // Collective: the largest and the smallest of every rank's value.
  int largest(int value) const;
  int smallest(int value) const;

  // Point to point, in order: `values` from this rank to rank `to`, which receives them with
  // receive(from = this rank). Any length; the receiver learns it from the message.
  void send(const std::vector<double>& values, int to) const;
  std::vector<double> receive(int from) const;

  // Runs `step` on every rank and then agrees: when it threw anywhere, it throws on every rank -- its
  // own error where it failed, elsewhere an error naming the first rank that failed, with that rank's
  // kind (a UsageError, exit 2, or a DataError, exit 1). No rank goes on alone after another failed, so
  // none waits forever for it and none writes an output file.
  template <typename Step>
  void together(Step&& step) const {
    int status = exit_success;
    std::exception_ptr failure;
    try {
      step();
    } catch (const UsageError&) {
      status = exit_usage_error;
      failure = std::current_exception();
    } catch (...) {
      status = exit_data_error;
      failure = std::current_exception();
    }
    if (size_ == 1) {
      if (failure) std::rethrow_exception(failure);
      return;
    }
    const int worst = largest(status);
    const int first_failed = smallest(status == exit_success ? size_ : rank_);
    if (failure) std::rethrow_exception(failure);
    if (worst == exit_success) return;
    const std::string message = "stopped: rank " + std::to_string(first_failed) + " of " + std::to_string(size_) +
                                " failed (its message says why)";
    if (worst == exit_usage_error) throw UsageError(message);
    throw DataError(message);
  }

  // The part of `items` this rank takes: a contiguous run, rank 0 the first, shares differing by at most
  // one item (empty for ranks beyond the number of items).
  template <typename Item>
  std::vector<Item> share(const std::vector<Item>& items) const {
    const auto count = static_cast<std::int64_t>(items.size());
    const std::int64_t begin = count * rank_ / size_, end = count * (rank_ + 1) / size_;
    return std::vector<Item>(items.begin() + begin, items.begin() + end);
  }

 private:
  int rank_ = 0;
  int size_ = 1;
  bool joined_mpi_ = false;
};

}  // namespace kqsvd::cli
