// libFuzzer target for kqsvd::llama::Tokenizer::load: reads the input as a llama2.c tokenizer, then encodes and decodes.
// Anything but a kqsvd::Error is a finding; see fuzz_entry_points.hpp. Build and run: tools/fuzz.sh.
#include <cstddef>
#include <cstdint>

#include "libfuzzer_adapter.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return kqsvd::fuzz::test_one_input(kqsvd::fuzz::Target::llama_tokenizer, data, size);
}
