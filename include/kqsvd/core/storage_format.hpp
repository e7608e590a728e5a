// kqsvd/core/storage_format.hpp -- how a cache stores each row of keys or values (full rows or latents),
// and what that costs in bytes.
//
//   format      per element                                   per group of elements        bits/element
//   f32         float32                                                                     32
//   f16, bf16   IEEE binary16, bfloat16                                                     16
//   fp8_e4m3    OCP E4M3 (saturating at 448)                                                8
//   fp8_e5m2    OCP E5M2 (saturating at 57344)                                              8
//   int8        int8 code, x = s * c                          the row: float16 scale s     8 + 16 / width
//   q8_0        llama.cpp q8_0: int8, x = d * c               32 elements: float16 d        8.5
//   q4_0        llama.cpp q4_0: 4-bit, x = d * (c - 8)        32 elements: float16 d        4.5
//   int4/B      asymmetric 4-bit, x = m + s * c (KIVI, Palu)  B elements: float16 s and m   4 + 32 / B
//   int2/B      asymmetric 2-bit, x = m + s * c               B elements: float16 s and m   2 + 32 / B
// q8_0 and q4_0 round exactly as ggml's reference quantizers (quantize_row_q8_0_ref,
// quantize_row_q4_0_ref): encode_row() gives the bytes of ggml's blocks. int4 and int2 take a block size
// B (default 32, written "int4/64"); every block format needs a row width its block size divides.
//
//   kqsvd::StorageFormat format = kqsvd::StorageFormat::parse("q4_0");
//   format.bytes_per_row(128);                 // 72: four blocks of 18 bytes
//   format.bits_per_element(128);              // 4.5
//   std::vector<std::uint8_t> bytes = kqsvd::encode_row(format, row);   // row: 1 x 128 floats
//   Eigen::RowVectorXf back = kqsvd::decode_row(format, bytes, 128);
//   kqsvd::RowMatrix<float> stored = kqsvd::round_trip(format, latents);   // n x 128, as the cache holds them
//
// Bad input is refused, never stored wrong: a non-finite value is an InvalidArgument naming it; a value
// beyond a format's range saturates where the format says so (fp8) and is otherwise an InvalidArgument
// (f16 and bf16 beyond their largest finite value, a scale beyond float16's range).
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "kqsvd/core/detail/float_conversion.hpp"
#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/error.hpp"
#include "kqsvd/core/matrix.hpp"

namespace kqsvd {

enum class StorageKind { f32, f16, bf16, fp8_e4m3, fp8_e5m2, int8, q8_0, q4_0, int4, int2 };

inline constexpr std::array<StorageKind, 10> all_storage_kinds = {
    StorageKind::f32,  StorageKind::f16,  StorageKind::bf16, StorageKind::fp8_e4m3, StorageKind::fp8_e5m2,
    StorageKind::int8, StorageKind::q8_0, StorageKind::q4_0, StorageKind::int4,     StorageKind::int2};

inline const char* to_string(StorageKind kind) {
  switch (kind) {
    case StorageKind::f32: return "f32";
    case StorageKind::f16: return "f16";
    case StorageKind::bf16: return "bf16";
    case StorageKind::fp8_e4m3: return "fp8_e4m3";
    case StorageKind::fp8_e5m2: return "fp8_e5m2";
    case StorageKind::int8: return "int8";
    case StorageKind::q8_0: return "q8_0";
    case StorageKind::q4_0: return "q4_0";
    case StorageKind::int4: return "int4";
    case StorageKind::int2: return "int2";
  }
  return "unknown";
}

class StorageFormat {
 public:
  using Index = Eigen::Index;

  // The block size of int4 and int2 when none is given.
  static constexpr Index default_block = 32;
  // The block of llama.cpp's q8_0 and q4_0 (QK8_0, QK4_0).
  static constexpr Index ggml_block = 32;

  // float32, the default.
  StorageFormat() : StorageFormat(StorageKind::f32) {}

  // `block`: elements per scale for int4 and int2 (0: default_block); must be 0 for the other kinds.
  explicit StorageFormat(StorageKind kind, Index block = 0) : kind_(kind), block_(block) {
    if (is_asymmetric()) {
      if (block_ == 0) block_ = default_block;
      if (block_ < 4 || block_ % 4 != 0) {
        detail::throw_invalid("kqsvd::StorageFormat", "block",
                              "must be a positive multiple of 4 for " + std::string(to_string(kind)) + ", got " +
                                  std::to_string(block));
      }
    } else if (block_ != 0) {
      detail::throw_invalid("kqsvd::StorageFormat", "block",
                            "is only for int4 and int2, got " + std::to_string(block) + " for " + to_string(kind));
    }
  }

