// kqsvd/io/dtype.hpp -- element types of tensors on disk, and their conversion to float and double.
//
// Tensor files store IEEE binary16 (f16), bfloat16 (bf16), binary32 (f32) or binary64 (f64) values,
// little-endian; kqsvd computes in float or double. decode() widens bytes to float or double (exactly,
// except f64 -> float, which rounds); encode() narrows to the storage type with round-to-nearest-even,
// overflowing to infinity as IEEE arithmetic does. Both work byte by byte, so they are correct on hosts
// of either endianness.
//
//   using kqsvd::io::DType;
//   const float values[3] = {1.0f, 0.1f, -2.5f};
//   std::vector<unsigned char> bytes(3 * kqsvd::io::element_size(DType::bf16));
//   kqsvd::io::encode(DType::bf16, values, 3, bytes.data());
//   float back[3];
//   kqsvd::io::decode(DType::bf16, bytes.data(), 3, back);   // back[1] == 0.10009765625f, 0.1 in bf16
//
// The names in files: safetensors_name(DType::bf16) == "BF16", numpy_descr(DType::f32) == "<f4".
// NumPy has no bfloat16, so numpy_descr(DType::bf16) throws.
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>
#include <type_traits>

#include "kqsvd/core/detail/float_conversion.hpp"
#include "kqsvd/core/error.hpp"
#include "kqsvd/core/matrix.hpp"

namespace kqsvd::io {

enum class DType { f16, bf16, f32, f64 };

constexpr std::size_t element_size(DType dtype) {
  switch (dtype) {
    case DType::f16:
    case DType::bf16:
      return 2;
    case DType::f32:
      return 4;
    case DType::f64:
      return 8;
  }
  return 0;
}

// Lower-case names for messages and command lines: "f16", "bf16", "f32", "f64".
inline const char* to_string(DType dtype) {
  switch (dtype) {
    case DType::f16:
      return "f16";
    case DType::bf16:
      return "bf16";
    case DType::f32:
      return "f32";
    case DType::f64:
      return "f64";
  }
  return "?";
}

inline std::optional<DType> parse_dtype(std::string_view name) {
  if (name == "f16") return DType::f16;
  if (name == "bf16") return DType::bf16;
  if (name == "f32") return DType::f32;
  if (name == "f64") return DType::f64;
  return std::nullopt;
}

// The safetensors header spelling: "F16", "BF16", "F32", "F64".
inline const char* safetensors_name(DType dtype) {
  switch (dtype) {
    case DType::f16:
      return "F16";
    case DType::bf16:
      return "BF16";
    case DType::f32:
      return "F32";
    case DType::f64:
      return "F64";
  }
  return "?";
}

inline std::optional<DType> parse_safetensors_dtype(std::string_view name) {
  if (name == "F16") return DType::f16;
  if (name == "BF16") return DType::bf16;
  if (name == "F32") return DType::f32;
  if (name == "F64") return DType::f64;
  return std::nullopt;
}

// The NumPy array-protocol spelling, always little-endian: "<f2", "<f4", "<f8".
inline const char* numpy_descr(DType dtype) {
  switch (dtype) {
    case DType::f16:
      return "<f2";
    case DType::f32:
      return "<f4";
    case DType::f64:
      return "<f8";
    case DType::bf16:
      break;
  }
  throw InvalidArgument("kqsvd::io::numpy_descr: NumPy has no bfloat16 dtype; store bf16 data as f32 in .npy files");
}

inline std::optional<DType> parse_numpy_descr(std::string_view descr) {
  if (descr == "<f2") return DType::f16;
  if (descr == "<f4") return DType::f32;
  if (descr == "<f8") return DType::f64;
  return std::nullopt;
}

}  // namespace kqsvd::io

