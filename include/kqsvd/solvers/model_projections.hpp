// kqsvd/solvers/model_projections.hpp -- key and value projections for every layer and KV head of a model,
// and what the compressed cache costs in bytes.
//
//   kqsvd::ModelCalibration calibration(shape);  ... calibration.add(layer, q, k, v) ...
//   std::vector<Eigen::MatrixXf> o_proj = ...;   // per layer, hidden x (query_heads * head_dim)
//   auto model = kqsvd::ModelProjections<float>::fit(calibration, o_proj, kqsvd::Method::kq_svd,
//                                                    kqsvd::RankSelection::fixed(16),          // keys
//                                                    kqsvd::RankSelection::error_budget(0.05)); // values
//   const auto& key_proj = model.keys(layer, kv_head);
//   kqsvd::RankAllocation ranks = model.ranks();           // per head
//   auto smaller = model.truncated(kqsvd::RankAllocation::uniform(model.shape(), 8, 8));
//
// fit() solves the heads in parallel with OpenMP (OMP_NUM_THREADS threads) when built with it, with
// bit-identical results for any thread count. For a whole model, FitOptions::svd =
// SvdAlgorithm::symmetric_eigen is several times faster (see fit_options.hpp for its accuracy). What a
// cache of these latents costs in bytes depends on its storage format: see cache/cache_footprint.hpp.
#pragma once

#include <Eigen/Core>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kqsvd/calibration/model_calibration.hpp"
#include "kqsvd/core/detail/parallel_for.hpp"
#include "kqsvd/core/model_shape.hpp"
#include "kqsvd/solvers/fit.hpp"
#include "kqsvd/calibration/output_projection.hpp"
#include "kqsvd/solvers/rank_allocation.hpp"

namespace kqsvd {

template <typename Scalar = float>
class ModelProjections {
 public:
  using Index = Eigen::Index;
  using Projection = LowRankProjection<Scalar>;

  // Projections indexed [layer * kv_heads + kv_head].
  ModelProjections(const ModelShape& shape, std::vector<Projection> keys, std::vector<Projection> values)
      : shape_(shape), keys_(std::move(keys)), values_(std::move(values)) {
    shape_.validate();
    const auto heads = static_cast<std::size_t>(shape_.layers * shape_.kv_heads);
    if (keys_.size() != heads || values_.size() != heads) {
      detail::throw_invalid("kqsvd::ModelProjections", "keys/values",
                            "must hold layers x kv_heads = " + std::to_string(heads) + " projections each");
    }
    for (std::size_t i = 0; i < heads; ++i) {
      if (keys_[i].dimension() != shape_.head_dim || values_[i].dimension() != shape_.head_dim) {
        detail::throw_invalid("kqsvd::ModelProjections", "keys/values",
                              "projection " + std::to_string(i) + " is not of head_dim " + std::to_string(shape_.head_dim));
      }
    }
  }

