// kqsvd/kernels/decode_arithmetic.hpp -- how a decode step multiplies the codes of a 4- or 2-bit cache.
//
// A decode step on a HeadCache in q4_0, int4/B or int2/B reads few bytes per token, so converting every
// code to float before its multiply-add, not memory, bounds its speed (bench/README.md). The choice:
//
//   float32             (the default) every code converted to float, float multiply-adds: the exact
//                       attention of the stored rows, to float rounding.
//   int8_dot_products   the float operand quantized to int8 and multiplied with the codes in integers,
//                       32 codes per instruction (what llama.cpp does with its q8_0 activations):
//                       keys    per scale group of the query's elements, q8 = round(127 q / max|q|) and
//                               d = max|q| / 127: the scores are those of the quantized query d q8;
//                       values  per block of 128 tokens and scale group, the softmax weights times the
//                               tokens' scales, quantized the same way (offsets stay in float).
//                       Each operand is off by at most half of 1/127 of its group's largest magnitude.
//
// It applies to the decode strategy (up to 16 queries sharing their rows, kernels/partial_attention.hpp)
// on q4_0, int4 and int2 caches (int8_dot_products_apply); other formats, and prefill, always compute in
// float. The speed-up needs the AVX2 or AVX-512 VNNI kernels (compile with -mavx2 -mfma -mf16c, or
// -march=native): the portable path is scalar and slower than float arithmetic (docs/end-to-end.md).
//
//   auto exact = kqsvd::decode_attention(q, cache);
//   auto fast = kqsvd::decode_attention(q, cache, kqsvd::DecodeArithmetic::int8_dot_products);
//   kqsvd::parse_decode_arithmetic("int8_dot_products");   // from a name, e.g. a command-line option
//   kqsvd::int8_dot_products_apply(cache.format());         // false: the option changes nothing
#pragma once

#include <string>

#include "kqsvd/core/error.hpp"
#include "kqsvd/core/storage_format.hpp"

namespace kqsvd {

enum class DecodeArithmetic { float32, int8_dot_products };

inline const char* to_string(DecodeArithmetic arithmetic) {
  return arithmetic == DecodeArithmetic::float32 ? "float32" : "int8_dot_products";
}

// "float32" or "int8_dot_products" (the names to_string gives); anything else is an InvalidArgument.
inline DecodeArithmetic parse_decode_arithmetic(const std::string& name) {
  if (name == "float32") return DecodeArithmetic::float32;
  if (name == "int8_dot_products") return DecodeArithmetic::int8_dot_products;
  throw InvalidArgument("kqsvd::parse_decode_arithmetic: unknown decode arithmetic '" + name +
                        "' (expected float32 or int8_dot_products)");
}

// Whether DecodeArithmetic::int8_dot_products changes how a decode step on rows stored in this format
// computes: for the 4- and 2-bit codes (q4_0, int4/B, int2/B). Every other format decodes in float
// whichever arithmetic is asked for: its codes are already 8 or more bits wide (int8, q8_0, fp8) or float.
constexpr bool int8_dot_products_apply(StorageKind kind) noexcept {
  return kind == StorageKind::q4_0 || kind == StorageKind::int4 || kind == StorageKind::int2;
}
inline bool int8_dot_products_apply(const StorageFormat& format) noexcept { return int8_dot_products_apply(format.kind()); }

}  // namespace kqsvd
