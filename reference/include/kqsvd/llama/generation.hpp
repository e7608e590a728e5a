// kqsvd/llama/generation.hpp -- greedy decoding, as llama2.c run.c at temperature 0.
//
// The prompt is prefilled in one block, then each new token is the argmax of the last logits (lowest id
// on ties, as run.c) and is decoded as a one-token block. Generation stops after max_new_tokens or at
// `stop_token` (not returned); run.c stops at BOS, which its models emit between stories.
//
//   kqsvd::llama::FullKvCache cache(model.shape(), model.rotary_embedding());
//   std::vector<int> ids = kqsvd::llama::generate_greedy(model, {kqsvd::llama::Tokenizer::bos_id}, 32, cache);
//   std::string text = tokenizer.decode(ids);
#pragma once

#include <Eigen/Core>

#include <string>
#include <vector>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/llama/kv_cache.hpp"
#include "kqsvd/metrics/next_token_metrics.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/llama/tokenizer.hpp"
#include "kqsvd/llama/transformer.hpp"

namespace kqsvd::llama {

// Resets `cache`, prefills `prompt` (non-empty, e.g. {Tokenizer::bos_id}) and returns up to
// max_new_tokens greedily chosen tokens that follow it.
inline std::vector<int> generate_greedy(const Transformer& model, const std::vector<int>& prompt,
                                        Eigen::Index max_new_tokens, KvCache& cache,
                                        int stop_token = Tokenizer::bos_id) {
  constexpr const char* where = "kqsvd::llama::generate_greedy";
  if (prompt.empty()) detail::throw_invalid(where, "prompt", "is empty (start it with BOS)");
  if (max_new_tokens < 0) {
    detail::throw_invalid(where, "max_new_tokens", "must be >= 0, got " + std::to_string(max_new_tokens));
  }
  cache.reset();
  std::vector<int> generated;
  if (max_new_tokens == 0) return generated;
  RowMatrix<float> logits = model.forward(prompt, cache);
  while (true) {
    const int next = argmax(logits.row(logits.rows() - 1));
    if (next == stop_token) break;
    generated.push_back(next);
    if (static_cast<Eigen::Index>(generated.size()) == max_new_tokens) break;
    logits = model.forward({next}, cache);
  }
  return generated;
}

}  // namespace kqsvd::llama
