// kqsvd/kernels/reference_attention.hpp -- the reference: causal attention of one head written as its
// definition (scores, a softmax over the whole row, weights times values), on full or compressed caches.
//
// It materialises the m x n scores, so it is for tests, metrics (metrics/fidelity.hpp) and small
// problems, in float or double: the kernels (decode_attention.hpp, prefill_attention.hpp,
// partial_attention.hpp) are checked against it, and are what an engine runs.
//
// Queries are a block of m tokens at absolute positions query_offset .. query_offset + m - 1; the cache
// holds n tokens at positions 0 .. n - 1 (n >= query_offset + m); query i sees keys 0 .. query_offset + i.
// Scores are scaled by 1/sqrt(d) with d the head dimension, also when they are computed from rank-r
// latents: the latents stand in for d-dimensional vectors.
//
//   // exact, for reference
//   auto out = kqsvd::causal_attention(Q, K, V);                        // m x d
//   // post-RoPE compressed cache: the cache stores K A and V A_v only
//   auto out_c = kqsvd::compressed_causal_attention(key_proj, value_proj, Q,
//                                                   key_proj.compress(K), value_proj.compress(V));
//   // pre-RoPE: latents of un-rotated keys; reconstruct, rotate, score with rotated queries
//   auto out_p = kqsvd::pre_rope_causal_attention(key_proj, value_proj, rope, Q_rotated,
//                                                 key_latents, value_latents);
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <string>
#include <type_traits>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/solvers/low_rank_projection.hpp"
#include "kqsvd/core/rope.hpp"

