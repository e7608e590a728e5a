// kqsvd/io/safetensors.hpp -- read and write safetensors files, the tensor container of Hugging Face.
//
// A safetensors file is an 8-byte little-endian header length N, N bytes of JSON describing every tensor
//   {"__metadata__": {"model": "llama-3.2-1b"},
//    "layers.0.k": {"dtype": "F16", "shape": [1, 8, 512, 64], "data_offsets": [0, 524288]}, ...}
// and then the data buffer, which the tensors tile exactly: offsets are relative to the buffer's start,
// and the format forbids gaps, overlaps and trailing bytes.
//
// SafetensorsFile maps the file and validates the whole header when it is opened, so that every later
// read is in bounds. A malformed file throws kqsvd::FormatError naming the file, the tensor and the
// problem; asking for a tensor that is not there, or an index out of range, throws InvalidArgument.
// Reading is const and touches no shared state, so threads may read tensors of one file concurrently.
//
//   kqsvd::io::SafetensorsFile cache("kv.safetensors");
//   // layers.0.k has shape [batch, heads, T, d]; this is the T x d matrix of sequence 0, head 3.
//   kqsvd::io::RowMatrix<float> keys = cache.read_matrix<float>("layers.0.k", {0, 3});
//   std::string model = cache.metadata().at("model");
//
//   kqsvd::io::SafetensorsWriter out;
//   out.add("keys", kqsvd::io::DType::bf16, keys);   // shape [T, d], rounded to bf16
//   out.set_metadata("model", model);
//   out.write("keys.safetensors", /*overwrite=*/true);
//
// Only the floating-point dtypes F16, BF16, F32 and F64 are supported; a file holding any other dtype
// (I64, BOOL, F8_E4M3, ...) is rejected when opened, with a message naming the tensor and its dtype.
#pragma once

#include <nlohmann/json.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kqsvd/core/error.hpp"
#include "kqsvd/io/atomic_file.hpp"
#include "kqsvd/io/detail/file_contents.hpp"
#include "kqsvd/io/detail/shape.hpp"
#include "kqsvd/io/dtype.hpp"

namespace kqsvd::io {

// What a read does with a NaN or infinity among the values.
enum class NonFinite { allow, reject };

// Bounds on what a header may declare, so that a hostile file cannot make the parser allocate without
// limit. The defaults are those of the reference implementation.
struct SafetensorsLimits {
  std::uint64_t max_header_bytes = 100'000'000;
  std::size_t max_tensors = 1'000'000;
};

struct TensorInfo {
  DType dtype = DType::f32;
  std::vector<std::int64_t> shape;
  std::uint64_t element_count = 0;
  // The tensor's bytes are [data_begin, data_end) of the data buffer, which starts after the header.
  std::uint64_t data_begin = 0;
  std::uint64_t data_end = 0;
};

}  // namespace kqsvd::io

namespace kqsvd::detail {

// Dtypes the safetensors format defines but kqsvd does not read, to tell "unsupported" from "corrupt".
inline bool is_other_safetensors_dtype(const std::string& name) {
  static const char* const others[] = {"BOOL", "U8",      "I8",      "U16",     "I16",    "U32",     "I32",
                                       "U64",  "I64",     "F8_E5M2", "F8_E4M3", "F8_E8M0", "F4",     "F6_E2M3",
                                       "F6_E3M2", "C64"};
  return std::find(std::begin(others), std::end(others), name) != std::end(others);
}

inline bool is_valid_utf8(const std::string& text) {
  try {
    (void)nlohmann::json(text).dump();
    return true;
  } catch (const nlohmann::json::exception&) {
    return false;
  }
}

}  // namespace kqsvd::detail

namespace kqsvd::io {

class SafetensorsFile {
 public:
  explicit SafetensorsFile(std::string path, SafetensorsLimits limits = {})
      : path_(std::move(path)), contents_(path_, "kqsvd::io::SafetensorsFile") {
    parse_header(limits);
  }

  const std::string& path() const { return path_; }

  // The "__metadata__" map, empty if the file has none.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Tensor names in the order their data appears in the file (ties between empty tensors by name).
  const std::vector<std::string>& names() const { return names_; }

