// kqsvd/llama/tokenizer.hpp -- llama2.c's byte-fallback BPE tokenizer (tok512.bin, tokenizer.bin).
//
// File format: int32 max_token_length, then per token: float32 merge score, int32 byte length, the
// bytes. Ids 0, 1, 2 are <unk>, BOS and EOS; ids 3..258 are the byte-fallback pieces <0x00>..<0xFF>.
// encode() and decode() reproduce llama2.c run.c token for token: a dummy-prefix " " token, one token
// per UTF-8 code point (byte fallback id = byte + 3 when the code point is not a piece), then greedy
// merging of the adjacent pair whose concatenation is the highest-scoring piece (leftmost on ties).
//
//   auto tokenizer = kqsvd::llama::Tokenizer::load("tok512.bin", 512);
//   std::vector<int> ids = tokenizer.encode("Once upon a time", /*add_bos=*/true, /*add_eos=*/false);
//   std::string text;
//   for (std::size_t i = 1; i < ids.size(); ++i) text += tokenizer.decode(ids[i - 1], ids[i]);
//
// load() throws kqsvd::FormatError naming the file and the problem for a malformed file, and
// kqsvd::IoError when it cannot be opened.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/error.hpp"
#include "kqsvd/llama/detail/binary_file.hpp"

namespace kqsvd::llama {

}  // namespace kqsvd::llama

namespace kqsvd::detail {

// The byte of a "<0xHH>" piece, or -1 for any other piece.
inline int byte_fallback_value(const std::string& piece) {
  if (piece.size() != 6 || piece.compare(0, 3, "<0x") != 0 || piece[5] != '>') return -1;
  const auto hex = [](char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  const int high = hex(piece[3]);
  const int low = hex(piece[4]);
  return high < 0 || low < 0 ? -1 : 16 * high + low;
}

inline bool is_utf8_continuation(char c) { return (static_cast<unsigned char>(c) & 0xC0) == 0x80; }

}  // namespace kqsvd::detail

namespace kqsvd::llama {

class Tokenizer {
 public:
  using Index = std::ptrdiff_t;

  static constexpr int unknown_id = 0;
  static constexpr int bos_id = 1;
  static constexpr int eos_id = 2;
  static constexpr int first_byte_id = 3;  // byte b is token first_byte_id + b
  static constexpr Index min_vocab_size = first_byte_id + 256;
  static constexpr Index max_token_length_limit = 1 << 16;
  static constexpr Index max_vocab_size = 1 << 21;

  // Reads exactly `vocab_size` tokens (the model's Config::vocab_size); the file must end there.
  static Tokenizer load(const std::string& path, Index vocab_size) {
    if (vocab_size < min_vocab_size || vocab_size > max_vocab_size) {
      detail::throw_invalid("kqsvd::llama::Tokenizer::load", "vocab_size",
                                   "is " + std::to_string(vocab_size) + ", expected a value in [" +
                                       std::to_string(min_vocab_size) + ", " + std::to_string(max_vocab_size) + "]");
    }
    return read(path, vocab_size);
  }

  // Reads tokens until the end of the file (llama2.c files do not store the count).
  static Tokenizer load(const std::string& path) { return read(path, -1); }

  Index vocab_size() const { return static_cast<Index>(pieces_.size()); }
  Index max_token_length() const { return max_token_length_; }
  const std::string& piece(int id) const { return pieces_[checked(id, "piece")]; }
  float score(int id) const { return scores_[checked(id, "score")]; }

  // The id of the piece spelled exactly `text`, or -1.
  int find(const std::string& text) const {
    const auto found = ids_.find(text);
    return found == ids_.end() ? -1 : found->second;
  }

  std::vector<int> encode(const std::string& text, bool add_bos, bool add_eos) const {
    std::vector<int> tokens;
    tokens.reserve(text.size() + 3);
    if (add_bos) tokens.push_back(bos_id);
    if (!text.empty()) tokens.push_back(dummy_prefix_id_);

    // One token per UTF-8 code point. Like run.c, a code point is a lead byte plus at most three
    // continuation bytes; longer runs of continuation bytes start a new "code point".
    std::string code_point;
    for (std::size_t i = 0; i < text.size(); ++i) {
      if (!detail::is_utf8_continuation(text[i])) code_point.clear();
      code_point += text[i];
      const bool more_follow = i + 1 < text.size() && detail::is_utf8_continuation(text[i + 1]);
      if (more_follow && code_point.size() < 4) continue;
      const int id = find(code_point);
      if (id >= 0) {
        tokens.push_back(id);
      } else {
        for (const char byte : code_point) tokens.push_back(first_byte_id + static_cast<unsigned char>(byte));
      }
      code_point.clear();
    }

    merge_pairs(tokens);
    if (add_eos) tokens.push_back(eos_id);
    return tokens;
  }

  // The text of `token` following `previous_token`, as run.c prints it: a piece's leading space is
  // dropped right after BOS, and <0xHH> pieces become the raw byte.
  std::string decode(int previous_token, int token) const {
    const std::string& text = pieces_[checked(token, "token")];
    const int byte = detail::byte_fallback_value(text);
    if (byte >= 0) return std::string(1, static_cast<char>(byte));
    if (previous_token == bos_id && !text.empty() && text[0] == ' ') return text.substr(1);
    return text;
  }

  // decode() over a sequence; the first token is decoded as if it followed BOS.
  std::string decode(const std::vector<int>& tokens) const {
    std::string text;
    int previous = bos_id;
    for (const int token : tokens) {
      text += decode(previous, token);
      previous = token;
    }
    return text;
  }