namespace kqsvd::detail {

template <class Scalar>
constexpr bool is_io_scalar = std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>;

// Files are little-endian whatever the host is; assembling integers from bytes with shifts is
// endian-neutral, and compilers turn these loops into single loads and stores on little-endian hosts.
template <class UInt>
UInt load_little_endian(const unsigned char* bytes) {
  UInt value = 0;
  for (std::size_t i = 0; i < sizeof(UInt); ++i) value |= static_cast<UInt>(static_cast<UInt>(bytes[i]) << (8 * i));
  return value;
}

template <class UInt>
void store_little_endian(UInt value, unsigned char* bytes) {
  for (std::size_t i = 0; i < sizeof(UInt); ++i) bytes[i] = static_cast<unsigned char>(value >> (8 * i));
}

// Narrowing double -> float -> half with two round-to-nearest steps can round a value lying just above
// a half-precision tie down to the tie, which the second step then settles to even: the wrong answer.
// Rounding the first step to odd instead (truncate, then set the last bit when inexact) keeps the
// information "strictly above the tie", and with 13 or more spare bits the second rounding is then the
// correctly rounded result (Boldo & Melquiond, "Emulation of FMA and correctly rounded sums", 2008).
inline float narrow_to_float_round_to_odd(double value) {
  const float nearest = static_cast<float>(value);
  if (std::isnan(value) || static_cast<double>(nearest) == value) return nearest;
  const float truncated =
      std::fabs(static_cast<double>(nearest)) > std::fabs(value) ? std::nextafter(nearest, 0.0f) : nearest;
  const auto bits = Eigen::numext::bit_cast<std::uint32_t>(truncated) | 1u;
  return Eigen::numext::bit_cast<float>(bits);
}

inline std::uint16_t half_bits(float value) { return float_to_half_bits(value); }
inline std::uint16_t half_bits(double value) { return float_to_half_bits(narrow_to_float_round_to_odd(value)); }
inline std::uint16_t bfloat16_bits(float value) { return float_to_bfloat16_bits(value); }
inline std::uint16_t bfloat16_bits(double value) { return float_to_bfloat16_bits(narrow_to_float_round_to_odd(value)); }

}  // namespace kqsvd::detail

namespace kqsvd::io {

// Converts `count` little-endian values of type `dtype` starting at `bytes` to Scalar (float or double).
// `bytes` needs no alignment.
template <class Scalar>
void decode(DType dtype, const unsigned char* bytes, std::size_t count, Scalar* out) {
  static_assert(detail::is_io_scalar<Scalar>, "kqsvd::io::decode converts to float or double");
  switch (dtype) {
    case DType::f16:
      for (std::size_t i = 0; i < count; ++i)
        out[i] = static_cast<Scalar>(detail::half_bits_to_float(detail::load_little_endian<std::uint16_t>(bytes + 2 * i)));
      return;
    case DType::bf16:
      for (std::size_t i = 0; i < count; ++i)
        out[i] =
            static_cast<Scalar>(detail::bfloat16_bits_to_float(detail::load_little_endian<std::uint16_t>(bytes + 2 * i)));
      return;
    case DType::f32:
      for (std::size_t i = 0; i < count; ++i)
        out[i] = static_cast<Scalar>(
            Eigen::numext::bit_cast<float>(detail::load_little_endian<std::uint32_t>(bytes + 4 * i)));
      return;
    case DType::f64:
      for (std::size_t i = 0; i < count; ++i)
        out[i] = static_cast<Scalar>(
            Eigen::numext::bit_cast<double>(detail::load_little_endian<std::uint64_t>(bytes + 8 * i)));
      return;
  }
}

// Converts `count` Scalar values to little-endian `dtype` at `bytes` (count * element_size(dtype) bytes),
// rounding to nearest, ties to even, whenever the storage type is narrower.
template <class Scalar>
void encode(DType dtype, const Scalar* values, std::size_t count, unsigned char* bytes) {
  static_assert(detail::is_io_scalar<Scalar>, "kqsvd::io::encode converts from float or double");
  switch (dtype) {
    case DType::f16:
      for (std::size_t i = 0; i < count; ++i) detail::store_little_endian(detail::half_bits(values[i]), bytes + 2 * i);
      return;
    case DType::bf16:
      for (std::size_t i = 0; i < count; ++i)
        detail::store_little_endian(detail::bfloat16_bits(values[i]), bytes + 2 * i);
      return;
    case DType::f32:
      for (std::size_t i = 0; i < count; ++i)
        detail::store_little_endian(Eigen::numext::bit_cast<std::uint32_t>(static_cast<float>(values[i])),
                                    bytes + 4 * i);
      return;
    case DType::f64:
      for (std::size_t i = 0; i < count; ++i)
        detail::store_little_endian(Eigen::numext::bit_cast<std::uint64_t>(static_cast<double>(values[i])),
                                    bytes + 8 * i);
      return;
  }
}

}  // namespace kqsvd::io
