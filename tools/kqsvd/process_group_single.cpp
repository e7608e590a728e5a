// ProcessGroup without MPI (CMake found none, or KQSVD_MPI=OFF): this process alone.
#include <stdexcept>

#include "process_group.hpp"

namespace kqsvd::cli {

ProcessGroup::ProcessGroup() = default;
ProcessGroup::~ProcessGroup() = default;

std::string ProcessGroup::signature(const std::string& tool) const { return tool; }
int ProcessGroup::largest(int value) const { return value; }
int ProcessGroup::smallest(int value) const { return value; }

// A group of one has no other rank to talk to.
void ProcessGroup::send(const std::vector<double>&, int) const {
  throw std::logic_error("kqsvd: ProcessGroup::send in a process group of one");
}
std::vector<double> ProcessGroup::receive(int) const {
  throw std::logic_error("kqsvd: ProcessGroup::receive in a process group of one");
}

}  // namespace kqsvd::cli
