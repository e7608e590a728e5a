// Storage formats: llama.cpp's q8_0 and q4_0 byte-identical to ggml's reference quantizers; the OCP fp8
// formats against a table of all 256 codes computed here from the specification; the asymmetric and
// per-token formats within their rounding bounds; exact byte accounting; float16/bfloat16 conversions
// bit for bit as Eigen's; bad input refused by name.
#include <gtest/gtest.h>

#include <kqsvd/kqsvd.hpp>

#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace kqsvd_test_storage_format {

using Eigen::Index;
using kqsvd::StorageFormat;
using kqsvd::test::expect_invalid;

// ---- llama.cpp formats ----------------------------------------------------------------------------

struct Vector {
  std::string format;
  Eigen::RowVectorXf row;
  std::vector<std::uint8_t> bytes;
};

std::vector<Vector> ggml_vectors() {
  std::ifstream in(std::string(KQSVD_TEST_DATA_DIR) + "/ggml/q8_0_q4_0_vectors.txt");
  std::vector<Vector> vectors;
  for (std::string line; std::getline(in, line);) {
    std::istringstream words(line);
    Vector vector;
    Index width = 0;
    words >> vector.format >> width;
    vector.row.resize(width);
    for (Index i = 0; i < width; ++i) {
      std::string hex;
      words >> hex;
      const auto bits = static_cast<std::uint32_t>(std::stoul(hex, nullptr, 16));
      std::memcpy(&vector.row(i), &bits, 4);
    }
    std::string colon;
    words >> colon;
    for (std::string hex; words >> hex;) vector.bytes.push_back(static_cast<std::uint8_t>(std::stoul(hex, nullptr, 16)));
    vectors.push_back(vector);
  }
  return vectors;
}

TEST(StorageFormat, Q8_0AndQ4_0AreByteIdenticalToGgmlReferenceQuantizers) {
  const std::vector<Vector> vectors = ggml_vectors();
  ASSERT_EQ(vectors.size(), 112u);
  int q8 = 0, q4 = 0;
  for (std::size_t i = 0; i < vectors.size(); ++i) {
    const Vector& v = vectors[i];
    const StorageFormat format = StorageFormat::parse(v.format);
    ASSERT_EQ(static_cast<std::size_t>(format.bytes_per_row(v.row.size())), v.bytes.size()) << i;
    EXPECT_EQ(kqsvd::encode_row(format, v.row), v.bytes) << "row " << i << " (" << v.format << ")";
    (v.format == "q8_0" ? q8 : q4) += 1;
    // Decoding is ggml's dequantize: d * c, or d * (c - 8).
    const Eigen::RowVectorXf back = kqsvd::decode_row(format, v.bytes, v.row.size());
    for (Index j = 0; j < v.row.size(); ++j) {
      const Index block = j / 32, in_block = j % 32;
      const std::uint8_t* b = v.bytes.data() + block * (format.kind() == kqsvd::StorageKind::q8_0 ? 34 : 18);
      std::uint16_t d_bits = 0;
      std::memcpy(&d_bits, b, 2);
      const float d = static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(d_bits));
      float expected = 0.0f;
      if (format.kind() == kqsvd::StorageKind::q8_0) {
        expected = d * static_cast<float>(static_cast<std::int8_t>(b[2 + in_block]));
      } else {
        const int code = in_block < 16 ? (b[2 + in_block] & 15) : (b[2 + in_block - 16] >> 4);
        expected = d * static_cast<float>(code - 8);
      }
      ASSERT_EQ(back(j), expected) << i << " " << j;
    }
  }
  EXPECT_EQ(q8, 56);
  EXPECT_EQ(q4, 56);
}

