#include <gtest/gtest.h>

#include <kqsvd/gram_accumulator.hpp>

#include <limits>
#include <vector>

#include "test_support.hpp"

namespace {

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

}  // namespace
