// kqsvd/detail/storage_conversion.hpp -- float <-> cache storage (float, Eigen::half, Eigen::bfloat16)
// for contiguous runs of elements.
//
// Why not Eigen's .cast<>(): in Eigen 3.4 a cast between half/bfloat16 and float is evaluated one
// scalar at a time (5-11 ns per 16-element row measured here), slower than reading the latents from
// memory, and its packet conversions never use the F16C instructions with GCC (Eigen 3.4 defines
// EIGEN_HAS_FP16_C only for clang). So:
//   * float16 with F16C (x86 since 2012; -mf16c, -march=haswell or later, -march=native): the F16C
//     conversion intrinsics, 8 elements per instruction (16 with AVX-512F);
//   * otherwise, and for bfloat16 (a shift), branch-free bit manipulation that compilers vectorise.
// Rounding is to nearest, ties to even: bit-identical to Eigen's scalar conversions either way.
#pragma once

#include <Eigen/Core>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#ifdef __F16C__
#include <immintrin.h>
#endif

namespace kqsvd::detail {

// Rows are tokens: cache contents and scratch tiles are row-major.
template <typename Scalar>
using RowMajorMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using FloatRows = RowMajorMatrix<float>;

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

// destination[i] = float(source[i]) for i < count.
template <typename Storage>
inline void to_float(const Storage* source, float* destination, Eigen::Index count) {
  static_assert(is_cache_storage_v<Storage>, "cache storage is float, Eigen::half or Eigen::bfloat16");
  if constexpr (std::is_same<Storage, float>::value) {
    std::memcpy(destination, source, static_cast<std::size_t>(count) * sizeof(float));
  } else {
    Eigen::Index i = 0;
#ifdef __F16C__
    if constexpr (std::is_same<Storage, Eigen::half>::value) {
#ifdef __AVX512F__
      for (; i + 16 <= count; i += 16) {
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(source + i));
        _mm512_storeu_ps(destination + i, _mm512_cvtph_ps(packed));
      }
#endif
      for (; i + 8 <= count; i += 8) {
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(source + i));
        _mm256_storeu_ps(destination + i, _mm256_cvtph_ps(packed));
      }
    }
#endif
    for (; i < count; ++i) {
      const auto raw = bits_as<std::uint16_t>(source[i]);
      destination[i] = std::is_same<Storage, Eigen::half>::value ? half_bits_to_float(raw) : bfloat16_bits_to_float(raw);
    }
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

inline const char* storage_name(float) { return "float32"; }
inline const char* storage_name(Eigen::half) { return "float16"; }
inline const char* storage_name(Eigen::bfloat16) { return "bfloat16"; }

}  // namespace kqsvd::detail
