// Decode attention (issue 4, item 5): one new query per head against a cache of n tokens, d = 128.
//
//   BM_DecodeFull<S>/tokens        kqsvd::decode_attention(q, K, V): full cache, keys and values stored
//                                  as S (float, Eigen::half)
//   BM_DecodeLatent<S>/tokens/r    kqsvd::decode_attention(key_proj, value_proj, q, cache): LatentCache
//                                  with r_k = r_v = r, latents stored as S (float, half, bfloat16)
//
// A decode step of a model touches every head's cache once, so caches are never hot in the CPU's
// caches: each iteration runs one step over a pool of heads holding 512 MiB in all (a Llama-2-7B at
// 1k tokens, fp16), in parallel over heads, and every head has its own projections (up to 1024 distinct
// pairs, the number a Llama-2-7B has). Counted bytes are the cache's; time per head-step and the
// speedup over the full cache follow in the summary, next to the ideal byte ratio 2d / (r_k + r_v).
#include <benchmark/benchmark.h>

#include <kqsvd/cache/head_cache.hpp>
#include <kqsvd/kernels/decode_attention.hpp>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "ceilings.hpp"
#include "random_fill.hpp"

namespace {

using Eigen::Index;
template <typename Storage>
using StorageRows = Eigen::Matrix<Storage, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr Index head_dim = 128;

template <typename Storage>
kqsvd::StorageFormat storage_format() {
  return kqsvd::StorageFormat::parse(std::is_same<Storage, float>::value ? "f32"
                                     : std::is_same<Storage, Eigen::half>::value ? "f16" : "bf16");
}
constexpr double pool_bytes = 512.0 * (1 << 20);
constexpr Index distinct_projections = 1024;

Index pool_heads(Index tokens, double bytes_per_token) {
  return std::max<Index>(2, static_cast<Index>(std::ceil(pool_bytes / (static_cast<double>(tokens) * bytes_per_token))));
}

std::vector<Eigen::RowVectorXf> queries(Index heads, Index width) {
  std::vector<Eigen::RowVectorXf> result(static_cast<std::size_t>(heads), Eigen::RowVectorXf(width));
  for (Index h = 0; h < heads; ++h) {
    // Scores of O(1) spread over unit-range keys: a softmax that is neither flat nor one-hot.
    kqsvd_bench::random_fill(result[static_cast<std::size_t>(h)].data(), width, 500 + static_cast<std::uint64_t>(h), 2.0f);
  }
  return result;
}

// Full caches of `heads` heads: keys and values tokens x head_dim each, random.
template <typename Storage>
struct FullCaches {
  std::vector<StorageRows<Storage>> keys, values;
  FullCaches(Index tokens, Index heads) {
    for (Index h = 0; h < heads; ++h) {
      keys.emplace_back(tokens, head_dim);
      values.emplace_back(tokens, head_dim);
      kqsvd_bench::random_fill(keys.back().data(), keys.back().size(), 2 * static_cast<std::uint64_t>(h));
      kqsvd_bench::random_fill(values.back().data(), values.back().size(), 2 * static_cast<std::uint64_t>(h) + 1);
    }
  }
  Index heads() const { return static_cast<Index>(keys.size()); }
};

// One decode-shaped pass per iteration over a pool of `heads` full caches (float32 or float16), in
// parallel over heads: step(h, keys, values) for each. Reported against the read ceiling.
template <typename Storage, typename Step>
void time_full_caches(benchmark::State& state, Index heads, Step&& step) {
  const Index tokens = state.range(0);
  const FullCaches<Storage> caches(tokens, heads);
  kqsvd_bench::AdjacentCeiling bandwidth(kqsvd_bench::Ceiling::read_bandwidth);
  for (auto _ : state) {
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1)
#endif
    for (Index h = 0; h < heads; ++h) {
      const auto i = static_cast<std::size_t>(h);
      step(i, caches.keys[i], caches.values[i]);
    }
    benchmark::ClobberMemory();
    bandwidth.interleave(state);
  }
  bandwidth.report(state, static_cast<double>(heads * tokens) * 2.0 * head_dim * sizeof(Storage));
  state.counters["heads"] = static_cast<double>(heads);
}

