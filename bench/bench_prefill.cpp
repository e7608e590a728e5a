// Prefill attention: a prompt of T tokens, causal, against its own cache, d = 128.
//
//   BM_PrefillFull<S>/T         kqsvd::prefill_attention(Q, K, V), keys and values in the caller's memory
//                               stored as S (float, Eigen::half)
//   BM_PrefillFullCache/F/T     kqsvd::prefill_attention(Q, cache): a HeadCache of full rows in format F
//   BM_PrefillLatent/F/T/r      kqsvd::prefill_attention(key_proj, value_proj, Q, cache): latents in
//                               format F, r_k = r_v = r
//
// Prefill is compute-bound (T^2/2 scores of d or r multiply-adds, and as many for the values): counted
// flops are those of the two causal products, 2 T(T+1)/2 (k + c) with k, c the key and value widths,
// reported against the float GEMM ceiling; the summary gives the speedup of the compressed cache.
#include <benchmark/benchmark.h>

#include <kqsvd/cache/head_cache.hpp>
#include <kqsvd/kernels/prefill_attention.hpp>

#include <string>
#include <vector>

#include "ceilings.hpp"
#include "random_fill.hpp"

namespace {

using Eigen::Index;
using FloatRows = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename Storage>
using StorageRows = Eigen::Matrix<Storage, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr Index head_dim = 128;

double causal_flops(Index tokens, Index key_width, Index value_width) {
  return static_cast<double>(tokens) * static_cast<double>(tokens + 1) * static_cast<double>(key_width + value_width);
}

FloatRows random_rows(Index rows, Index cols, std::uint64_t seed, float scale = 1.0f) {
  FloatRows m(rows, cols);
  kqsvd_bench::random_fill(m.data(), m.size(), seed, scale);
  return m;
}

template <typename Storage>
void BM_PrefillFull(benchmark::State& state) {
  const Index tokens = state.range(0);
  const FloatRows q = random_rows(tokens, head_dim, 1, 0.2f);
  const StorageRows<Storage> k = random_rows(tokens, head_dim, 2).cast<Storage>();
  const StorageRows<Storage> v = random_rows(tokens, head_dim, 3).cast<Storage>();
  kqsvd_bench::AdjacentCeiling gemm(kqsvd_bench::Ceiling::float_gemm);
  for (auto _ : state) {
    benchmark::DoNotOptimize(kqsvd::prefill_attention(q, k, v));
    gemm.interleave(state);
  }
  gemm.report(state, causal_flops(tokens, head_dim, head_dim));
}

kqsvd::HeadCache filled_cache(Index tokens, Index width, const kqsvd::StorageFormat& format) {
  kqsvd::HeadCache cache(width, width, format);
  cache.append(random_rows(tokens, width, 2), random_rows(tokens, width, 3));
  return cache;
}

void BM_PrefillFullCache(benchmark::State& state, const kqsvd::StorageFormat& format) {
  const Index tokens = state.range(0);
  const FloatRows q = random_rows(tokens, head_dim, 1, 0.2f);
  const kqsvd::HeadCache cache = filled_cache(tokens, head_dim, format);
  kqsvd_bench::AdjacentCeiling gemm(kqsvd_bench::Ceiling::float_gemm);
  for (auto _ : state) {
    benchmark::DoNotOptimize(kqsvd::prefill_attention(q, cache));
    gemm.interleave(state);
  }
  gemm.report(state, causal_flops(tokens, head_dim, head_dim));
}

void BM_PrefillLatent(benchmark::State& state, const kqsvd::StorageFormat& format) {
  const Index tokens = state.range(0), rank = state.range(1);
  Eigen::MatrixXf a(head_dim, rank), b(head_dim, rank);
  kqsvd_bench::random_fill(a.data(), a.size(), 4, 0.1f);
  kqsvd_bench::random_fill(b.data(), b.size(), 5, 0.1f);
  const kqsvd::LowRankProjection<float> keys(kqsvd::Method::kq_svd, a, b, Eigen::VectorXd::Ones(head_dim));
  const kqsvd::LowRankProjection<float> values(kqsvd::Method::kq_svd, b, a, Eigen::VectorXd::Ones(head_dim));
  const FloatRows q = random_rows(tokens, head_dim, 1, 2.0f);
  const kqsvd::HeadCache cache = filled_cache(tokens, rank, format);
  kqsvd_bench::AdjacentCeiling gemm(kqsvd_bench::Ceiling::float_gemm);
  for (auto _ : state) {
    benchmark::DoNotOptimize(kqsvd::prefill_attention(keys, values, q, cache));
    gemm.interleave(state);
  }
  gemm.report(state, causal_flops(tokens, rank, rank));
}

const std::vector<int64_t> prompt_tokens = {512, 2048, 8192};

BENCHMARK_TEMPLATE(BM_PrefillFull, float)
    ->ArgName("tokens")
    ->ArgsProduct({prompt_tokens})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_PrefillFull, Eigen::half)
    ->ArgName("tokens")
    ->ArgsProduct({prompt_tokens})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// The formats, registered by name (the summary reads the names back).
const bool registered = [] {
  for (const char* name : {"f16", "bf16", "fp8_e4m3", "int8", "q8_0", "q4_0", "int4", "int2"}) {
    const kqsvd::StorageFormat format = kqsvd::StorageFormat::parse(name);
    benchmark::RegisterBenchmark((std::string("BM_PrefillFullCache/") + name).c_str(), BM_PrefillFullCache, format)
        ->ArgName("tokens")
        ->ArgsProduct({prompt_tokens})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
  for (const char* name : {"f32", "f16", "int8", "q8_0", "q4_0", "int4", "int2"}) {
    const kqsvd::StorageFormat format = kqsvd::StorageFormat::parse(name);
    std::vector<int64_t> ranks;  // those the format holds (blocks of 32 need multiples of 32)
    for (const int64_t rank : {16, 32, 64}) {
      if (rank % format.group_size(rank) == 0) ranks.push_back(rank);
    }
    benchmark::RegisterBenchmark((std::string("BM_PrefillLatent/") + name).c_str(), BM_PrefillLatent, format)
        ->ArgNames({"tokens", "r"})
        ->ArgsProduct({prompt_tokens, ranks})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
  return true;
}();

}  // namespace
