// kqsvd/io/detail/file_metadata.hpp -- reading the __metadata__ entries that kqsvd's own safetensors
// files share (projection files, Gram files): the model shape and its RoPE, each problem a FormatError
// naming the reader, the file and the entry.
#pragma once

#include <Eigen/Core>

#include <string>

#include "kqsvd/core/error.hpp"
#include "kqsvd/core/model_shape.hpp"
#include "kqsvd/core/rope.hpp"
#include "kqsvd/io/activation_file.hpp"
#include "kqsvd/io/detail/number_text.hpp"
#include "kqsvd/io/safetensors.hpp"

namespace kqsvd::detail {

struct FileMetadata {
  const io::SafetensorsFile& file;
  const char* reader;  // e.g. "kqsvd::io::ProjectionFile"

  [[noreturn]] void fail(const std::string& problem) const {
    throw FormatError(std::string(reader) + ": '" + file.path() + "' " + problem);
  }

  const std::string& entry(const char* key) const {
    const auto found = file.metadata().find(key);
    if (found == file.metadata().end()) fail(std::string("has no '") + key + "' entry in its __metadata__");
    return found->second;
  }

  Eigen::Index positive(const char* key) const {
    const auto value = parse_count(entry(key));
    if (!value || *value <= 0 || *value > 1'000'000) {
      fail(std::string("has __metadata__ ") + key + " = '" + entry(key) + "', expected a positive integer");
    }
    return static_cast<Eigen::Index>(*value);
  }

  // "format" must be `format` and "format_version" `version`; `kind` names the file kind in errors.
  void require_format(const char* format, int version, const std::string& kind, const std::string& hint) const {
    const auto found = file.metadata().find("format");
    if (found == file.metadata().end() || found->second != format) {
      fail("is not a kqsvd " + kind + " (its __metadata__ has no format = '" + format + "'; " + hint + ")");
    }
    if (entry("format_version") != std::to_string(version)) {
      fail("has format_version '" + entry("format_version") + "'; this kqsvd reads version " + std::to_string(version));
    }
  }

  // layers, query_heads, kv_heads, head_dim.
  ModelShape shape() const {
    ModelShape result;
    result.layers = positive("layers");
    result.query_heads = positive("query_heads");
    result.kv_heads = positive("kv_heads");
    result.head_dim = positive("head_dim");
    if (result.query_heads % result.kv_heads != 0) {
      fail("has " + std::to_string(result.kv_heads) + " KV heads, which do not divide its " +
           std::to_string(result.query_heads) + " query heads");
    }
    return result;
  }

  // rope ("applied" / "none"), rope_style, rope_theta (> 1) into the fields of `target`.
  template <typename Info>
  void rope(Info& target) const {
    try {
      target.rope = io::parse_rope_spelling(entry("rope"));
      target.rope_style = parse_rope_style(entry("rope_style"));
    } catch (const InvalidArgument&) {
      fail("has __metadata__ rope = '" + entry("rope") + "', rope_style = '" + entry("rope_style") +
           "'; expected applied|none and adjacent|half");
    }
    const auto theta = parse_number(entry("rope_theta"));
    if (!theta || !(*theta > 1.0)) fail("has __metadata__ rope_theta = '" + entry("rope_theta") + "', expected a number > 1");
    target.rope_theta = *theta;
  }
};

}  // namespace kqsvd::detail
