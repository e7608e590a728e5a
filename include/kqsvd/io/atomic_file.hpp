// kqsvd/io/atomic_file.hpp -- write a file so that readers see either the old content or the complete new one.
//
// AtomicFileWriter writes into a fresh temporary file next to the target (same directory, hence same file
// system), and commit() flushes it to disk with fsync and renames it over the target, which POSIX makes
// atomic. If commit() is never reached -- an exception, an early return -- the destructor deletes the
// temporary, so a failed run never leaves a truncated output behind. A process killed outright (SIGKILL,
// power loss) cannot clean up: the target then still holds its old content, and a hidden
// ".<name>.tmp-*" file may remain beside it.
//
//   kqsvd::io::AtomicFileWriter out("cache.kqsvd", /*overwrite=*/true);
//   out.write(header.data(), header.size());
//   out.write(payload.data(), payload.size());   // may throw: "cache.kqsvd" is untouched
//   out.commit();                                 // now "cache.kqsvd" is the new file
//
// With overwrite == false the constructor refuses an existing target, and commit() links the file into
// place with link(2), which fails rather than replacing a target that appeared in the meantime.
// Replacing a target gives it the permissions of a new file (0666 less the umask); a symbolic link at the
// target path is replaced by the file, not followed.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <utility>

#include "kqsvd/core/error.hpp"
#include "kqsvd/io/detail/posix_error.hpp"

namespace kqsvd::io {

}  // namespace kqsvd::io

namespace kqsvd::detail {

inline std::string directory_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

inline std::string file_name_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

inline bool path_exists(const std::string& path) {
  struct stat status {};
  return ::lstat(path.c_str(), &status) == 0;
}

// Makes the rename itself durable; some file systems cannot fsync a directory, which is not worth failing
// a completed write over.
inline void sync_directory(const std::string& directory) noexcept {
  const int fd = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  (void)::fsync(fd);
  ::close(fd);
}

}  // namespace kqsvd::detail

