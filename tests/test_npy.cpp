// Tests for kqsvd/io/npy.hpp against files written by NumPy itself (tests/data/npy, see its README.md)
// and a corpus of malformed files (tests/data/malformed/npy_*, made by make_corpus.py).
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
#include <ostream>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "file_test_support.hpp"
#include "kqsvd/core/error.hpp"
#include "kqsvd/io/npy.hpp"

namespace kqsvd_test_npy {

namespace fs = std::filesystem;
using kqsvd::test::expect_error;
using kqsvd::test::read_file;
using kqsvd::test::scratch_directory;
using kqsvd::test::write_file;
using kqsvd::io::DType;
using kqsvd::io::NpyArray;
using kqsvd::io::read_npy;
using kqsvd::io::read_npy_matrix;
using kqsvd::io::write_npy;

const fs::path fixtures = fs::path(KQSVD_TEST_DATA_DIR) / "npy";

std::vector<double> iota_times(std::size_t count, double step) {
  std::vector<double> values(count);
  for (std::size_t i = 0; i < count; ++i) values[i] = step * static_cast<double>(i);
  return values;
}

// --- files written by NumPy 1.24 ------------------------------------------------------------------

TEST(NpyNumpyFixtures, COrderFloat32Matrix) {
  const NpyArray<float> array = read_npy<float>((fixtures / "c_f4_3x4.npy").string());
  EXPECT_EQ(array.dtype, DType::f32);
  EXPECT_EQ(array.shape, (std::vector<std::int64_t>{3, 4}));
  EXPECT_FALSE(array.fortran_order);
  const auto matrix = read_npy_matrix<double>((fixtures / "c_f4_3x4.npy").string());
  ASSERT_EQ(matrix.rows(), 3);
  ASSERT_EQ(matrix.cols(), 4);
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 4; ++j) {
      EXPECT_EQ(matrix(i, j), (i * 4 + j - 5.5) * 0.25);
      EXPECT_EQ(array.values[static_cast<std::size_t>(i * 4 + j)], static_cast<float>((i * 4 + j - 5.5) * 0.25));
    }
  }
}

TEST(NpyNumpyFixtures, FortranOrderFloat64MatrixComesBackInCOrder) {
  const NpyArray<double> array = read_npy<double>((fixtures / "fortran_f8_2x3.npy").string());
  EXPECT_EQ(array.dtype, DType::f64);
  EXPECT_TRUE(array.fortran_order);
  EXPECT_EQ(array.values, (std::vector<double>{0.5, 1.5, 2.5, 3.5, 4.5, 5.5}));
  const auto matrix = read_npy_matrix<float>((fixtures / "fortran_f8_2x3.npy").string());
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j) EXPECT_EQ(matrix(i, j), 3.0f * i + j + 0.5f);
}

TEST(NpyNumpyFixtures, Float16ValuesIncludingExtremes) {
  const NpyArray<double> array = read_npy<double>((fixtures / "f2_values.npy").string());
  EXPECT_EQ(array.dtype, DType::f16);
  EXPECT_EQ(array.shape, std::vector<std::int64_t>{7});
  // 0.1 and 1/3 as binary16 (0x2E66, 0x3555), the largest finite, the smallest normal and subnormal.
  EXPECT_EQ(array.values, (std::vector<double>{1.0, -2.0, 0.0999755859375, 65504.0, std::ldexp(1.0, -14),
                                                std::ldexp(1.0, -24), 0.333251953125}));
  // A 1-d array is an n x 1 column.
  const auto column = read_npy_matrix<float>((fixtures / "f2_values.npy").string());
  EXPECT_EQ(column.rows(), 7);
  EXPECT_EQ(column.cols(), 1);
  EXPECT_EQ(column(3, 0), 65504.0f);
}

TEST(NpyNumpyFixtures, FormatVersion2) {
  const NpyArray<float> array = read_npy<float>((fixtures / "v2_f4_2x2.npy").string());
  EXPECT_EQ(read_file(fixtures / "v2_f4_2x2.npy")[6], '\x02');
  EXPECT_EQ(array.shape, (std::vector<std::int64_t>{2, 2}));
  EXPECT_EQ(array.values, (std::vector<float>{1.5f, -2.25f, 3.0f, 1e-3f}));
}

TEST(NpyNumpyFixtures, FormatVersion3) {
  EXPECT_EQ(read_file(fixtures / "v3_f8_3.npy")[6], '\x03');
  EXPECT_EQ(read_npy<double>((fixtures / "v3_f8_3.npy").string()).values, (std::vector<double>{0.5, 1.5, 2.5}));
}

