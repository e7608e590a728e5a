// Tests for kqsvd/io/dtype.hpp and kqsvd/io/safetensors.hpp. Expected values are worked out by hand
// from the IEEE encodings (see the comments), never by calling the code under test.
#include <gtest/gtest.h>

#include <Eigen/Core>

#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <random>
#include <ostream>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "file_test_support.hpp"
#include "kqsvd/core/error.hpp"
#include "kqsvd/io/dtype.hpp"
#include "kqsvd/io/safetensors.hpp"

namespace kqsvd_test_safetensors {

namespace fs = std::filesystem;
using kqsvd::test::expect_error;
using kqsvd::test::read_file;
using kqsvd::test::scratch_directory;
using kqsvd::test::write_file;
using kqsvd::io::DType;
using kqsvd::io::NonFinite;
using kqsvd::io::SafetensorsFile;
using kqsvd::io::SafetensorsWriter;

constexpr DType all_dtypes[] = {DType::f16, DType::bf16, DType::f32, DType::f64};

std::string little_endian_u64(std::uint64_t value) {
  std::string bytes;
  for (int i = 0; i < 8; ++i) bytes += static_cast<char>((value >> (8 * i)) & 0xFF);
  return bytes;
}

std::uint16_t encode_one_16(DType dtype, double value) {
  unsigned char bytes[8] = {};  // as large as any dtype: encode() switches on it at run time
  kqsvd::io::encode(dtype, &value, 1, bytes);
  return static_cast<std::uint16_t>(bytes[0] | (bytes[1] << 8));
}

std::uint16_t encode_one_16(DType dtype, float value) {
  unsigned char bytes[8] = {};
  kqsvd::io::encode(dtype, &value, 1, bytes);
  return static_cast<std::uint16_t>(bytes[0] | (bytes[1] << 8));
}

// --- dtype.hpp ----------------------------------------------------------------------------------

TEST(SafetensorsDType, NamesAndSizes) {
  EXPECT_EQ(kqsvd::io::element_size(DType::f16), 2u);
  EXPECT_EQ(kqsvd::io::element_size(DType::bf16), 2u);
  EXPECT_EQ(kqsvd::io::element_size(DType::f32), 4u);
  EXPECT_EQ(kqsvd::io::element_size(DType::f64), 8u);
  for (const DType dtype : all_dtypes) {
    EXPECT_EQ(kqsvd::io::parse_safetensors_dtype(kqsvd::io::safetensors_name(dtype)), dtype);
    EXPECT_EQ(kqsvd::io::parse_dtype(kqsvd::io::to_string(dtype)), dtype);
  }
  EXPECT_STREQ(kqsvd::io::safetensors_name(DType::bf16), "BF16");
  EXPECT_STREQ(kqsvd::io::numpy_descr(DType::f16), "<f2");
  EXPECT_STREQ(kqsvd::io::numpy_descr(DType::f32), "<f4");
  EXPECT_STREQ(kqsvd::io::numpy_descr(DType::f64), "<f8");
  EXPECT_THROW(kqsvd::io::numpy_descr(DType::bf16), kqsvd::InvalidArgument);
  EXPECT_FALSE(kqsvd::io::parse_safetensors_dtype("f32"));
  EXPECT_FALSE(kqsvd::io::parse_numpy_descr(">f4"));
}

TEST(SafetensorsDType, BytesAreLittleEndian) {
  // 1.0 is 0x3C00 in binary16, 0x3F80 in bfloat16, 0x3F800000 in binary32, 0x3FF0000000000000 in binary64.
  const float one = 1.0f;
  unsigned char bytes[8];
  kqsvd::io::encode(DType::f16, &one, 1, bytes);
  EXPECT_EQ(bytes[0], 0x00);
  EXPECT_EQ(bytes[1], 0x3C);
  kqsvd::io::encode(DType::bf16, &one, 1, bytes);
  EXPECT_EQ(bytes[0], 0x80);
  EXPECT_EQ(bytes[1], 0x3F);
  kqsvd::io::encode(DType::f32, &one, 1, bytes);
  EXPECT_EQ(std::vector<int>(bytes, bytes + 4), (std::vector<int>{0x00, 0x00, 0x80, 0x3F}));
  kqsvd::io::encode(DType::f64, &one, 1, bytes);
  EXPECT_EQ(std::vector<int>(bytes, bytes + 8), (std::vector<int>{0, 0, 0, 0, 0, 0, 0xF0, 0x3F}));
}

TEST(SafetensorsDType, HalfRoundsToNearestEven) {
  // 0.1f = 1.6 * 2^-4; 0.6 * 1024 = 614.4 rounds down to 614 = 0x266: 0x2E66 = 0.0999755859375.
  EXPECT_EQ(encode_one_16(DType::f16, 0.1f), 0x2E66);
  // 1/3 = 1.333.. * 2^-2; 0.333.. * 1024 = 341.33 -> 341 = 0x155: 0x3555.
  EXPECT_EQ(encode_one_16(DType::f16, 1.0f / 3.0f), 0x3555);
  // Ties: 1 + 2^-11 lies halfway between 1 (mantissa 0, even) and 1 + 2^-10 (odd): goes to 1.
  EXPECT_EQ(encode_one_16(DType::f16, 1.0f + std::ldexp(1.0f, -11)), 0x3C00);
  // 1 + 3 * 2^-11 lies halfway between mantissas 1 (odd) and 2 (even): goes to 1 + 2^-9.
  EXPECT_EQ(encode_one_16(DType::f16, 1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);
  // Largest finite is 65504 = 0x7BFF; 65520 is the tie with 65536 (even, overflow) -> infinity.
  EXPECT_EQ(encode_one_16(DType::f16, 65519.0f), 0x7BFF);
  EXPECT_EQ(encode_one_16(DType::f16, 65520.0f), 0x7C00);
  EXPECT_EQ(encode_one_16(DType::f16, -1e6f), 0xFC00);
  // Subnormals: 2^-24 is the smallest (0x0001); 2^-25 ties to 0 (even); 1.5 * 2^-24 ties to 2 * 2^-24.
  EXPECT_EQ(encode_one_16(DType::f16, std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(encode_one_16(DType::f16, std::ldexp(1.0f, -25)), 0x0000);
  EXPECT_EQ(encode_one_16(DType::f16, 3 * std::ldexp(1.0f, -25)), 0x0002);
  EXPECT_EQ(encode_one_16(DType::f16, -0.0f), 0x8000);
  EXPECT_EQ(encode_one_16(DType::f16, std::numeric_limits<float>::quiet_NaN()) & 0x7C00, 0x7C00);
  EXPECT_NE(encode_one_16(DType::f16, std::numeric_limits<float>::quiet_NaN()) & 0x03FF, 0);
}

TEST(SafetensorsDType, BFloat16RoundsToNearestEven) {
  // 0.1f = 0x3DCCCCCD: the dropped half 0xCCCD > 0x8000 rounds up to 0x3DCD = 205/2048 = 0.10009765625.
  EXPECT_EQ(encode_one_16(DType::bf16, 0.1f), 0x3DCD);
  // 1/3f = 0x3EAAAAAB -> 0x3EAB = 171/512.
  EXPECT_EQ(encode_one_16(DType::bf16, 1.0f / 3.0f), 0x3EAB);
  // 1e5f = 0x47C35000: 0x5000 < 0x8000 rounds down to 0x47C3 = 195 * 512 = 99840.
  EXPECT_EQ(encode_one_16(DType::bf16, 1e5f), 0x47C3);
  // Ties: 1 + 2^-8 -> 1 (0x3F80); 1 + 3 * 2^-8 -> 1 + 2^-6 (0x3F82).
  EXPECT_EQ(encode_one_16(DType::bf16, 1.0f + std::ldexp(1.0f, -8)), 0x3F80);
  EXPECT_EQ(encode_one_16(DType::bf16, 1.0f + 3 * std::ldexp(1.0f, -8)), 0x3F82);
  // The largest float rounds past bfloat16's largest finite 0x7F7F to infinity.
  EXPECT_EQ(encode_one_16(DType::bf16, std::numeric_limits<float>::max()), 0x7F80);
  EXPECT_EQ(encode_one_16(DType::bf16, -0.0f), 0x8000);
}

TEST(SafetensorsDType, DoubleSourcesAreRoundedOnceNotTwice) {
  // 1 + 2^-11 + 2^-40 is just above the binary16 tie between 1 and 1 + 2^-10, so it rounds up. Going
  // through float first would round it to the tie 1 + 2^-11 and then to even, 1: wrong.
  const double above_half_tie = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);
  EXPECT_EQ(encode_one_16(DType::f16, above_half_tie), 0x3C01);
  EXPECT_EQ(encode_one_16(DType::f16, 1.0 - std::ldexp(1.0, -40) + std::ldexp(1.0, -11)), 0x3C00);
  const double above_bfloat_tie = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40);
  EXPECT_EQ(encode_one_16(DType::bf16, above_bfloat_tie), 0x3F81);
  // Exact ties and ordinary values agree with the float path.
  EXPECT_EQ(encode_one_16(DType::f16, 1.0 + std::ldexp(1.0, -11)), 0x3C00);
  EXPECT_EQ(encode_one_16(DType::f16, 0.1), 0x2E66);
  EXPECT_EQ(encode_one_16(DType::bf16, 1e300), 0x7F80);
  EXPECT_EQ(encode_one_16(DType::f16, std::ldexp(1.0, -24)), 0x0001);
  EXPECT_EQ(encode_one_16(DType::f16, 1e-300), 0x0000);
  EXPECT_EQ(encode_one_16(DType::f16, -1e-300), 0x8000);
}

TEST(SafetensorsDType, RoundTripErrorIsWithinHalfAnUlp) {
  std::mt19937 generator(7);
  std::uniform_real_distribution<double> uniform(-4.0, 4.0);
  std::vector<double> values(4096);
  for (double& value : values) value = uniform(generator);
  // Relative rounding error bound 2^-p for p bits of significand (11 for f16, 8 for bf16), for values in
  // the normal range (|v| >= 2^-14 for f16).
  const std::pair<DType, double> bounds[] = {{DType::f16, std::ldexp(1.0, -11)}, {DType::bf16, std::ldexp(1.0, -8)}};
  for (const auto& [dtype, bound] : bounds) {
    std::vector<unsigned char> bytes(values.size() * 2);
    kqsvd::io::encode(dtype, values.data(), values.size(), bytes.data());
    std::vector<double> back(values.size());
    kqsvd::io::decode(dtype, bytes.data(), back.size(), back.data());
    for (std::size_t i = 0; i < values.size(); ++i) {
      if (std::fabs(values[i]) < std::ldexp(1.0, -14)) continue;
      EXPECT_LE(std::fabs(back[i] - values[i]), bound * std::fabs(values[i])) << kqsvd::io::to_string(dtype);
    }
  }
  // f32 and f64 storage of values of their own type is exact.
  std::vector<float> floats(values.begin(), values.end());
  std::vector<unsigned char> bytes(values.size() * 8);
  kqsvd::io::encode(DType::f32, floats.data(), floats.size(), bytes.data());
  std::vector<float> floats_back(floats.size());
  kqsvd::io::decode(DType::f32, bytes.data(), floats.size(), floats_back.data());
  EXPECT_EQ(floats_back, floats);
  kqsvd::io::encode(DType::f64, values.data(), values.size(), bytes.data());
  std::vector<double> doubles_back(values.size());
  kqsvd::io::decode(DType::f64, bytes.data(), values.size(), doubles_back.data());
  EXPECT_EQ(doubles_back, values);
}

// --- safetensors round trips ---------------------------------------------------------------------

// Values whose stored forms are known by hand, per storage dtype (see the dtype tests above).
struct KnownValues {
  DType dtype;
  std::vector<double> stored;  // what reading back must give, as double
};

const std::vector<double> known_inputs = {1.0, 0.1, -2.5, 1.0 / 3.0, 1e5, 0.0, -0.0};

KnownValues expected_for(DType dtype) {
  switch (dtype) {
    case DType::f16:
      return {dtype, {1.0, 0.0999755859375, -2.5, 0.333251953125, std::numeric_limits<double>::infinity(), 0.0, -0.0}};
    case DType::bf16:
      return {dtype, {1.0, 0.10009765625, -2.5, 0.333984375, 99840.0, 0.0, -0.0}};
    case DType::f32:
      return {dtype,
              {1.0, static_cast<double>(0.1f), -2.5, static_cast<double>(1.0f / 3.0f), 1e5, 0.0, -0.0}};
    case DType::f64:
      return {dtype, known_inputs};
  }
  return {dtype, {}};
}

TEST(SafetensorsRoundTrip, EveryDTypeFromDoubleAndFloatData) {
  const fs::path path = scratch_directory() / "known.safetensors";
  const std::vector<float> float_inputs(known_inputs.begin(), known_inputs.end());
  SafetensorsWriter writer;
  for (const DType dtype : all_dtypes) {
    const std::string name = kqsvd::io::to_string(dtype);
    writer.add("from_double." + name, dtype, {static_cast<std::int64_t>(known_inputs.size())}, known_inputs);
    writer.add("from_float." + name, dtype, {static_cast<std::int64_t>(float_inputs.size())}, float_inputs);
  }
  writer.write(path.string());

  const SafetensorsFile file(path.string());
  EXPECT_EQ(file.size(), 8u);
  for (const DType dtype : all_dtypes) {
    const KnownValues expected = expected_for(dtype);
    for (const std::string source : {"from_double.", "from_float."}) {
      const std::string name = source + kqsvd::io::to_string(dtype);
      SCOPED_TRACE(name);
      ASSERT_TRUE(file.contains(name));
      EXPECT_EQ(file.info(name).dtype, dtype);
      EXPECT_EQ(file.info(name).shape, std::vector<std::int64_t>{7});
      const std::vector<double> as_double = file.read<double>(name);
      const std::vector<float> as_float = file.read<float>(name);
      ASSERT_EQ(as_double.size(), expected.stored.size());
      for (std::size_t i = 0; i < as_double.size(); ++i) {
        // f64 storage of a float source holds the float exactly, e.g. 0.1f, not 0.1.
        const double want = (dtype == DType::f64 && source == "from_float.")
                                ? static_cast<double>(float_inputs[i])
                                : expected.stored[i];
        EXPECT_EQ(as_double[i], want) << "element " << i;
        EXPECT_EQ(std::signbit(as_double[i]), std::signbit(want)) << "element " << i;
        EXPECT_EQ(as_float[i], static_cast<float>(want)) << "element " << i;
      }
    }
  }
}

TEST(SafetensorsRoundTrip, RandomMatricesWithinTheRoundingBoundOfEachDType) {
  const fs::path path = scratch_directory() / "random.safetensors";
  const Eigen::MatrixXd matrix = Eigen::MatrixXd::Random(37, 19) * 3.0;  // column-major source
  SafetensorsWriter writer;
  for (const DType dtype : all_dtypes) writer.add(kqsvd::io::to_string(dtype), dtype, matrix);
  writer.write(path.string());
  const SafetensorsFile file(path.string());
  for (const DType dtype : all_dtypes) {
    SCOPED_TRACE(kqsvd::io::to_string(dtype));
    const auto back = file.read_matrix<double>(kqsvd::io::to_string(dtype));
    ASSERT_EQ(back.rows(), 37);
    ASSERT_EQ(back.cols(), 19);
    const double relative = dtype == DType::f16 ? std::ldexp(1.0, -11) : dtype == DType::bf16 ? std::ldexp(1.0, -8) : 0.0;
    for (Eigen::Index i = 0; i < matrix.rows(); ++i) {
      for (Eigen::Index j = 0; j < matrix.cols(); ++j) {
        if (dtype == DType::f32) {
          EXPECT_EQ(back(i, j), static_cast<double>(static_cast<float>(matrix(i, j))));
        } else if (dtype == DType::f16 && std::fabs(matrix(i, j)) < std::ldexp(1.0, -14)) {
          EXPECT_LE(std::fabs(back(i, j) - matrix(i, j)), std::ldexp(1.0, -25));  // half a subnormal step
        } else {
          EXPECT_LE(std::fabs(back(i, j) - matrix(i, j)), relative * std::fabs(matrix(i, j)));
        }
      }
    }
  }
}

TEST(SafetensorsRoundTrip, RowMajorAndColumnMajorMatricesGiveTheSameTensor) {
  const fs::path directory = scratch_directory();
  Eigen::Matrix<float, 2, 3> column_major;
  column_major << 1, 2, 3, 4, 5, 6;
  const kqsvd::RowMatrix<float> row_major = column_major;
  SafetensorsWriter a, b;
  a.add("m", DType::f32, column_major);
  b.add("m", DType::f32, row_major);
  a.write((directory / "a.safetensors").string());
  b.write((directory / "b.safetensors").string());
  EXPECT_EQ(read_file(directory / "a.safetensors"), read_file(directory / "b.safetensors"));
  EXPECT_EQ(SafetensorsFile((directory / "a.safetensors").string()).read<float>("m"),
            (std::vector<float>{1, 2, 3, 4, 5, 6}));
}

TEST(SafetensorsRoundTrip, ExactFileLayout) {
  const fs::path path = scratch_directory() / "exact.safetensors";
  SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  writer.add("x", DType::f32, {2}, std::vector<float>{1.0f, -2.0f});
  writer.add("h", DType::f16, {1}, std::vector<float>{1.0f});
  writer.write(path.string());
  std::string header =
      R"({"__metadata__":{"format":"pt"},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("h":{"dtype":"F16","shape":[1],"data_offsets":[8,10]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  // 1.0f = 0x3F800000 and -2.0f = 0xC0000000 little-endian, then binary16 1.0 = 0x3C00.
  const std::string data("\x00\x00\x80\x3F\x00\x00\x00\xC0\x00\x3C", 10);
  EXPECT_EQ(read_file(path), little_endian_u64(header.size()) + header + data);
  EXPECT_EQ(header.size() % 8, 0u);
}

TEST(SafetensorsRoundTrip, MetadataIsPreserved) {
  const fs::path path = scratch_directory() / "metadata.safetensors";
  SafetensorsWriter writer;
  writer.set_metadata("model", "llama-3.2-1b");
  writer.set_metadata("empty", "");
  writer.set_metadata("unicode", "\xCE\xBB = 0.5, \xE2\x9C\x93");
  writer.set_metadata("quotes", "say \"hi\"\n\\");
  writer.set_metadata("model", "llama-3.2-3b");  // replaces
  writer.add("t", DType::f32, {1}, std::vector<float>{0.0f});
  writer.write(path.string());
  const SafetensorsFile file(path.string());
  const std::map<std::string, std::string> expected = {{"model", "llama-3.2-3b"},
                                                       {"empty", ""},
                                                       {"unicode", "\xCE\xBB = 0.5, \xE2\x9C\x93"},
                                                       {"quotes", "say \"hi\"\n\\"}};
  EXPECT_EQ(file.metadata(), expected);
  EXPECT_EQ(file.path(), path.string());
}

TEST(SafetensorsRoundTrip, EmptyAndScalarTensors) {
  const fs::path path = scratch_directory() / "shapes.safetensors";
  SafetensorsWriter writer;
  writer.add("empty", DType::f32, {0, 3}, std::vector<float>{});
  writer.add("scalar", DType::f64, {}, std::vector<double>{2.5});
  writer.add("after", DType::bf16, {2}, std::vector<float>{1.0f, 2.0f});
  writer.write(path.string());
  const SafetensorsFile file(path.string());
  EXPECT_TRUE(file.read<float>("empty").empty());
  EXPECT_EQ(file.info("empty").shape, (std::vector<std::int64_t>{0, 3}));
  EXPECT_EQ(file.read_matrix<float>("empty").rows(), 0);
  EXPECT_EQ(file.read_matrix<float>("empty").cols(), 3);
  EXPECT_EQ(file.read<double>("scalar"), std::vector<double>{2.5});
  EXPECT_TRUE(file.info("scalar").shape.empty());
  EXPECT_EQ(file.read<float>("after"), (std::vector<float>{1.0f, 2.0f}));
  EXPECT_EQ(file.info("after").data_begin, 8u);
  EXPECT_EQ(file.info("after").data_end, 12u);
}

// A file laid out differently from what the writer produces: data in the reverse order of the header,
// an unpadded header (so the data is not aligned), and no metadata.
TEST(SafetensorsRead, ForeignLayoutNamesInDataOrder) {
  const fs::path path = scratch_directory() / "foreign.safetensors";
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[2,6]},"b":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]}})";
  ASSERT_NE(header.size() % 8, 0u);
  // b = bfloat16 0x4049 = 3.140625; a = float 0x40490FDB = 3.14159274.
  const std::string data("\x49\x40\xDB\x0F\x49\x40", 6);
  write_file(path, little_endian_u64(header.size()) + header + data);
  const SafetensorsFile file(path.string());
  EXPECT_EQ(file.names(), (std::vector<std::string>{"b", "a"}));
  EXPECT_TRUE(file.metadata().empty());
  EXPECT_EQ(file.read<float>("b"), std::vector<float>{3.140625f});
  float pi_float;
  const std::uint32_t pi_bits = 0x40490FDB;
  std::memcpy(&pi_float, &pi_bits, 4);
  EXPECT_EQ(file.read<float>("a"), std::vector<float>{pi_float});
}