  // "f32", "f16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8", "q8_0", "q4_0", "int4", "int2", and "int4/B",
  // "int2/B" with a block size.
  static StorageFormat parse(const std::string& name) {
    const std::size_t slash = name.find('/');
    const std::string base = name.substr(0, slash);
    for (const StorageKind kind : all_storage_kinds) {
      if (base != to_string(kind)) continue;
      if (slash == std::string::npos) return StorageFormat(kind);
      const std::string digits = name.substr(slash + 1);
      const bool numeric = !digits.empty() && digits.size() <= 6 &&
                           std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; });
      if (!numeric || (kind != StorageKind::int4 && kind != StorageKind::int2)) break;
      const long block = std::stol(digits);
      if (block == 0) detail::throw_invalid("kqsvd::StorageFormat", "block", "must be a positive multiple of 4 for " + base + ", got 0");
      return StorageFormat(kind, block);
    }
    throw InvalidArgument("kqsvd::StorageFormat::parse: unknown storage format '" + name +
                          "' (expected f32, f16, bf16, fp8_e4m3, fp8_e5m2, int8, q8_0, q4_0, int4, int2, "
                          "or int4/B, int2/B with a block size B)");
  }

  StorageKind kind() const { return kind_; }
  // The name parse() reads back: "int4/64" when the block is not the default.
  std::string name() const {
    std::string text = to_string(kind_);
    if (is_asymmetric() && block_ != default_block) text += "/" + std::to_string(block_);
    return text;
  }

  // Bits of one element's code: 32, 16, 8, 4 or 2.
  int code_bits() const {
    switch (kind_) {
      case StorageKind::f32: return 32;
      case StorageKind::f16:
      case StorageKind::bf16: return 16;
      case StorageKind::q4_0:
      case StorageKind::int4: return 4;
      case StorageKind::int2: return 2;
      default: return 8;
    }
  }
  // Whether groups of elements share a float16 scale, and (asymmetric formats) a float16 minimum.
  bool has_scale() const {
    return kind_ == StorageKind::int8 || kind_ == StorageKind::q8_0 || kind_ == StorageKind::q4_0 || is_asymmetric();
  }
  bool has_minimum() const { return is_asymmetric(); }
  bool is_asymmetric() const { return kind_ == StorageKind::int4 || kind_ == StorageKind::int2; }

  // Elements per scale group in a row of `width`: the block of q8_0, q4_0, int4 and int2, the whole row
  // for int8 (one scale per token) and for the unscaled formats.
  Index group_size(Index width) const {
    if (kind_ == StorageKind::q8_0 || kind_ == StorageKind::q4_0) return ggml_block;
    if (is_asymmetric()) return block_;
    return width;
  }

  // The widths the format holds are the multiples of this: the block of q8_0, q4_0, int4 and int2,
  // 1 for the others.
  Index width_multiple() const {
    if (kind_ == StorageKind::q8_0 || kind_ == StorageKind::q4_0) return ggml_block;
    return is_asymmetric() ? block_ : 1;
  }

  // Throws InvalidArgument naming `function` and `argument` unless rows of `width` can be stored.
  void require_width(const char* function, const char* argument, Index width) const {
    if (width <= 0) detail::throw_invalid(function, argument, "must be positive, got " + std::to_string(width));
    const Index group = group_size(width);
    if (width % group != 0) {
      detail::throw_invalid(function, argument,
                            "is " + std::to_string(width) + ", which " + name() + " cannot hold: its blocks of " +
                                std::to_string(group) + " elements must divide the row width");
    }
  }

  // Exact bytes of one stored row of `width` elements: codes, scales and minimums.
  Index bytes_per_row(Index width) const {
    require_width("kqsvd::StorageFormat::bytes_per_row", "width", width);
    const Index groups = width / group_size(width);
    const Index side_bytes = (has_scale() ? 2 : 0) + (has_minimum() ? 2 : 0);
    return width * code_bits() / 8 + groups * side_bytes;
  }

  double bits_per_element(Index width) const {
    return 8.0 * static_cast<double>(bytes_per_row(width)) / static_cast<double>(width);
  }

  friend bool operator==(const StorageFormat& a, const StorageFormat& b) {
    return a.kind_ == b.kind_ && a.block_ == b.block_;
  }
  friend bool operator!=(const StorageFormat& a, const StorageFormat& b) { return !(a == b); }

 private:
  StorageKind kind_;
  Index block_;
};

