// kqsvd/core/detail/float_conversion.hpp -- the narrow floating-point types the library stores (IEEE
// binary16, bfloat16, and the OCP 8-bit formats E4M3 and E5M2) to and from float, one value at a time
// and for contiguous runs. Every conversion to a narrow type rounds to nearest, ties to even. One copy
// for the whole library: the cache layer stores these types and the file formats read and write them.
//
// Why not Eigen's .cast<>(): in Eigen 3.4 a cast between half/bfloat16 and float is evaluated one
// scalar at a time, slower than reading the latents from memory (bench/README.md, design measurements), and its packet conversions never use the F16C instructions with GCC (Eigen 3.4 defines
// EIGEN_HAS_FP16_C only for clang). So:
//   * float16 with F16C (x86 since 2012; -mf16c, -march=haswell or later, -march=native): the F16C
//     conversion intrinsics, 8 elements per instruction (16 with AVX-512F);
//   * otherwise, and for bfloat16 (a shift), branch-free bit manipulation that compilers vectorise.
// Rounding is to nearest, ties to even: bit-identical to Eigen's scalar conversions either way.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#ifdef __F16C__
#include <immintrin.h>
#endif

namespace kqsvd::detail {

// The element types a run conversion handles.
template <typename Storage>
inline constexpr bool is_cache_storage_v = std::is_same<Storage, float>::value ||
                                           std::is_same<Storage, Eigen::half>::value ||
                                           std::is_same<Storage, Eigen::bfloat16>::value;

template <typename To, typename From>
inline To bits_as(From from) {
  static_assert(sizeof(To) == sizeof(From), "bits_as reinterprets equal-sized values");
  static_assert(std::is_trivially_copyable<To>::value && std::is_trivially_copyable<From>::value,
                "bits_as copies object representations");
  To to;
  // Through void*: Eigen::half and bfloat16 have constructors, but are trivially copyable.
  std::memcpy(static_cast<void*>(&to), static_cast<const void*>(&from), sizeof(To));
  return to;
}

inline float half_bits_to_float(std::uint16_t half) {
  const std::uint32_t sign = (static_cast<std::uint32_t>(half) & 0x8000u) << 16;
  const std::uint32_t magnitude = static_cast<std::uint32_t>(half) & 0x7fffu;
  // Exponent and mantissa moved to float position, then one exact multiply by 2^112 rebiases the
  // exponent (15 -> 127) and normalises subnormal halves too.
  const std::uint32_t scaled = bits_as<std::uint32_t>(bits_as<float>(magnitude << 13) * 0x1p112f);
  // Infinity and NaN (half exponent 31) keep their payload with the float exponent 255.
  const std::uint32_t special = (magnitude << 13) | 0x7f800000u;
  return bits_as<float>((magnitude >= 0x7c00u ? special : scaled) | sign);
}

inline std::uint16_t float_to_half_bits(float value) {
  const std::uint32_t bits = bits_as<std::uint32_t>(value);
  const std::uint32_t sign = bits & 0x80000000u;
  const std::uint32_t magnitude = bits ^ sign;
  // |value| >= 65520 rounds to infinity; NaN stays a (quiet) NaN.
  const std::uint32_t overflow = magnitude > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // Results below the smallest normal half (2^-14): adding 0.5 puts the 10 mantissa bits at the
  // bottom of the float, and the float addition rounds them to nearest even.
  constexpr std::uint32_t subnormal_magic = ((127 - 15) + (23 - 10) + 1) << 23;
  const std::uint32_t subnormal =
      bits_as<std::uint32_t>(bits_as<float>(magnitude) + bits_as<float>(subnormal_magic)) - subnormal_magic;
  // Normal results: rebias the exponent and round the 13 dropped bits to nearest even.
  const std::uint32_t odd = (magnitude >> 13) & 1u;
  const std::uint32_t normal = (magnitude + (static_cast<std::uint32_t>(15 - 127) << 23) + 0xfffu + odd) >> 13;
  const std::uint32_t result = magnitude >= 0x47800000u ? overflow : (magnitude < 0x38800000u ? subnormal : normal);
  return static_cast<std::uint16_t>(result | (sign >> 16));
}

inline float bfloat16_bits_to_float(std::uint16_t bfloat) {
  return bits_as<float>(static_cast<std::uint32_t>(bfloat) << 16);
}

inline std::uint16_t float_to_bfloat16_bits(float value) {
  const std::uint32_t bits = bits_as<std::uint32_t>(value);
  const std::uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const std::uint32_t quiet_nan = (bits >> 16) | 0x0040u;
  return static_cast<std::uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// out[i] = the float16 value whose little-endian bits start at bytes + 2 i, for i < count: the F16C
// instructions where the compiler may use them (16 values per instruction with AVX-512F), else the bits.
inline void half_bytes_to_float(const unsigned char* bytes, float* out, Eigen::Index count) {
  const auto n = static_cast<std::size_t>(count);
  std::size_t i = 0;
#ifdef __F16C__
#ifdef __AVX512F__
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + 2 * i))));
  }