// layers.0.k of shape [batch, heads, T, d] holding 1000 b + 100 h + 10 t + d, exact in f16, f32, f64.
TEST(SafetensorsReadMatrix, SlicesOfAFourDimensionalTensorElementByElement) {
  const fs::path path = scratch_directory() / "kv.safetensors";
  constexpr int batch = 2, heads = 3, tokens = 4, dim = 5;
  std::vector<double> values;
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (int t = 0; t < tokens; ++t)
        for (int d = 0; d < dim; ++d) values.push_back(1000 * b + 100 * h + 10 * t + d);
  SafetensorsWriter writer;
  for (const DType dtype : {DType::f16, DType::f32, DType::f64}) {
    writer.add(std::string("layers.0.k.") + kqsvd::io::to_string(dtype), dtype, {batch, heads, tokens, dim}, values);
  }
  writer.write(path.string());
  const SafetensorsFile file(path.string());
  for (const DType dtype : {DType::f16, DType::f32, DType::f64}) {
    const std::string name = std::string("layers.0.k.") + kqsvd::io::to_string(dtype);
    for (int b = 0; b < batch; ++b) {
      for (int h = 0; h < heads; ++h) {
        const auto keys = file.read_matrix<float>(name, {b, h});
        ASSERT_EQ(keys.rows(), tokens);
        ASSERT_EQ(keys.cols(), dim);
        for (int t = 0; t < tokens; ++t)
          for (int d = 0; d < dim; ++d)
            EXPECT_EQ(keys(t, d), 1000.0f * b + 100.0f * h + 10.0f * t + d) << name << " b=" << b << " h=" << h;
        const auto keys_double = file.read_matrix<double>(name, {b, h});
        EXPECT_EQ(keys_double.cast<float>(), keys);
      }
    }
  }
}

