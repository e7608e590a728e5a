#include <gtest/gtest.h>

#include <kqsvd/calibration/gram_accumulator.hpp>

#include <limits>
#include <vector>

#include "test_support.hpp"

namespace kqsvd_test_gram_accumulator {

using kqsvd::GramAccumulator;
using kqsvd::test::gaussian;
using Eigen::Index;
using Eigen::MatrixXd;

TEST(GramAccumulator, StreamingEqualsDirectProductForEveryInputKind) {
  const Index n = 1000, d = 24;
  const MatrixXd x = gaussian(n, d, 1);
  const MatrixXd direct = x.transpose() * x;

  GramAccumulator from_double(d), from_float(d), from_row_major(d), from_map(d), from_blocks(d);
  from_double.add(x);
  const Eigen::MatrixXf xf = x.cast<float>();
  from_float.add(xf);
  const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> row_major = xf;
  from_row_major.add(row_major);
  // A raw buffer the caller owns (tokens contiguous, as a KV cache stores them), without a copy.
  std::vector<float> buffer(row_major.data(), row_major.data() + n * d);
  from_map.add(Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(buffer.data(), n, d));
  for (Index first = 0; first < n; first += 77) from_blocks.add(x.middleRows(first, std::min<Index>(77, n - first)));

  EXPECT_LT((from_double.gram() - direct).norm(), 1e-12 * direct.norm());
  EXPECT_LT((from_blocks.gram() - direct).norm(), 1e-12 * direct.norm());
  // Float input is widened exactly; the products of floats are exact in double.
  const MatrixXd direct_float = xf.cast<double>().transpose() * xf.cast<double>();
  for (const GramAccumulator* g : {&from_float, &from_row_major, &from_map}) {
    EXPECT_LT((g->gram() - direct_float).norm(), 1e-12 * direct.norm());
    EXPECT_EQ(g->token_count(), n);
  }
  EXPECT_LT((from_double.mean_gram() - direct / n).norm(), 1e-12 * direct.norm() / n);
  EXPECT_EQ(from_double.gram(), from_double.gram().transpose());
}

TEST(GramAccumulator, MergedShardsEqualOnePass) {
  const Index d = 16;
  const MatrixXd x = gaussian(900, d, 2);
  GramAccumulator single(d), a(d), b(d), c(d);
  single.add(x);
  a.add(x.topRows(300));
  b.add(x.middleRows(300, 500));
  c.add(x.bottomRows(100));
  a.merge(b).merge(c);
  EXPECT_EQ(a.token_count(), 900);
  EXPECT_LT((a.gram() - single.gram()).norm(), 1e-12 * single.gram().norm());
}

TEST(GramAccumulator, RejectsBadInputAndStaysUnchanged) {
  GramAccumulator g(8);
  g.add(gaussian(10, 8, 3));
  const MatrixXd before = g.gram();
  MatrixXd bad = gaussian(600, 8, 4);
  bad(517, 6) = std::numeric_limits<double>::quiet_NaN();  // in the third internal block
  try {
    g.add(bad);
    FAIL() << "expected InvalidArgument";
  } catch (const kqsvd::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("kqsvd::GramAccumulator::add: argument 'rows' contains a non-finite value "
                                         "(nan) at row 517, column 6"),
              std::string::npos)
        << e.what();
  }
  EXPECT_EQ(g.gram(), before);
  EXPECT_EQ(g.token_count(), 10);
  EXPECT_THROW(g.add(gaussian(4, 7, 5)), kqsvd::InvalidArgument);
  EXPECT_THROW(GramAccumulator(0), kqsvd::InvalidArgument);
  EXPECT_THROW(GramAccumulator(4).mean_gram(), kqsvd::InvalidArgument);
  GramAccumulator other(9);
  EXPECT_THROW(g.merge(other), kqsvd::InvalidArgument);
  g.reset();
  EXPECT_EQ(g.token_count(), 0);
  EXPECT_EQ(g.gram().norm(), 0.0);
}



