// fuzz/fuzz_entry_points.hpp -- what every fuzz target does with one input, shared by the libFuzzer
// targets (fuzz/fuzz_*.cpp) and the regression replay in the test suite (tests/test_fuzz_regressions.cpp).
//
// The readers take paths, so run() writes the input bytes to a scratch file and hands its path to
// every public entry point of one reader, touching every value of an accepted file. The contract under
// test: a file is either accepted -- and then what the reader returns is consistent (element counts
// match shapes, slices match whole-tensor reads, the llama2.c loaders return only finite weights) -- or
// rejected with a subclass of kqsvd::Error. Any other exception (std::bad_alloc, a JSON library
// exception, std::logic_error from a broken invariant below) escapes run(); the fuzzers turn it into a
// crash and the test suite into a failure. Memory errors, undefined behaviour, leaks, hangs and
// oversized allocations are the sanitizers' and libFuzzer's to report.
//
//   const kqsvd::fuzz::Outcome outcome = kqsvd::fuzz::run(kqsvd::fuzz::Target::npy, bytes, size);
//   if (!outcome.accepted) std::cout << outcome.error << '\n';   // the kqsvd::Error message
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kqsvd/core/error.hpp"
#include "kqsvd/io/npy.hpp"
#include "kqsvd/io/safetensors.hpp"
#include "kqsvd/llama/checkpoint.hpp"
#include "kqsvd/llama/tokenizer.hpp"

namespace kqsvd::fuzz {

enum class Target { safetensors, npy, llama_checkpoint, llama_tokenizer };

inline constexpr std::array<Target, 4> all_targets = {Target::safetensors, Target::npy, Target::llama_checkpoint,
                                                      Target::llama_tokenizer};

// The target's name: fuzz/fuzz_<name>.cpp, fuzz/corpus/<name>/, fuzz/regressions/<name>/.
inline const char* name(Target target) {
  switch (target) {
    case Target::safetensors: return "safetensors";
    case Target::npy: return "npy";
    case Target::llama_checkpoint: return "llama_checkpoint";
    case Target::llama_tokenizer: return "llama_tokenizer";
  }
  return "unknown";
}

struct Outcome {
  bool accepted = false;
  std::string error;  // what() of the kqsvd::Error that rejected the file, when !accepted
};

namespace checks {

// A broken promise of a reader that did not crash: reported as a non-kqsvd exception so that it escapes.
[[noreturn]] inline void invariant_failed(const std::string& what) {
  throw std::logic_error("kqsvd fuzz invariant broken: " + what);
}

// The directory for scratch files: $TMPDIR if set, else /dev/shm (memory: a disk-backed /tmp makes
// every input cost milliseconds of file-system work), else /tmp.
inline std::string scratch_directory() {
  const char* directory = std::getenv("TMPDIR");
  if (directory != nullptr && *directory != '\0') return directory;
  struct stat status {};
  if (::stat("/dev/shm", &status) == 0 && S_ISDIR(status.st_mode) && ::access("/dev/shm", W_OK) == 0) return "/dev/shm";
  return "/tmp";
}

// One file per process, rewritten for every input. Deleted at exit.
class ScratchFile {
 public:
  ScratchFile() {
    std::string pattern = scratch_directory() + "/kqsvd-fuzz-XXXXXX";
    std::vector<char> buffer(pattern.begin(), pattern.end());
    buffer.push_back('\0');
    fd_ = ::mkstemp(buffer.data());
    if (fd_ < 0) throw std::runtime_error("kqsvd fuzz: cannot create a scratch file from " + pattern);
    path_ = buffer.data();
  }
  ~ScratchFile() {
    ::close(fd_);
    ::unlink(path_.c_str());
  }
  ScratchFile(const ScratchFile&) = delete;
  ScratchFile& operator=(const ScratchFile&) = delete;

  const std::string& path() const { return path_; }

  void assign(const std::uint8_t* data, std::size_t size) {
    if (::ftruncate(fd_, 0) != 0) throw std::runtime_error("kqsvd fuzz: cannot truncate " + path_);
    std::size_t done = 0;
    while (done < size) {
      const ssize_t written = ::pwrite(fd_, data + done, size - done, static_cast<off_t>(done));
      if (written < 0 && errno == EINTR) continue;
      if (written <= 0) throw std::runtime_error("kqsvd fuzz: cannot write " + path_);
      done += static_cast<std::size_t>(written);
    }
  }