namespace kqsvd {

namespace detail {

inline void require_causal_layout(const char* function, Eigen::Index queries, Eigen::Index keys,
                                  Eigen::Index query_offset) {
  if (query_offset < 0 || query_offset + queries > keys) {
    throw_invalid(function, "query_offset",
                  "is " + std::to_string(query_offset) + ": " + std::to_string(queries) +
                      " queries from there need keys up to position " + std::to_string(query_offset + queries - 1) +
                      ", but the cache holds " + std::to_string(keys) + " tokens");
  }
}

}  // namespace detail

// Row-wise softmax of `scores` (m x n) under the causal mask; masked entries are exactly 0.
template <typename Derived>
RowMatrix<typename Derived::Scalar> causal_softmax(const Eigen::MatrixBase<Derived>& scores, Eigen::Index query_offset) {
  using Scalar = typename Derived::Scalar;
  detail::require_causal_layout("kqsvd::causal_softmax", scores.rows(), scores.cols(), query_offset);
  // exp(NaN) or inf - inf would make whole rows of weights NaN.
  detail::require_finite("kqsvd::causal_softmax", "scores", scores);
  RowMatrix<Scalar> weights = RowMatrix<Scalar>::Zero(scores.rows(), scores.cols());
  for (Eigen::Index i = 0; i < scores.rows(); ++i) {
    const Eigen::Index visible = query_offset + i + 1;
    const auto row = scores.row(i).head(visible);
    // Subtracting the row maximum keeps exp() from overflowing; the weights are unchanged.
    const Scalar largest = row.maxCoeff();
    weights.row(i).head(visible) = (row.array() - largest).exp().matrix();
    weights.row(i).head(visible) /= weights.row(i).head(visible).sum();
  }
  return weights;
}

// softmax(Q K^T * scale) V under the causal mask. Q is m x k, K is n x k, V is n x c: K and V may be
// full rows (k = c = d) or latents.
template <typename DerivedQ, typename DerivedK, typename DerivedV>
RowMatrix<typename DerivedQ::Scalar> causal_attention(const Eigen::MatrixBase<DerivedQ>& queries,
                                                      const Eigen::MatrixBase<DerivedK>& keys,
                                                      const Eigen::MatrixBase<DerivedV>& values,
                                                      Eigen::Index query_offset, double scale) {
  using Scalar = typename DerivedQ::Scalar;
  constexpr const char* where = "kqsvd::causal_attention";
  detail::require_columns(where, "keys", keys.cols(), queries.cols(), "the query width");
  if (values.rows() != keys.rows()) {
    detail::throw_invalid(where, "values",
                          "has " + std::to_string(values.rows()) + " rows, keys have " + std::to_string(keys.rows()));
  }
  if (!(scale > 0.0) || !std::isfinite(scale)) {
    detail::throw_invalid(where, "scale", "must be finite and > 0, got " + std::to_string(scale));
  }
  detail::require_causal_layout(where, queries.rows(), keys.rows(), query_offset);
  detail::require_finite(where, "values", values);
  const RowMatrix<Scalar> scores = (queries * keys.transpose()) * static_cast<Scalar>(scale);
  if (!scores.allFinite()) {
    detail::require_finite(where, "queries", queries);
    detail::require_finite(where, "keys", keys);
    throw NumericalError(std::string(where) + ": the attention scores overflowed");
  }
  return causal_softmax(scores, query_offset) * values;
}

// The same with the default layout: queries are the last m tokens of the cache, scale 1/sqrt(d).
template <typename DerivedQ, typename DerivedK, typename DerivedV>
RowMatrix<typename DerivedQ::Scalar> causal_attention(const Eigen::MatrixBase<DerivedQ>& queries,
                                                      const Eigen::MatrixBase<DerivedK>& keys,
                                                      const Eigen::MatrixBase<DerivedV>& values) {
  return causal_attention(queries, keys, values, keys.rows() - queries.rows(),
                          1.0 / std::sqrt(static_cast<double>(queries.cols())));
}

// Post-RoPE attention on a compressed cache (the paper's setting): scores (Q B)(K A)^T / sqrt(d) in
// latent space, weights times the value latents V A_v, decompressed by B_v^T. Nothing is
// reconstructed per cached token. Returns m x d.
template <typename Scalar, typename DerivedQ, typename DerivedK, typename DerivedV>
RowMatrix<Scalar> compressed_causal_attention(const LowRankProjection<Scalar>& key_projection,
                                              const LowRankProjection<Scalar>& value_projection,
                                              const Eigen::MatrixBase<DerivedQ>& queries,
                                              const Eigen::MatrixBase<DerivedK>& key_latents,
                                              const Eigen::MatrixBase<DerivedV>& value_latents,
                                              Eigen::Index query_offset = -1) {
  constexpr const char* where = "kqsvd::compressed_causal_attention";
  detail::require_columns(where, "key_latents", key_latents.cols(), key_projection.rank(), "the key rank");
  detail::require_columns(where, "value_latents", value_latents.cols(), value_projection.rank(), "the value rank");
  detail::require_finite(where, "key_latents", key_latents);
  detail::require_finite(where, "value_latents", value_latents);
  if (query_offset < 0) query_offset = key_latents.rows() - queries.rows();
  const double scale = 1.0 / std::sqrt(static_cast<double>(key_projection.dimension()));
  const RowMatrix<Scalar> latent_output =
      causal_attention(key_projection.map_queries(queries), key_latents, value_latents, query_offset, scale);
  return value_projection.decompress(latent_output);
}

// Pre-RoPE attention on a compressed cache (Palu, Eigen Attention, xKV): the latents are of
// un-rotated keys; keys are reconstructed as (K A) B^T, rotated by their positions 0 .. n-1, and scored
// against the rotated queries. Returns m x d.
template <typename Scalar, typename DerivedQ, typename DerivedK, typename DerivedV>
RowMatrix<Scalar> pre_rope_causal_attention(const LowRankProjection<Scalar>& key_projection,
                                            const LowRankProjection<Scalar>& value_projection,
                                            const RotaryEmbedding& rope, const Eigen::MatrixBase<DerivedQ>& rotated_queries,
                                            const Eigen::MatrixBase<DerivedK>& key_latents,
                                            const Eigen::MatrixBase<DerivedV>& value_latents,
                                            Eigen::Index query_offset = -1) {
  constexpr const char* where = "kqsvd::pre_rope_causal_attention";
  detail::require_columns(where, "value_latents", value_latents.cols(), value_projection.rank(), "the value rank");
  detail::require_finite(where, "value_latents", value_latents);
  if (query_offset < 0) query_offset = key_latents.rows() - rotated_queries.rows();
  RowMatrix<Scalar> keys = key_projection.decompress(key_latents);
  rope.rotate(keys, 0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(key_projection.dimension()));
  const RowMatrix<Scalar> latent_output = causal_attention(rotated_queries, keys, value_latents, query_offset, scale);
  return value_projection.decompress(latent_output);
}

}  // namespace kqsvd