TEST(SafetensorsReadMatrix, BadIndicesAreInvalidArgumentsNamingTensorAndIndex) {
  const fs::path path = scratch_directory() / "kv.safetensors";
  SafetensorsWriter writer;
  writer.add("k", DType::f32, {2, 3, 4, 5}, std::vector<float>(120, 0.0f));
  writer.add("v", DType::f32, {5}, std::vector<float>(5, 0.0f));
  writer.add("m", DType::f32, {2, 2}, std::vector<float>{1, 2, 3, 4});
  writer.write(path.string());
  const SafetensorsFile file(path.string());
  using kqsvd::InvalidArgument;
  expect_error<InvalidArgument>([&] { file.read_matrix<float>("k", {0}); }, "tensor 'k'", path.string());
  expect_error<InvalidArgument>([&] { file.read_matrix<float>("k", {0}); }, "needs 2 indices, got 1");
  expect_error<InvalidArgument>([&] { file.read_matrix<float>("k", {0, 0, 0}); }, "needs 2 indices, got 3");
  expect_error<InvalidArgument>([&] { file.read_matrix<float>("k", {2, 0}); },
                                "index 2 for axis 0 is out of range [0, 2)");
  expect_error<InvalidArgument>([&] { file.read_matrix<float>("k", {1, 3}); },
                                "index 3 for axis 1 is out of range [0, 3)");
  expect_error<InvalidArgument>([&] { file.read_matrix<float>("k", {-1, 0}); }, "index -1 for axis 0");
  expect_error<InvalidArgument>([&] { file.read_matrix<float>("v"); }, "tensor 'v'");
  expect_error<InvalidArgument>([&] { file.read_matrix<float>("v"); }, "rank 1");
  expect_error<InvalidArgument>([&] { file.read_matrix<float>("m", {0}); }, "needs 0 indices, got 1");
  expect_error<InvalidArgument>([&] { file.read<float>("missing"); }, "no tensor named 'missing'", path.string());
  expect_error<InvalidArgument>([&] { file.info("missing"); }, "no tensor named 'missing'");
  kqsvd::RowMatrix<float> expected(2, 2);
  expected << 1, 2, 3, 4;
  EXPECT_EQ(file.read_matrix<float>("m"), expected);
}