  std::size_t size() const { return tensors_.size(); }

  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }

  const TensorInfo& info(const std::string& name) const { return find(name, "info"); }

  // All elements of a tensor in C (row-major) order, converted to Scalar (float or double). Converting
  // F64 data to float rounds, and values beyond float's range become infinite -- which
  // NonFinite::reject reports as a NumericalError, while a NaN or infinity stored in the file is a
  // FormatError naming the element.
  template <class Scalar>
  std::vector<Scalar> read(const std::string& name, NonFinite policy = NonFinite::allow) const {
    static_assert(detail::is_io_scalar<Scalar>, "kqsvd::io::SafetensorsFile::read converts to float or double");
    const TensorInfo& tensor = find(name, "read");
    std::vector<Scalar> values(static_cast<std::size_t>(tensor.element_count));
    decode(tensor.dtype, buffer_ + tensor.data_begin, values.size(), values.data());
    if (policy == NonFinite::reject) require_finite(name, tensor, values.data(), values.size(), 0);
    return values;
  }

  // The matrix formed by the last two axes of a tensor of rank k >= 2 once the first k - 2 indices are
  // fixed to `leading`: for "layers.0.k" of shape [batch, heads, T, d], read_matrix<float>("layers.0.k",
  // {b, h}) is the T x d keys of sequence b, head h. A rank-2 tensor takes no leading indices.
  template <class Scalar>
  RowMatrix<Scalar> read_matrix(const std::string& name, const std::vector<std::int64_t>& leading = {},
                                     NonFinite policy = NonFinite::allow) const {
    static_assert(detail::is_io_scalar<Scalar>,
                  "kqsvd::io::SafetensorsFile::read_matrix converts to float or double");
    const char* const function = "kqsvd::io::SafetensorsFile::read_matrix";
    const TensorInfo& tensor = find(name, "read_matrix");
    const std::size_t rank = tensor.shape.size();
    if (rank < 2) {
      throw InvalidArgument(std::string(function) + ": tensor '" + name + "' in '" + path_ + "' has shape " +
                            detail::format_shape(tensor.shape) + ", rank " + std::to_string(rank) +
                            "; a matrix needs rank 2 or more");
    }
    if (leading.size() != rank - 2) {
      throw InvalidArgument(std::string(function) + ": tensor '" + name + "' in '" + path_ + "' has shape " +
                            detail::format_shape(tensor.shape) + ", so argument 'leading' needs " +
                            std::to_string(rank - 2) + " indices, got " + std::to_string(leading.size()));
    }
    std::uint64_t first_matrix = 0;  // index of the selected matrix among all rows x cols matrices
    for (std::size_t axis = 0; axis + 2 < rank; ++axis) {
      if (leading[axis] < 0 || leading[axis] >= tensor.shape[axis]) {
        throw InvalidArgument(std::string(function) + ": tensor '" + name + "' in '" + path_ + "' has shape " +
                              detail::format_shape(tensor.shape) + "; argument 'leading' index " +
                              std::to_string(leading[axis]) + " for axis " + std::to_string(axis) +
                              " is out of range [0, " + std::to_string(tensor.shape[axis]) + ")");
      }
      // Cannot overflow: the product of the dimensions was checked when the file was opened.
      first_matrix = first_matrix * static_cast<std::uint64_t>(tensor.shape[axis]) +
                     static_cast<std::uint64_t>(leading[axis]);
    }
    const std::int64_t rows = tensor.shape[rank - 2];
    const std::int64_t cols = tensor.shape[rank - 1];
    const std::uint64_t first_element = first_matrix * static_cast<std::uint64_t>(rows * cols);
    RowMatrix<Scalar> matrix(rows, cols);
    decode(tensor.dtype, buffer_ + tensor.data_begin + first_element * element_size(tensor.dtype),
           static_cast<std::size_t>(matrix.size()), matrix.data());
    if (policy == NonFinite::reject) {
      require_finite(name, tensor, matrix.data(), static_cast<std::size_t>(matrix.size()), first_element);
    }
    return matrix;
  }

