// Tests for kqsvd/io/atomic_file.hpp: the target holds either its old content or the complete new one,
// whatever happens to the writer, and no temporary file outlives a writer that could clean up.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "kqsvd/core/error.hpp"
#include "file_test_support.hpp"
#include "kqsvd/io/atomic_file.hpp"

namespace kqsvd_test_atomic_file {

namespace fs = std::filesystem;
using kqsvd::io::AtomicFileWriter;
using kqsvd::test::read_file;
using kqsvd::test::scratch_directory;
using kqsvd::test::write_file;

std::vector<std::string> directory_entries(const fs::path& directory) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(directory)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

TEST(AtomicFileWriter, CommitCreatesTheTargetAndLeavesNoTemporary) {
  const fs::path directory = scratch_directory();
  const fs::path target = directory / "out.bin";
  {
    AtomicFileWriter out(target.string());
    EXPECT_EQ(fs::path(out.temporary_path()).parent_path(), directory);  // same file system as the target
    EXPECT_EQ(out.temporary_path().find(directory.string() + "/.out.bin.tmp-"), 0u);
    out.write("hello, ");
    out.write(std::string("world"));
    EXPECT_FALSE(fs::exists(target)) << "the target must not appear before commit()";
    out.commit();
    EXPECT_TRUE(out.committed());
  }
  EXPECT_EQ(read_file(target), "hello, world");
  EXPECT_EQ(directory_entries(directory), std::vector<std::string>{"out.bin"});
}

TEST(AtomicFileWriter, NewFileGetsTheUsualPermissionsNotThoseOfATemporary) {
  const fs::path directory = scratch_directory();
  const fs::path target = directory / "out.bin";
  AtomicFileWriter out(target.string());
  out.write("x");
  out.commit();
  const mode_t mask = ::umask(0);
  ::umask(mask);
  struct stat status {};
  ASSERT_EQ(::stat(target.c_str(), &status), 0);
  EXPECT_EQ(status.st_mode & 0777, 0666u & ~mask);
}

TEST(AtomicFileWriter, CommitWithOverwriteReplacesTheOldContent) {
  const fs::path directory = scratch_directory();
  const fs::path target = directory / "out.bin";
  write_file(target, "old content");
  AtomicFileWriter out(target.string(), /*overwrite=*/true);
  out.write("new");
  EXPECT_EQ(read_file(target), "old content");
  out.commit();
  EXPECT_EQ(read_file(target), "new");
  EXPECT_EQ(directory_entries(directory), std::vector<std::string>{"out.bin"});
}

TEST(AtomicFileWriter, ExceptionBeforeCommitLeavesTheOldFileAndNoTemporary) {
  const fs::path directory = scratch_directory();
  const fs::path target = directory / "out.bin";
  write_file(target, "old content");
  std::string temporary;
  EXPECT_THROW(
      {
        AtomicFileWriter out(target.string(), /*overwrite=*/true);
        temporary = out.temporary_path();
        out.write("half of the new cont");
        EXPECT_TRUE(fs::exists(temporary));
        throw std::runtime_error("simulated failure while producing the output");
      },
      std::runtime_error);
  EXPECT_FALSE(fs::exists(temporary));
  EXPECT_EQ(read_file(target), "old content");
  EXPECT_EQ(directory_entries(directory), std::vector<std::string>{"out.bin"});
}

TEST(AtomicFileWriter, WithoutOverwriteAnExistingTargetIsRefusedNamingThePath) {
  const fs::path directory = scratch_directory();
  const fs::path target = directory / "out.bin";
  write_file(target, "old content");
  try {
    AtomicFileWriter out(target.string(), /*overwrite=*/false);
    FAIL() << "expected kqsvd::IoError";
  } catch (const kqsvd::IoError& error) {
    EXPECT_NE(std::string(error.what()).find(target.string()), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("already exists"), std::string::npos) << error.what();
  }
  EXPECT_EQ(read_file(target), "old content");
  EXPECT_EQ(directory_entries(directory), std::vector<std::string>{"out.bin"});
}

TEST(AtomicFileWriter, WithoutOverwriteATargetThatAppearsBeforeCommitIsNotReplaced) {
  const fs::path directory = scratch_directory();
  const fs::path target = directory / "out.bin";
  {
    AtomicFileWriter out(target.string(), /*overwrite=*/false);
    out.write("mine");
    write_file(target, "someone else's");
    try {
      out.commit();
      FAIL() << "expected kqsvd::IoError";
    } catch (const kqsvd::IoError& error) {
      EXPECT_NE(std::string(error.what()).find(target.string()), std::string::npos) << error.what();
    }
    EXPECT_FALSE(out.committed());
  }
  EXPECT_EQ(read_file(target), "someone else's");
  EXPECT_EQ(directory_entries(directory), std::vector<std::string>{"out.bin"});
}

TEST(AtomicFileWriter, MissingDirectoryIsAnIoErrorNamingThePath) {
  const fs::path directory = scratch_directory();
  const fs::path target = directory / "no-such-directory" / "out.bin";
  try {
    AtomicFileWriter out(target.string(), /*overwrite=*/true);
    FAIL() << "expected kqsvd::IoError";
  } catch (const kqsvd::IoError& error) {
    EXPECT_NE(std::string(error.what()).find(target.string()), std::string::npos) << error.what();
  }
}

TEST(AtomicFileWriter, UseAfterCommitIsRejected) {
  const fs::path directory = scratch_directory();
  AtomicFileWriter out((directory / "out.bin").string());
  out.write("x");
  out.commit();
  EXPECT_THROW(out.write("y"), kqsvd::InvalidArgument);
  EXPECT_THROW(out.commit(), kqsvd::InvalidArgument);
  EXPECT_EQ(read_file(directory / "out.bin"), "x");
}

TEST(AtomicFileWriter, EmptyOutputIsAFileOfZeroBytes) {
  const fs::path directory = scratch_directory();
  AtomicFileWriter out((directory / "empty.bin").string());
  out.commit();
  EXPECT_TRUE(fs::exists(directory / "empty.bin"));
  EXPECT_EQ(fs::file_size(directory / "empty.bin"), 0u);
}

// A process killed mid-write cannot run destructors; the point of writing beside the target is that
// the target is nevertheless untouched.
TEST(AtomicFileWriter, ProcessKilledBeforeCommitLeavesTheOldContent) {
  const fs::path directory = scratch_directory();
  const fs::path target = directory / "out.bin";
  write_file(target, "old content");
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    AtomicFileWriter out(target.string(), /*overwrite=*/true);
    const std::string part(1 << 20, 'n');
    out.write(part);
    ::kill(::getpid(), SIGKILL);
    ::_exit(0);  // not reached
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFSIGNALED(status));
  EXPECT_EQ(WTERMSIG(status), SIGKILL);
  EXPECT_EQ(read_file(target), "old content");
  // The child's temporary is left behind (nothing could remove it), hidden and named after the target.
  const auto entries = directory_entries(directory);
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_EQ(entries[0].rfind(".out.bin.tmp-", 0), 0u) << entries[0];
  EXPECT_EQ(entries[1], "out.bin");
}

