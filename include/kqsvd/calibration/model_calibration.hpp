// kqsvd/calibration/model_calibration.hpp -- calibration Grams for every layer and KV head of a model.
//
// Per (layer, KV head): the Gram of its keys, of its values, and of the queries of all query heads it
// serves (stacked, which is the exact GQA objective). Blocks are added as the model computes them: a
// layer's queries as T x (query_heads * head_dim), keys and values as T x (kv_heads * head_dim), head
// after head along the columns. Calibrations of separate shards merge (equal to one pass up to rounding;
// blocks added in order to one calibration give its bytes exactly, however they are cut).
//
//   kqsvd::ModelCalibration calibration(shape);
//   for (each sequence, each layer l) calibration.add(l, q, k, v);   // T x (heads * head_dim) blocks
//   calibration.merge(calibration_from_another_machine);
//   kqsvd::GramAccumulator keys = calibration.keys(l, h), queries = calibration.queries(l, h);
//   // then kqsvd::ModelProjections<float>::fit(calibration, ...) fits every head (solvers/)
#pragma once

#include <Eigen/Core>

#include <cstdint>
#include <string>
#include <vector>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/calibration/gram_accumulator.hpp"
#include "kqsvd/core/model_shape.hpp"

namespace kqsvd {

class ModelCalibration {
 public:
  using Index = Eigen::Index;

  explicit ModelCalibration(const ModelShape& shape) : shape_(validated(shape)) {
    const auto heads = static_cast<std::size_t>(shape.layers * shape.kv_heads);
    keys_.assign(heads, GramAccumulator(shape.head_dim));
    queries_.assign(static_cast<std::size_t>(shape.layers * shape.query_heads), GramAccumulator(shape.head_dim));
    values_.assign(heads, GramAccumulator(shape.head_dim));
  }

  const ModelShape& shape() const { return shape_; }

  // What a fit reads, all by value and all alike: the Gram accumulators of a KV head's keys, of its
  // values, and of the queries of the query heads it serves, stacked (the exact GQA objective; their
  // per-query-head accumulators merged in head order).
  GramAccumulator keys(Index layer, Index kv_head) const { return keys_[slot("keys", layer, kv_head)]; }
  GramAccumulator values(Index layer, Index kv_head) const { return values_[slot("values", layer, kv_head)]; }
  GramAccumulator queries(Index layer, Index kv_head) const {
    slot("queries", layer, kv_head);  // checks both
    const auto first = static_cast<std::size_t>(layer * shape_.query_heads + shape_.first_query_head_of(kv_head));
    GramAccumulator stacked = queries_[first];
    for (Index j = 1; j < shape_.group_size(); ++j) stacked.merge(queries_[first + static_cast<std::size_t>(j)]);
    return stacked;
  }
  // One query head's own accumulator (queries() stacks those of a KV head's group).
  GramAccumulator query_head(Index layer, Index query_head) const { return queries_[query_slot(layer, query_head)]; }

  // Grams accumulated elsewhere (a Gram file, another process), merged into one head: as
  // GramAccumulator::merge, the dimension checked.
  void merge_keys(Index layer, Index kv_head, const GramAccumulator& other) { keys_[slot("keys", layer, kv_head)].merge(other); }
  void merge_values(Index layer, Index kv_head, const GramAccumulator& other) {
    values_[slot("values", layer, kv_head)].merge(other);
  }
  void merge_queries(Index layer, Index query_head, const GramAccumulator& other) {
    queries_[query_slot(layer, query_head)].merge(other);
  }

  // Tokens per head added so far (the same for every head once whole blocks were added).
  std::int64_t token_count() const { return keys_.front().token_count(); }

  // One head's rows, for callers that stream a head at a time (one head of one sequence in memory):
  // tokens x head_dim. The query head's own accumulator keeps each stream of rows, and hence the
  // bytes, independent of how the calibration was cut into blocks.
  template <typename Derived>
  void add_keys(Index layer, Index kv_head, const Eigen::MatrixBase<Derived>& rows) {
    keys_[slot("add_keys", layer, kv_head)].add(rows);
  }
  template <typename Derived>
  void add_values(Index layer, Index kv_head, const Eigen::MatrixBase<Derived>& rows) {
    values_[slot("add_values", layer, kv_head)].add(rows);
  }
  template <typename Derived>
  void add_queries(Index layer, Index query_head, const Eigen::MatrixBase<Derived>& rows) {
    queries_[query_slot(layer, query_head)].add(rows);
  }