template <typename Storage>
void BM_DecodeFull(benchmark::State& state) {
  const Index heads = pool_heads(state.range(0), 2.0 * head_dim * sizeof(Storage));
  const std::vector<Eigen::RowVectorXf> q = queries(heads, head_dim);
  std::vector<Eigen::RowVectorXf> out(static_cast<std::size_t>(heads));
  time_full_caches<Storage>(state, heads, [&](std::size_t i, const auto& keys, const auto& values) {
    out[i] = kqsvd::decode_attention(q[i], keys, values);
  });
}

// The full-cache decode's memory access pattern without its arithmetic: the same pool of float32 heads,
// the same parallel loop, and per head the same alternation between a 64-token tile of keys and the
// matching tile of values (32 KiB each), only summed. Its fraction of the read ceiling is what any
// kernel reading the cache in this order can reach, to compare BM_DecodeFull<float> with.
void BM_DecodeAccessPattern(benchmark::State& state) {
  const Index heads = pool_heads(state.range(0), 2.0 * head_dim * sizeof(float));
  constexpr Index tile = 64;  // the kernels' tile of rows in the caller's memory
  std::vector<float> sums(static_cast<std::size_t>(heads));
  time_full_caches<float>(state, heads, [&](std::size_t i, const auto& keys, const auto& values) {
    float sum = 0.0f;
    for (Index first = 0; first < keys.rows(); first += tile) {
      const Index count = std::min(tile, keys.rows() - first);
      sum += keys.middleRows(first, count).sum();
      sum += values.middleRows(first, count).sum();
    }
    sums[i] = sum;
  });
  benchmark::DoNotOptimize(sums.data());
}

template <typename Storage>
void BM_DecodeLatent(benchmark::State& state) {
  const Index tokens = state.range(0), rank = state.range(1);
  const double bytes_per_token = 2.0 * static_cast<double>(rank * sizeof(Storage));
  const Index heads = pool_heads(tokens, bytes_per_token);
  const Index distinct = std::min(heads, distinct_projections);
  std::vector<kqsvd::LowRankProjection<float>> key_projections, value_projections;
  for (Index p = 0; p < distinct; ++p) {
    Eigen::MatrixXf a(head_dim, rank), b(head_dim, rank);
    kqsvd_bench::random_fill(a.data(), a.size(), 7000 + static_cast<std::uint64_t>(p), 0.1f);
    kqsvd_bench::random_fill(b.data(), b.size(), 9000 + static_cast<std::uint64_t>(p), 0.1f);
    key_projections.emplace_back(kqsvd::Method::kq_svd, a, b, Eigen::VectorXd::Ones(head_dim));
    value_projections.emplace_back(kqsvd::Method::kq_svd, b, a, Eigen::VectorXd::Ones(head_dim));
  }
  const kqsvd::StorageFormat format = storage_format<Storage>();
  std::vector<kqsvd::HeadCache> caches;
  caches.reserve(static_cast<std::size_t>(heads));
  {
    Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> latents(tokens, rank);
    for (Index h = 0; h < heads; ++h) {
      caches.emplace_back(rank, rank, format);
      caches.back().reserve(tokens);
      kqsvd_bench::random_fill(latents.data(), latents.size(), 2 * static_cast<std::uint64_t>(h));
      Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> value_latents = latents.colwise().reverse();
      caches.back().append(latents, value_latents);
    }
  }
  const std::vector<Eigen::RowVectorXf> q = queries(heads, head_dim);
  std::vector<Eigen::RowVectorXf> out(static_cast<std::size_t>(heads));
  kqsvd_bench::AdjacentCeiling bandwidth(kqsvd_bench::Ceiling::read_bandwidth);
  for (auto _ : state) {
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1)
#endif
    for (Index h = 0; h < heads; ++h) {
      const auto i = static_cast<std::size_t>(h);
      const auto p = static_cast<std::size_t>(h % distinct);
      out[i] = kqsvd::decode_attention(key_projections[p], value_projections[p], q[i], caches[i]);
    }
    benchmark::ClobberMemory();
    bandwidth.interleave(state);
  }
  bandwidth.report(state, static_cast<double>(heads * tokens) * bytes_per_token);
  state.counters["heads"] = static_cast<double>(heads);
}

