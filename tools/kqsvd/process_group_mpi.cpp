// ProcessGroup over MPI (MPI_COMM_WORLD). MPI is initialised only when a launcher started this process:
// the tool run by hand, by the tests or under valgrind stays a plain single process.
#include <mpi.h>

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <string>
#include <vector>

#include "process_group.hpp"

namespace kqsvd::cli {

namespace {

// Variables every common launcher sets in the processes it starts: Open MPI's mpirun, PMIx-based
// launchers (Open MPI 4+, Slurm's srun --mpi=pmix) and MPICH's Hydra.
bool launched_by_mpi() {
  for (const char* variable : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"}) {
    if (std::getenv(variable) != nullptr) return true;
  }
  return false;
}

// MPI counts are ints: long messages go in pieces of at most this many values.
constexpr std::size_t piece_values = std::size_t{1} << 26;
constexpr int length_tag = 1, values_tag = 2;

}  // namespace

ProcessGroup::ProcessGroup() {
  if (!launched_by_mpi()) return;
  MPI_Init(nullptr, nullptr);
  joined_mpi_ = true;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
}

ProcessGroup::~ProcessGroup() {
  if (joined_mpi_) MPI_Finalize();
}

std::string ProcessGroup::signature(const std::string& tool) const {
  if (size_ == 1) return tool;
  return tool + " (rank " + std::to_string(rank_) + " of " + std::to_string(size_) + ")";
}

int ProcessGroup::largest(int value) const {
  if (size_ == 1) return value;
  int result = value;
  MPI_Allreduce(&value, &result, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return result;
}

int ProcessGroup::smallest(int value) const {
  if (size_ == 1) return value;
  int result = value;
  MPI_Allreduce(&value, &result, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return result;
}

void ProcessGroup::send(const std::vector<double>& values, int to) const {
  const std::uint64_t length = values.size();
  MPI_Send(&length, 1, MPI_UINT64_T, to, length_tag, MPI_COMM_WORLD);
  for (std::size_t begin = 0; begin < values.size(); begin += piece_values) {
    const std::size_t count = std::min(piece_values, values.size() - begin);
    MPI_Send(values.data() + begin, static_cast<int>(count), MPI_DOUBLE, to, values_tag, MPI_COMM_WORLD);
  }
}

std::vector<double> ProcessGroup::receive(int from) const {
  std::uint64_t length = 0;
  MPI_Recv(&length, 1, MPI_UINT64_T, from, length_tag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
  std::vector<double> values(length);
  for (std::size_t begin = 0; begin < values.size(); begin += piece_values) {
    const std::size_t count = std::min(piece_values, values.size() - begin);
    MPI_Recv(values.data() + begin, static_cast<int>(count), MPI_DOUBLE, from, values_tag, MPI_COMM_WORLD,
             MPI_STATUS_IGNORE);
  }
  return values;
}

}  // namespace kqsvd::cli