 private:
  [[noreturn]] void fail(const std::string& problem) const {
    throw FormatError("kqsvd::io::SafetensorsFile: '" + path_ + "': " + problem);
  }

  [[noreturn]] void fail(const std::string& tensor, const std::string& problem) const {
    fail("tensor '" + tensor + "' " + problem);
  }

  const TensorInfo& find(const std::string& name, const char* method) const {
    const auto found = tensors_.find(name);
    if (found == tensors_.end()) {
      throw InvalidArgument("kqsvd::io::SafetensorsFile::" + std::string(method) + ": '" + path_ +
                            "' has no tensor named '" + name + "'");
    }
    return found->second;
  }

  template <class Scalar>
  void require_finite(const std::string& name, const TensorInfo& tensor, const Scalar* values, std::size_t count,
                      std::uint64_t first_element) const {
    for (std::size_t i = 0; i < count; ++i) {
      if (std::isfinite(values[i])) continue;
      const std::uint64_t flat = first_element + i;
      double stored = 0;
      decode(tensor.dtype, buffer_ + tensor.data_begin + flat * element_size(tensor.dtype), 1, &stored);
      std::ostringstream where;
      where << "at flat index " << flat << " (element " << detail::format_shape(detail::unravel_index(flat, tensor.shape))
            << " of shape " << detail::format_shape(tensor.shape) << ")";
      if (std::isfinite(stored)) {
        std::ostringstream value;
        value.precision(17);
        value << stored;
        throw NumericalError("kqsvd::io::SafetensorsFile: '" + path_ + "': tensor '" + name + "' value " +
                             value.str() + " " + where.str() + " is out of range for float");
      }
      std::ostringstream value;
      value << stored;
      fail(name, "holds a non-finite value (" + value.str() + ") " + where.str());
    }
  }