TEST(NpyNumpyFixtures, ThreeDimensionalInBothOrders) {
  const NpyArray<double> c_order = read_npy<double>((fixtures / "c_f8_2x3x4.npy").string());
  const NpyArray<double> fortran = read_npy<double>((fixtures / "fortran_f4_2x3x4.npy").string());
  EXPECT_FALSE(c_order.fortran_order);
  EXPECT_TRUE(fortran.fortran_order);
  EXPECT_EQ(fortran.dtype, DType::f32);
  for (const auto* array : {&c_order, &fortran}) {
    EXPECT_EQ(array->shape, (std::vector<std::int64_t>{2, 3, 4}));
    // Element [i, j, k] is 1.5 * (12 i + 4 j + k), which is 1.5 times its C-order position.
    EXPECT_EQ(array->values, iota_times(24, 1.5));
  }
  expect_error<kqsvd::InvalidArgument>([&] { read_npy_matrix<float>((fixtures / "c_f8_2x3x4.npy").string()); },
                                       "shape [2, 3, 4]; a matrix needs rank 1 or 2",
                                       (fixtures / "c_f8_2x3x4.npy").string());
}

TEST(NpyNumpyFixtures, ScalarAndEmptyArrays) {
  const NpyArray<double> scalar = read_npy<double>((fixtures / "scalar_f8.npy").string());
  EXPECT_TRUE(scalar.shape.empty());
  EXPECT_EQ(scalar.values, std::vector<double>{-3.25});
  expect_error<kqsvd::InvalidArgument>([&] { read_npy_matrix<double>((fixtures / "scalar_f8.npy").string()); },
                                       "a matrix needs rank 1 or 2");
  const NpyArray<float> empty = read_npy<float>((fixtures / "empty_f4_0x3.npy").string());
  EXPECT_EQ(empty.shape, (std::vector<std::int64_t>{0, 3}));
  EXPECT_TRUE(empty.values.empty());
  const auto matrix = read_npy_matrix<float>((fixtures / "empty_f4_0x3.npy").string());
  EXPECT_EQ(matrix.rows(), 0);
  EXPECT_EQ(matrix.cols(), 3);
}

// Writing back what was read gives NumPy's exact bytes: header text, padding, alignment and layout.
TEST(NpyWriter, ByteIdenticalToNumpySave) {
  const fs::path directory = scratch_directory();
  for (const char* name : {"c_f4_3x4.npy", "fortran_f8_2x3.npy", "f2_values.npy", "c_f8_2x3x4.npy",
                           "fortran_f4_2x3x4.npy", "scalar_f8.npy", "empty_f4_0x3.npy"}) {
    SCOPED_TRACE(name);
    const NpyArray<double> array = read_npy<double>((fixtures / name).string());
    write_npy((directory / name).string(), array.shape, array.values.data(), array.values.size(), array.dtype,
              array.fortran_order);
    EXPECT_EQ(read_file(directory / name), read_file(fixtures / name));
  }
}

// --- round trips ----------------------------------------------------------------------------------

TEST(NpyRoundTrip, EveryDTypeAndOrderWithinItsRoundingBound) {
  const fs::path directory = scratch_directory();
  Eigen::MatrixXd matrix = Eigen::MatrixXd::Random(9, 7) * 3.0;
  matrix(0, 0) = 0.1;  // binary16 0x2E66 = 0.0999755859375, exactly representable in the others
  const std::pair<DType, double> dtypes[] = {
      {DType::f16, std::ldexp(1.0, -11)}, {DType::f32, std::ldexp(1.0, -24)}, {DType::f64, 0.0}};
  for (const auto& [dtype, relative] : dtypes) {
    for (const bool fortran_order : {false, true}) {
      SCOPED_TRACE(std::string(kqsvd::io::to_string(dtype)) + (fortran_order ? " Fortran" : " C"));
      const std::string path = (directory / (std::string(kqsvd::io::to_string(dtype)) +
                                             (fortran_order ? "_f.npy" : "_c.npy"))).string();
      write_npy(path, matrix, dtype, fortran_order);
      const NpyArray<double> array = read_npy<double>(path);
      EXPECT_EQ(array.dtype, dtype);
      EXPECT_EQ(array.fortran_order, fortran_order);
      const auto back = read_npy_matrix<double>(path);
      ASSERT_EQ(back.rows(), 9);
      ASSERT_EQ(back.cols(), 7);
      for (Eigen::Index i = 0; i < 9; ++i)
        for (Eigen::Index j = 0; j < 7; ++j)
          EXPECT_LE(std::fabs(back(i, j) - matrix(i, j)), relative * std::fabs(matrix(i, j)));
      if (dtype == DType::f16) {
        EXPECT_EQ(back(0, 0), 0.0999755859375);
      }
      if (dtype == DType::f32) {
        EXPECT_EQ(back(0, 0), static_cast<double>(0.1f));
      }
      if (dtype == DType::f64) {
        EXPECT_EQ(back, matrix);
      }
      // Float sources: f32 and f64 storage are exact.
      const Eigen::MatrixXf single = matrix.cast<float>();
      write_npy(path, single, dtype, fortran_order, /*overwrite=*/true);
      if (dtype != DType::f16) {
        EXPECT_EQ(read_npy_matrix<float>(path), single);
      }
    }
  }
}

