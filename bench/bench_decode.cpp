// Decode attention: one new query per head against a cache of n tokens, d = 128.
//
//   BM_DecodeFull<S>/tokens              kqsvd::decode_attention(q, K, V): full rows in the caller's memory,
//                                        stored as S (float, Eigen::half) -- the baseline engines run
//   BM_DecodeAccessPattern/tokens        the float32 baseline's reads, summed only: that pattern's ceiling
//   BM_DecodeFullCache/F/tokens          kqsvd::decode_attention(q, cache): a HeadCache of full rows in
//                                        storage format F (f16, q8_0, q4_0, fp8_e4m3, int8, ...)
//   BM_DecodeLatent/F/tokens/r           kqsvd::decode_attention(key_proj, value_proj, q, cache): latents
//                                        with r_k = r_v = r in format F
//   BM_DecodeCacheCompute/F/width        one HeadCache of 2048 tokens, resident in L2: compute cost per
//                                        token (width 128: full rows; less: latents of that rank)
// F+int8 (F = q4_0, int4, int2): the same with kqsvd::DecodeArithmetic::int8_dot_products.
//
// A decode step of a model touches every head's cache once, so caches are never hot in the CPU's
// caches: each iteration runs one step over a pool of heads holding 512 MiB in all (a Llama-2-7B at 1k
// tokens, fp16), in parallel over heads, and every head has its own projections (up to 1024 distinct
// pairs, the number a Llama-2-7B has). Counted bytes are the cache's (codes, scales and minimums); time
// per head-step, the fraction of the read bandwidth and the speedup over the float16 full cache follow in
// the summary, next to the ideal byte ratio.
#include <benchmark/benchmark.h>

#include <kqsvd/cache/head_cache.hpp>
#include <kqsvd/kernels/decode_attention.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "ceilings.hpp"
#include "random_fill.hpp"

namespace {

using Eigen::Index;
template <typename Storage>
using StorageRows = Eigen::Matrix<Storage, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr Index head_dim = 128;
constexpr double pool_bytes = 512.0 * (1 << 20);
constexpr Index distinct_projections = 1024;
constexpr Index compute_tokens = 2048;

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

// Runs step(h) for every head of the pool per iteration, in parallel over heads; reported against the
// read ceiling for `bytes` per iteration.
template <typename Step>
void time_pool(benchmark::State& state, Index heads, double bytes, Step&& step) {
  kqsvd_bench::AdjacentCeiling bandwidth(kqsvd_bench::Ceiling::read_bandwidth);
  for (auto _ : state) {
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1)
#endif
    for (Index h = 0; h < heads; ++h) step(static_cast<std::size_t>(h));
    benchmark::ClobberMemory();
    bandwidth.interleave(state);
  }
  bandwidth.report(state, bytes);
  state.counters["heads"] = static_cast<double>(heads);
}

// ---- full rows in the caller's memory -------------------------------------------------------------

template <typename Storage>
struct FullRows {
  std::vector<StorageRows<Storage>> keys, values;
  FullRows(Index tokens, Index heads) {
    for (Index h = 0; h < heads; ++h) {
      keys.emplace_back(tokens, head_dim);
      values.emplace_back(tokens, head_dim);
      kqsvd_bench::random_fill(keys.back().data(), keys.back().size(), 2 * static_cast<std::uint64_t>(h));
      kqsvd_bench::random_fill(values.back().data(), values.back().size(), 2 * static_cast<std::uint64_t>(h) + 1);
    }
  }
};

template <typename Storage>
void BM_DecodeFull(benchmark::State& state) {
  const Index tokens = state.range(0);
  const Index heads = pool_heads(tokens, 2.0 * head_dim * sizeof(Storage));
  const FullRows<Storage> rows(tokens, heads);
  const std::vector<Eigen::RowVectorXf> q = queries(heads, head_dim);
  std::vector<Eigen::RowVectorXf> out(static_cast<std::size_t>(heads));
  time_pool(state, heads, static_cast<double>(heads * tokens) * 2.0 * head_dim * sizeof(Storage),
            [&](std::size_t i) { out[i] = kqsvd::decode_attention(q[i], rows.keys[i], rows.values[i]); });
}

// The float32 baseline's memory access pattern without its arithmetic: per head the alternation between
// a 64-token tile of keys and the matching tile of values, only summed. Its fraction of the read ceiling
// is what any kernel reading the cache in this order can reach.
void BM_DecodeAccessPattern(benchmark::State& state) {
  const Index tokens = state.range(0);
  const Index heads = pool_heads(tokens, 2.0 * head_dim * sizeof(float));
  const FullRows<float> rows(tokens, heads);
  constexpr Index tile = 64;
  std::vector<float> sums(static_cast<std::size_t>(heads));
  time_pool(state, heads, static_cast<double>(heads * tokens) * 2.0 * head_dim * sizeof(float), [&](std::size_t i) {
    float sum = 0.0f;
    for (Index first = 0; first < tokens; first += tile) {
      const Index count = std::min(tile, tokens - first);
      sum += rows.keys[i].middleRows(first, count).sum();
      sum += rows.values[i].middleRows(first, count).sum();
    }
    sums[i] = sum;
  });
  benchmark::DoNotOptimize(sums.data());
}

