// libFuzzer target for kqsvd::io::read_npy / read_npy_matrix: reads the input as a .npy file.
// Anything but a kqsvd::Error is a finding; see fuzz_entry_points.hpp. Build and run: tools/fuzz.sh.
#include <cstddef>
#include <cstdint>

#include "libfuzzer_adapter.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return kqsvd::fuzz::test_one_input(kqsvd::fuzz::Target::npy, data, size);
}
