// kqsvd/llama/row_matrix.hpp -- the float matrix type of the Llama forward pass.
//
// Row-major because rows are tokens (activations) or output units (weights, PyTorch's [out][in]
// layout): a token's vector, and a weight file's row, are then contiguous in memory.
//
//   kqsvd::llama::RowMatrix keys(tokens, n_kv_heads * head_dim);
//   keys.row(0);                            // the first token's keys, all heads
//   keys.middleCols(h * head_dim, head_dim); // KV head h, all tokens
#pragma once

#include <Eigen/Core>

namespace kqsvd::llama {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

}  // namespace kqsvd::llama