using RowMajorFloat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// gram() of `x` added in consecutive blocks of the given lengths (the last block takes the rest).
template <typename Rows>
MatrixXd gram_of_blocks(const Rows& x, const std::vector<Index>& lengths) {
  GramAccumulator g(x.cols());
  Index first = 0;
  for (const Index length : lengths) {
    if (first >= x.rows()) break;
    const Index count = std::min(length, x.rows() - first);
    g.add(x.middleRows(first, count));
    first += count;
  }
  if (first < x.rows()) g.add(x.bottomRows(x.rows() - first));
  EXPECT_EQ(g.token_count(), x.rows());
  return g.gram();
}


// The determinism guarantee across splits: chunk and task boundaries sit at absolute positions in the
// stream, so any cut of the same token sequence into add() calls gives the same bytes. Dimensions with
// chunks that divide a task (d = 64: 128-token chunks), that do not (d = 100: 81), and wide chunks (d = 3:
// 256); cuts mid-chunk, on chunk and task boundaries, single tokens, and blocks spanning many tasks.
TEST(GramAccumulator, ByteIdenticalForAnySplitOfTheStream) {
  for (const Index d : {3, 64, 100}) {
    const Index n = 9000;  // 4 whole tasks and a partial one
    const MatrixXd x = gaussian(n, d, static_cast<unsigned>(d));
    const MatrixXd one_block = gram_of_blocks(x, {});
    const std::vector<std::vector<Index>> splits = {
        {1, 1, 1, 5000},                   // single tokens, then a block of several tasks
        {2047, 1, 2048, 2049},             // around a task boundary
        {81, 81, 128, 128, 256, 4000},     // on and off chunk boundaries
        {4095, 4097},                      // parallel whole tasks after a partial one
        {3000, 3000, 3000},                // thirds
        {7, 700, 13, 1300, 6000},
    };
    for (const auto& split : splits) {
      const MatrixXd g = gram_of_blocks(x, split);
      EXPECT_EQ(g, one_block) << "d = " << d << ", first block " << split.front();
    }
    // Many small irregular blocks, tokens one to 300 at a time.
    std::vector<Index> irregular;
    for (Index i = 0; i < 200; ++i) irregular.push_back(1 + (i * 37) % 300);
    EXPECT_EQ(gram_of_blocks(x, irregular), one_block) << "d = " << d;
    // ... and the same bytes on any thread count.
    for (const int threads : {1, 2, 3}) {
      kqsvd::test::with_threads(threads, [&] {
        EXPECT_EQ(gram_of_blocks(x, {4095, 4097}), one_block) << threads << " threads";
      });
    }
    // Independent check: the direct product in double.
    const MatrixXd direct = x.transpose() * x;
    EXPECT_LT((one_block - direct).norm(), 1e-12 * direct.norm());
  }
}

// The same values as float or double, row- or column-major, a Matrix or a Map: the same bytes.
TEST(GramAccumulator, ByteIdenticalForAnyStorageOrderAndScalarOfTheSameValues) {
  const Index n = 5000, d = 48;
  const Eigen::MatrixXf column_major = gaussian(n, d, 7).cast<float>();
  const RowMajorFloat row_major = column_major;
  const MatrixXd widened = column_major.cast<double>();
  const MatrixXd reference = gram_of_blocks(row_major, {});
  EXPECT_EQ(gram_of_blocks(column_major, {}), reference);
  EXPECT_EQ(gram_of_blocks(widened, {333, 2500}), reference);
  EXPECT_EQ(gram_of_blocks(column_major, {1, 4096}), reference);
  const Eigen::Map<const RowMajorFloat> map(row_major.data(), n, d);
  EXPECT_EQ(gram_of_blocks(map, {2048, 1}), reference);
  // Exactness: products of floats are exact in double, so only the order of sums separates these from
  // the direct product.
  const MatrixXd direct = widened.transpose() * widened;
  EXPECT_LT((reference - direct).norm(), 1e-12 * direct.norm());
}

