// kqsvd/kqsvd.hpp -- the whole core library (Eigen only). The file formats live in kqsvd/io/ (target
// kqsvd::io), included separately.
//
//   #include <kqsvd/kqsvd.hpp>
//   kqsvd::GramAccumulator keys(d), queries(d);
//   keys.add(K); queries.add(Q);                       // any number of blocks, rows are tokens
//   auto proj = kqsvd::fit_projection<float>(kqsvd::Method::kq_svd, keys, queries,
//                                            kqsvd::RankSelection::fixed(16));
//   auto cached = proj.compress(K);                    // n x 16 instead of n x d
//
// The layers, lowest first (a header includes only its own layer and lower ones; docs/architecture.md):
//   core/         errors, the matrix vocabulary, model shapes, rotary embeddings
//   calibration/  streaming Gram matrices of activations, per head and per model
//   solvers/      the closed-form KQ-SVD projection, the baselines, rank selection and allocation
//   cache/        the per-head cache the kernels read, and its byte accounting
//   kernels/      the reference attention and the fused decode / prefill kernels
//   metrics/      fidelity of projections, and what compression costs a model's predictions
#pragma once

#include "kqsvd/version.hpp"

#include "kqsvd/core/error.hpp"
#include "kqsvd/core/matrix.hpp"
#include "kqsvd/core/model_shape.hpp"
#include "kqsvd/core/rope.hpp"
#include "kqsvd/core/storage_format.hpp"

#include "kqsvd/calibration/gram_accumulator.hpp"
#include "kqsvd/calibration/model_calibration.hpp"
#include "kqsvd/calibration/output_projection.hpp"

#include "kqsvd/solvers/budget_allocation.hpp"
#include "kqsvd/solvers/eigen_attention.hpp"
#include "kqsvd/solvers/fit.hpp"
#include "kqsvd/solvers/fit_options.hpp"
#include "kqsvd/solvers/key_query_svd.hpp"
#include "kqsvd/solvers/key_svd.hpp"
#include "kqsvd/solvers/latent_rotation.hpp"
#include "kqsvd/solvers/low_rank_projection.hpp"
#include "kqsvd/solvers/method.hpp"
#include "kqsvd/solvers/model_projections.hpp"
#include "kqsvd/solvers/rank_allocation.hpp"
#include "kqsvd/solvers/rank_selection.hpp"
#include "kqsvd/solvers/spectrum.hpp"

#include "kqsvd/cache/head_cache.hpp"
#include "kqsvd/cache/latent_compression.hpp"
#include "kqsvd/cache/cache_footprint.hpp"
#include "kqsvd/cache/heavy_hitter_cache.hpp"

#include "kqsvd/kernels/attention_weights.hpp"
#include "kqsvd/kernels/decode_arithmetic.hpp"
#include "kqsvd/kernels/decode_attention.hpp"
#include "kqsvd/kernels/partial_attention.hpp"
#include "kqsvd/kernels/prefill_attention.hpp"
#include "kqsvd/kernels/reference_attention.hpp"

#include "kqsvd/metrics/fidelity.hpp"
#include "kqsvd/metrics/next_token_metrics.hpp"
