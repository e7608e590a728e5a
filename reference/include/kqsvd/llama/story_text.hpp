// kqsvd/llama/story_text.hpp -- TinyStories-style text: stories separated by "<|endoftext|>", as token
// sequences for calibration and evaluation.
//
// The models' README.txt files define the protocol: split on the literal "<|endoftext|>", strip the
// surrounding whitespace, drop empty stories; each story is BOS + encode(story), truncated to a token
// budget (the model's seq_len in the reference numbers).
//
//   const std::vector<std::string> stories = kqsvd::llama::read_stories("tinystories_sample.txt");
//   const auto held_out = kqsvd::llama::encode_stories(tokenizer, stories, 2100, 2120, /*max_tokens=*/256);
#pragma once

#include <cstddef>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/error.hpp"
#include "kqsvd/llama/tokenizer.hpp"

namespace kqsvd::llama {

inline std::vector<std::string> split_stories(const std::string& text) {
  const std::string separator = "<|endoftext|>";
  const char* whitespace = " \t\n\r\f\v";
  std::vector<std::string> stories;
  std::size_t start = 0;
  while (start <= text.size()) {
    std::size_t end = text.find(separator, start);
    if (end == std::string::npos) end = text.size();
    const std::string part = text.substr(start, end - start);
    const std::size_t first = part.find_first_not_of(whitespace);
    if (first != std::string::npos) stories.push_back(part.substr(first, part.find_last_not_of(whitespace) - first + 1));
    start = end + separator.size();
  }
  return stories;
}

// The stories of the file at `path`; throws kqsvd::IoError if it cannot be read.
inline std::vector<std::string> read_stories(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError("kqsvd::llama::read_stories: cannot open '" + path + "'");
  std::ostringstream contents;
  contents << in.rdbuf();
  if (in.bad()) throw IoError("kqsvd::llama::read_stories: cannot read '" + path + "'");
  return split_stories(contents.str());
}

// Stories [first, last) as BOS + encode(story), each truncated to max_tokens (>= 2).
inline std::vector<std::vector<int>> encode_stories(const Tokenizer& tokenizer, const std::vector<std::string>& stories,
                                                    std::size_t first, std::size_t last, std::size_t max_tokens) {
  constexpr const char* where = "kqsvd::llama::encode_stories";
  if (first >= last || last > stories.size()) {
    detail::throw_invalid(where, "first/last",
                                 "select stories [" + std::to_string(first) + ", " + std::to_string(last) +
                                     "), but the text holds " + std::to_string(stories.size()) + " (need first < last)");
  }
  if (max_tokens < 2) detail::throw_invalid(where, "max_tokens", "must be >= 2 (BOS and one token to predict)");
  std::vector<std::vector<int>> sequences;
  for (std::size_t i = first; i < last; ++i) {
    std::vector<int> tokens = tokenizer.encode(stories[i], true, false);
    if (tokens.size() > max_tokens) tokens.resize(max_tokens);
    sequences.push_back(std::move(tokens));
  }
  return sequences;
}

}  // namespace kqsvd::llama
