// kqsvd/calibration/output_projection.hpp -- the value side's second Gram, from the output-projection weights.
//
// A head's output P V is multiplied by that head's d columns W_h of o_proj.weight (hidden x H*d,
// PyTorch layout), so what the model uses of V is V W_h^T. KQ-SVD for values therefore needs
// G_W = W_h^T W_h, from the weights alone. Under GQA the g query heads of a group share V:
//   GroupCombination::concatenate  G_W = sum_j W_j^T W_j      (the exact objective; default)
//   GroupCombination::average      G_W = Wbar^T Wbar, Wbar = mean_j W_j   (the authors' scripts)
//
//   Eigen::MatrixXd gw = kqsvd::output_projection_gram(o_proj, /*head_dim=*/64,
//                                                      /*first_head=*/2 * kv_head, /*head_count=*/2);
#pragma once

#include <Eigen/Core>

#include <string>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/error.hpp"
#include "kqsvd/calibration/gram_accumulator.hpp"

namespace kqsvd {

enum class GroupCombination { concatenate, average };

inline const char* to_string(GroupCombination combination) {
  return combination == GroupCombination::concatenate ? "concatenate" : "average";
}

template <typename Derived>
Eigen::MatrixXd output_projection_gram(const Eigen::MatrixBase<Derived>& output_weight, Eigen::Index head_dim,
                                       Eigen::Index first_head, Eigen::Index head_count,
                                       GroupCombination combination = GroupCombination::concatenate) {
  constexpr const char* where = "kqsvd::output_projection_gram";
  if (head_dim <= 0 || output_weight.cols() % head_dim != 0) {
    detail::throw_invalid(where, "output_weight",
                          "has " + std::to_string(output_weight.cols()) +
                              " columns, not a positive multiple of head_dim = " + std::to_string(head_dim));
  }
  const Eigen::Index heads = output_weight.cols() / head_dim;
  if (head_count < 1 || first_head < 0 || first_head + head_count > heads) {
    detail::throw_invalid(where, "first_head/head_count",
                          "select heads [" + std::to_string(first_head) + ", " + std::to_string(first_head + head_count) +
                              "), outside the " + std::to_string(heads) + " heads of output_weight");
  }
  // Only the selected heads' columns are read, and checked; a bad entry is then located in the whole
  // matrix, so that the error gives its row and column there.
  const auto slices = output_weight.middleCols(first_head * head_dim, head_count * head_dim);
  if (!detail::all_finite(slices)) detail::require_finite(where, "output_weight", output_weight);
  // The slices' rows are summed as tokens of a GramAccumulator: a symmetric rank update in double over
  // cache-sized chunks, half the flops of W_h^T W_h as a product and no double copy of the hidden x d
  // slice (4 MiB per head of a 7B model, where this was most of a whole-model fit's time).
  GramAccumulator gram(head_dim);
  try {
    if (combination == GroupCombination::concatenate) {
      for (Eigen::Index j = 0; j < head_count; ++j) gram.add(slices.middleCols(j * head_dim, head_dim));
    } else {
      Eigen::MatrixXd mean = Eigen::MatrixXd::Zero(output_weight.rows(), head_dim);
      for (Eigen::Index j = 0; j < head_count; ++j) {
        mean += slices.middleCols(j * head_dim, head_dim).template cast<double>();
      }
      mean /= static_cast<double>(head_count);
      gram.add(mean);
    }
    return gram.gram();
  } catch (const NumericalError& e) {
    // Weights beyond double's squared range: say which argument, not the accumulator's 'rows'.
    throw NumericalError(std::string(where) + ": argument 'output_weight' cannot be squared in double (" + e.what() +
                         ")");
  }
}

}  // namespace kqsvd