TEST(StorageFormat, BytesPerRowAndBitsPerElementAreExact) {
  EXPECT_EQ(StorageFormat::parse("f32").bytes_per_row(64), 256);
  EXPECT_EQ(StorageFormat::parse("f16").bytes_per_row(64), 128);
  EXPECT_EQ(StorageFormat::parse("bf16").bytes_per_row(64), 128);
  EXPECT_EQ(StorageFormat::parse("fp8_e4m3").bytes_per_row(64), 64);
  EXPECT_EQ(StorageFormat::parse("int8").bytes_per_row(32), 34);  // 32 codes + one float16 scale
  EXPECT_EQ(StorageFormat::parse("q8_0").bytes_per_row(128), 4 * 34);
  EXPECT_EQ(StorageFormat::parse("q4_0").bytes_per_row(128), 4 * 18);
  EXPECT_EQ(StorageFormat::parse("int4").bytes_per_row(64), 2 * (16 + 4));
  EXPECT_EQ(StorageFormat::parse("int4/16").bytes_per_row(16), 8 + 4);
  EXPECT_EQ(StorageFormat::parse("int2/64").bytes_per_row(128), 2 * (16 + 4));
  EXPECT_DOUBLE_EQ(StorageFormat::parse("q8_0").bits_per_element(64), 8.5);
  EXPECT_DOUBLE_EQ(StorageFormat::parse("q4_0").bits_per_element(64), 4.5);
  EXPECT_DOUBLE_EQ(StorageFormat::parse("int4").bits_per_element(32), 5.0);
  EXPECT_DOUBLE_EQ(StorageFormat::parse("int2/32").bits_per_element(32), 3.0);
  EXPECT_DOUBLE_EQ(StorageFormat::parse("int8").bits_per_element(32), 8.5);
  // Every row encodes to exactly bytes_per_row bytes.
  const Eigen::RowVectorXf row = kqsvd::test::gaussian(1, 64, 3).cast<float>();
  for (const char* name : {"f32", "f16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8", "q8_0", "q4_0", "int4", "int2",
                           "int4/16", "int2/64"}) {
    const StorageFormat format = StorageFormat::parse(name);
    EXPECT_EQ(static_cast<Index>(kqsvd::encode_row(format, row).size()), format.bytes_per_row(64)) << name;
    EXPECT_EQ(StorageFormat::parse(format.name()), format) << name;
  }
}

// ---- OCP fp8, from the specification --------------------------------------------------------------

// The value of an fp8 code, written out from the OCP definitions with ldexp (the library uses a
// constant-expression table).
double ocp_value(bool e4m3, int code) {
  const int exponent_bits = e4m3 ? 4 : 5, mantissa_bits = e4m3 ? 3 : 2, bias = e4m3 ? 7 : 15;
  const double sign = (code & 0x80) != 0 ? -1.0 : 1.0;
  const int exponent = (code >> mantissa_bits) & ((1 << exponent_bits) - 1);
  const int mantissa = code & ((1 << mantissa_bits) - 1);
  const int top = (1 << exponent_bits) - 1;
  if (e4m3 && exponent == top && mantissa == (1 << mantissa_bits) - 1) return std::numeric_limits<double>::quiet_NaN();
  if (!e4m3 && exponent == top) {
    return mantissa == 0 ? sign * std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
  }
  if (exponent == 0) return sign * std::ldexp(mantissa, 1 - bias - mantissa_bits);
  return sign * std::ldexp((1 << mantissa_bits) + mantissa, exponent - bias - mantissa_bits);
}

float decode_one(const StorageFormat& format, int code) {
  return kqsvd::decode_row(format, {static_cast<std::uint8_t>(code)}, 1)(0);
}

std::uint8_t encode_one(const StorageFormat& format, float value) {
  return kqsvd::encode_row(format, Eigen::RowVectorXf::Constant(1, value))[0];
}