// ---- HeadCaches -------------------------------------------------------------------------------------

// `heads` caches of `tokens` rows of width key_width / value_width in `format`, random unit-range rows.
std::vector<kqsvd::HeadCache> head_caches(Index heads, Index tokens, Index width, const kqsvd::StorageFormat& format) {
  std::vector<kqsvd::HeadCache> caches;
  caches.reserve(static_cast<std::size_t>(heads));
  kqsvd::RowMatrix<float> keys(std::min<Index>(tokens, 4096), width), values(keys.rows(), width);
  for (Index h = 0; h < heads; ++h) {
    caches.emplace_back(width, width, format);
    caches.back().reserve(tokens);
    for (Index first = 0; first < tokens; first += keys.rows()) {
      const Index count = std::min(keys.rows(), tokens - first);
      kqsvd_bench::random_fill(keys.data(), keys.size(), 2 * static_cast<std::uint64_t>(h) + static_cast<std::uint64_t>(first));
      kqsvd_bench::random_fill(values.data(), values.size(), 2 * static_cast<std::uint64_t>(h) + 1 + static_cast<std::uint64_t>(first));
      caches.back().append(keys.topRows(count), values.topRows(count));
    }
  }
  return caches;
}

void BM_DecodeFullCache(benchmark::State& state, const kqsvd::StorageFormat& format, kqsvd::DecodeArithmetic arithmetic) {
  const Index tokens = state.range(0);
  const double bytes_per_token = 2.0 * static_cast<double>(format.bytes_per_row(head_dim));
  const Index heads = pool_heads(tokens, bytes_per_token);
  const std::vector<kqsvd::HeadCache> caches = head_caches(heads, tokens, head_dim, format);
  const std::vector<Eigen::RowVectorXf> q = queries(heads, head_dim);
  std::vector<Eigen::RowVectorXf> out(static_cast<std::size_t>(heads));
  time_pool(state, heads, static_cast<double>(heads * tokens) * bytes_per_token,
            [&](std::size_t i) { out[i] = kqsvd::decode_attention(q[i], caches[i], arithmetic); });
  state.counters["bytes_per_token"] = bytes_per_token;
}

std::vector<std::pair<kqsvd::LowRankProjection<float>, kqsvd::LowRankProjection<float>>> projections(Index count,
                                                                                                      Index rank) {
  std::vector<std::pair<kqsvd::LowRankProjection<float>, kqsvd::LowRankProjection<float>>> result;
  for (Index p = 0; p < count; ++p) {
    Eigen::MatrixXf a(head_dim, rank), b(head_dim, rank);
    kqsvd_bench::random_fill(a.data(), a.size(), 7000 + static_cast<std::uint64_t>(p), 0.1f);
    kqsvd_bench::random_fill(b.data(), b.size(), 9000 + static_cast<std::uint64_t>(p), 0.1f);
    result.emplace_back(kqsvd::LowRankProjection<float>(kqsvd::Method::kq_svd, a, b, Eigen::VectorXd::Ones(head_dim)),
                        kqsvd::LowRankProjection<float>(kqsvd::Method::kq_svd, b, a, Eigen::VectorXd::Ones(head_dim)));
  }
  return result;
}

void BM_DecodeLatent(benchmark::State& state, const kqsvd::StorageFormat& format, kqsvd::DecodeArithmetic arithmetic) {
  const Index tokens = state.range(0), rank = state.range(1);
  const double bytes_per_token = 2.0 * static_cast<double>(format.bytes_per_row(rank));
  const Index heads = pool_heads(tokens, bytes_per_token);
  const auto pairs = projections(std::min(heads, distinct_projections), rank);
  const std::vector<kqsvd::HeadCache> caches = head_caches(heads, tokens, rank, format);
  const std::vector<Eigen::RowVectorXf> q = queries(heads, head_dim);
  std::vector<Eigen::RowVectorXf> out(static_cast<std::size_t>(heads));
  time_pool(state, heads, static_cast<double>(heads * tokens) * bytes_per_token, [&](std::size_t i) {
    const auto& [keys, values] = pairs[i % pairs.size()];
    out[i] = kqsvd::decode_attention(keys, values, q[i], caches[i], arithmetic);
  });
  state.counters["bytes_per_token"] = bytes_per_token;
}

// Compute cost per token, free of memory effects: one head of 2048 tokens (resident in L2, a single
// decode task, so one thread), called repeatedly; the summary divides the CPU time (not the wall time:
// this machine's neighbours steal cores) by the tokens. threads x bytes-per-token / that time is the
// bandwidth a decode could reach if compute were its only limit.
template <typename Storage>
void BM_DecodeFullCompute(benchmark::State& state) {
  StorageRows<Storage> keys(compute_tokens, head_dim), values(compute_tokens, head_dim);
  kqsvd_bench::random_fill(keys.data(), keys.size(), 1);
  kqsvd_bench::random_fill(values.data(), values.size(), 2);
  const Eigen::RowVectorXf q = queries(1, head_dim)[0];
  for (auto _ : state) benchmark::DoNotOptimize(kqsvd::decode_attention(q, keys, values));
  state.counters["tokens"] = static_cast<double>(compute_tokens);
}