TEST(SafetensorsRead, NonFiniteValuesAreReportedByPositionWhenRejected) {
  const fs::path path = scratch_directory() / "nan.safetensors";
  std::vector<float> values(2 * 3 * 4, 1.0f);
  values[1 * 12 + 2 * 4 + 3] = std::numeric_limits<float>::quiet_NaN();  // element [1, 2, 3], flat 23
  std::vector<double> infinite(4, 0.0);
  infinite[2] = -std::numeric_limits<double>::infinity();
  SafetensorsWriter writer;
  writer.add("x", DType::f16, {2, 3, 4}, values);
  writer.add("inf", DType::f64, {2, 2}, infinite);
  writer.add("huge", DType::f64, {2}, std::vector<double>{1.0, 1e300});
  writer.write(path.string());
  const SafetensorsFile file(path.string());

  EXPECT_TRUE(std::isnan(file.read<float>("x")[23]));  // allowed by default
  expect_error<kqsvd::FormatError>([&] { file.read<float>("x", NonFinite::reject); },
                                   "tensor 'x' holds a non-finite value (nan) at flat index 23 (element [1, 2, 3]",
                                   path.string());
  EXPECT_NO_THROW(file.read_matrix<float>("x", {0}, NonFinite::reject));  // the NaN is in matrix 1
  expect_error<kqsvd::FormatError>([&] { file.read_matrix<double>("x", {1}, NonFinite::reject); },
                                   "at flat index 23 (element [1, 2, 3]", path.string());
  expect_error<kqsvd::FormatError>([&] { file.read_matrix<double>("inf", {}, NonFinite::reject); },
                                   "non-finite value (-inf) at flat index 2 (element [1, 0]", path.string());
  // Finite in the file but beyond float: an overflow of the conversion, not a malformed file.
  EXPECT_EQ(file.read<double>("huge", NonFinite::reject)[1], 1e300);
  EXPECT_TRUE(std::isinf(file.read<float>("huge")[1]));
  expect_error<kqsvd::NumericalError>([&] { file.read<float>("huge", NonFinite::reject); },
                                      "at flat index 1 (element [1]", path.string());
}

