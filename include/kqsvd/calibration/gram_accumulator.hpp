// kqsvd/calibration/gram_accumulator.hpp -- streaming calibration Gram matrices.
//
// KQ-SVD and its baselines need only the d x d Gram matrices G = X^T X of the calibration keys, queries
// and values of each head, never the n x d activations themselves. GramAccumulator builds G in one pass
// over any number of row blocks (rows are tokens), in O(d^2) memory, accumulating in double whatever
// the input scalar. Accumulators of separate shards merge: G = G_1 + G_2.
//
// The token stream is cut into tasks of task_rows tokens at fixed positions counted from the first
// token added; the whole tasks inside a block are summed in parallel with OpenMP (when built with it)
// and added in stream order. gram() is therefore byte-identical for any thread count and for any way of
// cutting the same token sequence into add() calls (one block or many, one file or several), whatever
// the storage order of the blocks. merge() adds another accumulator's Gram: equal to one pass up to
// rounding, not byte for byte.
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

#include "kqsvd/core/detail/parallel_for.hpp"
#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/error.hpp"

namespace kqsvd {

class GramAccumulator {
 public:
  using Index = Eigen::Index;

  // Rows per chunk, at most: input is widened to double a chunk at a time, so the temporary stays in
  // cache and the caller's data is never copied whole. Wide rows get fewer (see chunk_rows).
  static constexpr Index block_rows = 256;
  // Tokens per task: the stream is cut into tasks of this many tokens, counted from the first token
  // added; whole tasks inside one add() are summed in parallel.
  static constexpr Index task_rows = 2048;

  explicit GramAccumulator(Index dimension)
      : lower_(Eigen::MatrixXd::Zero(validated_dimension(dimension), dimension)),
        open_task_(Eigen::MatrixXd::Zero(dimension, dimension)),
        pending_(dimension, chunk_rows(dimension)),
        largest_(Eigen::ArrayXd::Zero(dimension)) {}

  // An accumulator holding a Gram summed elsewhere (a Gram file, another process): as if an
  // accumulator of `tokens` tokens whose columns reached `largest` in magnitude had been merged into an
  // empty one. `gram` must be square, symmetric, finite, with a non-negative diagonal; `largest` >= 0.
  static GramAccumulator restored(const Eigen::Ref<const Eigen::MatrixXd>& gram, std::int64_t tokens,
                                  const Eigen::Ref<const Eigen::ArrayXd>& largest) {
    constexpr const char* function = "kqsvd::GramAccumulator::restored";
    if (gram.rows() != gram.cols() || gram.rows() == 0) {
      detail::throw_invalid(function, "gram", "is " + detail::shape_string(gram.rows(), gram.cols()) + ", expected square");
    }
    detail::require_finite(function, "gram", gram);
    if (!gram.isApprox(gram.transpose(), 1e-12) || (gram.diagonal().array() < 0.0).any()) {
      detail::throw_invalid(function, "gram", "is not symmetric with a non-negative diagonal (not a sum of x^T x)");
    }
    if (tokens < 0) detail::throw_invalid(function, "tokens", "must be >= 0, got " + std::to_string(tokens));
    if (tokens == 0 && !gram.isZero(0.0)) detail::throw_invalid(function, "gram", "must be zero for 0 tokens");
    if (largest.size() != gram.rows() || !largest.allFinite() || (largest < 0.0).any()) {
      detail::throw_invalid(function, "largest",
                            "must hold " + std::to_string(gram.rows()) + " finite magnitudes >= 0, one per column");
    }
    GramAccumulator result(gram.rows());
    result.lower_.triangularView<Eigen::Lower>() = gram;
    result.largest_ = largest;
    result.token_count_ = tokens;
    return result;
  }

  Index dimension() const { return lower_.rows(); }
  std::int64_t token_count() const { return token_count_; }
  // Per column, the largest magnitude added (what restored() takes back, with gram() and token_count()).
  const Eigen::ArrayXd& largest_magnitudes() const { return largest_; }

