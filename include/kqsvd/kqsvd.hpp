// kqsvd/kqsvd.hpp -- the whole core library (Eigen only). File formats live in kqsvd/io/ and the
// llama2.c reference model in kqsvd/llama/, included separately.
//
//   #include <kqsvd/kqsvd.hpp>
//   kqsvd::GramAccumulator keys(d), queries(d);
//   keys.add(K); queries.add(Q);                       // any number of blocks, rows are tokens
//   auto proj = kqsvd::fit_projection<float>(kqsvd::Method::kq_svd, keys, queries,
//                                            kqsvd::RankSelection::fixed(16));
//   auto cached = proj.compress(K);                    // n x 16 instead of n x d
#pragma once

#include "kqsvd/attention.hpp"
#include "kqsvd/decode_attention.hpp"
#include "kqsvd/eigen_attention.hpp"
#include "kqsvd/error.hpp"
#include "kqsvd/fidelity.hpp"
#include "kqsvd/fit.hpp"
#include "kqsvd/fit_options.hpp"
#include "kqsvd/gram_accumulator.hpp"
#include "kqsvd/key_query_svd.hpp"
#include "kqsvd/key_svd.hpp"
#include "kqsvd/latent_cache.hpp"
#include "kqsvd/latent_compression.hpp"
#include "kqsvd/low_rank_projection.hpp"
#include "kqsvd/method.hpp"
#include "kqsvd/model_calibration.hpp"
#include "kqsvd/model_projections.hpp"
#include "kqsvd/model_shape.hpp"
#include "kqsvd/output_projection.hpp"
#include "kqsvd/prefill_attention.hpp"
#include "kqsvd/rank_selection.hpp"
#include "kqsvd/rope.hpp"
#include "kqsvd/spectrum.hpp"