 private:
  Tokenizer() = default;

  std::size_t checked(int id, const char* argument) const {
    if (id < 0 || id >= static_cast<int>(pieces_.size())) {
      detail::throw_invalid(
          "kqsvd::llama::Tokenizer", argument,
          "is " + std::to_string(id) + ", expected a token id in [0, " + std::to_string(pieces_.size()) + ")");
    }
    return static_cast<std::size_t>(id);
  }

  // The merge a pair (left, right) would make: the id of their concatenation and its score.
  struct Merge {
    int id = -1;
    float score = 0;
  };

  Merge merge_of(int left, int right) const {
    const int id = find(pieces_[static_cast<std::size_t>(left)] + pieces_[static_cast<std::size_t>(right)]);
    return id < 0 ? Merge{} : Merge{id, scores_[static_cast<std::size_t>(id)]};
  }

  // run.c's merge loop, pair for pair, including its quirks (pairs with the BOS token are considered;
  // a merge needs a score above -1e10). Candidate merges are cached per adjacent pair and recomputed
  // only next to a merge, so encoding is O(n) lookups instead of run.c's O(n^2).
  void merge_pairs(std::vector<int>& tokens) const {
    if (tokens.size() < 2) return;
    std::vector<Merge> merges(tokens.size() - 1);
    for (std::size_t i = 0; i + 1 < tokens.size(); ++i) merges[i] = merge_of(tokens[i], tokens[i + 1]);
    while (true) {
      float best_score = -1e10f;
      std::size_t best = merges.size();
      for (std::size_t i = 0; i < merges.size(); ++i) {
        if (merges[i].id >= 0 && merges[i].score > best_score) {
          best_score = merges[i].score;
          best = i;
        }
      }
      if (best == merges.size()) return;
      tokens[best] = merges[best].id;
      tokens.erase(tokens.begin() + static_cast<std::ptrdiff_t>(best) + 1);
      merges.erase(merges.begin() + static_cast<std::ptrdiff_t>(best));
      if (best > 0) merges[best - 1] = merge_of(tokens[best - 1], tokens[best]);
      if (best < merges.size()) merges[best] = merge_of(tokens[best], tokens[best + 1]);
    }
  }

  static Tokenizer read(const std::string& path, Index expected_vocab_size) {
    detail::BinaryFile file(path, "kqsvd::llama::Tokenizer::load");
    if (file.size() < 4) {
      file.fail("is too short for the tokenizer header: " + std::to_string(file.size()) +
                " bytes, expected at least 4");
    }
    Tokenizer tokenizer;
    const std::int32_t max_length = file.read_int32("the header");
    if (max_length < 1 || max_length > max_token_length_limit) {
      file.fail("has an invalid header: max_token_length = " + std::to_string(max_length) + " is outside [1, " +
                std::to_string(max_token_length_limit) + "]");
    }
    tokenizer.max_token_length_ = max_length;

    const bool until_end = expected_vocab_size < 0;
    for (Index id = 0; until_end ? file.remaining() > 0 : id < expected_vocab_size; ++id) {
      if (id >= max_vocab_size) {
        file.fail("has more than " + std::to_string(max_vocab_size) + " tokens");
      }
      const std::string where = "token " + std::to_string(id);
      const float score = file.read_float(where + " (score)");
      const std::int32_t length = file.read_int32(where + " (length)");
      if (!std::isfinite(score)) {
        file.fail("has a non-finite score (" + std::to_string(score) + ") for " + where);
      }
      if (length < 1 || length > max_length) {
        file.fail("has an invalid length " + std::to_string(length) + " for " + where + ", expected [1, " +
                  std::to_string(max_length) + "] (max_token_length)");
      }
      std::string text(static_cast<std::size_t>(length), '\0');
      file.read_bytes(text.data(), static_cast<std::uint64_t>(length), where + " (bytes)");
      tokenizer.scores_.push_back(score);
      tokenizer.pieces_.push_back(std::move(text));
    }
    if (file.remaining() != 0) {
      file.fail("has " + std::to_string(file.remaining()) + " bytes after the " + std::to_string(expected_vocab_size) +
                " tokens of the vocabulary (expected the file to end there)");
    }
    tokenizer.validate_pieces(file);
    return tokenizer;
  }

  void validate_pieces(const detail::BinaryFile& file) {
    const Index count = vocab_size();
    if (count < min_vocab_size) {
      file.fail("has " + std::to_string(count) + " tokens, expected at least " + std::to_string(min_vocab_size) +
                " (3 special tokens and 256 byte-fallback tokens)");
    }
    for (int byte = 0; byte < 256; ++byte) {
      const int id = first_byte_id + byte;
      if (detail::byte_fallback_value(pieces_[static_cast<std::size_t>(id)]) != byte) {
        file.fail("has token " + std::to_string(id) + " = '" + pieces_[static_cast<std::size_t>(id)] +
                  "', expected the byte-fallback piece for byte " + std::to_string(byte));
      }
    }
    // Like run.c's sorted-vocabulary lookup, a piece spelled twice resolves to one id; keep the first.
    ids_.reserve(pieces_.size());
    for (std::size_t id = 0; id < pieces_.size(); ++id) ids_.emplace(pieces_[id], static_cast<int>(id));
    dummy_prefix_id_ = find(" ");
    if (dummy_prefix_id_ < 0) file.fail("has no \" \" token (needed for the dummy prefix that encode() adds)");
  }

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int> ids_;
  Index max_token_length_ = 0;
  int dummy_prefix_id_ = -1;
};

}  // namespace kqsvd::llama