TEST(SafetensorsWriter, InvalidArgumentsAreRejected) {
  SafetensorsWriter writer;
  const std::vector<float> four(4, 0.0f);
  writer.add("a", DType::f32, {4}, four);
  using kqsvd::InvalidArgument;
  expect_error<InvalidArgument>([&] { writer.add("a", DType::f32, {4}, four); }, "tensor 'a' was already added");
  expect_error<InvalidArgument>([&] { writer.add("", DType::f32, {4}, four); }, "'name' is empty");
  expect_error<InvalidArgument>([&] { writer.add("__metadata__", DType::f32, {4}, four); }, "reserves");
  expect_error<InvalidArgument>([&] { writer.add("__x", DType::f32, {4}, four); }, "starts with \"__\"");
  expect_error<InvalidArgument>([&] { writer.add("b", DType::f32, {2, 3}, four); },
                                "shape' [2, 3] has 6 elements but the data has 4");
  expect_error<InvalidArgument>([&] { writer.add("b", DType::f32, {-2, -2}, four); }, "negative dimension");
  expect_error<InvalidArgument>([&] { writer.add("b", DType::f32, {2, 3}, Eigen::MatrixXf::Zero(2, 2)); },
                                "has 6 elements but the data has 4");
  expect_error<InvalidArgument>([&] { writer.add("\xFF", DType::f32, {4}, four); }, "not valid UTF-8");
  expect_error<InvalidArgument>([&] { writer.set_metadata("k", "\xC3"); }, "not valid UTF-8");
  EXPECT_EQ(writer.size(), 1u);
  EXPECT_TRUE(writer.contains("a"));
  EXPECT_FALSE(writer.contains("b"));
}

