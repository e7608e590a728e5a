// kqsvd/io/npy.hpp -- read and write NumPy .npy files of float16, float32 and float64 arrays.
//
// A .npy file is the magic string "\x93NUMPY", a format version (1.0, 2.0 or 3.0), the length of the
// header (2 bytes little-endian in 1.0, 4 bytes in 2.0 and 3.0), the header -- a Python dict literal
//   {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
// padded with spaces and a newline -- and the raw elements, in C or Fortran order.
//
//   kqsvd::io::RowMatrix<double> gram = kqsvd::io::read_npy_matrix<double>("gram.npy");
//   kqsvd::io::NpyArray<float> keys = kqsvd::io::read_npy<float>("keys.npy");   // any rank
//   kqsvd::io::write_npy("projection.npy", gram, kqsvd::io::DType::f32);        // numpy.load() reads it
//
// Readers always return elements in C (row-major) order, reordering Fortran-order files, so that code
// which ignores NpyArray::fortran_order is still correct. Only little-endian floats ('<f2', '<f4',
// '<f8') are read; big-endian, integer, object and structured dtypes throw FormatError ("unsupported
// dtype"), as does any malformed file, with a message naming the file and the problem. The writer emits
// the same bytes numpy.save() does for the same array (format 1.0, or 2.0 when the header needs it).
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kqsvd/core/error.hpp"
#include "kqsvd/io/atomic_file.hpp"
#include "kqsvd/io/detail/file_contents.hpp"
#include "kqsvd/io/detail/shape.hpp"
#include "kqsvd/io/dtype.hpp"

namespace kqsvd::io {

template <class Scalar>
struct NpyArray {
  DType dtype = DType::f64;  // how the file stores the elements
  std::vector<std::int64_t> shape;
  bool fortran_order = false;  // how the file lays them out; `values` is in C order either way
  std::vector<Scalar> values;  // C (row-major) order: the last index varies fastest
};

}  // namespace kqsvd::io

namespace kqsvd::detail {

constexpr char npy_magic[] = "\x93NUMPY";
constexpr std::size_t npy_magic_size = 6;

struct NpyHeader {
  std::string descr;
  bool fortran_order = false;
  std::vector<std::int64_t> shape;
};

// Parses the header dict. It is a Python literal, not JSON (single quotes, True/False, tuples), and
// numpy.save() writes a very regular one, so this accepts exactly the three keys NumPy requires, with
// string, boolean and tuple-of-integers values, and rejects everything else with the reason.
class NpyHeaderParser {
 public:
  NpyHeaderParser(std::string_view text, std::string error_prefix)
      : text_(text), error_prefix_(std::move(error_prefix)) {}

  NpyHeader parse() {
    NpyHeader header;
    bool seen_descr = false, seen_fortran_order = false, seen_shape = false;
    skip_space();
    expect('{', "the header is not a Python dict: expected '{'");
    skip_space();
    while (!at('}')) {
      const std::string key = parse_string("a key");
      skip_space();
      expect(':', "expected ':' after key '" + key + "'");
      skip_space();
      if (key == "descr") {
        mark_seen(seen_descr, key);
        if (at('[') || at('{')) fail("unsupported dtype: structured (record) arrays are not supported");
        if (!at('\'') && !at('"')) fail("the value of 'descr' is not a string");
        header.descr = parse_string("the value of 'descr'");
      } else if (key == "fortran_order") {
        mark_seen(seen_fortran_order, key);
        header.fortran_order = parse_bool();
      } else if (key == "shape") {
        mark_seen(seen_shape, key);
        header.shape = parse_shape();
      } else {
        fail("unexpected key '" + key + "' (a .npy header has exactly 'descr', 'fortran_order' and 'shape')");
      }
      skip_space();
      if (at(',')) {
        ++position_;
        skip_space();
      } else if (!at('}')) {
        fail("expected ',' or '}' after the value of '" + key + "'");
      }
    }
    ++position_;
    skip_space();
    if (position_ != text_.size()) fail("unexpected text after the closing '}'");
    if (!seen_descr) fail("missing key 'descr'");
    if (!seen_fortran_order) fail("missing key 'fortran_order'");
    if (!seen_shape) fail("missing key 'shape'");
    return header;
  }

 private:
  [[noreturn]] void fail(const std::string& problem) const {
    constexpr std::size_t shown = 120;
    std::string_view visible = text_.substr(0, shown);
    while (!visible.empty() && (visible.back() == ' ' || visible.back() == '\n')) visible.remove_suffix(1);
    std::string excerpt;
    for (const char c : visible) excerpt += (c >= ' ' && c <= '~') ? c : '?';
    if (text_.size() > shown) excerpt += "...";
    throw FormatError(error_prefix_ + "cannot parse the header: " + problem + " at character " +
                      std::to_string(position_) + " of \"" + excerpt + "\"");
  }