TEST(NpyRoundTrip, FortranOrderLaysOutColumnsInTheFile) {
  const fs::path path = scratch_directory() / "fortran.npy";
  Eigen::Matrix<float, 2, 3, Eigen::RowMajor> matrix;
  matrix << 1, 2, 3, 4, 5, 6;
  write_npy(path.string(), matrix, DType::f32, /*fortran_order=*/true);
  const std::string bytes = read_file(path);
  ASSERT_EQ(bytes.size(), 128u + 6 * 4);  // NumPy pads the 1.0 header to 128 bytes here
  EXPECT_NE(bytes.find("'fortran_order': True"), std::string::npos);
  std::vector<float> stored(6);
  std::memcpy(stored.data(), bytes.data() + 128, 24);  // this test host is little-endian (x86, ARM)
  EXPECT_EQ(stored, (std::vector<float>{1, 4, 2, 5, 3, 6}));
}

TEST(NpyRoundTrip, FourDimensionalFortranOrder) {
  const fs::path path = scratch_directory() / "4d.npy";
  const std::vector<std::int64_t> shape = {2, 3, 1, 5};
  const std::vector<double> values = iota_times(30, 0.25);
  write_npy(path.string(), shape, values.data(), values.size(), DType::f64, /*fortran_order=*/true);
  const NpyArray<double> array = read_npy<double>(path.string());
  EXPECT_EQ(array.shape, shape);
  EXPECT_TRUE(array.fortran_order);
  EXPECT_EQ(array.values, values);
}

TEST(NpyRoundTrip, LongHeaderSwitchesToFormatVersion2) {
  const fs::path path = scratch_directory() / "long_header.npy";
  const std::vector<std::int64_t> shape(25000, 1);  // "1, " 25000 times: more than 65535 header bytes
  const double value = 7.5;
  write_npy(path.string(), shape, &value, 1, DType::f64);
  const std::string bytes = read_file(path);
  EXPECT_EQ(bytes[6], '\x02');
  EXPECT_EQ(bytes[7], '\x00');
  EXPECT_EQ((bytes.size() - 8) % 64, 0u);  // data is aligned to 64 bytes, 8 of them
  const NpyArray<double> array = read_npy<double>(path.string());
  EXPECT_EQ(array.shape, shape);
  EXPECT_EQ(array.values, std::vector<double>{7.5});
}

TEST(NpyWriter, InvalidArgumentsAndOverwriteProtection) {
  const fs::path directory = scratch_directory();
  const std::string path = (directory / "out.npy").string();
  const std::vector<float> four(4, 1.0f);
  expect_error<kqsvd::InvalidArgument>([&] { write_npy(path, {2, 3}, four.data(), four.size(), DType::f32); },
                                       "'shape' [2, 3] has 6 elements but the data has 4");
  expect_error<kqsvd::InvalidArgument>([&] { write_npy(path, {-1, -4}, four.data(), four.size(), DType::f32); },
                                       "negative dimension");
  expect_error<kqsvd::InvalidArgument>([&] { write_npy(path, {4}, four.data(), four.size(), DType::bf16); },
                                       "NumPy has no bfloat16");
  EXPECT_FALSE(fs::exists(path));
  write_file(path, "precious");
  expect_error<kqsvd::IoError>([&] { write_npy(path, {4}, four.data(), four.size(), DType::f32); }, "already exists",
                               path);
  EXPECT_EQ(read_file(path), "precious");
  write_npy(path, {4}, four.data(), four.size(), DType::f32, false, /*overwrite=*/true);
  EXPECT_EQ(read_npy<float>(path).values, four);
  EXPECT_EQ(std::distance(fs::directory_iterator(directory), fs::directory_iterator()), 1);  // no temporaries
}

TEST(NpyReader, UnreadablePathsAreIoErrors) {
  const fs::path directory = scratch_directory();
  expect_error<kqsvd::IoError>([&] { read_npy<float>((directory / "missing.npy").string()); }, "cannot open",
                               (directory / "missing.npy").string());
  expect_error<kqsvd::IoError>([&] { read_npy<float>(directory.string()); }, "not a regular file");
}