TEST(SafetensorsWriter, RefusesToOverwriteUnlessAsked) {
  const fs::path path = scratch_directory() / "out.safetensors";
  write_file(path, "precious");
  SafetensorsWriter writer;
  writer.add("a", DType::f32, {1}, std::vector<float>{1.0f});
  expect_error<kqsvd::IoError>([&] { writer.write(path.string()); }, "already exists", path.string());
  EXPECT_EQ(read_file(path), "precious");
  writer.write(path.string(), /*overwrite=*/true);
  EXPECT_EQ(SafetensorsFile(path.string()).read<float>("a"), std::vector<float>{1.0f});
}

TEST(SafetensorsRead, LimitsOnHeaderSizeAndTensorCount) {
  const fs::path path = scratch_directory() / "three.safetensors";
  SafetensorsWriter writer;
  for (const char* name : {"a", "b", "c"}) writer.add(name, DType::f32, {1}, std::vector<float>{1.0f});
  writer.set_metadata("k", "v");
  writer.write(path.string());
  kqsvd::io::SafetensorsLimits few_tensors;
  few_tensors.max_tensors = 2;
  expect_error<kqsvd::FormatError>([&] { SafetensorsFile(path.string(), few_tensors); },
                                   "more than 2 tensors, the limit", path.string());
  few_tensors.max_tensors = 3;  // "__metadata__" does not count
  EXPECT_NO_THROW(SafetensorsFile(path.string(), few_tensors));
  kqsvd::io::SafetensorsLimits small_header;
  small_header.max_header_bytes = 16;
  expect_error<kqsvd::FormatError>([&] { SafetensorsFile(path.string(), small_header); }, "more than the limit of 16",
                                   path.string());
}