  bool at(char c) const { return position_ < text_.size() && text_[position_] == c; }

  void expect(char c, const std::string& problem) {
    if (!at(c)) fail(problem);
    ++position_;
  }

  void skip_space() {
    while (position_ < text_.size() &&
           (text_[position_] == ' ' || text_[position_] == '\t' || text_[position_] == '\n' || text_[position_] == '\r')) {
      ++position_;
    }
  }

  void mark_seen(bool& seen, const std::string& key) {
    if (seen) fail("duplicate key '" + key + "'");
    seen = true;
  }

  std::string parse_string(const std::string& what) {
    if (!at('\'') && !at('"')) fail("expected " + what + " as a quoted string");
    const char quote = text_[position_++];
    std::string value;
    while (true) {
      if (position_ >= text_.size() || text_[position_] == '\n') fail("unterminated string");
      const char c = text_[position_++];
      if (c == quote) return value;
      if (c == '\\') fail("escape sequences are not supported in header strings");
      value += c;
    }
  }

  bool parse_bool() {
    if (text_.substr(position_, 4) == "True") {
      position_ += 4;
      return true;
    }
    if (text_.substr(position_, 5) == "False") {
      position_ += 5;
      return false;
    }
    fail("the value of 'fortran_order' must be True or False");
  }

  std::int64_t parse_dimension() {
    const bool negative = at('-');
    if (negative) ++position_;
    if (position_ >= text_.size() || text_[position_] < '0' || text_[position_] > '9') {
      fail("expected an integer in 'shape'");
    }
    std::uint64_t value = 0;
    bool too_large = false;
    while (position_ < text_.size() && text_[position_] >= '0' && text_[position_] <= '9') {
      const auto digit = static_cast<std::uint64_t>(text_[position_++] - '0');
      if (value > (static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) - digit) / 10) {
        too_large = true;
      } else {
        value = value * 10 + digit;
      }
    }
    if (at('L')) ++position_;  // Python 2 long literals, as old NumPy wrote them: (3L, 4L)
    if (negative) fail("'shape' has a negative dimension");
    if (too_large) fail("'shape' has a dimension too large for 64 bits");
    return static_cast<std::int64_t>(value);
  }

  std::vector<std::int64_t> parse_shape() {
    if (!at('(')) fail("the value of 'shape' is not a tuple");
    ++position_;
    skip_space();
    std::vector<std::int64_t> shape;
    bool comma_seen = false;
    while (!at(')')) {
      shape.push_back(parse_dimension());
      skip_space();
      if (at(')')) break;
      expect(',', "expected ',' or ')' in 'shape'");
      comma_seen = true;
      skip_space();
    }
    ++position_;
    // In Python "(3)" is the integer 3, not a tuple; NumPy rejects it, and so does kqsvd.
    if (shape.size() == 1 && !comma_seen) fail("the value of 'shape' is not a tuple (a 1-d shape is written (n,))");
    return shape;
  }

  std::string_view text_;
  std::string error_prefix_;
  std::size_t position_ = 0;
};

// Calls visit(c_index, fortran_index) for every element of an array of this shape, in C order: the
// correspondence between the two layouts, for any rank.
template <class Visit>
void for_each_fortran_index(const std::vector<std::int64_t>& shape, std::uint64_t count, Visit visit) {
  if (count == 0) return;
  const std::size_t rank = shape.size();
  std::vector<std::uint64_t> fortran_stride(rank);
  std::uint64_t stride = 1;
  for (std::size_t axis = 0; axis < rank; ++axis) {
    fortran_stride[axis] = stride;
    stride *= static_cast<std::uint64_t>(shape[axis]);
  }
  std::vector<std::int64_t> index(rank, 0);
  std::uint64_t fortran_index = 0;
  for (std::uint64_t c_index = 0; c_index < count; ++c_index) {
    visit(c_index, fortran_index);
    for (std::size_t axis = rank; axis-- > 0;) {
      if (++index[axis] < shape[axis]) {
        fortran_index += fortran_stride[axis];
        break;
      }
      fortran_index -= static_cast<std::uint64_t>(shape[axis] - 1) * fortran_stride[axis];
      index[axis] = 0;
    }
  }
}

inline std::string npy_dict_text(const char* descr, bool fortran_order, const std::vector<std::int64_t>& shape) {
  std::string shape_text = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) shape_text += (i == 0 ? "" : ", ") + std::to_string(shape[i]);
  if (shape.size() == 1) shape_text += ',';
  shape_text += ')';
  std::string text = std::string("{'descr': '") + descr + "', 'fortran_order': " + (fortran_order ? "True" : "False") +
                     ", 'shape': " + shape_text + ", }";
  // numpy.save() leaves room for the growing axis to reach 21 digits, so that appending to an array can
  // rewrite the header in place; matching it makes the files byte-identical.
  constexpr std::size_t growth_axis_max_digits = 21;
  if (!shape.empty()) {
    const std::size_t digits = std::to_string(fortran_order ? shape.back() : shape.front()).size();
    if (digits < growth_axis_max_digits) text.append(growth_axis_max_digits - digits, ' ');
  }
  return text;
}

