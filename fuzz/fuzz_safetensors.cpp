// libFuzzer target for kqsvd::io::SafetensorsFile: opens the input as a safetensors file and reads every tensor.
// Anything but a kqsvd::Error is a finding; see fuzz_entry_points.hpp. Build and run: tools/fuzz.sh.
#include <cstddef>
#include <cstdint>

#include "libfuzzer_adapter.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return kqsvd::fuzz::test_one_input(kqsvd::fuzz::Target::safetensors, data, size);
}