TEST(SafetensorsRead, UnreadablePathsAreIoErrors) {
  const fs::path directory = scratch_directory();
  expect_error<kqsvd::IoError>([&] { SafetensorsFile((directory / "missing.safetensors").string()); }, "cannot open",
                               (directory / "missing.safetensors").string());
  expect_error<kqsvd::IoError>([&] { SafetensorsFile(directory.string()); }, "not a regular file", directory.string());
}

TEST(SafetensorsRead, FileStaysReadableAfterTheReaderIsMoved) {
  const fs::path path = scratch_directory() / "move.safetensors";
  SafetensorsWriter writer;
  writer.add("a", DType::f32, {3}, std::vector<float>{1, 2, 3});
  writer.write(path.string());
  SafetensorsFile first(path.string());
  const SafetensorsFile second(std::move(first));
  EXPECT_EQ(second.read<float>("a"), (std::vector<float>{1, 2, 3}));
}

// --- the malformed corpus, tests/data/malformed/st_* (made by make_corpus.py) --------------------

struct MalformedFile {
  const char* file;
  const char* problem;  // a substring of the FormatError message that identifies this problem
};

const MalformedFile malformed_files[] = {
    {"st_empty.safetensors", "is 0 bytes long, shorter than the 8-byte header length"},
    {"st_truncated_length.safetensors", "is 5 bytes long, shorter than the 8-byte header length"},
    {"st_header_too_large.safetensors", "declares a 1099511627776-byte header, more than the limit"},
    {"st_header_past_eof.safetensors", "declares a 1000-byte header, which extends past the end of the file"},
    {"st_header_length_zero.safetensors", "header is not valid JSON"},
    {"st_header_not_json.safetensors", "header is not valid JSON"},
    {"st_header_not_object.safetensors", "header is not a JSON object"},
    {"st_header_invalid_utf8.safetensors", "header is not valid JSON"},
    {"st_duplicate_tensor.safetensors", "header has duplicate key 'a'"},
    {"st_entry_not_object.safetensors", "tensor 'a' is described by number, not a JSON object"},
    {"st_missing_dtype.safetensors", "tensor 'a' has no 'dtype' field"},
    {"st_missing_offsets.safetensors", "tensor 'a' has no 'data_offsets' field"},
    {"st_dtype_not_string.safetensors", "tensor 'a' has a 'dtype' that is not a string"},
    {"st_unknown_dtype.safetensors", "tensor 'a' has unknown dtype 'F17'"},
    {"st_unsupported_dtype.safetensors", "tensor 'a' has unsupported dtype 'I64'"},
    {"st_shape_not_array.safetensors", "tensor 'a' has a 'shape' that is not an array"},
    {"st_negative_shape.safetensors", "tensor 'a' has a negative 'shape' entry -1"},
    {"st_fractional_shape.safetensors", "tensor 'a' has a 'shape' entry that is not an integer: 2.5"},
    {"st_shape_overflow.safetensors", "tensor 'a' has shape [4294967296, 4294967296, 16] with more elements than fit"},
    {"st_offsets_wrong_length.safetensors", "tensor 'a' has 'data_offsets' [0], expected [begin, end]"},
    {"st_offsets_negative.safetensors", "tensor 'a' has a negative 'data_offsets' entry -4"},
    {"st_offsets_reversed.safetensors", "tensor 'a' has 'data_offsets' [8, 4] with begin > end"},
    {"st_offsets_past_buffer.safetensors", "tensor 'a' has 'data_offsets' [0, 16] beyond the end of the data buffer"},
    {"st_byte_count_mismatch.safetensors", "spanning 12 bytes, but shape [2, 2] of F32 needs 16 bytes"},
    {"st_overlapping.safetensors", "tensors 'a' and 'b' overlap"},
    {"st_gap.safetensors", "bytes [8, 12) of the data buffer belong to no tensor"},
    {"st_trailing_bytes.safetensors", "4 trailing bytes after the last tensor"},
    {"st_metadata_not_object.safetensors", "'__metadata__' is not a JSON object"},
    {"st_metadata_not_string.safetensors", "'__metadata__' entry 'k' is not a string"},
    {"st_deeply_nested.safetensors", "tensor 'a' is described by array, not a JSON object"},
};