// Compute cost per token, free of memory effects: one head of 2048 tokens (resident in L2, a single
// decode task, so one thread), called repeatedly; the summary divides the CPU time (not the wall time:
// this machine's neighbours steal cores) by the tokens. threads x bytes-per-token / that time is the
// bandwidth a decode could reach if compute were its only limit.
constexpr Index compute_tokens = 2048;

template <typename Storage>
void BM_DecodeFullCompute(benchmark::State& state) {
  StorageRows<Storage> keys(compute_tokens, head_dim), values(compute_tokens, head_dim);
  kqsvd_bench::random_fill(keys.data(), keys.size(), 1);
  kqsvd_bench::random_fill(values.data(), values.size(), 2);
  const Eigen::RowVectorXf q = queries(1, head_dim)[0];
  for (auto _ : state) benchmark::DoNotOptimize(kqsvd::decode_attention(q, keys, values));
  state.counters["tokens"] = static_cast<double>(compute_tokens);
}

template <typename Storage>
void BM_DecodeLatentCompute(benchmark::State& state) {
  const Index rank = state.range(0);
  Eigen::MatrixXf a(head_dim, rank);
  kqsvd_bench::random_fill(a.data(), a.size(), 3, 0.1f);
  const kqsvd::LowRankProjection<float> projection(kqsvd::Method::kq_svd, a, a, Eigen::VectorXd::Ones(head_dim));
  Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> latents(compute_tokens, rank);
  kqsvd_bench::random_fill(latents.data(), latents.size(), 4);
  kqsvd::HeadCache cache(rank, rank, storage_format<Storage>());
  cache.append(latents, latents);
  const Eigen::RowVectorXf q = queries(1, head_dim)[0];
  for (auto _ : state) benchmark::DoNotOptimize(kqsvd::decode_attention(projection, projection, q, cache));
  state.counters["tokens"] = static_cast<double>(compute_tokens);
}

const std::vector<int64_t> decode_tokens = {1024, 4096, 16384, 32768, 131072};

void full_sizes(benchmark::internal::Benchmark* b) {
  b->ArgName("tokens")->ArgsProduct({decode_tokens})->UseRealTime()->Unit(benchmark::kMicrosecond);
}
void latent_sizes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"tokens", "r"})->ArgsProduct({decode_tokens, {16, 32, 64}})->UseRealTime()->Unit(benchmark::kMicrosecond);
}

BENCHMARK_TEMPLATE(BM_DecodeFull, float)->Apply(full_sizes);
BENCHMARK_TEMPLATE(BM_DecodeFull, Eigen::half)->Apply(full_sizes);
BENCHMARK(BM_DecodeAccessPattern)->Apply(full_sizes);
BENCHMARK_TEMPLATE(BM_DecodeLatent, float)->Apply(latent_sizes);
BENCHMARK_TEMPLATE(BM_DecodeLatent, Eigen::half)->Apply(latent_sizes);
BENCHMARK_TEMPLATE(BM_DecodeLatent, Eigen::bfloat16)->Apply(latent_sizes);
BENCHMARK_TEMPLATE(BM_DecodeFullCompute, float)->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_DecodeFullCompute, Eigen::half)->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_DecodeLatentCompute, float)->ArgName("r")->Arg(16)->Arg(32)->Arg(64)->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_DecodeLatentCompute, Eigen::half)->ArgName("r")->Arg(16)->Arg(32)->Arg(64)->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_DecodeLatentCompute, Eigen::bfloat16)->ArgName("r")->Arg(16)->Arg(32)->Arg(64)->Unit(benchmark::kMicrosecond);

}  // namespace