namespace detail {

// One group of elements quantized: a code per element (int8 codes as their two's-complement byte) and
// the group's float16 scale and minimum bits (0 where the format has none).
struct QuantizedGroup {
  std::uint16_t scale = 0;
  std::uint16_t minimum = 0;
};

// Names the first entry of `values` (count elements of a row of `width`, starting at `first`) that is
// not finite, or that is beyond `limit` in magnitude, as the message of an InvalidArgument.
inline void require_storable(const char* function, const char* argument, const float* values, Eigen::Index count,
                             Eigen::Index row, Eigen::Index first_column, float limit, const char* format_name) {
  for (Eigen::Index j = 0; j < count; ++j) {
    const float value = values[j];
    if (!std::isfinite(value)) {
      std::ostringstream out;
      out << "contains a non-finite value (" << value << ") at row " << row << ", column " << first_column + j;
      throw_invalid(function, argument, out.str());
    }
    if (!(std::fabs(value) < limit)) {
      std::ostringstream out;
      out << "has the value " << value << " at row " << row << ", column " << first_column + j
          << ", beyond the range of " << format_name;
      throw_invalid(function, argument, out.str());
    }
  }
}

// The float16 bits of a group's scale, or an InvalidArgument when it is beyond float16's range.
inline std::uint16_t scale_bits(const char* function, const char* argument, float scale, Eigen::Index row,
                                Eigen::Index first_column, const StorageFormat& format) {
  if (!(std::fabs(scale) < 65520.0f)) {
    std::ostringstream out;
    out << "needs a " << format.name() << " scale of " << scale << " for the group of row " << row
        << " starting at column " << first_column << ", beyond float16's range (values up to about "
        << (format.is_asymmetric() ? "65504" : "65504 x the largest code") << "); rescale the data";
    throw_invalid(function, argument, out.str());
  }
  return float_to_half_bits(scale);
}

// Quantizes `count` elements x[0..count) of one group into codes[0..count). `row` and `first_column`
// place the group in its caller's matrix for error messages. The float formats are element-wise: they
// ignore the group and write each element's bits (f32: 4 bytes, f16/bf16: 2, fp8: 1) into `codes`.
inline QuantizedGroup quantize_group(const char* function, const char* argument, const StorageFormat& format,
                                     const float* x, Eigen::Index count, std::uint8_t* codes, Eigen::Index row,
                                     Eigen::Index first_column) {
  QuantizedGroup group;
  const StorageKind kind = format.kind();
  const auto check = [&](float limit, const char* name) {
    require_storable(function, argument, x, count, row, first_column, limit, name);
  };
  switch (kind) {
    case StorageKind::f32:
      check(std::numeric_limits<float>::infinity(), "float32");
      std::memcpy(codes, x, static_cast<std::size_t>(count) * sizeof(float));
      return group;
    case StorageKind::f16:
      check(storage_overflow_threshold<Eigen::half>(), "float16");
      for (Eigen::Index j = 0; j < count; ++j) {
        const std::uint16_t bits = float_to_half_bits(x[j]);
        std::memcpy(codes + 2 * j, &bits, 2);
      }
      return group;
    case StorageKind::bf16:
      check(storage_overflow_threshold<Eigen::bfloat16>(), "bfloat16");
      for (Eigen::Index j = 0; j < count; ++j) {
        const std::uint16_t bits = float_to_bfloat16_bits(x[j]);
        std::memcpy(codes + 2 * j, &bits, 2);
      }
      return group;
    case StorageKind::fp8_e4m3:
    case StorageKind::fp8_e5m2: {
      check(std::numeric_limits<float>::infinity(), "float32");  // saturating: only non-finite is refused
      const Fp8 fp8 = kind == StorageKind::fp8_e4m3 ? Fp8::e4m3 : Fp8::e5m2;
      for (Eigen::Index j = 0; j < count; ++j) codes[j] = float_to_fp8(fp8, x[j]);
      return group;
    }
    case StorageKind::int8:
    case StorageKind::q8_0: {
      // ggml's quantize_row_q8_0_ref: d = amax / 127, codes round(x / d) through id = 1 / d, d stored as
      // float16. int8 is the same with the whole row as its group.
      check(std::numeric_limits<float>::infinity(), "float32");
      float amax = 0.0f;
      for (Eigen::Index j = 0; j < count; ++j) amax = std::max(amax, std::fabs(x[j]));
      const float d = amax / 127.0f;
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      group.scale = scale_bits(function, argument, d, row, first_column, format);
      for (Eigen::Index j = 0; j < count; ++j) {
        codes[j] = static_cast<std::uint8_t>(static_cast<std::int8_t>(std::round(x[j] * id)));
      }
      return group;
    }
    case StorageKind::q4_0: {
      // ggml's quantize_row_q4_0_ref: the signed value of largest magnitude (the first, on ties) sets
      // d = max / -8, and c = min(15, (int8_t)(x / d + 8.5)). The product is rounded to float before
      // the addition, as ggml's unfused float arithmetic does: computed in double (exact for a float
      // product) and narrowed, so that no compiler can fuse it into a multiply-add.
      check(std::numeric_limits<float>::infinity(), "float32");
      float amax = 0.0f, max = 0.0f;
      for (Eigen::Index j = 0; j < count; ++j) {
        if (amax < std::fabs(x[j])) {
          amax = std::fabs(x[j]);
          max = x[j];
        }
      }
      const float d = max / -8.0f;
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      group.scale = scale_bits(function, argument, d, row, first_column, format);
      for (Eigen::Index j = 0; j < count; ++j) {
        const auto scaled = static_cast<float>(static_cast<double>(x[j]) * static_cast<double>(id));
        codes[j] = static_cast<std::uint8_t>(std::min(15, static_cast<int>(static_cast<std::int8_t>(scaled + 8.5f))));
      }
      return group;
    }
    case StorageKind::int4:
    case StorageKind::int2: {
      // Asymmetric: the group's minimum m and step s = (max - m) / levels, both rounded to float16
      // first, so that the codes are chosen for the values that decoding will use.
      check(std::numeric_limits<float>::infinity(), "float32");
      const int levels = kind == StorageKind::int4 ? 15 : 3;
      const float low = *std::min_element(x, x + count);
      const float high = *std::max_element(x, x + count);
      group.minimum = scale_bits(function, argument, low, row, first_column, format);
      const float minimum = half_bits_to_float(group.minimum);
      group.scale = scale_bits(function, argument, (high - minimum) / static_cast<float>(levels), row, first_column,
                               format);
      const float scale = half_bits_to_float(group.scale);
      const float inverse = scale != 0.0f ? 1.0f / scale : 0.0f;
      for (Eigen::Index j = 0; j < count; ++j) {
        const float code = std::nearbyint((x[j] - minimum) * inverse);
        codes[j] = static_cast<std::uint8_t>(std::clamp(code, 0.0f, static_cast<float>(levels)));
      }
      return group;
    }
  }
  return group;
}

// The value of code `code` of a group with float16 `scale` and `minimum` (already as float): what a
// stored element means. Float formats do not come here.
inline float dequantize(StorageKind kind, std::uint8_t code, float scale, float minimum) {
  switch (kind) {
    case StorageKind::int8:
    case StorageKind::q8_0: return scale * static_cast<float>(static_cast<std::int8_t>(code));
    case StorageKind::q4_0: return scale * static_cast<float>(static_cast<int>(code) - 8);
    default: return minimum + scale * static_cast<float>(code);
  }
}

// Element j of a float-format row as stored at `codes` (the bytes quantize_group wrote).
inline float float_code_value(StorageKind kind, const std::uint8_t* codes, Eigen::Index j) {
  switch (kind) {
    case StorageKind::f32: {
      float value = 0.0f;
      std::memcpy(&value, codes + 4 * j, 4);
      return value;
    }
    case StorageKind::f16:
    case StorageKind::bf16: {
      std::uint16_t bits = 0;
      std::memcpy(&bits, codes + 2 * j, 2);
      return kind == StorageKind::f16 ? half_bits_to_float(bits) : bfloat16_bits_to_float(bits);
    }
    case StorageKind::fp8_e4m3: return fp8_table<Fp8::e4m3>.values[codes[j]];
    default: return fp8_table<Fp8::e5m2>.values[codes[j]];
  }
}

inline bool is_float_kind(StorageKind kind) {
  return kind == StorageKind::f32 || kind == StorageKind::f16 || kind == StorageKind::bf16 ||
         kind == StorageKind::fp8_e4m3 || kind == StorageKind::fp8_e5m2;
}

}  // namespace detail

