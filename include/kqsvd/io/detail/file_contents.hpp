// kqsvd/io/detail/file_contents.hpp -- the bytes of a whole file, read-only, memory-mapped when possible.
//
// Mapping lets a reader touch only the tensors it is asked for in a multi-gigabyte cache dump; where
// mmap is refused (some network and FUSE file systems) the file is read into memory instead, with the
// same interface. A mapped file that another process truncates while it is open raises SIGBUS on
// access; kqsvd does not guard against that (nor does any mmap-based reader).
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "kqsvd/core/error.hpp"
#include "kqsvd/io/detail/posix_error.hpp"

namespace kqsvd::detail {

class FileContents {
 public:
  // `who` starts every error message, e.g. "kqsvd::io::SafetensorsFile".
  FileContents(const std::string& path, const char* who) {
    // O_NONBLOCK keeps open() from hanging on a FIFO; the S_ISREG check below then rejects it.
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
      throw IoError(std::string(who) + ": cannot open '" + path + "': " + describe_errno(errno));
    }
    try {
      struct stat status {};
      if (::fstat(fd, &status) != 0) {
        throw IoError(std::string(who) + ": cannot stat '" + path + "': " + describe_errno(errno));
      }
      if (!S_ISREG(status.st_mode)) throw IoError(std::string(who) + ": '" + path + "' is not a regular file");
      if (status.st_size < 0 ||
          static_cast<std::uint64_t>(status.st_size) > std::numeric_limits<std::size_t>::max()) {
        throw IoError(std::string(who) + ": '" + path + "' is too large to map on this host");
      }
      size_ = static_cast<std::size_t>(status.st_size);
      if (size_ > 0) {
        void* mapping = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
        if (mapping != MAP_FAILED) {
          mapping_ = mapping;
          data_ = static_cast<const unsigned char*>(mapping);
        } else {
          read_into_memory(fd, path, who);
        }
      }
    } catch (...) {
      ::close(fd);
      throw;
    }
    ::close(fd);  // the mapping keeps its own reference to the file
  }

  ~FileContents() { release(); }

  FileContents(const FileContents&) = delete;
  FileContents& operator=(const FileContents&) = delete;

  FileContents(FileContents&& other) noexcept { take(std::move(other)); }
  FileContents& operator=(FileContents&& other) noexcept {
    if (this != &other) {
      release();
      take(std::move(other));
    }
    return *this;
  }

  const unsigned char* data() const { return data_; }
  std::size_t size() const { return size_; }
  bool memory_mapped() const { return mapping_ != nullptr; }

 private:
  void read_into_memory(int fd, const std::string& path, const char* who) {
    buffer_.resize(size_);
    std::size_t done = 0;
    while (done < size_) {
      const ssize_t got = ::pread(fd, buffer_.data() + done, size_ - done, static_cast<off_t>(done));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) throw IoError(std::string(who) + ": cannot read '" + path + "': " + describe_errno(errno));
      if (got == 0) throw IoError(std::string(who) + ": '" + path + "' shrank while being read");
      done += static_cast<std::size_t>(got);
    }
    data_ = buffer_.data();
  }

  void release() noexcept {
    if (mapping_ != nullptr) ::munmap(mapping_, size_);
    mapping_ = nullptr;
    data_ = nullptr;
    size_ = 0;
    buffer_.clear();
  }

  void take(FileContents&& other) noexcept {
    mapping_ = std::exchange(other.mapping_, nullptr);
    size_ = std::exchange(other.size_, 0);
    buffer_ = std::move(other.buffer_);  // a moved vector keeps its heap block, so data_ stays valid
    data_ = std::exchange(other.data_, nullptr);
  }

  void* mapping_ = nullptr;
  const unsigned char* data_ = nullptr;
  std::size_t size_ = 0;
  std::vector<unsigned char> buffer_;
};

}  // namespace kqsvd::detail