  // Rejects duplicate keys at any depth (the JSON grammar allows them, and a parser silently keeping one
  // of two "layers.0.k" entries is how two tools come to disagree about a file) and stops counting
  // tensors at the limit rather than after building the whole tree.
  nlohmann::json parse_json(const unsigned char* first, const unsigned char* last, std::size_t max_tensors) const {
    std::vector<std::set<std::string>> open_objects;
    std::size_t top_level_keys = 0;
    const auto check = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
      using Event = nlohmann::json::parse_event_t;
      if (event == Event::object_start) {
        open_objects.emplace_back();
      } else if (event == Event::object_end) {
        open_objects.pop_back();
      } else if (event == Event::key) {
        const auto& key = parsed.get_ref<const std::string&>();
        if (!open_objects.back().insert(key).second) fail("header has duplicate key '" + key + "'");
        // One more than the limit: "__metadata__" is not a tensor.
        if (depth == 1 && ++top_level_keys > max_tensors + 1) {
          fail("header lists more than " + std::to_string(max_tensors) + " tensors, the limit");
        }
      }
      return true;
    };
    try {
      return nlohmann::json::parse(first, last, check);
    } catch (const nlohmann::json::exception& error) {
      fail(std::string("header is not valid JSON: ") + error.what());
    }
  }

  void parse_header(const SafetensorsLimits& limits) {
    constexpr std::uint64_t length_bytes = 8;
    const std::uint64_t file_size = contents_.size();
    if (file_size < length_bytes) {
      fail("is " + std::to_string(file_size) +
           " bytes long, shorter than the 8-byte header length that starts a safetensors file");
    }
    const auto header_size = detail::load_little_endian<std::uint64_t>(contents_.data());
    if (header_size > limits.max_header_bytes) {
      fail("declares a " + std::to_string(header_size) + "-byte header, more than the limit of " +
           std::to_string(limits.max_header_bytes) + " bytes (is this a safetensors file?)");
    }
    if (header_size > file_size - length_bytes) {
      fail("declares a " + std::to_string(header_size) + "-byte header, which extends past the end of the file (" +
           std::to_string(file_size) + " bytes)");
    }
    const unsigned char* header = contents_.data() + length_bytes;
    buffer_ = header + header_size;
    buffer_size_ = file_size - length_bytes - header_size;

    const nlohmann::json root = parse_json(header, header + header_size, limits.max_tensors);
    if (!root.is_object()) fail("header is not a JSON object");

    for (const auto& [name, entry] : root.items()) {
      if (name == "__metadata__") {
        parse_metadata(entry);
      } else {
        tensors_.emplace(name, parse_tensor(name, entry));
      }
    }
    check_layout();
  }

  void parse_metadata(const nlohmann::json& entry) {
    if (!entry.is_object()) fail("'__metadata__' is not a JSON object of strings");
    for (const auto& [key, value] : entry.items()) {
      if (!value.is_string()) fail("'__metadata__' entry '" + key + "' is not a string");
      metadata_.emplace(key, value.get<std::string>());
    }
  }

  // A non-negative JSON integer that fits in int64, or a FormatError naming the field.
  std::uint64_t parse_count(const std::string& tensor, const char* field, const nlohmann::json& value) const {
    if (value.is_number_unsigned()) {
      const auto count = value.get<std::uint64_t>();
      if (count > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
        fail(tensor, std::string("has an out-of-range '") + field + "' entry " + std::to_string(count));
      }
      return count;
    }
    if (value.is_number_integer()) {
      fail(tensor, std::string("has a negative '") + field + "' entry " + value.dump());
    }
    fail(tensor, std::string("has a '") + field + "' entry that is not an integer: " + value.dump());
  }

  const nlohmann::json& field(const std::string& tensor, const nlohmann::json& entry, const char* key) const {
    const auto found = entry.find(key);
    if (found == entry.end()) fail(tensor, std::string("has no '") + key + "' field");
    return *found;
  }

  TensorInfo parse_tensor(const std::string& name, const nlohmann::json& entry) const {
    if (!entry.is_object()) fail(name, "is described by " + std::string(entry.type_name()) + ", not a JSON object");
    TensorInfo tensor;

    const nlohmann::json& dtype = field(name, entry, "dtype");
    if (!dtype.is_string()) fail(name, "has a 'dtype' that is not a string: " + dtype.dump());
    const auto& dtype_name = dtype.get_ref<const std::string&>();
    const auto parsed_dtype = parse_safetensors_dtype(dtype_name);
    if (!parsed_dtype) {
      if (detail::is_other_safetensors_dtype(dtype_name)) {
        fail(name, "has unsupported dtype '" + dtype_name + "' (kqsvd reads F16, BF16, F32 and F64)");
      }
      fail(name, "has unknown dtype '" + dtype_name + "'");
    }
    tensor.dtype = *parsed_dtype;

    const nlohmann::json& shape = field(name, entry, "shape");
    if (!shape.is_array()) fail(name, "has a 'shape' that is not an array: " + shape.dump());
    for (const auto& dimension : shape) {
      tensor.shape.push_back(static_cast<std::int64_t>(parse_count(name, "shape", dimension)));
    }
    const auto count = detail::element_count(tensor.shape);
    if (!count) fail(name, "has shape " + detail::format_shape(tensor.shape) + " with more elements than fit in 64 bits");
    tensor.element_count = *count;

    const nlohmann::json& offsets = field(name, entry, "data_offsets");
    if (!offsets.is_array() || offsets.size() != 2) {
      fail(name, "has 'data_offsets' " + offsets.dump() + ", expected [begin, end]");
    }
    tensor.data_begin = parse_count(name, "data_offsets", offsets[0]);
    tensor.data_end = parse_count(name, "data_offsets", offsets[1]);
    const std::string range = "[" + std::to_string(tensor.data_begin) + ", " + std::to_string(tensor.data_end) + "]";
    if (tensor.data_begin > tensor.data_end) fail(name, "has 'data_offsets' " + range + " with begin > end");
    if (tensor.data_end > buffer_size_) {
      fail(name, "has 'data_offsets' " + range + " beyond the end of the data buffer (" +
                     std::to_string(buffer_size_) + " bytes)");
    }
    const auto bytes = detail::checked_multiply(tensor.element_count, element_size(tensor.dtype));
    if (!bytes || *bytes != tensor.data_end - tensor.data_begin) {
      fail(name, "has 'data_offsets' " + range + " spanning " + std::to_string(tensor.data_end - tensor.data_begin) +
                     " bytes, but shape " + detail::format_shape(tensor.shape) + " of " + dtype_name + " needs " +
                     (bytes ? std::to_string(*bytes) : std::string("more than 2^64")) + " bytes");
    }
    return tensor;
  }

  // The spec requires the tensors to tile the data buffer: no overlap (two names for the same bytes), no
  // gaps and no trailing bytes (room to hide a second file in, a "polyglot").
  void check_layout() {
    std::vector<std::pair<const std::string*, const TensorInfo*>> by_offset;
    by_offset.reserve(tensors_.size());
    for (const auto& [name, tensor] : tensors_) by_offset.emplace_back(&name, &tensor);
    std::sort(by_offset.begin(), by_offset.end(), [](const auto& a, const auto& b) {
      return std::tie(a.second->data_begin, a.second->data_end, *a.first) <
             std::tie(b.second->data_begin, b.second->data_end, *b.first);
    });
    std::uint64_t covered = 0;
    const std::string* previous = nullptr;
    for (const auto& [name, tensor] : by_offset) {
      if (tensor->data_begin < covered) {
        fail("tensors '" + *previous + "' and '" + *name + "' overlap: '" + *name + "' starts at byte " +
             std::to_string(tensor->data_begin) + " of the data buffer, before '" + *previous + "' ends at byte " +
             std::to_string(covered));
      }
      if (tensor->data_begin > covered) {
        fail("bytes [" + std::to_string(covered) + ", " + std::to_string(tensor->data_begin) +
             ") of the data buffer belong to no tensor (the format allows no gaps); the next tensor is '" + *name +
             "'");
      }
      if (tensor->data_end > covered) {
        covered = tensor->data_end;
        previous = name;
      }
      names_.push_back(*name);
    }
    if (covered != buffer_size_) {
      fail("the data buffer has " + std::to_string(buffer_size_ - covered) +
           " trailing bytes after the last tensor that belong to no tensor");
    }
  }

  std::string path_;
  detail::FileContents contents_;
  const unsigned char* buffer_ = nullptr;
  std::uint64_t buffer_size_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::vector<std::string> names_;
  std::map<std::string, std::string> metadata_;
};