  // Adds the rows of `rows` (tokens x dimension()). The whole block is validated before anything is
  // added, so a rejected block leaves the accumulator unchanged.
  template <typename Derived>
  GramAccumulator& add(const Eigen::MatrixBase<Derived>& rows) {
    static_assert(std::is_floating_point<typename Derived::Scalar>::value,
                  "GramAccumulator::add takes float or double rows");
    constexpr const char* function = "kqsvd::GramAccumulator::add";
    detail::require_columns(function, "rows", rows.cols(), dimension());
    detail::require_finite(function, "rows", rows);
    const Index n = rows.rows();
    if (n == 0) return *this;

    // Where the stream stands: `offset` tokens into the open task, whose chunk in progress holds
    // pending_count_ of them.
    Index offset = open_task_offset();
    const Index chunk_length = std::min(pending_.cols(), task_rows - (offset - pending_count_));
    if (pending_count_ + n < chunk_length) {
      // The rows only extend the chunk in progress: nothing is summed yet. Columns past pending_count_
      // are unused, so a rejected block leaves nothing behind.
      auto added = pending_.middleCols(pending_count_, n);
      added = rows.transpose().template cast<double>();
      const Eigen::ArrayXd largest = largest_.max(added.cwiseAbs().rowwise().maxCoeff().array());
      require_representable_sum(function, "rows", largest, n, lower_, open_task_, pending_.leftCols(pending_count_ + n));
      pending_count_ += n;
      finish_add(n, largest);
      return *this;
    }

    // The new state is built apart and replaces the old one only once it is known to be representable.
    Eigen::ArrayXd largest = largest_;
    Eigen::MatrixXd task = open_task_;
    Eigen::MatrixXd lower;  // a copy of lower_, made when the first task completes
    bool lower_copied = false;
    const auto close_task = [&](const Eigen::MatrixXd& task_gram) {
      if (!lower_copied) {
        lower = lower_;
        lower_copied = true;
      }
      lower.triangularView<Eigen::Lower>() += task_gram;
    };

    Index consumed = 0;
    Eigen::MatrixXd chunk;
    if (pending_count_ > 0) {
      consumed = chunk_length - pending_count_;
      pending_.middleCols(pending_count_, consumed) = rows.topRows(consumed).transpose().template cast<double>();
      add_chunk(pending_.leftCols(chunk_length), task, largest);
      offset += consumed;
    }
    while (consumed < n) {
      if (offset == task_rows) {
        close_task(task);
        task.setZero();
        offset = 0;
      }
      if (offset == 0 && n - consumed >= 2 * task_rows) {
        // Whole tasks, summed in parallel and closed in task order. Each is summed from zero over its
        // chunks exactly as the serial path below sums one, so the bytes do not depend on which path a
        // task took.
        const Index tasks = (n - consumed) / task_rows;
        add_tasks(rows.middleRows(consumed, tasks * task_rows), tasks, close_task, largest);
        consumed += tasks * task_rows;
        continue;
      }
      const Index length = std::min(pending_.cols(), task_rows - offset);
      if (n - consumed < length) break;
      chunk = rows.middleRows(consumed, length).transpose().template cast<double>();
      add_chunk(chunk, task, largest);
      consumed += length;
      offset += length;
    }
    if (offset == task_rows) {
      close_task(task);
      task.setZero();
    }
    // The rest starts the next chunk.
    const Index rest = n - consumed;
    Eigen::MatrixXd pending(dimension(), pending_.cols());
    if (rest > 0) {
      pending.leftCols(rest) = rows.bottomRows(rest).transpose().template cast<double>();
      largest = largest.max(pending.leftCols(rest).cwiseAbs().rowwise().maxCoeff().array());
    }
    require_representable_sum(function, "rows", largest, n, lower_copied ? lower : lower_, task, pending.leftCols(rest));
    if (lower_copied) lower_.swap(lower);
    open_task_.swap(task);
    pending_.swap(pending);
    pending_count_ = rest;
    finish_add(n, largest);
    return *this;
  }

  // Adds another accumulator's tokens: afterwards gram() equals, to rounding, the Gram of both streams.
  // This accumulator's own task and chunk boundaries stay where they were (see the members, below).
  GramAccumulator& merge(const GramAccumulator& other) {
    constexpr const char* function = "kqsvd::GramAccumulator::merge";
    if (other.dimension() != dimension()) {
      detail::throw_invalid(function, "other",
                            "has dimension " + std::to_string(other.dimension()) + ", expected " +
                                std::to_string(dimension()));
    }
    Eigen::MatrixXd lower = lower_;
    lower.triangularView<Eigen::Lower>() += other.lower_sum();
    const Eigen::ArrayXd largest = largest_.max(other.largest_);
    require_representable_sum(function, "other", largest, other.token_count_, lower, open_task_,
                              pending_.leftCols(pending_count_));
    lower_.swap(lower);
    largest_ = largest;
    token_count_ += other.token_count_;
    return *this;
  }

  void reset() {
    lower_.setZero();
    open_task_.setZero();
    pending_count_ = 0;
    largest_.setZero();
    stream_tokens_ = 0;
    token_count_ = 0;
  }