#endif
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 2 * i))));
  }
#endif
  for (; i < n; ++i) {
    std::uint16_t bits = 0;
    std::memcpy(&bits, bytes + 2 * i, 2);
    out[i] = half_bits_to_float(bits);
  }
}

// destination[i] = float(source[i]) for i < count.
template <typename Storage>
inline void to_float(const Storage* source, float* destination, Eigen::Index count) {
  static_assert(is_cache_storage_v<Storage>, "cache storage is float, Eigen::half or Eigen::bfloat16");
  if constexpr (std::is_same<Storage, float>::value) {
    std::memcpy(destination, source, static_cast<std::size_t>(count) * sizeof(float));
  } else if constexpr (std::is_same<Storage, Eigen::half>::value) {
    half_bytes_to_float(reinterpret_cast<const unsigned char*>(source), destination, count);
  } else {
    for (Eigen::Index i = 0; i < count; ++i) destination[i] = bfloat16_bits_to_float(bits_as<std::uint16_t>(source[i]));
  }
}

// destination[i] = Storage(source[i]), rounded to nearest even, for i < count.
template <typename Storage>
inline void from_float(const float* source, Storage* destination, Eigen::Index count) {
  static_assert(is_cache_storage_v<Storage>, "cache storage is float, Eigen::half or Eigen::bfloat16");
  if constexpr (std::is_same<Storage, float>::value) {
    std::memcpy(destination, source, static_cast<std::size_t>(count) * sizeof(float));
  } else {
    Eigen::Index i = 0;
#ifdef __F16C__
    if constexpr (std::is_same<Storage, Eigen::half>::value) {
#ifdef __AVX512F__
      for (; i + 16 <= count; i += 16) {
        const __m256i packed = _mm512_cvtps_ph(_mm512_loadu_ps(source + i), _MM_FROUND_TO_NEAREST_INT);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(destination + i), packed);
      }
#endif
      for (; i + 8 <= count; i += 8) {
        const __m128i packed = _mm256_cvtps_ph(_mm256_loadu_ps(source + i), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(destination + i), packed);
      }
    }
#endif
    for (; i < count; ++i) {
      const std::uint16_t raw = std::is_same<Storage, Eigen::half>::value ? float_to_half_bits(source[i])
                                                                          : float_to_bfloat16_bits(source[i]);
      destination[i] = bits_as<Storage>(raw);
    }
  }
}

// The smallest float magnitude that rounds to infinity in Storage: latents at or above it cannot be
// stored.
template <typename Storage>
inline float storage_overflow_threshold() {
  if constexpr (std::is_same<Storage, Eigen::half>::value) {
    return 65520.0f;  // half of an ulp above the largest half, 65504
  } else if constexpr (std::is_same<Storage, Eigen::bfloat16>::value) {
    return bits_as<float>(std::uint32_t{0x7f7f8000u});  // likewise above the largest bfloat16
  } else {
    return std::numeric_limits<float>::infinity();
  }
}

// The OCP 8-bit floating-point formats (OCP 8-bit Floating Point Specification, 2023):
//   E4M3 ("FN"): 4 exponent bits (bias 7), 3 mantissa bits; no infinities; S.1111.111 is NaN; the
//                largest finite value is 448;
//   E5M2:        5 exponent bits (bias 15), 2 mantissa bits; IEEE-like infinities and NaNs; the largest
//                finite value is 57344.
// Encoding saturates (the specification's saturating mode): finite values beyond the largest finite
// value become it, with their sign. Decoding is a table of the 256 codes, built at compile time.
enum class Fp8 { e4m3, e5m2 };

