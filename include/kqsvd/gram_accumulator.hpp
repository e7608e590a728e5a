// kqsvd/gram_accumulator.hpp -- streaming calibration Gram matrices.
//
// KQ-SVD and its baselines need only the d x d Gram matrices G = X^T X of the calibration keys, queries
// and values of each head, never the n x d activations themselves. GramAccumulator builds G in one pass
// over any number of row blocks (rows are tokens), in O(d^2) memory, accumulating in double whatever
// the input scalar. Accumulators of separate shards merge exactly: G = G_1 + G_2.
//
// A large block is split into fixed runs of task_rows tokens whose Grams are computed in parallel with
// OpenMP (when built with it) and added in run order: the split depends on the block's length only, so
// the result is bit-identical for any number of threads.
//
//   kqsvd::GramAccumulator keys(64);
//   for (const auto& block : calibration_blocks)   // each block: tokens x 64, float or double,
//     keys.add(block);                             // row- or column-major, a Matrix or a Map
//   keys.merge(keys_from_another_machine);
//   Eigen::MatrixXd mean = keys.mean_gram();       // G / token_count()
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "kqsvd/detail/parallel_for.hpp"
#include "kqsvd/detail/validation.hpp"
#include "kqsvd/error.hpp"

namespace kqsvd {

class GramAccumulator {
 public:
  using Index = Eigen::Index;

  // Rows per conversion chunk, at most: input is widened to double a chunk at a time, so the temporary
  // stays in cache and the caller's data is never copied whole. Wide rows get fewer (see chunk_rows).
  static constexpr Index block_rows = 256;
  // Rows per parallel task: blocks of up to this many rows are added serially; longer ones split.
  static constexpr Index task_rows = 2048;

  explicit GramAccumulator(Index dimension)
      : lower_(Eigen::MatrixXd::Zero(validated_dimension(dimension), dimension)),
        largest_(Eigen::ArrayXd::Zero(dimension)) {}

  Index dimension() const { return lower_.rows(); }
  std::int64_t token_count() const { return token_count_; }

  // Adds the rows of `rows` (tokens x dimension()). The whole block is validated before anything is
  // added, so a rejected block leaves the accumulator unchanged.
  template <typename Derived>
  GramAccumulator& add(const Eigen::MatrixBase<Derived>& rows) {
    static_assert(std::is_floating_point<typename Derived::Scalar>::value,
                  "GramAccumulator::add takes float or double rows");
    detail::require_columns("kqsvd::GramAccumulator::add", "rows", rows.cols(), dimension());
    // Eigen 3.4's allFinite() is a scalar loop (1 ns per entry, a third of the accumulation's cost at
    // d = 128). A product with zero summed is the same test, vectorised: 0 for finite rows, NaN if any
    // entry is infinite or NaN. Only then does require_finite look for the entry to report.
    if (!((rows.array() * typename Derived::Scalar(0)).sum() == typename Derived::Scalar(0))) {
      detail::require_finite("kqsvd::GramAccumulator::add", "rows", rows);
    }
    const Index n = rows.rows();
    if (n == 0) return *this;
    const Index tasks = (n + task_rows - 1) / task_rows;
    // The block's Gram is summed apart and added only once it is known to be representable, so that a
    // rejected block leaves the accumulator unchanged.
    Eigen::MatrixXd block = Eigen::MatrixXd::Zero(dimension(), dimension());
    Eigen::ArrayXd block_largest = Eigen::ArrayXd::Zero(dimension());
    if (tasks <= 1) {
      Eigen::MatrixXd chunk;
      accumulate(rows, block, block_largest, chunk);
    } else {
      // Partial Grams of at most `wave` tasks at a time: bounded memory (wave x d x d doubles).
      constexpr Index wave = 8;
      const auto slots = static_cast<std::size_t>(std::min(wave, tasks));
      std::vector<Eigen::MatrixXd> partial(slots);
      std::vector<Eigen::ArrayXd> partial_largest(slots);
      for (Index first_task = 0; first_task < tasks; first_task += wave) {
        const Index count = std::min(wave, tasks - first_task);
        detail::parallel_for(
            count, [] { return Eigen::MatrixXd(); },
            [&](Index task, Eigen::MatrixXd& chunk) {
              const Index first = (first_task + task) * task_rows;
              const auto slot = static_cast<std::size_t>(task);
              partial[slot].setZero(dimension(), dimension());
              partial_largest[slot].setZero(dimension());
              accumulate(rows.middleRows(first, std::min(task_rows, n - first)), partial[slot], partial_largest[slot],
                         chunk);
            },
            /*always_open_region=*/true);
        for (std::size_t slot = 0; slot < static_cast<std::size_t>(count); ++slot) {
          block.triangularView<Eigen::Lower>() += partial[slot];
          block_largest = block_largest.max(partial_largest[slot]);
        }
      }
    }
    commit("kqsvd::GramAccumulator::add", "rows", block, block_largest, n);
    return *this;
  }

  // Adds another accumulator's tokens, as if its blocks had been added here.
  GramAccumulator& merge(const GramAccumulator& other) {
    if (other.dimension() != dimension()) {
      detail::throw_invalid("kqsvd::GramAccumulator::merge", "other",
                            "has dimension " + std::to_string(other.dimension()) + ", expected " +
                                std::to_string(dimension()));
    }
    commit("kqsvd::GramAccumulator::merge", "other", other.lower_, other.largest_, other.token_count_);
    return *this;
  }