void BM_DecodeCacheCompute(benchmark::State& state, const kqsvd::StorageFormat& format,
                           kqsvd::DecodeArithmetic arithmetic) {
  const Index width = state.range(0);  // head_dim: a full cache; less: latents of that rank
  const auto pair = projections(1, std::min(width, head_dim)).front();
  const std::vector<kqsvd::HeadCache> cache = head_caches(1, compute_tokens, width, format);
  const Eigen::RowVectorXf q = queries(1, head_dim)[0];
  for (auto _ : state) {
    if (width == head_dim) {
      benchmark::DoNotOptimize(kqsvd::decode_attention(q, cache.front(), arithmetic));
    } else {
      benchmark::DoNotOptimize(kqsvd::decode_attention(pair.first, pair.second, q, cache.front(), arithmetic));
    }
  }
  state.counters["tokens"] = static_cast<double>(compute_tokens);
}

const std::vector<int64_t> full_tokens = {1024, 4096, 16384, 32768, 131072};
const std::vector<int64_t> format_tokens = {4096, 32768, 131072};

void full_sizes(benchmark::internal::Benchmark* b) {
  b->ArgName("tokens")->ArgsProduct({full_tokens})->UseRealTime()->Unit(benchmark::kMicrosecond);
}

BENCHMARK_TEMPLATE(BM_DecodeFull, float)->Apply(full_sizes);
BENCHMARK_TEMPLATE(BM_DecodeFull, Eigen::half)->Apply(full_sizes);
BENCHMARK(BM_DecodeAccessPattern)->Apply(full_sizes);
BENCHMARK_TEMPLATE(BM_DecodeFullCompute, float)->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_DecodeFullCompute, Eigen::half)->Unit(benchmark::kMicrosecond);

// The formats benchmarked, registered by name (the summary reads the names back); the 4- and 2-bit
// formats once more with integer dot products, as "F+int8".
std::vector<std::pair<std::string, kqsvd::DecodeArithmetic>> arithmetics(const kqsvd::StorageFormat& format) {
  std::vector<std::pair<std::string, kqsvd::DecodeArithmetic>> result = {{"", kqsvd::DecodeArithmetic::float32}};
  if (kqsvd::int8_dot_products_apply(format)) result.emplace_back("+int8", kqsvd::DecodeArithmetic::int8_dot_products);
  return result;
}

const bool registered = [] {
  for (const char* name : {"f16", "bf16", "fp8_e4m3", "int8", "q8_0", "q4_0", "int4", "int2"}) {
    const kqsvd::StorageFormat format = kqsvd::StorageFormat::parse(name);
    for (const auto& [suffix, arithmetic] : arithmetics(format)) {
      const std::string label = name + suffix;
      benchmark::RegisterBenchmark(("BM_DecodeFullCache/" + label).c_str(), BM_DecodeFullCache, format, arithmetic)
          ->ArgName("tokens")
          ->ArgsProduct({format_tokens})
          ->UseRealTime()
          ->Unit(benchmark::kMicrosecond);
      benchmark::RegisterBenchmark(("BM_DecodeCacheCompute/" + label).c_str(), BM_DecodeCacheCompute, format, arithmetic)
          ->ArgName("width")
          ->Arg(head_dim)
          ->Unit(benchmark::kMicrosecond);
    }
  }
  for (const char* name : {"f32", "f16", "bf16", "fp8_e4m3", "int8", "q8_0", "q4_0", "int4/16", "int4", "int2/16", "int2"}) {
    const kqsvd::StorageFormat format = kqsvd::StorageFormat::parse(name);
    // The ranks the format can hold (q8_0, q4_0 and the default int4 / int2 blocks need multiples of
    // 32); int4/16 and int2/16 stand in for int4 and int2 at r = 16.
    std::vector<int64_t> ranks;
    for (const int64_t rank : {16, 32, 64}) {
      if (rank % format.group_size(rank) == 0) ranks.push_back(rank);
    }
    if (format.is_asymmetric() && format.group_size(16) == 16) ranks = {16};
    for (const auto& [suffix, arithmetic] : arithmetics(format)) {
      const std::string label = name + suffix;
      benchmark::RegisterBenchmark(("BM_DecodeLatent/" + label).c_str(), BM_DecodeLatent, format, arithmetic)
          ->ArgNames({"tokens", "r"})
          ->ArgsProduct({format_tokens, ranks})
          ->UseRealTime()
          ->Unit(benchmark::kMicrosecond);
      benchmark::RegisterBenchmark(("BM_DecodeCacheCompute/" + label).c_str(), BM_DecodeCacheCompute, format, arithmetic)
          ->ArgName("width")
          ->ArgsProduct({ranks})
          ->Unit(benchmark::kMicrosecond);
    }
  }
  return true;
}();

}  // namespace