 private:
  int fd_ = -1;
  std::string path_;
};

inline ScratchFile& scratch_file() {
  static ScratchFile file;
  return file;
}

// Float values decoded to float and to double agree: static_cast<float>(double) is the same rounding.
inline bool same_value(float as_float, double as_double) {
  const float narrowed = static_cast<float>(as_double);
  if (std::isnan(as_float) || std::isnan(narrowed)) return std::isnan(as_float) && std::isnan(narrowed);
  return std::memcmp(&as_float, &narrowed, sizeof as_float) == 0;
}

// Calls f(); a kqsvd::Error is an acceptable answer to a hostile request and is swallowed.
template <typename Function>
void tolerating_errors(Function f) {
  try {
    f();
  } catch (const kqsvd::Error&) {
  }
}

}  // namespace checks

// Opens the file, then reads every tensor both ways (whole, and as the first and last matrix of its
// leading axes), as float and double, allowing and rejecting non-finite values.
inline void read_safetensors(const std::string& path) {
  const io::SafetensorsFile file(path);
  if (file.names().size() != file.size()) checks::invariant_failed("names() and size() disagree");
  for (const std::string& tensor : file.names()) {
    const io::TensorInfo& info = file.info(tensor);
    const std::vector<float> as_float = file.read<float>(tensor, io::NonFinite::allow);
    const std::vector<double> as_double = file.read<double>(tensor, io::NonFinite::allow);
    if (as_float.size() != info.element_count || as_double.size() != info.element_count) {
      checks::invariant_failed("tensor '" + tensor + "' read a number of elements other than its shape's");
    }
    for (std::size_t i = 0; i < as_float.size(); ++i) {
      if (!checks::same_value(as_float[i], as_double[i])) {
        checks::invariant_failed("tensor '" + tensor + "' element " + std::to_string(i) + " differs as float and double");
      }
    }
    checks::tolerating_errors([&] { (void)file.read<float>(tensor, io::NonFinite::reject); });
    checks::tolerating_errors([&] { (void)file.read<double>(tensor, io::NonFinite::reject); });

    const std::size_t rank = info.shape.size();
    // Too few or too many leading indices are the caller's mistake: InvalidArgument, never a crash.
    checks::tolerating_errors([&] { (void)file.read_matrix<float>(tensor, std::vector<std::int64_t>(rank + 1, 0)); });
    checks::tolerating_errors([&] { (void)file.read_matrix<float>(tensor, {-1}); });
    if (rank < 2) continue;
    std::vector<std::int64_t> first(rank - 2, 0), last(rank - 2, 0), past(rank - 2, 0);
    for (std::size_t axis = 0; axis + 2 < rank; ++axis) {
      last[axis] = info.shape[axis] - 1;
      past[axis] = info.shape[axis];
    }
    checks::tolerating_errors([&] { (void)file.read_matrix<double>(tensor, past); });
    const std::int64_t rows = info.shape[rank - 2], cols = info.shape[rank - 1];
    for (const std::vector<std::int64_t>* leading : {&first, &last}) {
      std::uint64_t matrix_index = 0;
      bool in_range = true;
      for (std::size_t axis = 0; axis + 2 < rank; ++axis) {
        in_range = in_range && (*leading)[axis] >= 0 && (*leading)[axis] < info.shape[axis];
        matrix_index = matrix_index * static_cast<std::uint64_t>(info.shape[axis]) +
                       static_cast<std::uint64_t>(std::max<std::int64_t>((*leading)[axis], 0));
      }
      if (!in_range) continue;  // a leading axis of length 0: there is no matrix to read
      const RowMatrix<float> matrix = file.read_matrix<float>(tensor, *leading);
      if (matrix.rows() != rows || matrix.cols() != cols) {
        checks::invariant_failed("tensor '" + tensor + "' read_matrix returned the wrong shape");
      }
      const std::uint64_t offset = matrix_index * static_cast<std::uint64_t>(rows * cols);
      for (Eigen::Index k = 0; k < matrix.size(); ++k) {
        if (!checks::same_value(matrix.data()[k], as_double[offset + static_cast<std::uint64_t>(k)])) {
          checks::invariant_failed("tensor '" + tensor + "' read_matrix disagrees with read");
        }
      }
      checks::tolerating_errors([&] { (void)file.read_matrix<double>(tensor, *leading, io::NonFinite::reject); });
    }
  }
}

// Reads the array as float and as double, and as a matrix.
inline void read_npy(const std::string& path) {
  const io::NpyArray<double> as_double = io::read_npy<double>(path);
  const io::NpyArray<float> as_float = io::read_npy<float>(path);
  const auto count = detail::element_count(as_double.shape);
  if (!count || as_double.values.size() != *count || as_float.values.size() != *count) {
    checks::invariant_failed("read_npy returned a number of elements other than its shape's");
  }
  if (as_float.shape != as_double.shape || as_float.fortran_order != as_double.fortran_order) {
    checks::invariant_failed("read_npy<float> and read_npy<double> disagree on the header");
  }
  for (std::size_t i = 0; i < as_float.values.size(); ++i) {
    if (!checks::same_value(as_float.values[i], as_double.values[i])) {
      checks::invariant_failed("element " + std::to_string(i) + " differs as float and double");
    }
  }
  checks::tolerating_errors([&] {
    const RowMatrix<double> matrix = io::read_npy_matrix<double>(path);
    if (static_cast<std::uint64_t>(matrix.size()) != *count) {
      checks::invariant_failed("read_npy_matrix returned a number of elements other than the shape's");
    }
  });
}

// Loads the model and checks every tensor's shape against the header and that every weight is finite.
inline void read_llama_checkpoint(const std::string& path) {
  const llama::Checkpoint checkpoint = llama::Checkpoint::load(path);
  const llama::Config& c = checkpoint.config();
  const auto check = [](const auto& tensor, Eigen::Index rows, Eigen::Index cols, const char* what) {
    if (tensor.rows() != rows || tensor.cols() != cols) checks::invariant_failed(std::string(what) + " has the wrong shape");
    if (!tensor.allFinite()) checks::invariant_failed(std::string(what) + " holds a non-finite weight");
  };
  check(checkpoint.token_embedding(), c.vocab_size, c.dim, "token_embedding");
  check(checkpoint.classifier(), c.vocab_size, c.dim, "classifier");
  check(checkpoint.final_norm(), c.dim, 1, "final_norm");
  if (static_cast<Eigen::Index>(checkpoint.layers().size()) != c.n_layers) checks::invariant_failed("layer count");
  for (Eigen::Index l = 0; l < c.n_layers; ++l) {
    const llama::LayerWeights& w = checkpoint.layer(l);
    check(w.attention_norm, c.dim, 1, "attention_norm");
    check(w.wq, c.dim, c.dim, "wq");
    check(w.wk, c.kv_dim(), c.dim, "wk");
    check(w.wv, c.kv_dim(), c.dim, "wv");
    check(w.wo, c.dim, c.dim, "wo");
    check(w.ffn_norm, c.dim, 1, "ffn_norm");
    check(w.w1, c.hidden_dim, c.dim, "w1");
    check(w.w2, c.dim, c.hidden_dim, "w2");
    check(w.w3, c.hidden_dim, c.dim, "w3");
  }
  checks::tolerating_errors([&] { (void)checkpoint.layer(c.n_layers); });
  checks::tolerating_errors([&] { (void)checkpoint.layer(-1); });
}

// Loads the vocabulary both ways (to the end of the file, and with the count it holds), then encodes
// a text with multi-byte and unknown code points and decodes the tokens.
inline void read_llama_tokenizer(const std::string& path) {
  const llama::Tokenizer tokenizer = llama::Tokenizer::load(path);
  const llama::Tokenizer::Index vocab = tokenizer.vocab_size();
  const llama::Tokenizer counted = llama::Tokenizer::load(path, vocab);
  if (counted.vocab_size() != vocab) checks::invariant_failed("the two loads disagree on the vocabulary size");
  checks::tolerating_errors([&] { (void)llama::Tokenizer::load(path, vocab + 1); });
  const std::string text = "Once upon a time, a l\xC3\xB6we saw \xE6\xBC\xA2\xE5\xAD\x97 <0x41> \xFF\x80\x80\x80\x80!";
  const std::vector<int> tokens = tokenizer.encode(text, true, true);
  for (const int token : tokens) {
    if (token < 0 || token >= vocab) checks::invariant_failed("encode() produced a token id outside the vocabulary");
  }
  (void)tokenizer.decode(tokens);
  checks::tolerating_errors([&] { (void)tokenizer.piece(static_cast<int>(vocab)); });
  checks::tolerating_errors([&] { (void)tokenizer.decode(-1, 3); });
}

// Reads `path` with the target's reader; kqsvd::Error means rejected, anything else propagates.
inline Outcome read_file(Target target, const std::string& path) {
  Outcome outcome;
  try {
    switch (target) {
      case Target::safetensors: read_safetensors(path); break;
      case Target::npy: read_npy(path); break;
      case Target::llama_checkpoint: read_llama_checkpoint(path); break;
      case Target::llama_tokenizer: read_llama_tokenizer(path); break;
    }
    outcome.accepted = true;
  } catch (const kqsvd::Error& error) {
    outcome.error = error.what();
    if (outcome.error.empty()) checks::invariant_failed("a kqsvd::Error with an empty message");
  }
  return outcome;
}

// The fuzz entry point: the bytes become a file, which read_file() reads.
inline Outcome run(Target target, const std::uint8_t* data, std::size_t size) {
  checks::ScratchFile& file = checks::scratch_file();
  file.assign(data, size);
  return read_file(target, file.path());
}

}  // namespace kqsvd::fuzz
