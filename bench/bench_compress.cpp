// Compress: keys n x d (float) -> latents n x r, stored as float32 or float16, with
// kqsvd::compress_into.
//
// A pool of heads totalling 256 MiB of keys is compressed per iteration, so the input streams from
// memory as in a real prefill, not from cache. Reported against both ceilings: bytes moved (read
// n d 4 + write n r sizeof) over the bandwidth ceiling -- the target -- and flops (2 n d r)
// over the float GEMM ceiling. The arithmetic intensity is r/2 flops per byte read, so for r >= 8 the
// GEMM ceiling binds before the bandwidth one on this machine; the summary prints that roofline bound.
#include <benchmark/benchmark.h>

#include <kqsvd/cache/latent_compression.hpp>

#include <algorithm>
#include <vector>

#include "ceilings.hpp"
#include "random_fill.hpp"

namespace {

using Eigen::Index;
using FloatRows = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename Storage>
using StorageRows = Eigen::Matrix<Storage, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr Index head_dim = 128;
constexpr double pool_bytes = 256.0 * (1 << 20);

template <typename Storage>
void BM_Compress(benchmark::State& state) {
  const Index tokens = state.range(0), rank = state.range(1);
  const auto heads = static_cast<Index>(std::max(1.0, pool_bytes / (static_cast<double>(tokens * head_dim) * 4.0)));
  std::vector<FloatRows> keys;
  std::vector<StorageRows<Storage>> latents;
  std::vector<kqsvd::LowRankProjection<float>> projections;
  for (Index h = 0; h < heads; ++h) {
    keys.emplace_back(tokens, head_dim);
    kqsvd_bench::random_fill(keys.back().data(), keys.back().size(), static_cast<std::uint64_t>(h));
    // Written once before timing: a fresh buffer's first touch costs page faults (measured with perf:
    // most of the float32 r = 64 time), which a cache that reuses its memory does not pay per token.
    latents.emplace_back(StorageRows<Storage>::Zero(tokens, rank));
    Eigen::MatrixXf encoder(head_dim, rank);
    kqsvd_bench::random_fill(encoder.data(), encoder.size(), 1000 + static_cast<std::uint64_t>(h), 0.1f);
    projections.emplace_back(kqsvd::Method::kq_svd, encoder, encoder, Eigen::VectorXd::Ones(head_dim));
  }
  const double bytes = static_cast<double>(heads * tokens) * (head_dim * 4.0 + static_cast<double>(rank * sizeof(Storage)));
  const double flops = static_cast<double>(heads * tokens) * 2.0 * head_dim * static_cast<double>(rank);
  kqsvd_bench::AdjacentCeiling bandwidth(kqsvd_bench::Ceiling::read_bandwidth);
  kqsvd_bench::AdjacentCeiling gemm(kqsvd_bench::Ceiling::float_gemm);
  for (auto _ : state) {
    for (Index h = 0; h < heads; ++h) {
      kqsvd::compress_into(projections[static_cast<std::size_t>(h)], keys[static_cast<std::size_t>(h)],
                           latents[static_cast<std::size_t>(h)]);
    }
    benchmark::ClobberMemory();
    bandwidth.interleave(state);
    gemm.interleave(state);
  }
  bandwidth.report(state, bytes);
  gemm.report(state, flops);
  state.counters["heads"] = static_cast<double>(heads);
  state.counters["tokens_per_s"] =
      benchmark::Counter(static_cast<double>(heads * tokens * state.iterations()), benchmark::Counter::kIsRate);
}

void compress_sizes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"tokens", "r"})->ArgsProduct({{32768, 131072}, {16, 32, 64}})->UseRealTime()->Unit(benchmark::kMillisecond);
}
BENCHMARK_TEMPLATE(BM_Compress, float)->Apply(compress_sizes);
BENCHMARK_TEMPLATE(BM_Compress, Eigen::half)->Apply(compress_sizes);

}  // namespace
