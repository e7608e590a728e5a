// kqsvd/solvers/low_rank_projection.hpp -- a fitted rank-r projection of one head, and the operators it offers.
//
// Every method (KQ-SVD, K-SVD, Eigen Attention) produces the same object: two d x r matrices
//   A = encoder()  -- cached rows are stored compressed as  X A            (n x r latents)
//   B = decoder()  -- queries are mapped as Q B; latents are decompressed as Z B^T  (back to d)
// so that scores become (Q B)(K A)^T and head outputs (P V A) B^T. For the baselines A = B is an
// orthonormal basis; for KQ-SVD A != B and A^T B = I_r. The object also carries the full spectrum of
// the method's own objective (length d), so the predicted error of every rank is known.
//
//   auto proj = kqsvd::fit_projection<float>(kqsvd::Method::kq_svd, keys, queries,
//                                            kqsvd::RankSelection::fixed(16));
//   auto key_latents   = proj.compress(K);           // n x 16, what the cache stores
//   auto query_latents = proj.map_queries(Q);        // m x 16
//   Eigen::MatrixXf scores = query_latents * key_latents.transpose();   // ~ Q K^T
//   auto keys_again = proj.decompress(key_latents);  // n x d, for the pre-RoPE path
//
// rotated(R) turns the latent coordinates by an r x r orthogonal R (A R, B R): every score and output
// is unchanged, since (Q B R)(K A R)^T = (Q B)(K A)^T, but outliers spread across coordinates, which
// helps a quantized latent cache (Palu's Hadamard; see latent_rotation.hpp). A rotated projection's
// dimensions are no longer ordered by importance, so it cannot be truncated.
#pragma once

#include <Eigen/Core>

#include <string>
#include <type_traits>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/error.hpp"
#include "kqsvd/solvers/method.hpp"
#include "kqsvd/solvers/spectrum.hpp"

namespace kqsvd {

// How a projection's r latent coordinates relate to its objective's singular vectors.
enum class LatentBasis {
  ordered_by_importance,  // coordinate i is the i-th singular direction: the first k are the rank-k fit
  rotated                 // mixed by an orthogonal rotation: the same subspace, no order
};

inline const char* to_string(LatentBasis basis) {
  return basis == LatentBasis::rotated ? "rotated" : "ordered_by_importance";
}

template <typename Scalar_>
class LowRankProjection {
 public:
  using Scalar = Scalar_;
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  // Results keep tokens contiguous (row-major), the layout a KV cache stores.
  using RowMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  static_assert(std::is_floating_point<Scalar>::value, "LowRankProjection is for float or double");

  LowRankProjection(Method method, Matrix encoder, Matrix decoder, Eigen::VectorXd singular_values,
                    LatentBasis basis = LatentBasis::ordered_by_importance)
      : method_(method),
        basis_(basis),
        encoder_(std::move(encoder)),
        decoder_(std::move(decoder)),
        singular_values_(std::move(singular_values)) {
    constexpr const char* where = "kqsvd::LowRankProjection";
    const Index d = encoder_.rows();
    if (d == 0 || encoder_.cols() == 0 || encoder_.cols() > d) {
      detail::throw_invalid(where, "encoder",
                            "must be d x r with 1 <= r <= d, got " + detail::shape_string(d, encoder_.cols()));
    }
    if (decoder_.rows() != d || decoder_.cols() != encoder_.cols()) {
      detail::throw_invalid(where, "decoder",
                            "must have the encoder's shape " + detail::shape_string(d, encoder_.cols()) + ", got " +
                                detail::shape_string(decoder_.rows(), decoder_.cols()));
    }
    if (singular_values_.size() != d) {
      detail::throw_invalid(where, "singular_values",
                            "must have " + std::to_string(d) + " entries (the head dimension), got " +
                                std::to_string(singular_values_.size()));
    }
    detail::require_finite(where, "encoder", encoder_);
    detail::require_finite(where, "decoder", decoder_);
    detail::require_finite(where, "singular_values", singular_values_);
  }

  Method method() const { return method_; }
  LatentBasis basis() const { return basis_; }
  Index dimension() const { return encoder_.rows(); }
  Index rank() const { return encoder_.cols(); }

  const Matrix& encoder() const { return encoder_; }  // A
  const Matrix& decoder() const { return decoder_; }  // B

  // Singular values of the method's objective, descending, length d: those of Q K^T (or V W^T) for
  // KQ-SVD, of K (or V) for K-SVD, of [a K; Q / a] for Eigen Attention.
  const Eigen::VectorXd& singular_values() const { return singular_values_; }

  // The relative error the method's objective reaches at this rank, or at another one.
  double predicted_relative_error() const { return relative_tail_error(singular_values_, rank()); }
  double predicted_relative_error(Index rank) const { return relative_tail_error(singular_values_, rank); }