// Magic, version, header length and the header padded with spaces and a newline so that the data starts
// on a 64-byte boundary, as numpy.save() writes it: version 1.0 unless the header needs more than 65535
// bytes.
inline std::string npy_preamble(const char* descr, bool fortran_order, const std::vector<std::int64_t>& shape) {
  constexpr std::size_t alignment = 64;
  const std::string dict = npy_dict_text(descr, fortran_order, shape);
  for (const int major : {1, 2}) {
    const std::size_t length_bytes = major == 1 ? 2 : 4;
    const std::size_t unpadded = npy_magic_size + 2 + length_bytes + dict.size() + 1;
    const std::size_t padding = alignment - unpadded % alignment;
    const std::size_t header_length = dict.size() + padding + 1;
    if (major == 1 && header_length > 0xFFFF) continue;
    std::string preamble(npy_magic, npy_magic_size);
    preamble += static_cast<char>(major);
    preamble += '\0';
    unsigned char length[4];
    store_little_endian(static_cast<std::uint32_t>(header_length), length);
    preamble.append(reinterpret_cast<const char*>(length), length_bytes);
    preamble += dict;
    preamble.append(padding, ' ');
    preamble += '\n';
    return preamble;
  }
  throw InvalidArgument("kqsvd::io::write_npy: the header for shape " + format_shape(shape) + " is too long");
}

}  // namespace kqsvd::detail