TEST(AtomicFileWriter, ConcurrentWritersUseDistinctTemporaries) {
  const fs::path directory = scratch_directory();
  const fs::path target = directory / "out.bin";
  AtomicFileWriter first(target.string(), /*overwrite=*/true);
  AtomicFileWriter second(target.string(), /*overwrite=*/true);
  EXPECT_NE(first.temporary_path(), second.temporary_path());
  first.write("first");
  second.write("second");
  first.commit();
  second.commit();
  EXPECT_EQ(read_file(target), "second");
  EXPECT_EQ(directory_entries(directory), std::vector<std::string>{"out.bin"});
}

TEST(AtomicFileWriter, PathWithoutAFileNameIsAnInvalidArgument) {
  EXPECT_THROW(AtomicFileWriter(""), kqsvd::InvalidArgument);
  EXPECT_THROW(AtomicFileWriter("some/directory/"), kqsvd::InvalidArgument);
}

TEST(AtomicFileWriter, RelativePathInTheCurrentDirectory) {
  const fs::path directory = scratch_directory();
  const fs::path previous = fs::current_path();
  fs::current_path(directory);
  {
    AtomicFileWriter out("relative.bin");
    EXPECT_EQ(out.temporary_path().rfind("./.relative.bin.tmp-", 0), 0u) << out.temporary_path();
    out.write("r");
    out.commit();
  }
  fs::current_path(previous);
  EXPECT_EQ(read_file(directory / "relative.bin"), "r");
}

}  // namespace kqsvd_test_atomic_file
