// kqsvd/llama/likelihood.hpp -- mean next-token negative log-likelihood of a token sequence.
//
// The quality measure for KV-cache compression: run a sequence through the model with a given cache
// and sum -log p(token[i+1] | tokens[0..i]) over the n-1 predicted tokens. Sums and counts add up across
// sequences, so a corpus mean is the sum of the per-sequence results.
//
//   kqsvd::llama::FullKvCache cache(model.shape(), model.rotary_embedding());
//   kqsvd::llama::NegativeLogLikelihood corpus;
//   for (const auto& story : stories)
//     corpus += kqsvd::llama::negative_log_likelihood(model, tokenizer.encode(story, true, false), cache);
//   double nats_per_token = corpus.mean();
//
// block_size 0 runs the whole sequence as one prefill block; block_size b runs it in blocks of b tokens
// (b = 1 is token-by-token decoding), which exercises the cache across blocks.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/llama/activation_recorder.hpp"
#include "kqsvd/llama/kv_cache.hpp"
#include "kqsvd/metrics/next_token_metrics.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/llama/transformer.hpp"

namespace kqsvd::llama {

struct NegativeLogLikelihood {
  double sum = 0.0;         // nats, summed over predicted tokens
  Eigen::Index tokens = 0;  // predicted tokens

  double mean() const {
    return tokens > 0 ? sum / static_cast<double>(tokens) : std::numeric_limits<double>::quiet_NaN();
  }

  NegativeLogLikelihood& operator+=(const NegativeLogLikelihood& other) {
    sum += other.sum;
    tokens += other.tokens;
    return *this;
  }
};


// Resets `cache`, then runs `tokens` through `model` in blocks of `block_size` (0: one block).
inline NegativeLogLikelihood negative_log_likelihood(const Transformer& model, const std::vector<int>& tokens,
                                                     KvCache& cache, Eigen::Index block_size = 0,
                                                     ActivationObserver* observer = nullptr) {
  using Index = Eigen::Index;
  if (block_size < 0) {
    detail::throw_invalid("kqsvd::llama::negative_log_likelihood", "block_size",
                                 "must be >= 0 (0: the whole sequence at once), got " + std::to_string(block_size));
  }
  cache.reset();
  NegativeLogLikelihood result;
  const auto n = static_cast<Index>(tokens.size());
  const Index step = block_size == 0 ? n : block_size;
  for (Index start = 0; start < n; start += step) {
    const Index count = std::min(step, n - start);
    const std::vector<int> block(tokens.begin() + start, tokens.begin() + start + count);
    const RowMatrix<float> logits = model.forward(block, cache, observer);
    for (Index i = 0; i < count && start + i + 1 < n; ++i) {
      result.sum -= log_softmax(logits.row(i))(tokens[static_cast<std::size_t>(start + i + 1)]);
      ++result.tokens;
    }
  }
  return result;
}

}  // namespace kqsvd::llama