TEST(StorageFormat, Fp8MatchesTheSpecificationOnAll256Codes) {
  for (const bool e4m3 : {true, false}) {
    const StorageFormat format = StorageFormat::parse(e4m3 ? "fp8_e4m3" : "fp8_e5m2");
    int finite = 0;
    for (int code = 0; code < 256; ++code) {
      const double expected = ocp_value(e4m3, code);
      const float decoded = decode_one(format, code);
      if (std::isnan(expected)) {
        EXPECT_TRUE(std::isnan(decoded)) << code;
        continue;
      }
      EXPECT_EQ(static_cast<double>(decoded), expected) << format.name() << " code " << code;
      if (!std::isfinite(expected)) continue;
      ++finite;
      EXPECT_EQ(encode_one(format, decoded), code) << format.name() << " value " << decoded;  // round trip
    }
    EXPECT_EQ(finite, e4m3 ? 254 : 248);  // e4m3: all but two NaNs; e5m2: less 4 NaN/inf codes per sign
  }
  EXPECT_EQ(decode_one(StorageFormat::parse("fp8_e4m3"), 0x7e), 448.0f);
  EXPECT_EQ(decode_one(StorageFormat::parse("fp8_e5m2"), 0x7b), 57344.0f);
}

TEST(StorageFormat, Fp8RoundsToNearestEvenAndSaturates) {
  for (const bool e4m3 : {true, false}) {
    const StorageFormat format = StorageFormat::parse(e4m3 ? "fp8_e4m3" : "fp8_e5m2");
    const int largest = e4m3 ? 0x7e : 0x7b;
    // Between consecutive positive codes: just below the midpoint rounds down, just above rounds up,
    // the midpoint itself to the even code.
    for (int code = 0; code < largest; ++code) {
      const double low = ocp_value(e4m3, code), high = ocp_value(e4m3, code + 1);
      const double middle = 0.5 * (low + high);
      EXPECT_EQ(encode_one(format, static_cast<float>(middle)), code % 2 == 0 ? code : code + 1) << code;
      EXPECT_EQ(encode_one(format, std::nextafter(static_cast<float>(middle), 0.0f)), code) << code;
      EXPECT_EQ(encode_one(format, std::nextafter(static_cast<float>(middle), 1e30f)), code + 1) << code;
      EXPECT_EQ(encode_one(format, -static_cast<float>(middle)), 0x80 | (code % 2 == 0 ? code : code + 1)) << code;
    }
    // Saturating: beyond the largest finite value, the largest finite value.
    for (const float big : {static_cast<float>(ocp_value(e4m3, largest)) * 1.06f, 1e6f, 3e38f}) {
      EXPECT_EQ(encode_one(format, big), largest) << big;
      EXPECT_EQ(encode_one(format, -big), 0x80 | largest) << big;
    }
  }
}

// ---- the other formats ----------------------------------------------------------------------------

TEST(StorageFormat, PerTokenAndAsymmetricFormatsAreWithinHalfAStep) {
  std::mt19937 engine(11);
  for (const char* name : {"int8", "int4", "int4/16", "int2", "int2/64"}) {
    const StorageFormat format = StorageFormat::parse(name);
    for (int trial = 0; trial < 20; ++trial) {
      Eigen::RowVectorXf row = kqsvd::test::gaussian(1, 64, static_cast<unsigned>(trial)).cast<float>();
      row *= std::ldexp(1.0f, std::uniform_int_distribution<int>(-6, 6)(engine));
      const std::vector<std::uint8_t> bytes = kqsvd::encode_row(format, row);
      const Eigen::RowVectorXf back = kqsvd::decode_row(format, bytes, 64);
      const Index group = format.group_size(64);
      for (Index first = 0; first < 64; first += group) {
        const auto block = row.segment(first, group);
        const double levels = format.kind() == kqsvd::StorageKind::int8 ? 254.0
                              : format.kind() == kqsvd::StorageKind::int4 ? 15.0
                                                                          : 3.0;
        // A step of (range / levels), its float16 rounding, and the minimum's float16 rounding.
        const double range = format.kind() == kqsvd::StorageKind::int8 ? 2.0 * block.cwiseAbs().maxCoeff()
                                                                       : block.maxCoeff() - block.minCoeff();
        const double bound = 0.5 * range / levels * (1.0 + 1e-3) + 1e-3 * block.cwiseAbs().maxCoeff();
        EXPECT_LE((back.segment(first, group) - block).cwiseAbs().maxCoeff(), bound) << name << " " << trial;
      }
    }
    // The asymmetric formats give a constant row back exactly (its minimum, step 0); int8 a row already
    // on its grid (a step that float16 holds exactly).
    if (format.is_asymmetric()) {
      const Eigen::RowVectorXf constant = Eigen::RowVectorXf::Constant(64, 0.375f);
      EXPECT_EQ(kqsvd::decode_row(format, kqsvd::encode_row(format, constant), 64), constant) << name;
    } else {
      const Eigen::RowVectorXf on_grid = (Eigen::RowVectorXf::LinSpaced(64, -127.0f, 127.0f).array().round() / 64.0f).matrix();
      EXPECT_EQ(kqsvd::decode_row(format, kqsvd::encode_row(format, on_grid), 64), on_grid) << name;
    }
  }
}