class SafetensorsWriter {
 public:
  // Adds a tensor of the given shape whose elements, in C (row-major) order, are data[0..count).
  template <class Scalar>
  void add(const std::string& name, DType storage, const std::vector<std::int64_t>& shape, const Scalar* data,
           std::size_t count) {
    static_assert(detail::is_io_scalar<Scalar>, "kqsvd::io::SafetensorsWriter::add takes float or double data");
    check_name(name);
    const auto elements = detail::element_count(shape);
    if (!elements) {
      throw InvalidArgument("kqsvd::io::SafetensorsWriter::add: tensor '" + name + "': argument 'shape' " +
                            detail::format_shape(shape) + " has a negative dimension or too many elements");
    }
    if (*elements != count) {
      throw InvalidArgument("kqsvd::io::SafetensorsWriter::add: tensor '" + name + "': argument 'shape' " +
                            detail::format_shape(shape) + " has " + std::to_string(*elements) +
                            " elements but the data has " + std::to_string(count));
    }
    const auto bytes = detail::byte_size(count, element_size(storage));
    if (!bytes) {
      throw InvalidArgument("kqsvd::io::SafetensorsWriter::add: tensor '" + name + "' is too large for memory");
    }
    PendingTensor tensor{name, storage, shape, std::vector<unsigned char>(*bytes)};
    encode(storage, data, count, tensor.bytes.data());
    tensors_.push_back(std::move(tensor));
    names_.insert(name);
  }

  template <class Scalar>
  void add(const std::string& name, DType storage, const std::vector<std::int64_t>& shape,
           const std::vector<Scalar>& values) {
    add(name, storage, shape, values.data(), values.size());
  }