// Names the case in test output instead of dumping the struct's bytes.
void PrintTo(const MalformedFile& malformed, std::ostream* out) { *out << malformed.file; }

const fs::path malformed_directory = fs::path(KQSVD_TEST_DATA_DIR) / "malformed";

class SafetensorsMalformed : public ::testing::TestWithParam<MalformedFile> {};

TEST_P(SafetensorsMalformed, IsAFormatErrorNamingFileAndProblem) {
  const std::string path = (malformed_directory / GetParam().file).string();
  ASSERT_TRUE(fs::exists(path)) << "run tests/data/malformed/make_corpus.py";
  expect_error<kqsvd::FormatError>([&] { SafetensorsFile file(path); }, GetParam().problem, path);
}

INSTANTIATE_TEST_SUITE_P(Corpus, SafetensorsMalformed, ::testing::ValuesIn(malformed_files),
                         [](const ::testing::TestParamInfo<MalformedFile>& info) {
                           return kqsvd::test::corpus_test_name(info.param.file);
                         });

TEST(SafetensorsMalformedCorpus, EveryFileHasATest) {
  std::set<std::string> tested;
  for (const auto& entry : malformed_files) tested.insert(entry.file);
  for (const auto& entry : fs::directory_iterator(malformed_directory)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("st_", 0) == 0) {
      EXPECT_TRUE(tested.count(name)) << name << " has no expectation";
    }
  }
}

}  // namespace kqsvd_test_safetensors
