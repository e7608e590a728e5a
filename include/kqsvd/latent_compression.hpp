// kqsvd/latent_compression.hpp -- compress rows straight into preallocated float/half/bfloat16 latents.
//
// LowRankProjection::compress returns a new float matrix; a cache wants the latents X A written into its
// own storage, rounded to its element type, without an intermediate n x r float copy. compress_into
// does that in fixed blocks of rows (a product with A in float, then the rounding), in parallel across
// blocks with OpenMP when built with it; every output row is computed the same way on any thread count.
//
//   Eigen::Matrix<Eigen::half, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> latents(n, proj.rank());
//   kqsvd::compress_into(proj, K, latents);          // K: n x d float rows
//   // or into memory the caller owns:
//   kqsvd::compress_into(proj, K, Eigen::Map<decltype(latents)>(buffer, n, proj.rank()));
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <type_traits>

#include "kqsvd/detail/parallel_for.hpp"
#include "kqsvd/detail/storage_conversion.hpp"
#include "kqsvd/detail/validation.hpp"
#include "kqsvd/error.hpp"
#include "kqsvd/low_rank_projection.hpp"

namespace kqsvd {

namespace detail {

// Rows per compression task: 256 x d floats of input (128 KiB at d = 128) and 256 x r of output fit
// in L2 while the product and the rounding run over them.
inline constexpr Eigen::Index compression_block_rows = 256;

// Throws InvalidArgument naming the first non-finite entry of `rows` by its absolute row (token).
template <typename Derived>
void require_finite_rows(const char* function, const char* argument, const Eigen::MatrixBase<Derived>& rows,
                         Eigen::Index first_row) {
  for (Eigen::Index i = 0; i < rows.rows(); ++i) {
    for (Eigen::Index j = 0; j < rows.cols(); ++j) {
      const double value = static_cast<double>(rows(i, j));
      if (!std::isfinite(value)) {
        std::ostringstream out;
        out << "contains a non-finite value (" << value << ") at row " << first_row + i << ", column " << j;
        throw_invalid(function, argument, out.str());
      }
    }
  }
}

// The first (row, column) of float `values` whose magnitude does not fit Storage, as a message.
template <typename Storage, typename Derived>
std::string unstorable_entry(const Eigen::MatrixBase<Derived>& values, Eigen::Index first_row) {
  const float limit = storage_overflow_threshold<Storage>();
  for (Eigen::Index i = 0; i < values.rows(); ++i) {
    for (Eigen::Index j = 0; j < values.cols(); ++j) {
      if (!(std::abs(values(i, j)) < limit)) {
        std::ostringstream out;
        out << "value " << values(i, j) << " at row " << first_row + i << ", column " << j << " is beyond the range of "
            << storage_name(Storage{});
        return out.str();
      }
    }
  }
  return {};
}

}  // namespace detail

namespace detail {

// compress_into with the caller's function and argument names in its error messages.
template <typename DerivedRows, typename DerivedLatents>
void compress_rows(const char* where, const char* argument, const LowRankProjection<float>& projection,
                   const Eigen::MatrixBase<DerivedRows>& rows, const Eigen::MatrixBase<DerivedLatents>& latents_out) {
  using Storage = typename DerivedLatents::Scalar;
  static_assert(is_cache_storage_v<Storage>, "latents are float, Eigen::half or Eigen::bfloat16");
  static_assert(std::is_same<typename DerivedRows::Scalar, float>::value,
                "compress_into takes float rows: the latents are computed in float");
  static_assert(static_cast<bool>(DerivedLatents::Flags & Eigen::RowMajorBit) || DerivedLatents::ColsAtCompileTime == 1,
                "latents must be row-major: one token per row");
  static_assert(static_cast<bool>(DerivedLatents::Flags & Eigen::DirectAccessBit),
                "latents must be memory (a Matrix, a Map or a block of one), not an expression");
  using Index = Eigen::Index;
  // Eigen's convention for writable expression arguments: const MatrixBase&, cast away.
  auto& latents = const_cast<Eigen::MatrixBase<DerivedLatents>&>(latents_out);
  require_columns(where, argument, rows.cols(), projection.dimension(), "the head dimension");
  if (latents.rows() != rows.rows() || latents.cols() != projection.rank()) {
    throw_invalid(where, "latents",
                          "is " + shape_string(latents.rows(), latents.cols()) + ", expected " +
                              shape_string(rows.rows(), projection.rank()) + " (rows x rank)");
  }
  if (latents.derived().innerStride() != 1) {
    throw_invalid(where, "latents", "must have contiguous rows (inner stride 1)");
  }
  const Index n = rows.rows();
  const Index r = projection.rank();
  const Index blocks = (n + compression_block_rows - 1) / compression_block_rows;
  const auto& encoder = projection.encoder();
  const float limit = storage_overflow_threshold<Storage>();
  parallel_for(
      blocks, [&] { return FloatRows(compression_block_rows, r); },
      [&](Index block, FloatRows& product) {
        const Index first = block * compression_block_rows;
        const Index count = std::min(compression_block_rows, n - first);
        auto tile = product.topRows(count);
        tile.noalias() = rows.middleRows(first, count) * encoder;
        // A non-finite input entry always makes its output row non-finite: checking the (smaller)
        // product finds bad input without a second pass over the rows.
        // One vectorised pass for both checks (Eigen's allFinite() is a scalar loop; measured: the kernel
        // 10-18 % faster at 128k tokens); the slow diagnosis runs only when something is wrong.
        if (!(tile.cwiseAbs().template maxCoeff<Eigen::PropagateNaN>() < limit)) {
          if (!all_finite(tile)) {
            require_finite_rows(where, argument, rows.middleRows(first, count), first);
            throw NumericalError(std::string(where) + ": the latents of rows " + std::to_string(first) + ".." +
                                 std::to_string(first + count - 1) + " overflowed float");
          }
          throw NumericalError(std::string(where) + ": latent " + unstorable_entry<Storage>(tile, first));
        }
        for (Index i = 0; i < count; ++i) from_float(&tile(i, 0), &latents(first + i, 0), r);
      },
      /*always_open_region=*/true);
}

}  // namespace detail

// latents = rows * projection.encoder(), rounded to Storage. rows: n x d (float, any layout);
// latents: n x rank, row-major (a Matrix, a Map over caller memory, or a block of either).
// Throws InvalidArgument for wrong shapes or a non-finite input row, NumericalError if a latent does
// not fit Storage; the contents of `latents` are then unspecified.
template <typename DerivedRows, typename DerivedLatents>
void compress_into(const LowRankProjection<float>& projection, const Eigen::MatrixBase<DerivedRows>& rows,
                   const Eigen::MatrixBase<DerivedLatents>& latents_out) {
  detail::compress_rows("kqsvd::compress_into", "rows", projection, rows, latents_out);
}

}  // namespace kqsvd