// One row in the format's canonical bytes: for q8_0 and q4_0 exactly ggml's blocks (a float16 d, then 32
// int8 codes, or 16 bytes of nibbles, element j in the low and j + 16 in the high nibble); int8 a float16
// scale then the codes; int4/B and int2/B per block a float16 scale, a float16 minimum, then the codes
// packed low bits first (int4: element j and j + B/2 in a byte; int2: j, j + B/4, j + B/2, j + 3B/4);
// the float formats their little-endian elements. Multi-byte fields are little-endian.
template <typename Derived>
std::vector<std::uint8_t> encode_row(const StorageFormat& format, const Eigen::MatrixBase<Derived>& row) {
  constexpr const char* where = "kqsvd::encode_row";
  if (row.rows() != 1 && row.cols() != 1) {
    detail::throw_invalid(where, "row", "must be a vector, got " + detail::shape_string(row.rows(), row.cols()));
  }
  const Eigen::Index width = row.size();
  format.require_width(where, "row", width);
  const Eigen::VectorXf values = row.derived().reshaped().template cast<float>();
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(format.bytes_per_row(width)));
  const Eigen::Index group = format.group_size(width);
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(group) * 4);
  std::uint8_t* out = bytes.data();
  const int bits = format.code_bits();
  for (Eigen::Index first = 0; first < width; first += group) {
    const detail::QuantizedGroup quantized =
        detail::quantize_group(where, "row", format, values.data() + first, group, codes.data(), 0, first);
    if (format.has_scale()) {
      std::memcpy(out, &quantized.scale, 2);
      out += 2;
    }
    if (format.has_minimum()) {
      std::memcpy(out, &quantized.minimum, 2);
      out += 2;
    }
    if (bits >= 8) {
      const auto length = static_cast<std::size_t>(group * bits / 8);
      std::memcpy(out, codes.data(), length);
      out += length;
    } else {
      const Eigen::Index per_byte = 8 / bits, stride = group / per_byte;
      for (Eigen::Index k = 0; k < stride; ++k) {
        std::uint8_t packed = 0;
        for (Eigen::Index p = 0; p < per_byte; ++p) {
          packed = static_cast<std::uint8_t>(packed | (codes[static_cast<std::size_t>(k + p * stride)] << (p * bits)));
        }
        *out++ = packed;
      }
    }
  }
  return bytes;
}

