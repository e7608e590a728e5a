// kqsvd/core/matrix.hpp -- the library's one matrix vocabulary: rows are tokens.
//
// Activations, caches and kernel results keep each token's vector contiguous (row-major), as models and
// KV caches store them; weights keep PyTorch's [out][in] layout, each output unit's row contiguous.
//
//   kqsvd::RowMatrix<float> keys(tokens, kv_heads * head_dim);
//   keys.row(0);                               // the first token, all heads
//   keys.middleCols(h * head_dim, head_dim);   // KV head h, all tokens
#pragma once

#include <Eigen/Core>

namespace kqsvd {

template <typename Scalar>
using RowMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

}  // namespace kqsvd
