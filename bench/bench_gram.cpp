// Calibration: Gram accumulation throughput.
//
// GramAccumulator::add of one block of float keys (tokens x d, row-major as a model produces them),
// d = 64 and 128, blocks of 4k, 16k and 64k tokens. Useful work is the symmetric rank-k update,
// n d^2 flops; reported as tokens/s and as fractions of this machine's float GEMM ceiling (the target)
// and of its double GEMM ceiling (what the accumulation, in double by contract, runs on).
//
// Reference point, not a library path: the same parallel split with Eigen's *float* rank update, which
// would give up the double accumulation the tests require. It shows what float arithmetic would buy.
#include <benchmark/benchmark.h>

#include <kqsvd/calibration/gram_accumulator.hpp>

#include <algorithm>
#include <vector>

#include "ceilings.hpp"
#include "random_fill.hpp"

namespace {

using Eigen::Index;
using FloatRows = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

FloatRows keys(Index tokens, Index d) {
  FloatRows rows(tokens, d);
  kqsvd_bench::random_fill(rows.data(), rows.size(), 1);
  return rows;
}

void BM_GramAccumulate(benchmark::State& state) {
  const Index d = state.range(0), tokens = state.range(1);
  const FloatRows block = keys(tokens, d);
  kqsvd::GramAccumulator gram(d);
  const double flops = static_cast<double>(tokens) * static_cast<double>(d * d);
  kqsvd_bench::AdjacentCeiling sgemm(kqsvd_bench::Ceiling::float_gemm);
  kqsvd_bench::AdjacentCeiling dgemm(kqsvd_bench::Ceiling::double_gemm);
  for (auto _ : state) {
    gram.add(block);
    benchmark::ClobberMemory();
    sgemm.interleave(state);
    dgemm.interleave(state);
  }
  sgemm.report(state, flops);
  dgemm.report(state, flops);
  state.counters["tokens_per_s"] = benchmark::Counter(static_cast<double>(tokens * state.iterations()),
                                                      benchmark::Counter::kIsRate);
}

// Eigen's float rank update over the same tasks as GramAccumulator (2048 rows each, in parallel).
void BM_FloatSyrkReference(benchmark::State& state) {
  const Index d = state.range(0), tokens = state.range(1);
  const FloatRows block = keys(tokens, d);
  constexpr Index task_rows = kqsvd::GramAccumulator::task_rows;
  const Index tasks = (tokens + task_rows - 1) / task_rows;
  std::vector<Eigen::MatrixXf> partial(static_cast<std::size_t>(tasks), Eigen::MatrixXf::Zero(d, d));
  const double flops = static_cast<double>(tokens) * static_cast<double>(d * d);
  kqsvd_bench::AdjacentCeiling sgemm(kqsvd_bench::Ceiling::float_gemm);
  for (auto _ : state) {
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1)
#endif
    for (Index t = 0; t < tasks; ++t) {
      const Index first = t * task_rows;
      partial[static_cast<std::size_t>(t)].selfadjointView<Eigen::Lower>().rankUpdate(
          block.middleRows(first, std::min(task_rows, tokens - first)).transpose());
    }
    benchmark::ClobberMemory();
    sgemm.interleave(state);
  }
  sgemm.report(state, flops);
}

void gram_sizes(benchmark::internal::Benchmark* b) {
  for (Index d : {64, 128}) {
    for (Index tokens : {4096, 16384, 65536}) b->Args({d, tokens});
  }
  b->ArgNames({"d", "tokens"})->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_GramAccumulate)->Apply(gram_sizes);
BENCHMARK(BM_FloatSyrkReference)->Apply(gram_sizes);

}  // namespace
