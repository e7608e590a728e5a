// Replays the fuzzers' seed corpora (fuzz/corpus/<target>/) and every finding turned regression file
// (fuzz/regressions/<target>/) through the fuzz targets' own entry point, kqsvd::fuzz::run(), so that
// what the fuzzers once found stays fixed in the normal (and the sanitized) test suite, without clang.
// Each file must be accepted or rejected with a kqsvd::Error; files named valid_* must be accepted.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "../fuzz/fuzz_entry_points.hpp"

namespace kqsvd_test_fuzz_regressions {

namespace fs = std::filesystem;
using kqsvd::fuzz::Target;

const fs::path fuzz_directory = fs::path(KQSVD_TEST_DATA_DIR) / ".." / ".." / "fuzz";

std::vector<fs::path> files_in(const fs::path& directory) {
  std::vector<fs::path> files;
  if (!fs::is_directory(directory)) return files;
  for (const auto& entry : fs::directory_iterator(directory)) {
    if (entry.is_regular_file()) files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  return files;
}

std::vector<std::uint8_t> bytes_of(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<std::uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Returns how many files were replayed.
std::size_t replay(Target target, const fs::path& directory) {
  const std::vector<fs::path> files = files_in(directory);
  for (const fs::path& file : files) {
    SCOPED_TRACE(file.string());
    const std::vector<std::uint8_t> bytes = bytes_of(file);
    kqsvd::fuzz::Outcome outcome;
    EXPECT_NO_THROW(outcome = kqsvd::fuzz::run(target, bytes.data(), bytes.size()));
    if (file.filename().string().rfind("valid_", 0) == 0) {
      EXPECT_TRUE(outcome.accepted) << "a valid seed was rejected: " << outcome.error;
    }
  }
  return files.size();
}

class FuzzReplay : public testing::TestWithParam<Target> {};

TEST_P(FuzzReplay, SeedCorpusIsAcceptedOrRejectedCleanly) {
  const fs::path corpus = fuzz_directory / "corpus" / kqsvd::fuzz::name(GetParam());
  EXPECT_GE(replay(GetParam(), corpus), 5u) << "the seed corpus " << corpus << " is missing or nearly empty";
}

TEST_P(FuzzReplay, RegressionFilesStayFixed) {
  // Empty until a fuzzer finds something: tools/fuzz.sh copies each finding there.
  replay(GetParam(), fuzz_directory / "regressions" / kqsvd::fuzz::name(GetParam()));
}

// Inputs no corpus file spells out: nothing at all, and one byte of every value.
TEST_P(FuzzReplay, EmptyAndOneByteInputsAreRejected) {
  for (int value = 0; value < 256; ++value) {
    const auto byte = static_cast<std::uint8_t>(value);
    kqsvd::fuzz::Outcome outcome;
    EXPECT_NO_THROW(outcome = kqsvd::fuzz::run(GetParam(), &byte, 1));
    EXPECT_FALSE(outcome.accepted) << "byte " << value;
  }
  const kqsvd::fuzz::Outcome empty = kqsvd::fuzz::run(GetParam(), nullptr, 0);
  EXPECT_FALSE(empty.accepted);
  EXPECT_FALSE(empty.error.empty());
}

INSTANTIATE_TEST_SUITE_P(AllReaders, FuzzReplay, testing::ValuesIn(kqsvd::fuzz::all_targets),
                         [](const testing::TestParamInfo<Target>& info) { return kqsvd::fuzz::name(info.param); });

}  // namespace kqsvd_test_fuzz_regressions