// The values a row of canonical bytes (encode_row's) stands for.
inline Eigen::RowVectorXf decode_row(const StorageFormat& format, const std::vector<std::uint8_t>& bytes,
                                     Eigen::Index width) {
  constexpr const char* where = "kqsvd::decode_row";
  format.require_width(where, "width", width);
  if (static_cast<Eigen::Index>(bytes.size()) != format.bytes_per_row(width)) {
    detail::throw_invalid(where, "bytes",
                          "holds " + std::to_string(bytes.size()) + " bytes, a " + format.name() + " row of " +
                              std::to_string(width) + " elements has " + std::to_string(format.bytes_per_row(width)));
  }
  Eigen::RowVectorXf row(width);
  const Eigen::Index group = format.group_size(width);
  const std::uint8_t* in = bytes.data();
  const int bits = format.code_bits();
  for (Eigen::Index first = 0; first < width; first += group) {
    std::uint16_t scale_bits = 0, minimum_bits = 0;
    if (format.has_scale()) {
      std::memcpy(&scale_bits, in, 2);
      in += 2;
    }
    if (format.has_minimum()) {
      std::memcpy(&minimum_bits, in, 2);
      in += 2;
    }
    const float scale = detail::half_bits_to_float(scale_bits), minimum = detail::half_bits_to_float(minimum_bits);
    if (detail::is_float_kind(format.kind())) {
      for (Eigen::Index j = 0; j < group; ++j) row(first + j) = detail::float_code_value(format.kind(), in, j);
      in += group * bits / 8;
    } else if (bits == 8) {
      for (Eigen::Index j = 0; j < group; ++j) row(first + j) = detail::dequantize(format.kind(), in[j], scale, minimum);
      in += group;
    } else {
      const Eigen::Index per_byte = 8 / bits, stride = group / per_byte;
      for (Eigen::Index k = 0; k < stride; ++k, ++in) {
        for (Eigen::Index p = 0; p < per_byte; ++p) {
          const auto code = static_cast<std::uint8_t>((*in >> (p * bits)) & ((1 << bits) - 1));
          row(first + k + p * stride) = detail::dequantize(format.kind(), code, scale, minimum);
        }
      }
    }
  }
  return row;
}

// Every row of `rows` as a cache in `format` gives it back: encoded and decoded, so that what a metric
// or a test sees carries exactly the format's rounding. rows: n x width, width one the format can hold.
template <typename Derived>
RowMatrix<float> round_trip(const StorageFormat& format, const Eigen::MatrixBase<Derived>& rows) {
  format.require_width("kqsvd::round_trip", "rows", rows.cols());
  detail::require_finite("kqsvd::round_trip", "rows", rows);
  RowMatrix<float> result(rows.rows(), rows.cols());
  for (Eigen::Index i = 0; i < rows.rows(); ++i) {
    result.row(i) = decode_row(format, encode_row(format, rows.row(i)), rows.cols());
  }
  return result;
}

}  // namespace kqsvd