  // The sum of x^T x over all tokens added (d x d, symmetric).
  // Throws NumericalError when a dimension's values were all too small for their squares to be
  // represented in double (|x| < sqrt(DBL_MIN), about 1.5e-154): that part of the Gram has lost its
  // bits, and a projection fitted from it would be silently wrong.
  Eigen::MatrixXd gram() const {
    require_representable_squares("kqsvd::GramAccumulator::gram");
    return lower_sum().selfadjointView<Eigen::Lower>();
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
  // depth) stay within 64 KiB. Larger temporaries are fresh pages from the OS on every call here, ten
  // times slower in a fresh process (bench/README.md, design measurements).
  static Index chunk_rows(Index dimension) {
    return std::clamp<Index>((Index{64} << 10) / (8 * dimension), 1, block_rows);
  }

  Index open_task_offset() const { return static_cast<Index>(stream_tokens_ % task_rows); }

  // gram += chunk chunk^T. Chunks are always d x length column-major, tokens in columns: a contiguous
  // copy from row-major rows (tokens contiguous, as models produce them), and the operand layout Eigen's
  // rank update is fastest on (bench/README.md, design measurements). One layout for
  // every input also makes the bytes independent of the caller's storage order.
  static void add_chunk(const Eigen::Ref<const Eigen::MatrixXd>& chunk, Eigen::MatrixXd& gram, Eigen::ArrayXd& largest) {
    gram.selfadjointView<Eigen::Lower>().rankUpdate(chunk);
    largest = largest.max(chunk.cwiseAbs().rowwise().maxCoeff().array());
  }

  // Sums `tasks` whole tasks of `rows` (tasks x task_rows tokens, starting on a task boundary) in
  // parallel, at most `wave` at a time (bounded memory: wave x d x d doubles), and closes them in order.
  template <typename Derived, typename CloseTask>
  void add_tasks(const Eigen::MatrixBase<Derived>& rows, Index tasks, const CloseTask& close_task,
                 Eigen::ArrayXd& largest) const {
    constexpr Index wave = 8;
    const auto slots = static_cast<std::size_t>(std::min(wave, tasks));
    std::vector<Eigen::MatrixXd> partial(slots);
    std::vector<Eigen::ArrayXd> partial_largest(slots);
    const Index step = pending_.cols();
    for (Index first_task = 0; first_task < tasks; first_task += wave) {
      const Index count = std::min(wave, tasks - first_task);
      detail::parallel_for(
          count, [] { return Eigen::MatrixXd(); },
          [&](Index task, Eigen::MatrixXd& chunk) {
            const Index first = (first_task + task) * task_rows;
            const auto slot = static_cast<std::size_t>(task);
            partial[slot].setZero(dimension(), dimension());
            partial_largest[slot].setZero(dimension());
            for (Index offset = 0; offset < task_rows; offset += step) {
              const Index length = std::min(step, task_rows - offset);
              chunk = rows.middleRows(first + offset, length).transpose().template cast<double>();
              add_chunk(chunk, partial[slot], partial_largest[slot]);
            }
          },
          /*always_open_region=*/true);
      for (std::size_t slot = 0; slot < static_cast<std::size_t>(count); ++slot) {
        close_task(partial[slot]);
        largest = largest.max(partial_largest[slot]);
      }
    }
  }

  void finish_add(Index tokens, const Eigen::ArrayXd& largest) {
    largest_ = largest;
    stream_tokens_ += tokens;
    token_count_ += tokens;
  }

  // Lower triangle of the whole Gram: the closed tasks, then the open task with its chunk in progress.
  Eigen::MatrixXd lower_sum() const {
    Eigen::MatrixXd open = open_task_;
    if (pending_count_ > 0) open.selfadjointView<Eigen::Lower>().rankUpdate(pending_.leftCols(pending_count_));
    Eigen::MatrixXd sum = lower_;
    sum.triangularView<Eigen::Lower>() += open;
    return sum;
  }

  // Throws NumericalError naming `argument` unless lower + task + pending pending^T, the Gram the state
  // would hold, stays within double's range. Off-diagonal entries are bounded by the diagonal
  // (|G_ij| <= sqrt(G_ii G_jj)), so a finite diagonal means a finite Gram.
  void require_representable_sum(const char* function, const char* argument, const Eigen::ArrayXd& largest,
                                 std::int64_t tokens, const Eigen::MatrixXd& lower, const Eigen::MatrixXd& task,
                                 const Eigen::Ref<const Eigen::MatrixXd>& pending) const {
    const Eigen::ArrayXd diagonal = lower.diagonal().array() + task.diagonal().array() +
                                    pending.rowwise().squaredNorm().array();
    for (Index j = 0; j < dimension(); ++j) {
      if (!std::isfinite(diagonal(j))) {
        std::ostringstream out;
        out << function << ": argument '" << argument << "' has values up to " << largest(j) << " in magnitude in column "
            << j << ", whose squares summed over " << token_count_ + tokens
            << " tokens exceed the range of double; rescale the data (the fit does not depend on a common scale)";
        throw NumericalError(out.str());
      }
    }
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

  // The stream is cut at absolute token positions: tasks of task_rows tokens, each summed from zero
  // over chunks of pending_.cols() tokens (the last one shorter when the two do not divide), and closed
  // tasks added to lower_ in order. A task or chunk left open by one add() is carried into the next, so
  // every floating-point operation, and hence every byte of gram(), depends only on the sequence of
  // tokens -- not on how it was cut into add() calls, nor on the thread count or the input's storage
  // order or type (float values widen to double exactly).
  Eigen::MatrixXd lower_;      // closed tasks and merged accumulators (lower triangle only)
  Eigen::MatrixXd open_task_;  // the open task's completed chunks (lower triangle only)
  Eigen::MatrixXd pending_;    // d x chunk: the chunk in progress, its first pending_count_ columns
  Index pending_count_ = 0;
  Eigen::ArrayXd largest_;     // per column: the largest magnitude added, to detect underflowed squares
  std::int64_t stream_tokens_ = 0;  // tokens passed to add(): positions in the stream
  std::int64_t token_count_ = 0;    // stream_tokens_ plus merged tokens
};

}  // namespace kqsvd
