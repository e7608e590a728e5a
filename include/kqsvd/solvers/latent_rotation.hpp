// kqsvd/solvers/latent_rotation.hpp -- orthogonal rotations of the latent coordinates, for quantized
// latent caches.
//
// A fitted projection concentrates energy in its first latent coordinates, and a few outlier
// coordinates set the scale of every block a quantizer stores: small coordinates then round to zero.
// Rotating the latents by an orthogonal R (encoder A R, decoder B R) changes no score and no output,
// (Q B R)(K A R)^T = (Q B)(K A)^T, but a Hadamard R spreads every coordinate over all of them, so the
// quantizer sees flatter rows (Palu, Chang et al. 2024; QuaRot, Ashkboos et al. 2024).
// It pays where the latent coordinates differ in scale: K-SVD's and Eigen Attention's latents are
// principal components, scaled by the singular values. KQ-SVD's key latents are whitened on the
// calibration data (Z^T Z = n I): every coordinate has the same scale already, and a rotation can only
// help tokens whose own rows have outliers. `kqsvd eval --latents int4` on a file from
// `kqsvd fit --rotate hadamard`, or `kqsvd-llama quality --rotate none,hadamard`, measures it.
//
//   Eigen::MatrixXd h = kqsvd::hadamard_rotation(32);              // 32 x 32, H^T H = I
//   auto rotated = projection.rotated(h);                          // one head
//   auto model_rotated = kqsvd::hadamard_rotated(model);           // every head, keys and values
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <string>
#include <vector>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/solvers/model_projections.hpp"

namespace kqsvd {

// The normalized Walsh-Hadamard matrix when `rank` is a power of two; otherwise block-diagonal with
// Hadamard blocks of the largest power of two dividing `rank` (48: three blocks of 16), so that every
// block of a block quantizer (32 elements, or 16, ...) whose size the rank allows is mixed within
// itself. For an odd rank the blocks are 1 x 1: the identity, nothing is mixed.
inline Eigen::MatrixXd hadamard_rotation(Eigen::Index rank) {
  if (rank < 1) detail::throw_invalid("kqsvd::hadamard_rotation", "rank", "must be >= 1, got " + std::to_string(rank));
  Eigen::Index block = 1;
  while (rank % (2 * block) == 0) block *= 2;
  // Sylvester's construction: H_{2m} = [H_m H_m; H_m -H_m].
  Eigen::MatrixXd hadamard = Eigen::MatrixXd::Ones(1, 1);
  while (hadamard.rows() < block) {
    const Eigen::Index m = hadamard.rows();
    Eigen::MatrixXd doubled(2 * m, 2 * m);
    doubled << hadamard, hadamard, hadamard, -hadamard;
    hadamard = std::move(doubled);
  }
  hadamard /= std::sqrt(static_cast<double>(block));
  Eigen::MatrixXd rotation = Eigen::MatrixXd::Zero(rank, rank);
  for (Eigen::Index first = 0; first < rank; first += block) rotation.block(first, first, block, block) = hadamard;
  return rotation;
}

// Every key and value projection of `projections` rotated by hadamard_rotation of its rank.
template <typename Scalar>
ModelProjections<Scalar> hadamard_rotated(const ModelProjections<Scalar>& projections) {
  const ModelShape& shape = projections.shape();
  std::vector<LowRankProjection<Scalar>> keys, values;
  for (Eigen::Index l = 0; l < shape.layers; ++l) {
    for (Eigen::Index h = 0; h < shape.kv_heads; ++h) {
      const LowRankProjection<Scalar>& key = projections.keys(l, h);
      const LowRankProjection<Scalar>& value = projections.values(l, h);
      keys.push_back(key.rotated(hadamard_rotation(key.rank())));
      values.push_back(value.rotated(hadamard_rotation(value.rank())));
    }
  }
  return ModelProjections<Scalar>(shape, std::move(keys), std::move(values));
}

}  // namespace kqsvd