  // One block of T tokens of one layer, heads side by side along the columns.
  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  void add(Index layer, const Eigen::MatrixBase<DerivedQ>& queries, const Eigen::MatrixBase<DerivedK>& keys,
           const Eigen::MatrixBase<DerivedV>& values) {
    constexpr const char* where = "kqsvd::ModelCalibration::add";
    shape_.require_layer(where, layer);
    shape_.require_layer_columns(where, queries.cols(), keys.cols(), values.cols());
    if (keys.rows() != queries.rows() || values.rows() != queries.rows()) {
      detail::throw_invalid(where, "keys/values", "must have as many rows (tokens) as queries");
    }
    // Validate everything first so a rejected block leaves no head half-updated.
    detail::require_finite(where, "queries", queries);
    detail::require_finite(where, "keys", keys);
    detail::require_finite(where, "values", values);
    const Index d = shape_.head_dim;
    const auto add_heads = [&] {
      for (Index h = 0; h < shape_.kv_heads; ++h) {
        add_keys(layer, h, keys.middleCols(h * d, d));
        add_values(layer, h, values.middleCols(h * d, d));
      }
      for (Index h = 0; h < shape_.query_heads; ++h) add_queries(layer, h, queries.middleCols(h * d, d));
    };
    // A head's add() can still refuse its rows when their squares overflow its Gram (NumericalError),
    // after earlier heads took theirs. Entries below 1e100 cannot: their squares, summed over any
    // int64 count of tokens, stay below 1e219, too small to carry a Gram near DBL_MAX (1.8e308) over
    // it. Only a block with larger entries pays for copies of the layer's accumulators to roll back.
    if (largest_magnitude(queries) < 1e100 && largest_magnitude(keys) < 1e100 && largest_magnitude(values) < 1e100) {
      add_heads();
      return;
    }
    const std::vector<GramAccumulator> saved = layer_accumulators(layer);
    try {
      add_heads();
    } catch (...) {
      restore_layer(layer, saved);
      throw;
    }
  }

  ModelCalibration& merge(const ModelCalibration& other) {
    if (other.shape_ != shape_) {
      throw InvalidArgument("kqsvd::ModelCalibration::merge: argument 'other' has a different model shape");
    }
    for (std::size_t i = 0; i < keys_.size(); ++i) {
      keys_[i].merge(other.keys_[i]);
      values_[i].merge(other.values_[i]);
    }
    for (std::size_t i = 0; i < queries_.size(); ++i) queries_[i].merge(other.queries_[i]);
    return *this;
  }

 private:
  static const ModelShape& validated(const ModelShape& shape) {
    shape.validate();
    return shape;
  }

  template <typename Derived>
  static double largest_magnitude(const Eigen::MatrixBase<Derived>& x) {
    return x.size() == 0 ? 0.0 : static_cast<double>(x.cwiseAbs().maxCoeff());
  }

  // The layer's key, value and query accumulators, in that order.
  std::vector<GramAccumulator> layer_accumulators(Index layer) const {
    std::vector<GramAccumulator> copies;
    for (Index h = 0; h < shape_.kv_heads; ++h) {
      copies.push_back(keys_[slot("keys", layer, h)]);
      copies.push_back(values_[slot("values", layer, h)]);
    }
    for (Index h = 0; h < shape_.query_heads; ++h) copies.push_back(queries_[query_slot(layer, h)]);
    return copies;
  }

  void restore_layer(Index layer, const std::vector<GramAccumulator>& copies) {
    std::size_t i = 0;
    for (Index h = 0; h < shape_.kv_heads; ++h) {
      keys_[slot("keys", layer, h)] = copies[i++];
      values_[slot("values", layer, h)] = copies[i++];
    }
    for (Index h = 0; h < shape_.query_heads; ++h) queries_[query_slot(layer, h)] = copies[i++];
  }

  std::size_t query_slot(Index layer, Index query_head) const {
    constexpr const char* where = "kqsvd::ModelCalibration::add_queries";
    shape_.require_layer(where, layer);
    if (query_head < 0 || query_head >= shape_.query_heads) {
      detail::throw_invalid(where, "query_head",
                            "is " + std::to_string(query_head) + ", outside [0, " + std::to_string(shape_.query_heads) + ")");
    }
    return static_cast<std::size_t>(layer * shape_.query_heads + query_head);
  }

  std::size_t slot(const char* which, Index layer, Index kv_head) const {
    return shape_.kv_head_slot("kqsvd::ModelCalibration", which, layer, kv_head);
  }

  ModelShape shape_;
  std::vector<GramAccumulator> keys_, queries_, values_;
};

}  // namespace kqsvd