namespace kqsvd::io {

// Reads any array of '<f2', '<f4' or '<f8' elements, converting them to Scalar (float or double).
template <class Scalar>
NpyArray<Scalar> read_npy(const std::string& path) {
  static_assert(detail::is_io_scalar<Scalar>, "kqsvd::io::read_npy converts to float or double");
  const std::string prefix = "kqsvd::io::read_npy: '" + path + "': ";
  const detail::FileContents contents(path, "kqsvd::io::read_npy");
  const unsigned char* bytes = contents.data();
  const std::size_t size = contents.size();

  const std::size_t magic_checked = std::min(size, detail::npy_magic_size);
  if (magic_checked > 0 && std::memcmp(bytes, detail::npy_magic, magic_checked) != 0) {
    throw FormatError(prefix + "bad magic: the file does not start with \"\\x93NUMPY\"; not a .npy file");
  }
  if (size < detail::npy_magic_size + 2) {
    throw FormatError(prefix + "truncated: the file is " + std::to_string(size) +
                      " bytes long and ends before the format version");
  }
  const int major = bytes[6];
  const int minor = bytes[7];
  if (minor != 0 || major < 1 || major > 3) {
    throw FormatError(prefix + "unsupported .npy format version " + std::to_string(major) + "." +
                      std::to_string(minor) + " (kqsvd reads 1.0, 2.0 and 3.0)");
  }
  const std::size_t length_bytes = major == 1 ? 2 : 4;
  const std::size_t header_start = detail::npy_magic_size + 2 + length_bytes;
  if (size < header_start) {
    throw FormatError(prefix + "truncated: the file is " + std::to_string(size) +
                      " bytes long and ends inside the header length");
  }
  const std::size_t header_length = major == 1 ? detail::load_little_endian<std::uint16_t>(bytes + 8)
                                               : detail::load_little_endian<std::uint32_t>(bytes + 8);
  if (header_length > size - header_start) {
    throw FormatError(prefix + "the header length " + std::to_string(header_length) +
                      " extends past the end of the file (" + std::to_string(size) + " bytes)");
  }
  const std::string_view header_text(reinterpret_cast<const char*>(bytes + header_start), header_length);
  const detail::NpyHeader header = detail::NpyHeaderParser(header_text, prefix).parse();

  const auto dtype = parse_numpy_descr(header.descr);
  if (!dtype) {
    const bool big_endian = !header.descr.empty() && header.descr.front() == '>';
    throw FormatError(prefix + "unsupported dtype '" + header.descr + "'" +
                      (big_endian ? ": big-endian data is not supported" : "") +
                      " (kqsvd reads '<f2', '<f4' and '<f8')");
  }
  const auto count = detail::element_count(header.shape);
  const auto needed = count ? detail::checked_multiply(*count, element_size(*dtype)) : std::nullopt;
  if (!needed) {
    throw FormatError(prefix + "shape " + detail::format_shape(header.shape) + " has more elements than fit in 64 bits");
  }
  const std::size_t data_start = header_start + header_length;
  const std::size_t available = size - data_start;
  if (available != *needed) {
    throw FormatError(prefix + (available < *needed ? "truncated data: " : "trailing bytes after the data: ") +
                      "shape " + detail::format_shape(header.shape) + " of '" + header.descr + "' needs " +
                      std::to_string(*needed) + " bytes, the file has " + std::to_string(available));
  }

  NpyArray<Scalar> array;
  array.dtype = *dtype;
  array.shape = header.shape;
  array.fortran_order = header.fortran_order;
  array.values.resize(static_cast<std::size_t>(*count));
  if (header.fortran_order && header.shape.size() > 1) {
    std::vector<Scalar> file_order(array.values.size());
    decode(*dtype, bytes + data_start, file_order.size(), file_order.data());
    detail::for_each_fortran_index(header.shape, *count, [&](std::uint64_t c_index, std::uint64_t fortran_index) {
      array.values[c_index] = file_order[fortran_index];
    });
  } else {
    decode(*dtype, bytes + data_start, array.values.size(), array.values.data());
  }
  return array;
}

// A 2-d array as a rows x cols matrix, a 1-d array of length n as an n x 1 column. Other ranks throw
// InvalidArgument: the file is fine, it is just not a matrix.
template <class Scalar>
RowMatrix<Scalar> read_npy_matrix(const std::string& path) {
  NpyArray<Scalar> array = read_npy<Scalar>(path);
  const std::size_t rank = array.shape.size();
  if (rank != 1 && rank != 2) {
    throw InvalidArgument("kqsvd::io::read_npy_matrix: '" + path + "' holds an array of shape " +
                          detail::format_shape(array.shape) + "; a matrix needs rank 1 or 2");
  }
  const Eigen::Index rows = array.shape[0];
  const Eigen::Index cols = rank == 2 ? array.shape[1] : 1;
  return Eigen::Map<const RowMatrix<Scalar>>(array.values.data(), rows, cols);
}

// Writes data[0..count), the elements of an array of this shape in C (row-major) order, as `dtype`
// ('<f2', '<f4' or '<f8'; NumPy has no bf16). fortran_order picks the layout in the file, not the
// order of `data`.
template <class Scalar>
void write_npy(const std::string& path, const std::vector<std::int64_t>& shape, const Scalar* data,
               std::size_t count, DType dtype, bool fortran_order = false, bool overwrite = false) {
  static_assert(detail::is_io_scalar<Scalar>, "kqsvd::io::write_npy takes float or double data");
  const auto elements = detail::element_count(shape);
  if (!elements) {
    throw InvalidArgument("kqsvd::io::write_npy: argument 'shape' " + detail::format_shape(shape) +
                          " has a negative dimension or too many elements");
  }
  if (*elements != count) {
    throw InvalidArgument("kqsvd::io::write_npy: argument 'shape' " + detail::format_shape(shape) + " has " +
                          std::to_string(*elements) + " elements but the data has " + std::to_string(count));
  }
  const std::string preamble = detail::npy_preamble(numpy_descr(dtype), fortran_order, shape);

  std::vector<Scalar> reordered;
  const Scalar* file_order = data;
  if (fortran_order && shape.size() > 1) {
    reordered.resize(count);
    detail::for_each_fortran_index(shape, count, [&](std::uint64_t c_index, std::uint64_t fortran_index) {
      reordered[fortran_index] = data[c_index];
    });
    file_order = reordered.data();
  }

  AtomicFileWriter out(path, overwrite);
  out.write(preamble);
  // Converting in chunks bounds the extra memory whatever the array's size.
  constexpr std::size_t chunk = 1 << 16;
  std::vector<unsigned char> encoded(std::min(count, chunk) * element_size(dtype));
  for (std::size_t first = 0; first < count; first += chunk) {
    const std::size_t n = std::min(chunk, count - first);
    encode(dtype, file_order + first, n, encoded.data());
    out.write(encoded.data(), n * element_size(dtype));
  }
  out.commit();
}

// Writes a matrix as a 2-d array of shape (rows, cols), whatever its storage order in memory.
template <class Derived>
void write_npy(const std::string& path, const Eigen::DenseBase<Derived>& matrix, DType dtype,
               bool fortran_order = false, bool overwrite = false) {
  using Scalar = typename Derived::Scalar;
  static_assert(detail::is_io_scalar<Scalar>, "kqsvd::io::write_npy takes float or double data");
  const RowMatrix<Scalar> row_major = matrix.derived();
  write_npy(path, {static_cast<std::int64_t>(row_major.rows()), static_cast<std::int64_t>(row_major.cols())},
            row_major.data(), static_cast<std::size_t>(row_major.size()), dtype, fortran_order, overwrite);
}

}  // namespace kqsvd::io