  // output_weights: per layer, o_proj.weight (hidden x query_heads*head_dim). Needed when the value
  // method is KQ-SVD; may be empty otherwise (values then use V-SVD for every method).
  template <typename WeightMatrix>
  static ModelProjections fit(const ModelCalibration& calibration, const std::vector<WeightMatrix>& output_weights,
                              Method method, const RankSelection& key_rank, const RankSelection& value_rank,
                              const FitOptions& options = {},
                              GroupCombination combination = GroupCombination::concatenate) {
    constexpr const char* where = "kqsvd::ModelProjections::fit";
    const ModelShape& shape = calibration.shape();
    const bool needs_weights = method == Method::kq_svd;
    if (needs_weights && static_cast<Index>(output_weights.size()) != shape.layers) {
      detail::throw_invalid(where, "output_weights",
                            "holds " + std::to_string(output_weights.size()) + " matrices; KQ-SVD for values needs one " +
                                "o_proj weight per layer (" + std::to_string(shape.layers) + ")");
    }
    for (Index l = 0; l < shape.layers; ++l) {
      if (needs_weights && output_weights[static_cast<std::size_t>(l)].cols() != shape.query_heads * shape.head_dim) {
        detail::throw_invalid(where, "output_weights",
                              "layer " + std::to_string(l) + " has " +
                                  std::to_string(output_weights[static_cast<std::size_t>(l)].cols()) +
                                  " columns, expected query_heads x head_dim = " +
                                  std::to_string(shape.query_heads * shape.head_dim));
      }
    }
    // One task per (layer, KV head), in parallel with OpenMP when built with it. Each head's fit is
    // the same computation on any thread count (Eigen runs single-threaded inside the region), so the
    // projections are bit-identical; the first failing head, in head order, is the error reported.
    const Index heads = shape.layers * shape.kv_heads;
    std::vector<std::optional<Projection>> keys(static_cast<std::size_t>(heads)), values(keys.size());
    detail::parallel_for(
        heads, [] { return 0; },
        [&](Index head, int) {
          const Index l = head / shape.kv_heads, h = head % shape.kv_heads;
          const auto slot = static_cast<std::size_t>(head);
          keys[slot].emplace(
              fit_projection<Scalar>(method, calibration.keys(l, h), calibration.queries(l, h), key_rank, options));
          const Eigen::MatrixXd output_gram =
              needs_weights ? output_projection_gram(output_weights[static_cast<std::size_t>(l)], shape.head_dim,
                                                     shape.first_query_head_of(h), shape.group_size(), combination)
                            : Eigen::MatrixXd::Zero(shape.head_dim, shape.head_dim);
          values[slot].emplace(
              fit_value_projection<Scalar>(method, calibration.values(l, h), output_gram, value_rank, options));
        },
        /*always_open_region=*/true);
    std::vector<Projection> key_projections, value_projections;
    key_projections.reserve(keys.size());
    value_projections.reserve(values.size());
    for (std::size_t i = 0; i < keys.size(); ++i) {
      key_projections.push_back(std::move(*keys[i]));
      value_projections.push_back(std::move(*values[i]));
    }
    return ModelProjections(shape, std::move(key_projections), std::move(value_projections));
  }

  const ModelShape& shape() const { return shape_; }
  const Projection& keys(Index layer, Index kv_head) const { return keys_[slot("keys", layer, kv_head)]; }
  const Projection& values(Index layer, Index kv_head) const { return values_[slot("values", layer, kv_head)]; }

  // The rank of every key and value projection.
  RankAllocation ranks() const {
    RankAllocation allocation(shape_);
    for (Index l = 0; l < shape_.layers; ++l) {
      for (Index h = 0; h < shape_.kv_heads; ++h) {
        allocation.set_key(l, h, keys(l, h).rank());
        allocation.set_value(l, h, values(l, h).rank());
      }
    }
    return allocation;
  }

  // The same projections keeping the first ranks.key(l, h) / ranks.value(l, h) dimensions of each head
  // (each at most the head's rank now): equal to fitting at those ranks, since every method orders its
  // dimensions by importance.
  ModelProjections truncated(const RankAllocation& ranks) const {
    if (ranks.shape() != shape_) {
      detail::throw_invalid("kqsvd::ModelProjections::truncated", "ranks",
                            "are for " + to_string(ranks.shape()) + ", the projections for " + to_string(shape_));
    }
    std::vector<Projection> key_projections, value_projections;
    for (Index l = 0; l < shape_.layers; ++l) {
      for (Index h = 0; h < shape_.kv_heads; ++h) {
        key_projections.push_back(keys(l, h).truncated(ranks.key(l, h)));
        value_projections.push_back(values(l, h).truncated(ranks.value(l, h)));
      }
    }
    return ModelProjections(shape_, std::move(key_projections), std::move(value_projections));
  }

  // The method of the key projections (the value projections of K-SVD and Eigen Attention are V-SVD:
  // Method::k_svd, see fit.hpp).
  Method method() const { return keys_.front().method(); }

 private:
  std::size_t slot(const char* which, Index layer, Index kv_head) const {
    return shape_.kv_head_slot("kqsvd::ModelProjections", which, layer, kv_head);
  }

  ModelShape shape_;
  std::vector<Projection> keys_, values_;
};

}  // namespace kqsvd