// A rejected block leaves the accumulator as it was, wherever in a chunk or task the stream stood: the
// tokens that follow give the same bytes as if the rejected block had never been offered.
TEST(GramAccumulator, RejectedBlocksMidStreamChangeNoByte) {
  const Index n = 6000, d = 16;
  const MatrixXd x = gaussian(n, d, 8);
  const MatrixXd expected = gram_of_blocks(x, {});
  for (const Index cut : {Index{5}, Index{128}, Index{2047}, Index{2100}}) {
    for (const Index bad_rows : {Index{3}, Index{300}, Index{5000}}) {
      GramAccumulator g(d);
      g.add(x.topRows(cut));
      MatrixXd bad = gaussian(bad_rows, d, 9);
      bad(bad_rows - 1, 4) = std::numeric_limits<double>::infinity();
      EXPECT_THROW(g.add(bad), kqsvd::InvalidArgument);
      MatrixXd huge = gaussian(bad_rows, d, 10);
      huge(bad_rows / 2, 3) = 1e200;  // its square overflows: refused as a NumericalError
      EXPECT_THROW(g.add(huge), kqsvd::NumericalError);
      EXPECT_EQ(g.token_count(), cut);
      g.add(x.bottomRows(n - cut));
      EXPECT_EQ(g.gram(), expected) << "cut " << cut << ", rejected " << bad_rows << " rows";
    }
  }
}

// gram() reads the state without changing it: asking for the Gram mid-stream changes no later byte,
// and a mid-stream Gram is the Gram of the tokens so far.
TEST(GramAccumulator, GramMidStreamIsExactAndChangesNothing) {
  const Index n = 5000, d = 32;
  const MatrixXd x = gaussian(n, d, 11);
  GramAccumulator g(d);
  g.add(x.topRows(2111));  // a closed task, and an open one with a chunk in progress
  const MatrixXd partial = g.gram();
  const MatrixXd direct_partial = x.topRows(2111).transpose() * x.topRows(2111);
  EXPECT_LT((partial - direct_partial).norm(), 1e-12 * direct_partial.norm());
  g.add(x.bottomRows(n - 2111));
  EXPECT_EQ(g.gram(), gram_of_blocks(x, {}));
}

TEST(GramAccumulator, RestoredFromItsGramMergesAndFitsLikeTheOriginal) {
  const MatrixXd x = kqsvd::test::gaussian(300, 6, 31), y = kqsvd::test::gaussian(200, 6, 32);
  kqsvd::GramAccumulator original(6), other(6);
  original.add(x);
  other.add(y);
  const kqsvd::GramAccumulator restored =
      kqsvd::GramAccumulator::restored(original.gram(), original.token_count(), original.largest_magnitudes());
  EXPECT_TRUE(restored.gram() == original.gram());
  EXPECT_EQ(restored.token_count(), 300);
  kqsvd::GramAccumulator merged = restored;
  merged.merge(other);
  EXPECT_TRUE(merged.gram().isApprox(x.transpose() * x + y.transpose() * y, 1e-12));
  EXPECT_EQ(merged.token_count(), 500);
  MatrixXd asymmetric = original.gram();
  asymmetric(0, 1) += 1.0;
  kqsvd::test::expect_invalid([&] { kqsvd::GramAccumulator::restored(asymmetric, 300, original.largest_magnitudes()); }, "symmetric");
  kqsvd::test::expect_invalid([&] { kqsvd::GramAccumulator::restored(original.gram(), -1, original.largest_magnitudes()); }, "tokens");
  kqsvd::test::expect_invalid([&] { kqsvd::GramAccumulator::restored(original.gram(), 0, original.largest_magnitudes()); }, "0 tokens");
  kqsvd::test::expect_invalid([&] { kqsvd::GramAccumulator::restored(original.gram(), 300, Eigen::ArrayXd::Zero(5)); }, "largest");
  kqsvd::test::expect_invalid([&] { kqsvd::GramAccumulator::restored(MatrixXd::Ones(6, 5), 300, Eigen::ArrayXd::Zero(6)); }, "square");
}

}  // namespace kqsvd_test_gram_accumulator
