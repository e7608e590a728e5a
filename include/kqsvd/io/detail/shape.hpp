// kqsvd/io/detail/shape.hpp -- overflow-safe arithmetic on tensor shapes read from untrusted files.
//
// Every dimension and offset in a file is attacker-controlled; these helpers compute element counts and
// byte sizes without wrapping around, so that a forged shape is reported instead of turning into a small
// allocation followed by an out-of-bounds read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace kqsvd::detail {

inline std::optional<std::uint64_t> checked_multiply(std::uint64_t a, std::uint64_t b) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return std::nullopt;
  return a * b;
}

inline std::optional<std::uint64_t> checked_add(std::uint64_t a, std::uint64_t b) {
  if (b > std::numeric_limits<std::uint64_t>::max() - a) return std::nullopt;
  return a + b;
}

// Number of elements, or nullopt if a dimension is negative or the product does not fit in int64 (and
// hence in Eigen::Index and std::ptrdiff_t on 64-bit hosts).
inline std::optional<std::uint64_t> element_count(const std::vector<std::int64_t>& shape) {
  std::uint64_t count = 1;
  for (const std::int64_t dimension : shape) {
    if (dimension < 0) return std::nullopt;
    const auto product = checked_multiply(count, static_cast<std::uint64_t>(dimension));
    if (!product || *product > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      return std::nullopt;
    }
    count = *product;
  }
  return count;
}

// Byte size of `count` elements of `element_bytes` each, or nullopt if it does not fit in size_t.
inline std::optional<std::size_t> byte_size(std::uint64_t count, std::size_t element_bytes) {
  const auto bytes = checked_multiply(count, element_bytes);
  if (!bytes || *bytes > std::numeric_limits<std::size_t>::max()) return std::nullopt;
  return static_cast<std::size_t>(*bytes);
}

// "[2, 3, 4]", the way error messages spell shapes and element positions.
inline std::string format_shape(const std::vector<std::int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < shape.size(); ++i) out << (i == 0 ? "" : ", ") << shape[i];
  out << ']';
  return out.str();
}

// The multi-index of position `flat` in a C-order (row-major) array of this shape.
inline std::vector<std::int64_t> unravel_index(std::uint64_t flat, const std::vector<std::int64_t>& shape) {
  std::vector<std::int64_t> index(shape.size(), 0);
  for (std::size_t axis = shape.size(); axis-- > 0;) {
    const auto extent = static_cast<std::uint64_t>(shape[axis]);
    if (extent == 0) break;
    index[axis] = static_cast<std::int64_t>(flat % extent);
    flat /= extent;
  }
  return index;
}

}  // namespace kqsvd::detail