  // The same projection keeping its first `rank` dimensions. Every method here orders dimensions by
  // importance, so this equals fitting at the lower rank directly.
  LowRankProjection truncated(Index rank) const {
    if (basis_ == LatentBasis::rotated && rank != this->rank()) {
      detail::throw_invalid("kqsvd::LowRankProjection::truncated", "rank",
                            "is " + std::to_string(rank) + ", but this projection is rotated: its " +
                                std::to_string(this->rank()) + " coordinates are mixed, so keeping the first few is "
                                "not a lower-rank fit; truncate first, then rotate");
    }
    if (rank < 1 || rank > this->rank()) {
      detail::throw_invalid("kqsvd::LowRankProjection::truncated", "rank",
                            "must be in [1, " + std::to_string(this->rank()) + "], got " + std::to_string(rank));
    }
    return LowRankProjection(method_, encoder_.leftCols(rank), decoder_.leftCols(rank), singular_values_, basis_);
  }

  // A R and B R for an r x r orthogonal `rotation` (R^T R = I to within 1e-5 for float, 1e-12 for
  // double): the same scores and outputs, latents in rotated coordinates.
  template <typename Derived>
  LowRankProjection rotated(const Eigen::MatrixBase<Derived>& rotation) const {
    constexpr const char* where = "kqsvd::LowRankProjection::rotated";
    if (rotation.rows() != rank() || rotation.cols() != rank()) {
      detail::throw_invalid(where, "rotation",
                            "must be rank x rank = " + detail::shape_string(rank(), rank()) + ", got " +
                                detail::shape_string(rotation.rows(), rotation.cols()));
    }
    detail::require_finite(where, "rotation", rotation);
    const Eigen::MatrixXd r = rotation.template cast<double>();
    const double deviation = (r.transpose() * r - Eigen::MatrixXd::Identity(rank(), rank())).cwiseAbs().maxCoeff();
    const double tolerance = std::is_same<Scalar, float>::value ? 1e-5 : 1e-12;
    if (deviation > tolerance) {
      detail::throw_invalid(where, "rotation",
                            "is not orthogonal: R^T R differs from the identity by " + std::to_string(deviation));
    }
    const Matrix cast_rotation = r.template cast<Scalar>();
    return LowRankProjection(method_, encoder_ * cast_rotation, decoder_ * cast_rotation, singular_values_,
                             LatentBasis::rotated);
  }

  template <typename NewScalar>
  LowRankProjection<NewScalar> cast() const {
    constexpr const char* where = "kqsvd::LowRankProjection::cast";
    return LowRankProjection<NewScalar>(method_, detail::narrowed<NewScalar>(where, "encoder", encoder_),
                                        detail::narrowed<NewScalar>(where, "decoder", decoder_), singular_values_,
                                        basis_);
  }

  // X A: n x d cached rows (keys or values) to n x r latents.
  template <typename Derived>
  RowMatrix compress(const Eigen::MatrixBase<Derived>& rows) const {
    return checked_product("compress", "rows", rows, encoder_, dimension(), "the head dimension");
  }

  // Q B: m x d queries to m x r, so that (Q B)(X A)^T approximates Q X^T.
  template <typename Derived>
  RowMatrix map_queries(const Eigen::MatrixBase<Derived>& queries) const {
    return checked_product("map_queries", "queries", queries, decoder_, dimension(), "the head dimension");
  }

  // Z B^T: n x r latents back to n x d (reconstructed keys for the pre-RoPE path, or a latent head
  // output back to the head dimension).
  template <typename Derived>
  RowMatrix decompress(const Eigen::MatrixBase<Derived>& latents) const {
    return checked_product("decompress", "latents", latents, decoder_.transpose(), rank(), "the rank");
  }

  // X A B^T: what the cache gives back for X.
  template <typename Derived>
  RowMatrix reconstruct(const Eigen::MatrixBase<Derived>& rows) const {
    return decompress(compress(rows));
  }

 private:
  template <typename Derived, typename Factor>
  static RowMatrix checked_product(const char* operation, const char* argument, const Eigen::MatrixBase<Derived>& input,
                                   const Factor& factor, Index expected_columns, const char* meaning) {
    static_assert(std::is_same<typename Derived::Scalar, Scalar>::value,
                  "the input's scalar type must match the projection's: use projection.cast<T>()");
    const std::string where = std::string("kqsvd::LowRankProjection::") + operation;
    detail::require_columns(where.c_str(), argument, input.cols(), expected_columns, meaning);
    RowMatrix result = input * factor;
    // A non-finite input entry always makes its output row non-finite, so checking the (smaller)
    // result finds bad input without a second pass over it in the common case.
    if (!result.allFinite()) {
      detail::require_finite(where.c_str(), argument, input);
      throw NumericalError(where + ": the result overflowed (input '" + argument + "' is finite but too large for " +
                           (std::is_same<Scalar, float>::value ? "float" : "double") + ")");
    }
    return result;
  }

  Method method_;
  LatentBasis basis_;
  Matrix encoder_;
  Matrix decoder_;
  Eigen::VectorXd singular_values_;
};

}  // namespace kqsvd
