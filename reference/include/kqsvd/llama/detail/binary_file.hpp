// kqsvd/llama/detail/binary_file.hpp -- bounds-checked reading of little-endian llama2.c files.
//
// llama2.c writes raw little-endian int32 and float32 with no framing, so every read must be checked
// against the bytes actually left: a short file must become a FormatError naming the file and what was
// being read, never a silently zero-filled tensor.
#pragma once

#include <sys/stat.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <utility>

#include "kqsvd/core/error.hpp"

namespace kqsvd::detail {

inline bool host_is_little_endian() {
  const std::uint32_t probe = 1;
  unsigned char first_byte = 0;
  std::memcpy(&first_byte, &probe, 1);
  return first_byte == 1;
}

inline void reverse_bytes_of_each_word(char* data, std::size_t words) {
  for (std::size_t i = 0; i < words; ++i) {
    char* word = data + 4 * i;
    std::swap(word[0], word[3]);
    std::swap(word[1], word[2]);
  }
}

// A read-only file with a cursor. `owner` (e.g. "kqsvd::llama::Checkpoint::load") prefixes every message.
class BinaryFile {
 public:
  BinaryFile(std::string path, std::string owner) : path_(std::move(path)), owner_(std::move(owner)) {
    // Opening a FIFO for reading blocks until a writer appears, and a directory "opens" and then fails
    // every read: refuse anything but a regular file first.
    struct stat status {};
    if (::stat(path_.c_str(), &status) == 0 && !S_ISREG(status.st_mode)) {
      throw IoError(owner_ + ": '" + path_ + "' is not a regular file");
    }
    stream_.open(path_, std::ios::binary);
    if (!stream_) throw IoError(owner_ + ": cannot open file '" + path_ + "'");
    stream_.seekg(0, std::ios::end);
    const std::streamoff end = stream_.tellg();
    stream_.seekg(0, std::ios::beg);
    if (end < 0 || !stream_) throw IoError(owner_ + ": cannot determine the size of file '" + path_ + "'");
    size_ = static_cast<std::uint64_t>(end);
  }

  const std::string& path() const { return path_; }
  std::uint64_t size() const { return size_; }
  std::uint64_t offset() const { return offset_; }
  std::uint64_t remaining() const { return size_ - offset_; }

  [[noreturn]] void fail(const std::string& problem) const {
    throw FormatError(owner_ + ": file '" + path_ + "' " + problem);
  }

  // `what` names the field in the error message, e.g. "the header" or "token 17".
  void read_bytes(char* destination, std::uint64_t count, const std::string& what) {
    if (count > remaining()) {
      fail("is truncated: " + what + " needs " + std::to_string(count) + " bytes at offset " + std::to_string(offset_) +
           ", only " + std::to_string(remaining()) + " remain");
    }
    if (count == 0) return;
    stream_.read(destination, static_cast<std::streamsize>(count));
    if (!stream_) throw IoError(owner_ + ": reading file '" + path_ + "' failed at offset " + std::to_string(offset_));
    offset_ += count;
  }

  // Reads `count` 4-byte words (int32 or float32) in host order.
  template <typename Word>
  void read_words(Word* destination, std::uint64_t count, const std::string& what) {
    static_assert(sizeof(Word) == 4, "llama2.c files hold 4-byte words only");
    if (count > remaining() / 4) {
      fail("is truncated: " + what + " needs " + std::to_string(count * 4) + " bytes at offset " +
           std::to_string(offset_) + ", only " + std::to_string(remaining()) + " remain");
    }
    char* bytes = reinterpret_cast<char*>(destination);
    read_bytes(bytes, 4 * count, what);
    if (!host_is_little_endian()) reverse_bytes_of_each_word(bytes, count);
  }

  std::int32_t read_int32(const std::string& what) {
    std::int32_t value = 0;
    read_words(&value, 1, what);
    return value;
  }

  float read_float(const std::string& what) {
    float value = 0;
    read_words(&value, 1, what);
    return value;
  }

  void skip(std::uint64_t count, const std::string& what) {
    if (count > remaining()) {
      fail("is truncated: " + what + " needs " + std::to_string(count) + " bytes at offset " + std::to_string(offset_) +
           ", only " + std::to_string(remaining()) + " remain");
    }
    offset_ += count;
    stream_.seekg(static_cast<std::streamoff>(offset_), std::ios::beg);
  }

 private:
  std::string path_;
  std::string owner_;
  std::ifstream stream_;
  std::uint64_t size_ = 0;
  std::uint64_t offset_ = 0;
};

}  // namespace kqsvd::detail
