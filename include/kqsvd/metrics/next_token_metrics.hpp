// kqsvd/metrics/next_token_metrics.hpp -- what a compressed cache costs a model's next-token predictions,
// measured against the same model with its full cache.
//
// Per predicted token, from the logits of both models and the true next token:
//   NLL        -log softmax(logits)[target], of each model;
//   KL         KL(full || compressed) of the two next-token distributions, in nats;
//   top-1      whether both models' argmax agree (the first index on ties, as llama2.c's sampler).
// Means run over every token added. The NLL difference carries its paired standard error over tokens,
// sqrt(var(d) / (n - 1)) of the per-token differences d: tokens of one text are correlated, so it
// understates the uncertainty -- read |difference| below about two of them as noise. Sums are kept in
// double, so comparisons of many texts merge exactly with +=.
//
//   kqsvd::NextTokenComparison comparison;
//   for (each text) comparison.add(full_logits, compressed_logits, next_tokens);   // T x vocab, T targets
//   comparison.mean_kl();  comparison.top1_agreement();  comparison.nll_difference();
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/error.hpp"

namespace kqsvd {

// log softmax of one row of logits, in double: the sums run over thousands of tokens.
template <typename Derived>
Eigen::RowVectorXd log_softmax(const Eigen::MatrixBase<Derived>& logits) {
  const Eigen::RowVectorXd row = logits.template cast<double>().reshaped().transpose();
  const double largest = row.maxCoeff();
  return row.array() - (largest + std::log((row.array() - largest).exp().sum()));
}

// The first index of the largest entry. Eigen's maxCoeff() does not promise which of tied entries it
// returns once vectorised.
template <typename Derived>
int argmax(const Eigen::MatrixBase<Derived>& row) {
  Eigen::Index best = 0;
  for (Eigen::Index i = 1; i < row.size(); ++i) {
    if (row(i) > row(best)) best = i;
  }
  return static_cast<int>(best);
}

class NextTokenComparison {
 public:
  using Index = Eigen::Index;

  // One text: reference (full-cache) and compared logits, T x vocab each, whose row i predicts
  // targets[i]. Everything is checked before anything is added.
  template <typename DerivedR, typename DerivedC>
  void add(const Eigen::MatrixBase<DerivedR>& reference_logits, const Eigen::MatrixBase<DerivedC>& logits,
           const std::vector<int>& targets) {
    constexpr const char* where = "kqsvd::NextTokenComparison::add";
    if (logits.rows() != reference_logits.rows() || logits.cols() != reference_logits.cols()) {
      detail::throw_invalid(where, "logits",
                            "is " + detail::shape_string(logits.rows(), logits.cols()) + ", the reference logits " +
                                detail::shape_string(reference_logits.rows(), reference_logits.cols()));
    }
    if (static_cast<Index>(targets.size()) != logits.rows()) {
      detail::throw_invalid(where, "targets",
                            "holds " + std::to_string(targets.size()) + " tokens for " + std::to_string(logits.rows()) +
                                " rows of logits");
    }
    for (std::size_t i = 0; i < targets.size(); ++i) {
      if (targets[i] < 0 || targets[i] >= logits.cols()) {
        detail::throw_invalid(where, "targets",
                              "has token " + std::to_string(targets[i]) + " at index " + std::to_string(i) +
                                  ", outside the vocabulary [0, " + std::to_string(logits.cols()) + ")");
      }
    }
    detail::require_finite(where, "reference_logits", reference_logits);
    detail::require_finite(where, "logits", logits);
    for (Index i = 0; i < logits.rows(); ++i) {
      const Eigen::RowVectorXd reference = log_softmax(reference_logits.row(i));
      const Eigen::RowVectorXd compared = log_softmax(logits.row(i));
      const auto target = static_cast<Index>(targets[static_cast<std::size_t>(i)]);
      const double reference_nll = -reference(target), nll = -compared(target);
      const double difference = nll - reference_nll;
      reference_nll_ += reference_nll;
      nll_ += nll;
      difference_ += difference;
      squared_difference_ += difference * difference;
      kl_ += (reference.array().exp() * (reference - compared).array()).sum();
      agree_ += argmax(reference_logits.row(i)) == argmax(logits.row(i)) ? 1 : 0;
      ++tokens_;
    }
  }

  NextTokenComparison& operator+=(const NextTokenComparison& other) {
    reference_nll_ += other.reference_nll_;
    nll_ += other.nll_;
    difference_ += other.difference_;
    squared_difference_ += other.squared_difference_;
    kl_ += other.kl_;
    agree_ += other.agree_;
    tokens_ += other.tokens_;
    return *this;
  }

  Index tokens() const { return tokens_; }
  double mean_nll() const { return mean(nll_); }
  double reference_mean_nll() const { return mean(reference_nll_); }
  double perplexity() const { return std::exp(mean_nll()); }
  double mean_kl() const { return mean(kl_); }
  double top1_agreement() const { return mean(static_cast<double>(agree_)); }
  double nll_difference() const { return mean(difference_); }
  // NaN with fewer than two tokens.
  double nll_difference_standard_error() const {
    if (tokens_ < 2) return std::numeric_limits<double>::quiet_NaN();
    const double n = static_cast<double>(tokens_);
    const double average = difference_ / n;
    return std::sqrt(std::max(0.0, squared_difference_ / n - average * average) / (n - 1.0));
  }

 private:
  double mean(double sum) const {
    return tokens_ > 0 ? sum / static_cast<double>(tokens_) : std::numeric_limits<double>::quiet_NaN();
  }

  double reference_nll_ = 0.0, nll_ = 0.0, difference_ = 0.0, squared_difference_ = 0.0, kl_ = 0.0;
  Index agree_ = 0, tokens_ = 0;
};

}  // namespace kqsvd