TEST(StorageFormat, Float16AndBfloat16MatchEigenBitForBit) {
  // Every float16 bit pattern to float, and back.
  std::vector<Eigen::half> halves(65536);
  for (std::uint32_t bits = 0; bits < 65536; ++bits) {
    halves[bits] = Eigen::half(Eigen::half_impl::raw_uint16_to_half(static_cast<std::uint16_t>(bits)));
  }
  std::vector<float> widened(halves.size());
  kqsvd::detail::to_float(halves.data(), widened.data(), static_cast<Index>(halves.size()));
  for (std::size_t i = 0; i < halves.size(); ++i) {
    const float expected = static_cast<float>(halves[i]);
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(widened[i])) << i;
    } else {
      EXPECT_EQ(widened[i], expected) << i;
    }
  }
  // Floats around every float16/bfloat16 boundary: normal, subnormal, overflow, ties.
  std::mt19937 engine(7);
  std::vector<float> floats;
  for (int i = 0; i < 200000; ++i) {
    const float mantissa = std::uniform_real_distribution<float>(-2.0f, 2.0f)(engine);
    floats.push_back(std::ldexp(mantissa, std::uniform_int_distribution<int>(-30, 20)(engine)));
  }
  for (float special : {0.0f, -0.0f, 65504.0f, 65519.0f, 65520.0f, 1e-8f, std::numeric_limits<float>::infinity(),
                        -std::numeric_limits<float>::infinity(), 3.0e38f, 1.0f + 1.0f / 2048.0f, 1.0f + 3.0f / 2048.0f}) {
    floats.push_back(special);
  }
  std::vector<Eigen::half> narrowed(floats.size());
  std::vector<Eigen::bfloat16> brain(floats.size());
  kqsvd::detail::from_float(floats.data(), narrowed.data(), static_cast<Index>(floats.size()));
  kqsvd::detail::from_float(floats.data(), brain.data(), static_cast<Index>(floats.size()));
  std::vector<float> brain_widened(floats.size());
  kqsvd::detail::to_float(brain.data(), brain_widened.data(), static_cast<Index>(floats.size()));
  for (std::size_t i = 0; i < floats.size(); ++i) {
    ASSERT_EQ(narrowed[i].x, Eigen::half(floats[i]).x) << floats[i];
    ASSERT_EQ(brain[i].value, Eigen::bfloat16(floats[i]).value) << floats[i];
    ASSERT_EQ(brain_widened[i], static_cast<float>(Eigen::bfloat16(floats[i])));
  }
}