  void reset() {
    lower_.setZero();
    largest_.setZero();
    token_count_ = 0;
  }

  // The sum of x^T x over all tokens added (d x d, symmetric).
  // Throws NumericalError when a dimension's values were all too small for their squares to be
  // represented in double (|x| < sqrt(DBL_MIN), about 1.5e-154): that part of the Gram has lost its
  // bits, and a projection fitted from it would be silently wrong.
  Eigen::MatrixXd gram() const {
    require_representable_squares("kqsvd::GramAccumulator::gram");
    return lower_.selfadjointView<Eigen::Lower>();
  }

  // gram() / token_count(): the second-moment matrix, O(1) in scale whatever the token count.
  Eigen::MatrixXd mean_gram() const {
    if (token_count_ == 0) {
      throw InvalidArgument("kqsvd::GramAccumulator::mean_gram: no tokens have been added");
    }
    return gram() / static_cast<double>(token_count_);
  }

 private:
  static Index validated_dimension(Index dimension) {
    if (dimension <= 0) {
      detail::throw_invalid("kqsvd::GramAccumulator", "dimension",
                            "must be positive, got " + std::to_string(dimension));
    }
    return dimension;
  }

  // Rows per chunk for this dimension: the chunk (and Eigen's packing buffers for a rank update of that
  // depth) stay within 64 KiB. Larger temporaries are fresh pages from the OS on every call here --
  // measured at d = 128: 256-row chunks ran at 5 GFLOP/s in a fresh process, 64-row chunks at 50.
  Index chunk_rows() const { return std::clamp<Index>((Index{64} << 10) / (8 * dimension()), 1, block_rows); }

  // lower += rows^T rows (lower triangle only), a chunk of rows at a time copied as double. Row-major
  // rows (tokens contiguous, as models produce them) are copied transposed, d x chunk column-major:
  // a contiguous read, and the operand layout Eigen's rank update is fastest on (measured at d = 128:
  // 55 GFLOP/s against 42 untransposed). Column-major rows are copied as they are.
  // Also tracks each column's largest magnitude, from the chunk while it is in cache.
  template <typename Derived>
  void accumulate(const Eigen::MatrixBase<Derived>& rows, Eigen::MatrixXd& lower, Eigen::ArrayXd& largest,
                  Eigen::MatrixXd& chunk) const {
    const Index step = chunk_rows();
    for (Index first = 0; first < rows.rows(); first += step) {
      const Index count = std::min(step, rows.rows() - first);
      if constexpr (static_cast<bool>(Derived::IsRowMajor)) {
        chunk = rows.middleRows(first, count).transpose().template cast<double>();
        lower.selfadjointView<Eigen::Lower>().rankUpdate(chunk);
        largest = largest.max(chunk.cwiseAbs().rowwise().maxCoeff().array());
      } else {
        chunk = rows.middleRows(first, count).template cast<double>();
        lower.selfadjointView<Eigen::Lower>().rankUpdate(chunk.transpose());
        largest = largest.max(chunk.cwiseAbs().colwise().maxCoeff().transpose().array());
      }
    }
  }

  // Adds a block's (or another accumulator's) Gram, unless the sum leaves double's range: then throws
  // NumericalError naming `argument` and leaves everything unchanged. Off-diagonal entries are bounded by
  // the diagonal (|G_ij| <= sqrt(G_ii G_jj)), so a finite diagonal means a finite Gram.
  void commit(const char* function, const char* argument, const Eigen::MatrixXd& lower_gram,
              const Eigen::ArrayXd& largest, std::int64_t tokens) {
    const Eigen::ArrayXd diagonal = lower_.diagonal().array() + lower_gram.diagonal().array();
    for (Index j = 0; j < dimension(); ++j) {
      if (!std::isfinite(diagonal(j))) {
        std::ostringstream out;
        out << function << ": argument '" << argument << "' has values up to " << largest(j) << " in magnitude in column "
            << j << ", whose squares summed over " << token_count_ + tokens
            << " tokens exceed the range of double; rescale the data (the fit does not depend on a common scale)";
        throw NumericalError(out.str());
      }
    }
    lower_.triangularView<Eigen::Lower>() += lower_gram;
    largest_ = largest_.max(largest);
    token_count_ += tokens;
  }

  void require_representable_squares(const char* function) const {
    const double smallest_square_root = std::sqrt(std::numeric_limits<double>::min());
    for (Index j = 0; j < dimension(); ++j) {
      if (largest_(j) > 0.0 && largest_(j) < smallest_square_root) {
        std::ostringstream out;
        out << function << ": column " << j << " of the rows added has values only up to " << largest_(j)
            << " in magnitude; below " << smallest_square_root
            << " their squares underflow in double and the Gram loses them; rescale the data";
        throw NumericalError(out.str());
      }
    }
  }

  Eigen::MatrixXd lower_;     // only the lower triangle is maintained
  Eigen::ArrayXd largest_;    // per column: the largest magnitude added, to detect underflowed squares
  std::int64_t token_count_ = 0;
};

}  // namespace kqsvd
