// kqsvd/cache/latent_compression.hpp -- compress rows straight into preallocated float/half/bfloat16
// latents, in the caller's memory.
//
// LowRankProjection::compress returns a new float matrix; an engine with its own cache wants the latents
// X A written into its storage, rounded to its element type, without an intermediate n x r float copy.
// compress_into does that in fixed blocks of rows (a product with A in float, then the rounding), in
// parallel across blocks with OpenMP when built with it; every output row is computed the same way on any
// thread count. (kqsvd::HeadCache::append does the same into the library's own cache, in any
// StorageFormat.)
//
//   kqsvd::RowMatrix<Eigen::half> latents(n, proj.rank());
//   kqsvd::compress_into(proj, K, latents);          // K: n x d float rows
//   // or into memory the caller owns:
//   kqsvd::compress_into(proj, K, Eigen::Map<kqsvd::RowMatrix<Eigen::half>>(buffer, n, proj.rank()));
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <type_traits>

#include "kqsvd/core/detail/float_conversion.hpp"
#include "kqsvd/core/detail/parallel_for.hpp"
#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/error.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/solvers/low_rank_projection.hpp"

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

// tile = rows * projection.encoder() in float, checked: an InvalidArgument naming the first non-finite
// entry of `rows` (counted from first_row), a NumericalError when finite rows overflow float. One
// vectorised pass finds both (Eigen's allFinite() is a scalar loop, a measurable share of the kernel:
// bench/README.md, design measurements); the slow diagnosis runs only when something is wrong.
template <typename Derived>
void compress_tile(const char* function, const char* argument, const LowRankProjection<float>& projection,
                   const Eigen::MatrixBase<Derived>& rows, Eigen::Index first_row, RowMatrix<float>& tile) {
  static_assert(std::is_same<typename Derived::Scalar, float>::value,
                "rows to compress are float: the latents are computed in float");
  tile.noalias() = rows * projection.encoder();
  // A non-finite input entry always makes its output row non-finite: checking the (smaller) product
  // finds bad input without a second pass over the rows.
  if (!all_finite(tile)) {
    require_finite_rows(function, argument, rows, first_row);
    throw NumericalError(std::string(function) + ": the latents of '" + argument + "' rows " +
                         std::to_string(first_row) + ".." + std::to_string(first_row + rows.rows() - 1) +
                         " overflowed float");
  }
}

}  // namespace detail

// latents = rows * projection.encoder(), rounded to Storage (float, Eigen::half or Eigen::bfloat16).
// rows: n x d (float, any layout); latents: n x rank, row-major (a Matrix, a Map over caller memory, or
// a block of either). Throws InvalidArgument for wrong shapes or a non-finite input row, NumericalError
// if a latent does not fit Storage; the contents of `latents` are then unspecified.
template <typename DerivedRows, typename DerivedLatents>
void compress_into(const LowRankProjection<float>& projection, const Eigen::MatrixBase<DerivedRows>& rows,
                   const Eigen::MatrixBase<DerivedLatents>& latents_out) {
  using Storage = typename DerivedLatents::Scalar;
  using Index = Eigen::Index;
  constexpr const char* where = "kqsvd::compress_into";
  static_assert(detail::is_cache_storage_v<Storage>, "latents are float, Eigen::half or Eigen::bfloat16");
  static_assert(static_cast<bool>(DerivedLatents::Flags & Eigen::RowMajorBit) || DerivedLatents::ColsAtCompileTime == 1,
                "latents must be row-major: one token per row");
  static_assert(static_cast<bool>(DerivedLatents::Flags & Eigen::DirectAccessBit),
                "latents must be memory (a Matrix, a Map or a block of one), not an expression");
  // Eigen's convention for writable expression arguments: const MatrixBase&, cast away.
  auto& latents = const_cast<Eigen::MatrixBase<DerivedLatents>&>(latents_out);
  detail::require_columns(where, "rows", rows.cols(), projection.dimension(), "the head dimension");
  if (latents.rows() != rows.rows() || latents.cols() != projection.rank()) {
    detail::throw_invalid(where, "latents",
                          "is " + detail::shape_string(latents.rows(), latents.cols()) + ", expected " +
                              detail::shape_string(rows.rows(), projection.rank()) + " (rows x rank)");
  }
  if (latents.derived().innerStride() != 1) detail::throw_invalid(where, "latents", "must have contiguous rows (inner stride 1)");
  const Index n = rows.rows();
  const Index r = projection.rank();
  const Index blocks = (n + detail::compression_block_rows - 1) / detail::compression_block_rows;
  const float limit = detail::storage_overflow_threshold<Storage>();
  detail::parallel_for(
      blocks, [&] { return RowMatrix<float>(detail::compression_block_rows, r); },
      [&](Index block, RowMatrix<float>& product) {
        const Index first = block * detail::compression_block_rows;
        const Index count = std::min(detail::compression_block_rows, n - first);
        product.resize(count, r);
        detail::compress_tile(where, "rows", projection, rows.middleRows(first, count), first, product);
        if (!(product.cwiseAbs().maxCoeff() < limit)) {
          for (Index i = 0; i < count; ++i) {
            for (Index j = 0; j < r; ++j) {
              if (std::abs(product(i, j)) < limit) continue;
              std::ostringstream out;
              out << where << ": latent value " << product(i, j) << " at row " << first + i << ", column " << j
                  << " is beyond the range of " << detail::storage_name(Storage{});
              throw NumericalError(out.str());
            }
          }
        }
        for (Index i = 0; i < count; ++i) detail::from_float(&product(i, 0), &latents(first + i, 0), r);
      },
      /*always_open_region=*/true);
}

}  // namespace kqsvd