TEST(StorageFormat, RejectsBadInputByName) {
  expect_invalid([] { StorageFormat::parse("q5_1"); }, "unknown storage format 'q5_1'");
  expect_invalid([] { StorageFormat::parse("int4/0"); }, "argument 'block' must be a positive multiple of 4");
  expect_invalid([] { StorageFormat::parse("q8_0/64"); }, "unknown storage format 'q8_0/64'");
  expect_invalid([] { StorageFormat::parse("int4/x"); }, "unknown storage format");
  expect_invalid([] { StorageFormat(kqsvd::StorageKind::q4_0, 16); }, "argument 'block' is only for int4 and int2");
  expect_invalid([] { StorageFormat::parse("q4_0").bytes_per_row(48); },
                 "argument 'width' is 48, which q4_0 cannot hold: its blocks of 32 elements must divide the row width");
  expect_invalid([] { kqsvd::encode_row(StorageFormat::parse("int4/16"), Eigen::RowVectorXf::Ones(24)); },
                 "argument 'row' is 24, which int4/16 cannot hold");
  Eigen::RowVectorXf row = Eigen::RowVectorXf::Ones(32);
  row(5) = std::numeric_limits<float>::quiet_NaN();
  for (const char* name : {"f32", "f16", "fp8_e4m3", "int8", "q8_0", "q4_0", "int4", "int2"}) {
    expect_invalid([&] { kqsvd::encode_row(StorageFormat::parse(name), row); },
                   "argument 'row' contains a non-finite value (nan) at row 0, column 5");
  }
  row(5) = std::numeric_limits<float>::infinity();
  expect_invalid([&] { kqsvd::encode_row(StorageFormat::parse("fp8_e5m2"), row); }, "non-finite value (inf)");
  row(5) = 1e5f;
  expect_invalid([&] { kqsvd::encode_row(StorageFormat::parse("f16"), row); },
                 "has the value 100000 at row 0, column 5, beyond the range of float16");
  row(5) = 1e7f;  // d = 1e7 / 127 fits float16? no: 78740 > 65504
  expect_invalid([&] { kqsvd::encode_row(StorageFormat::parse("q8_0"), row); }, "beyond float16's range");
  expect_invalid([&] { kqsvd::encode_row(StorageFormat::parse("int4"), row); }, "beyond float16's range");
  expect_invalid([] { kqsvd::decode_row(StorageFormat::parse("q8_0"), std::vector<std::uint8_t>(33), 32); },
                 "argument 'bytes' holds 33 bytes, a q8_0 row of 32 elements has 34");
  Eigen::MatrixXf rows = Eigen::MatrixXf::Ones(3, 32);
  rows(2, 7) = std::numeric_limits<float>::quiet_NaN();
  expect_invalid([&] { kqsvd::round_trip(StorageFormat::parse("q4_0"), rows); }, "at row 2, column 7");
  expect_invalid([] { kqsvd::round_trip(StorageFormat::parse("q4_0"), Eigen::MatrixXf::Ones(2, 16)); },
                 "argument 'rows' is 16, which q4_0 cannot hold");
}

// round_trip is encode_row then decode_row, row by row, and idempotent: stored values store exactly.
TEST(StorageFormat, RoundTripIsWhatTheCacheHolds) {
  const Eigen::MatrixXf rows = kqsvd::test::gaussian(5, 64, 3).cast<float>();
  for (const kqsvd::StorageKind kind : kqsvd::all_storage_kinds) {
    const StorageFormat format(kind);
    const kqsvd::RowMatrix<float> stored = kqsvd::round_trip(format, rows);
    for (Eigen::Index i = 0; i < rows.rows(); ++i) {
      ASSERT_EQ(stored.row(i), kqsvd::decode_row(format, kqsvd::encode_row(format, rows.row(i)), 64)) << format.name();
    }
    if (kind != kqsvd::StorageKind::int2 && kind != kqsvd::StorageKind::int4) {
      // Symmetric and float formats map stored values to themselves (asymmetric minimum/scale pairs may
      // re-round the float16 minimum, so they are only checked to stay within a step below).
      EXPECT_EQ(kqsvd::round_trip(format, stored), stored) << format.name();
    }
  }
}

}  // namespace kqsvd_test_storage_format