  // A matrix as a [rows, cols] tensor, whatever its storage order in memory.
  template <class Derived>
  void add(const std::string& name, DType storage, const Eigen::DenseBase<Derived>& matrix) {
    add(name, storage, {static_cast<std::int64_t>(matrix.rows()), static_cast<std::int64_t>(matrix.cols())}, matrix);
  }

  // Matrix entries taken in row-major order as the elements of a tensor of any shape, e.g. a T x d
  // matrix stored as [1, 1, T, d].
  template <class Derived>
  void add(const std::string& name, DType storage, const std::vector<std::int64_t>& shape,
           const Eigen::DenseBase<Derived>& values) {
    using Scalar = typename Derived::Scalar;
    static_assert(detail::is_io_scalar<Scalar>, "kqsvd::io::SafetensorsWriter::add takes float or double data");
    const RowMatrix<Scalar> row_major = values.derived();
    add(name, storage, shape, row_major.data(), static_cast<std::size_t>(row_major.size()));
  }

  // Sets (or replaces) one "__metadata__" entry.
  void set_metadata(const std::string& key, const std::string& value) {
    if (!detail::is_valid_utf8(key) || !detail::is_valid_utf8(value)) {
      throw InvalidArgument("kqsvd::io::SafetensorsWriter::set_metadata: key '" + key +
                            "' or its value is not valid UTF-8, which JSON requires");
    }
    const auto existing = std::find_if(metadata_.begin(), metadata_.end(),
                                       [&](const auto& entry) { return entry.first == key; });
    if (existing != metadata_.end()) {
      existing->second = value;
    } else {
      metadata_.emplace_back(key, value);
    }
  }

  std::size_t size() const { return tensors_.size(); }
  bool contains(const std::string& name) const { return names_.count(name) != 0; }

  // Writes the metadata first, then the tensors in the order they were added, data contiguous in that
  // order; the header is padded with spaces to a multiple of 8 bytes, as the reference implementation
  // does, so that the data buffer starts 8-byte aligned.
  void write(const std::string& path, bool overwrite = false) const {
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata_.empty()) {
      nlohmann::ordered_json metadata = nlohmann::ordered_json::object();
      for (const auto& [key, value] : metadata_) metadata[key] = value;
      header["__metadata__"] = std::move(metadata);
    }
    std::uint64_t offset = 0;
    for (const PendingTensor& tensor : tensors_) {
      nlohmann::ordered_json entry = nlohmann::ordered_json::object();
      entry["dtype"] = safetensors_name(tensor.dtype);
      entry["shape"] = tensor.shape;
      entry["data_offsets"] = {offset, offset + tensor.bytes.size()};
      header[tensor.name] = std::move(entry);
      offset += tensor.bytes.size();
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    unsigned char length[8];
    detail::store_little_endian<std::uint64_t>(text.size(), length);

    AtomicFileWriter out(path, overwrite);
    out.write(length, sizeof length);
    out.write(text);
    for (const PendingTensor& tensor : tensors_) out.write(tensor.bytes.data(), tensor.bytes.size());
    out.commit();
  }

 private:
  struct PendingTensor {
    std::string name;
    DType dtype;
    std::vector<std::int64_t> shape;
    std::vector<unsigned char> bytes;  // already in the storage dtype
  };

  void check_name(const std::string& name) const {
    const std::string function = "kqsvd::io::SafetensorsWriter::add";
    if (name.empty()) throw InvalidArgument(function + ": argument 'name' is empty");
    if (name.rfind("__", 0) == 0) {
      throw InvalidArgument(function + ": tensor name '" + name +
                            "' starts with \"__\", which the format reserves (\"__metadata__\")");
    }
    if (names_.count(name) != 0) throw InvalidArgument(function + ": tensor '" + name + "' was already added");
    if (!detail::is_valid_utf8(name)) {
      throw InvalidArgument(function + ": tensor name '" + name + "' is not valid UTF-8, which JSON requires");
    }
  }

  std::vector<PendingTensor> tensors_;
  std::set<std::string> names_;
  std::vector<std::pair<std::string, std::string>> metadata_;  // in the order first set
};

}  // namespace kqsvd::io
