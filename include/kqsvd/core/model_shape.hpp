// kqsvd/core/model_shape.hpp -- the attention geometry of a model: layers, heads, GQA grouping.
//
//   kqsvd::ModelShape shape{/*layers=*/32, /*query_heads=*/32, /*kv_heads=*/8, /*head_dim=*/128};
//   shape.validate();
//   shape.group_size();      // 4 query heads per KV head
//   shape.kv_head_of(13);    // 3: query head h reads KV head h / group_size
//   shape.kv_width();        // 1024: columns of a layer's keys (KV heads side by side)
#pragma once

#include <Eigen/Core>

#include <cstddef>
#include <string>

#include "kqsvd/core/detail/validation.hpp"

namespace kqsvd {

struct ModelShape {
  Eigen::Index layers = 0;
  Eigen::Index query_heads = 0;
  Eigen::Index kv_heads = 0;
  Eigen::Index head_dim = 0;

  Eigen::Index group_size() const { return query_heads / kv_heads; }
  Eigen::Index query_width() const { return query_heads * head_dim; }  // columns of a layer's queries
  Eigen::Index kv_width() const { return kv_heads * head_dim; }        // columns of its keys or values
  Eigen::Index kv_head_of(Eigen::Index query_head) const { return query_head / group_size(); }
  Eigen::Index first_query_head_of(Eigen::Index kv_head) const { return kv_head * group_size(); }

  void validate() const {
    constexpr const char* where = "kqsvd::ModelShape";
    const auto positive = [where](const char* name, Eigen::Index value) {
      if (value <= 0) detail::throw_invalid(where, name, "must be positive, got " + std::to_string(value));
    };
    positive("layers", layers);
    positive("query_heads", query_heads);
    positive("kv_heads", kv_heads);
    positive("head_dim", head_dim);
    if (query_heads % kv_heads != 0) {
      detail::throw_invalid(where, "kv_heads",
                            "(" + std::to_string(kv_heads) + ") must divide query_heads (" +
                                std::to_string(query_heads) + ")");
    }
  }

  void require_layer(const char* function, Eigen::Index layer) const {
    if (layer < 0 || layer >= layers) {
      detail::throw_invalid(function, "layer", "is " + std::to_string(layer) + ", outside [0, " + std::to_string(layers) + ")");
    }
  }
  // layer * kv_heads + kv_head: where a (layer, KV head) sits in per-head arrays. Indices out of range
  // throw InvalidArgument naming "owner::member" (the name is built only then: accessors call this).
  std::size_t kv_head_slot(const char* owner, const char* member, Eigen::Index layer, Eigen::Index kv_head) const {
    if (layer < 0 || layer >= layers || kv_head < 0 || kv_head >= kv_heads) {
      const std::string where = std::string(owner) + "::" + member;
      require_layer(where.c_str(), layer);
      require_kv_head(where.c_str(), kv_head);
    }
    return static_cast<std::size_t>(layer * kv_heads + kv_head);
  }
  // One layer's block of tokens, heads side by side along the columns: queries query_heads x head_dim
  // wide, keys and values kv_heads x head_dim.
  void require_layer_columns(const char* function, Eigen::Index query_columns, Eigen::Index key_columns,
                             Eigen::Index value_columns) const {
    detail::require_columns(function, "queries", query_columns, query_width(), "query_heads x head_dim");
    detail::require_columns(function, "keys", key_columns, kv_width(), "kv_heads x head_dim");
    detail::require_columns(function, "values", value_columns, kv_width(), "kv_heads x head_dim");
  }
  void require_kv_head(const char* function, Eigen::Index kv_head) const {
    if (kv_head < 0 || kv_head >= kv_heads) {
      detail::throw_invalid(function, "kv_head",
                            "is " + std::to_string(kv_head) + ", outside [0, " + std::to_string(kv_heads) + ")");
    }
  }
};

inline bool operator==(const ModelShape& x, const ModelShape& y) {
  return x.layers == y.layers && x.query_heads == y.query_heads && x.kv_heads == y.kv_heads && x.head_dim == y.head_dim;
}
inline bool operator!=(const ModelShape& x, const ModelShape& y) { return !(x == y); }

// "6 layers, 4 query heads, 2 KV heads, head_dim 64", for messages.
inline std::string to_string(const ModelShape& shape) {
  return std::to_string(shape.layers) + " layers, " + std::to_string(shape.query_heads) + " query heads, " +
         std::to_string(shape.kv_heads) + " KV heads, head_dim " + std::to_string(shape.head_dim);
}

}  // namespace kqsvd