constexpr int fp8_mantissa_bits(Fp8 format) { return format == Fp8::e4m3 ? 3 : 2; }
constexpr int fp8_bias(Fp8 format) { return format == Fp8::e4m3 ? 7 : 15; }
constexpr std::uint8_t fp8_largest_code(Fp8 format) { return format == Fp8::e4m3 ? 0x7e : 0x7b; }

// 2^exponent for |exponent| < 150, exactly, in a constant expression.
constexpr float power_of_two(int exponent) {
  float value = 1.0f;
  for (; exponent > 0; --exponent) value *= 2.0f;
  for (; exponent < 0; ++exponent) value *= 0.5f;
  return value;
}

constexpr float fp8_to_float(Fp8 format, std::uint8_t code) {
  const int mantissa_bits = fp8_mantissa_bits(format);
  const int exponent_field = (code & 0x7f) >> mantissa_bits;
  const int mantissa = code & ((1 << mantissa_bits) - 1);
  const float sign = (code & 0x80) != 0 ? -1.0f : 1.0f;
  // E4M3 spends its top exponent on ordinary numbers, all but the NaN S.1111.111; E5M2 keeps it for
  // infinities and NaNs, as IEEE does.
  if (format == Fp8::e4m3 && exponent_field == 15 && mantissa == 7) return std::numeric_limits<float>::quiet_NaN();
  if (format == Fp8::e5m2 && exponent_field == 31) {
    return mantissa == 0 ? sign * std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN();
  }
  const float fraction = static_cast<float>(mantissa) / static_cast<float>(1 << mantissa_bits);
  if (exponent_field == 0) return sign * fraction * power_of_two(1 - fp8_bias(format));  // subnormal
  return sign * (1.0f + fraction) * power_of_two(exponent_field - fp8_bias(format));
}

template <Fp8 Format>
struct Fp8Table {
  float values[256]{};
  constexpr Fp8Table() {
    for (int code = 0; code < 256; ++code) values[code] = fp8_to_float(Format, static_cast<std::uint8_t>(code));
  }
};

template <Fp8 Format>
inline constexpr Fp8Table<Format> fp8_table{};

// The code of `value`, rounded to nearest (ties to even), saturating at the largest finite value.
// `value` must be finite (callers reject NaN and infinity before encoding).
inline std::uint8_t float_to_fp8(Fp8 format, float value) {
  const int mantissa_bits = fp8_mantissa_bits(format);
  const std::uint8_t sign = std::signbit(value) ? 0x80 : 0x00;
  const double magnitude = std::fabs(static_cast<double>(value));
  const std::uint8_t largest = fp8_largest_code(format);
  if (magnitude == 0.0) return sign;
  if (magnitude >= static_cast<double>(fp8_to_float(format, largest))) return sign | largest;
  const int minimum_exponent = 1 - fp8_bias(format);  // of the smallest normal number
  int exponent = 0;
  std::frexp(magnitude, &exponent);  // magnitude = f * 2^exponent, f in [0.5, 1)
  exponent = std::max(exponent - 1, minimum_exponent);
  // Units of the last place at this exponent (subnormals share the smallest normal's); nearbyint
  // rounds ties to even in the default rounding mode.
  const double units = std::nearbyint(std::ldexp(magnitude, mantissa_bits - exponent));
  // units in [2^m, 2^(m+1)] for normal numbers (2^(m+1) carries into the next exponent), [0, 2^m] for
  // subnormals (2^m being the smallest normal): in both cases the code is (exponent field << m) + the
  // units above the implicit bit, and the carry works out by itself.
  const int biased = exponent - minimum_exponent;  // 0 for subnormals and the smallest normals
  const auto code = static_cast<int>((biased << mantissa_bits) + static_cast<int>(units));
  return sign | static_cast<std::uint8_t>(std::min<int>(code, largest));
}

inline const char* storage_name(float) { return "float32"; }
inline const char* storage_name(Eigen::half) { return "float16"; }
inline const char* storage_name(Eigen::bfloat16) { return "bfloat16"; }

}  // namespace kqsvd::detail