namespace kqsvd::io {

class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::string target_path, bool overwrite = false)
      : target_path_(std::move(target_path)), overwrite_(overwrite) {
    if (target_path_.empty() || target_path_.back() == '/') {
      throw InvalidArgument("kqsvd::io::AtomicFileWriter: argument 'target_path' must name a file, got '" +
                            target_path_ + "'");
    }
    if (!overwrite_ && detail::path_exists(target_path_)) {
      throw IoError(message("already exists and overwriting was not requested"));
    }
    open_temporary();
  }

  ~AtomicFileWriter() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_ && !temporary_path_.empty()) ::unlink(temporary_path_.c_str());
  }

  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;
  AtomicFileWriter(AtomicFileWriter&&) = delete;
  AtomicFileWriter& operator=(AtomicFileWriter&&) = delete;

  const std::string& target_path() const { return target_path_; }
  const std::string& temporary_path() const { return temporary_path_; }
  bool committed() const { return committed_; }

  void write(const void* bytes, std::size_t size) {
    require_writable("write");
    const auto* next = static_cast<const unsigned char*>(bytes);
    while (size > 0) {
      const ssize_t written = ::write(fd_, next, size);
      if (written < 0 && errno == EINTR) continue;
      if (written <= 0) {
        failed_ = true;
        throw IoError(message("cannot write " + std::to_string(size) + " bytes to '" + temporary_path_ +
                              "': " + detail::describe_errno(written < 0 ? errno : EIO)));
      }
      next += written;
      size -= static_cast<std::size_t>(written);
    }
  }

  void write(const std::string& bytes) { write(bytes.data(), bytes.size()); }

  // Flushes the temporary to disk and moves it to the target path. After a failed commit the temporary
  // is still deleted by the destructor and the target keeps its old content.
  void commit() {
    require_writable("commit");
    if (::fsync(fd_) != 0) {
      failed_ = true;
      throw IoError(message("cannot flush '" + temporary_path_ + "' to disk: " + detail::describe_errno(errno)));
    }
    const int close_result = ::close(fd_);
    fd_ = -1;
    if (close_result != 0) {
      failed_ = true;
      throw IoError(message("cannot close '" + temporary_path_ + "': " + detail::describe_errno(errno)));
    }
    if (overwrite_) {
      if (::rename(temporary_path_.c_str(), target_path_.c_str()) != 0) {
        failed_ = true;
        throw IoError(message("cannot rename '" + temporary_path_ + "' to it: " + detail::describe_errno(errno)));
      }
    } else {
      link_without_replacing();
    }
    committed_ = true;
    detail::sync_directory(detail::directory_of(target_path_));
  }

 private:
  std::string message(const std::string& problem) const {
    return "kqsvd::io::AtomicFileWriter: '" + target_path_ + "' " + problem;
  }

  void require_writable(const char* operation) const {
    if (committed_) {
      throw InvalidArgument("kqsvd::io::AtomicFileWriter::" + std::string(operation) + ": '" + target_path_ +
                            "' was already committed");
    }
    if (failed_ || fd_ < 0) {
      throw IoError("kqsvd::io::AtomicFileWriter::" + std::string(operation) + ": '" + target_path_ +
                    "': an earlier write failed; the output is incomplete");
    }
  }

  // The name is hidden, tied to the target for anyone who finds a leftover, and random so that concurrent
  // writers (threads or processes) never share a temporary; O_EXCL makes a collision an error, not a race.
  void open_temporary() {
    const std::string prefix =
        detail::directory_of(target_path_) + "/." + detail::file_name_of(target_path_) + ".tmp-";
    std::random_device entropy;
    std::mt19937_64 generator((static_cast<std::uint64_t>(entropy()) << 32) ^ entropy() ^
                              static_cast<std::uint64_t>(::getpid()));
    constexpr int attempts = 64;
    for (int attempt = 0; attempt < attempts; ++attempt) {
      std::ostringstream name;
      name << prefix << ::getpid() << '-' << std::hex << generator();
      const std::string candidate = name.str();
      const int fd = ::open(candidate.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      if (fd >= 0) {
        fd_ = fd;
        temporary_path_ = candidate;
        return;
      }
      if (errno != EEXIST) {
        throw IoError(message("cannot be written: cannot create a temporary file in '" +
                              detail::directory_of(target_path_) + "': " + detail::describe_errno(errno)));
      }
    }
    throw IoError(message("cannot be written: no unused temporary file name after 64 attempts"));
  }

  void link_without_replacing() {
    if (::link(temporary_path_.c_str(), target_path_.c_str()) == 0) {
      ::unlink(temporary_path_.c_str());
      return;
    }
    const int link_error = errno;
    if (link_error == EEXIST) {
      failed_ = true;
      throw IoError(message("already exists (it appeared while being written) and overwriting was not requested"));
    }
    // File systems without hard links (FAT, some FUSE mounts): check, then rename. Not atomic against a
    // target created in between, which is the best such a file system allows.
    const bool no_hard_links = link_error == EPERM || link_error == ENOTSUP || link_error == ENOSYS ||
                               link_error == EMLINK || link_error == EXDEV;
    if (!no_hard_links) {
      failed_ = true;
      throw IoError(message("cannot be created: " + detail::describe_errno(link_error)));
    }
    if (detail::path_exists(target_path_)) {
      failed_ = true;
      throw IoError(message("already exists (it appeared while being written) and overwriting was not requested"));
    }
    if (::rename(temporary_path_.c_str(), target_path_.c_str()) != 0) {
      failed_ = true;
      throw IoError(message("cannot rename '" + temporary_path_ + "' to it: " + detail::describe_errno(errno)));
    }
  }

  std::string target_path_;
  std::string temporary_path_;
  bool overwrite_;
  int fd_ = -1;
  bool committed_ = false;
  bool failed_ = false;
};

}  // namespace kqsvd::io
