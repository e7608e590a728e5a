// Prefill attention (issue 4, item 6): a prompt of T tokens, causal, against its own cache, d = 128.
//
//   BM_PrefillFull<S>/T         kqsvd::prefill_attention(Q, K, V), keys and values stored as S
//   BM_PrefillLatent<S>/T/r     kqsvd::prefill_attention(key_proj, value_proj, Q, cache), r_k = r_v = r
//
// Prefill is compute-bound (T^2/2 scores of d or r multiply-adds, and as many for the values): counted
// flops are those of the two causal products, 2 T(T+1)/2 (k + c) with k, c the key and value widths,
// reported against the float GEMM ceiling; the summary gives the speedup of the compressed cache.
#include <benchmark/benchmark.h>

#include <kqsvd/cache/head_cache.hpp>

#include <type_traits>
#include <kqsvd/kernels/prefill_attention.hpp>

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

template <typename Storage>
void BM_PrefillLatent(benchmark::State& state) {
  const Index tokens = state.range(0), rank = state.range(1);
  Eigen::MatrixXf a(head_dim, rank), b(head_dim, rank);
  kqsvd_bench::random_fill(a.data(), a.size(), 4, 0.1f);
  kqsvd_bench::random_fill(b.data(), b.size(), 5, 0.1f);
  const kqsvd::LowRankProjection<float> keys(kqsvd::Method::kq_svd, a, b, Eigen::VectorXd::Ones(head_dim));
  const kqsvd::LowRankProjection<float> values(kqsvd::Method::kq_svd, b, a, Eigen::VectorXd::Ones(head_dim));
  const FloatRows q = random_rows(tokens, head_dim, 1, 2.0f);
  kqsvd::HeadCache cache(rank, rank, kqsvd::StorageFormat::parse(std::is_same<Storage, float>::value ? "f32" : "f16"));
  cache.append(random_rows(tokens, rank, 2), random_rows(tokens, rank, 3));
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
BENCHMARK_TEMPLATE(BM_PrefillLatent, Eigen::half)
    ->ArgNames({"tokens", "r"})
    ->ArgsProduct({prompt_tokens, {16, 32, 64}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