TEST(NpyReader, HandwrittenHeadersNumpyAlsoAccepts) {
  const fs::path directory = scratch_directory();
  const auto write_npy_bytes = [&](const char* name, const std::string& header, const std::string& data) {
    std::string bytes = std::string("\x93NUMPY\x01\x00", 8);
    bytes += static_cast<char>(header.size() & 0xFF);
    bytes += static_cast<char>(header.size() >> 8);
    write_file(directory / name, bytes + header + data);
    return (directory / name).string();
  };
  const std::string two_floats("\x00\x00\x80\x3F\x00\x00\x00\x40", 8);  // 1.0f, 2.0f
  // Keys in another order, double quotes, no trailing comma, no padding, Python 2 long literals.
  EXPECT_EQ(read_npy<float>(write_npy_bytes("a.npy", "{\"shape\": (2,), \"descr\": \"<f4\", \"fortran_order\": False}",
                                            two_floats))
                .values,
            (std::vector<float>{1.0f, 2.0f}));
  EXPECT_EQ(read_npy<float>(write_npy_bytes("b.npy", "{'descr':'<f4','fortran_order':True,'shape':(1L,2L)}\n",
                                            two_floats))
                .shape,
            (std::vector<std::int64_t>{1, 2}));
}

// --- the malformed corpus ------------------------------------------------------------------------

struct MalformedFile {
  const char* file;
  const char* problem;
};

const MalformedFile malformed_files[] = {
    {"npy_empty.npy", "truncated: the file is 0 bytes long"},
    {"npy_truncated_magic.npy", "truncated: the file is 4 bytes long"},
    {"npy_bad_magic.npy", "bad magic"},
    {"npy_bad_version.npy", "unsupported .npy format version 4.0"},
    {"npy_v2_truncated_length.npy", "ends inside the header length"},
    {"npy_header_past_eof.npy", "the header length 1000 extends past the end of the file"},
    {"npy_header_not_dict.npy", "the header is not a Python dict"},
    {"npy_header_unparsable.npy", "expected an integer in 'shape'"},
    {"npy_unterminated_string.npy", "unterminated string"},
    {"npy_trailing_text.npy", "unexpected text after the closing '}'"},
    {"npy_missing_shape.npy", "missing key 'shape'"},
    {"npy_extra_key.npy", "unexpected key 'extra'"},
    {"npy_duplicate_key.npy", "duplicate key 'descr'"},
    {"npy_fortran_order_not_bool.npy", "'fortran_order' must be True or False"},
    {"npy_big_endian.npy", "unsupported dtype '>f4': big-endian"},
    {"npy_int_dtype.npy", "unsupported dtype '<i4'"},
    {"npy_object_dtype.npy", "unsupported dtype '|O'"},
    {"npy_structured_dtype.npy", "structured (record) arrays are not supported"},
    {"npy_negative_dimension.npy", "'shape' has a negative dimension"},
    {"npy_shape_not_tuple.npy", "the value of 'shape' is not a tuple"},
    {"npy_dimension_too_large.npy", "'shape' has a dimension too large for 64 bits"},
    {"npy_shape_overflow.npy", "shape [4294967296, 4294967296, 16] has more elements than fit in 64 bits"},
    {"npy_data_truncated.npy", "truncated data: shape [3, 4] of '<f4' needs 48 bytes, the file has 40"},
    {"npy_data_too_long.npy", "trailing bytes after the data: shape [2] of '<f8' needs 16 bytes, the file has 24"},
};

// Names the case in test output instead of dumping the struct's bytes.
void PrintTo(const MalformedFile& malformed, std::ostream* out) { *out << malformed.file; }

const fs::path malformed_directory = fs::path(KQSVD_TEST_DATA_DIR) / "malformed";

class NpyMalformed : public ::testing::TestWithParam<MalformedFile> {};

TEST_P(NpyMalformed, IsAFormatErrorNamingFileAndProblem) {
  const std::string path = (malformed_directory / GetParam().file).string();
  ASSERT_TRUE(fs::exists(path)) << "run tests/data/malformed/make_corpus.py";
  expect_error<kqsvd::FormatError>([&] { read_npy<double>(path); }, GetParam().problem, path);
  expect_error<kqsvd::FormatError>([&] { read_npy_matrix<float>(path); }, GetParam().problem, path);
}

INSTANTIATE_TEST_SUITE_P(Corpus, NpyMalformed, ::testing::ValuesIn(malformed_files),
                         [](const ::testing::TestParamInfo<MalformedFile>& info) {
                           return kqsvd::test::corpus_test_name(info.param.file);
                         });

TEST(NpyMalformedCorpus, EveryFileHasATest) {
  std::set<std::string> tested;
  for (const auto& entry : malformed_files) tested.insert(entry.file);
  for (const auto& entry : fs::directory_iterator(malformed_directory)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("npy_", 0) == 0) {
      EXPECT_TRUE(tested.count(name)) << name << " has no expectation";
    }
  }
}

}  // namespace kqsvd_test_npy
