// kqsvd/solvers/fit.hpp -- fit any method by name, from Grams or from calibration accumulators.
//
// Every method returns the same LowRankProjection, so tests, examples and benchmarks swap methods by
// name. From accumulators, both Grams are divided by the cached side's token count: KQ-SVD's latents
// come out O(1) in scale, and Eigen Attention sees keys and queries weighted as if stacked.
//
// Values: KQ-SVD solves for V W^T (the output projection's Gram, output_projection_gram()). K-SVD and
// Eigen Attention both compress values with V-SVD, the top principal directions of V, as their papers
// do; that is K-SVD applied to values, and the projection says so: its method() is Method::k_svd.
// value_method(m) names what fit_value_projection(m, ...) computes.
//
//   kqsvd::GramAccumulator keys(d), queries(d), values(d);
//   ... keys.add(K); queries.add(Q); values.add(V); ...
//   for (kqsvd::Method m : kqsvd::all_methods) {
//     auto key_proj = kqsvd::fit_projection<float>(m, keys, queries, kqsvd::RankSelection::fixed(16));
//     auto value_proj = kqsvd::fit_value_projection<float>(m, values, w_gram,
//                                                          kqsvd::RankSelection::error_budget(0.05));
//   }
#pragma once

#include <Eigen/Core>

#include <string>

#include "kqsvd/solvers/detail/gram_factor.hpp"
#include "kqsvd/solvers/eigen_attention.hpp"
#include "kqsvd/solvers/fit_options.hpp"
#include "kqsvd/calibration/gram_accumulator.hpp"
#include "kqsvd/solvers/key_query_svd.hpp"
#include "kqsvd/solvers/key_svd.hpp"
#include "kqsvd/solvers/low_rank_projection.hpp"
#include "kqsvd/solvers/method.hpp"
#include "kqsvd/solvers/rank_selection.hpp"

namespace kqsvd {

// Keys: the cached side is K, the query side Q (for GQA, all query heads of the group).
template <typename Scalar = float>
LowRankProjection<Scalar> fit_projection(Method method, const Eigen::Ref<const Eigen::MatrixXd>& cached_gram,
                                         const Eigen::Ref<const Eigen::MatrixXd>& query_gram,
                                         const RankSelection& rank, const FitOptions& options = {}) {
  switch (method) {
    case Method::kq_svd: return fit_kq_svd<Scalar>(cached_gram, query_gram, rank, options);
    case Method::k_svd: return fit_k_svd<Scalar>(cached_gram, rank);
    case Method::eigen_attention: return fit_eigen_attention<Scalar>(cached_gram, query_gram, rank, options);
  }
  throw InvalidArgument("kqsvd::fit_projection: argument 'method' is not a known method");
}

template <typename Scalar = float>
LowRankProjection<Scalar> fit_projection(Method method, const GramAccumulator& cached, const GramAccumulator& queries,
                                         const RankSelection& rank, const FitOptions& options = {}) {
  constexpr const char* where = "kqsvd::fit_projection";
  if (queries.dimension() != cached.dimension()) {
    detail::throw_invalid(where, "queries",
                          "has dimension " + std::to_string(queries.dimension()) + ", the cached side " +
                              std::to_string(cached.dimension()));
  }
  if (cached.token_count() == 0) detail::throw_invalid(where, "cached", "holds no tokens");
  if (method != Method::k_svd && queries.token_count() == 0) detail::throw_invalid(where, "queries", "holds no tokens");
  const double tokens = static_cast<double>(cached.token_count());
  return fit_projection<Scalar>(method, cached.gram() / tokens, queries.gram() / tokens, rank, options);
}

// The method fit_value_projection(method, ...) applies to values: KQ-SVD itself, V-SVD (K-SVD) otherwise.
constexpr Method value_method(Method method) { return method == Method::kq_svd ? Method::kq_svd : Method::k_svd; }

// Values: the cached side is V, the "query" side the output projection (output_projection_gram()).
// KQ-SVD solves for V W^T; K-SVD and Eigen Attention both use V-SVD (the result's method() is k_svd),
// and output_gram is then not read.
template <typename Scalar = float>
LowRankProjection<Scalar> fit_value_projection(Method method, const GramAccumulator& values,
                                               const Eigen::Ref<const Eigen::MatrixXd>& output_gram,
                                               const RankSelection& rank, const FitOptions& options = {}) {
  constexpr const char* where = "kqsvd::fit_value_projection";
  if (values.token_count() == 0) detail::throw_invalid(where, "values", "holds no tokens");
  const Eigen::MatrixXd mean = values.mean_gram();
  if (method == Method::kq_svd) {
    // Checked here so that a bad weight Gram is reported under the name this function gives it.
    return fit_kq_svd<Scalar>(mean, detail::checked_gram(where, "output_gram", output_gram, values.dimension()), rank,
                              options);
  }
  return fit_k_svd<Scalar>(mean, rank);
}

}  // namespace kqsvd
