// kqsvd/gram_accumulator.hpp -- streaming calibration Gram matrices.
//
// KQ-SVD and its baselines need only the d x d Gram matrices G = X^T X of the calibration keys, queries
// and values of each head, never the n x d activations themselves. GramAccumulator builds G in one pass
// over any number of row blocks (rows are tokens), in O(d^2) memory, accumulating in double whatever
// the input scalar. Accumulators of separate shards merge exactly: G = G_1 + G_2.
//
//   kqsvd::GramAccumulator keys(64);
//   for (const auto& block : calibration_blocks)   // each block: tokens x 64, float or double,
//     keys.add(block);                             // row- or column-major, a Matrix or a Map
//   keys.merge(keys_from_another_machine);
//   Eigen::MatrixXd mean = keys.mean_gram();       // G / token_count()
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kqsvd/detail/validation.hpp"
#include "kqsvd/error.hpp"

namespace kqsvd {

class GramAccumulator {
 public:
  using Index = Eigen::Index;

  // Rows per conversion chunk: float input is widened to double a chunk at a time, so the temporary
  // stays in cache (block_rows x d doubles) and the caller's data is never copied whole.
  static constexpr Index block_rows = 256;

  explicit GramAccumulator(Index dimension) : lower_(validated_dimension(dimension), dimension) {
    lower_.setZero();
  }

  Index dimension() const { return lower_.rows(); }
  std::int64_t token_count() const { return token_count_; }

  // Adds the rows of `rows` (tokens x dimension()). The whole block is validated before anything is
  // added, so a rejected block leaves the accumulator unchanged.
  template <typename Derived>
  GramAccumulator& add(const Eigen::MatrixBase<Derived>& rows) {
    static_assert(std::is_floating_point<typename Derived::Scalar>::value,
                  "GramAccumulator::add takes float or double rows");
    detail::require_columns("kqsvd::GramAccumulator::add", "rows", rows.cols(), dimension());
    detail::require_finite("kqsvd::GramAccumulator::add", "rows", rows);
    Eigen::MatrixXd chunk;
    for (Index first = 0; first < rows.rows(); first += block_rows) {
      const Index count = std::min(block_rows, rows.rows() - first);
      chunk = rows.middleRows(first, count).template cast<double>();
      lower_.selfadjointView<Eigen::Lower>().rankUpdate(chunk.transpose());
    }
    token_count_ += rows.rows();
    return *this;
  }

  // Adds another accumulator's tokens, as if its blocks had been added here.
  GramAccumulator& merge(const GramAccumulator& other) {
    if (other.dimension() != dimension()) {
      detail::throw_invalid("kqsvd::GramAccumulator::merge", "other",
                            "has dimension " + std::to_string(other.dimension()) + ", expected " +
                                std::to_string(dimension()));
    }
    lower_.triangularView<Eigen::Lower>() += other.lower_;
    token_count_ += other.token_count_;
    return *this;
  }

  void reset() {
    lower_.setZero();
    token_count_ = 0;
  }

  // The sum of x^T x over all tokens added (d x d, symmetric).
  Eigen::MatrixXd gram() const { return lower_.selfadjointView<Eigen::Lower>(); }

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

  Eigen::MatrixXd lower_;  // only the lower triangle is maintained
  std::int64_t token_count_ = 0;
};

}  // namespace kqsvd
