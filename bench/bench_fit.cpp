// Fit: the closed-form solve from accumulated Grams, per head and for a whole
// Llama-2-7B-shaped model, next to the authors' route (QR of the n x d calibration matrices, then an
// SVD), with the peak memory of both.
//
//   BM_FitHead/d/svd          fit_kq_svd from (G_K, G_Q), d = 64, 128; svd = 0 BDCSVD (default),
//                             1 JacobiSVD, 2 symmetric eigendecomposition
//   BM_FitModel/svd           ModelProjections::fit of 32 layers x 32 KV heads, d = 128, keys and values
//                             (2048 solves, plus G_W = W_h^T W_h of every head from a 4096 x 4096 o_proj)
//   BM_LossAwareAllocation/format  loss_aware_allocation over the same model's 2048 key and value
//                             projections (d = 128, spectra decaying like real ones, random weights) at a
//                             quarter of the full cache; format = 0 f32 (steps of 1), 1 int4 (blocks of 32)
//   BM_QrRoute/tokens         authors' route for one head: K, Q (tokens x 128 float) -> QR, QR ->
//                             SVD(R_K R_Q^T) -> A = R_K^-1 U_r, B = R_K^T U_r
//   BM_GramRoute/tokens       ours for the same data: stream K, Q through GramAccumulators in blocks of
//                             4096 tokens, then the solve
// Peak memory (counter peak_MiB): measured once per benchmark by Linux's VmHWM around one run of the
// route starting from nothing -- the QR route must hold K and Q (n x d each); ours generates and
// streams one block at a time, as a calibration loop does.
#include <benchmark/benchmark.h>

#include <kqsvd/kqsvd.hpp>

#include <Eigen/QR>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "ceilings.hpp"
#include "peak_memory.hpp"
#include "random_fill.hpp"

namespace {

using Eigen::Index;
using FloatRows = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr Index head_dim = 128;
constexpr Index fit_rank = 32;
constexpr Index stream_block = 4096;

kqsvd::FitOptions options_for(int64_t svd) {
  kqsvd::FitOptions options;
  options.svd = svd == 0   ? kqsvd::SvdAlgorithm::divide_and_conquer
                : svd == 1 ? kqsvd::SvdAlgorithm::jacobi
                           : kqsvd::SvdAlgorithm::symmetric_eigen;
  return options;
}

// Activations with a decaying spectrum across dimensions, as real keys and queries have.
template <typename Matrix>
void fill_activations(Matrix& rows, std::uint64_t seed) {
  kqsvd_bench::random_fill(rows.data(), rows.size(), seed);
  for (Index j = 0; j < rows.cols(); ++j) rows.col(j) *= 1.0f + 8.0f * std::exp(-static_cast<float>(j % head_dim) / 16.0f);
}

void BM_FitHead(benchmark::State& state) {
  const Index d = state.range(0);
  FloatRows k(4 * d, d), q(4 * d, d);
  fill_activations(k, 1);
  fill_activations(q, 2);
  const Eigen::MatrixXd kd = k.cast<double>(), qd = q.cast<double>();
  const Eigen::MatrixXd gk = kd.transpose() * kd / static_cast<double>(kd.rows());
  const Eigen::MatrixXd gq = qd.transpose() * qd / static_cast<double>(qd.rows());
  const kqsvd::FitOptions options = options_for(state.range(1));
  for (auto _ : state) {
    auto projection = kqsvd::fit_kq_svd<float>(gk, gq, kqsvd::RankSelection::fixed(d / 4), options);
    benchmark::DoNotOptimize(projection);
  }
}
BENCHMARK(BM_FitHead)
    ->ArgNames({"d", "svd"})
    ->ArgsProduct({{64, 128}, {0, 1, 2}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// Llama-2-7B: 32 layers, 32 query heads = 32 KV heads (multi-head attention), head_dim 128.
const kqsvd::ModelShape llama2_7b{32, 32, 32, head_dim};

void BM_FitModel(benchmark::State& state) {
  const kqsvd::ModelShape& shape = llama2_7b;
  kqsvd::ModelCalibration calibration(shape);
  {
    const Index tokens = 512;  // enough for full-rank Grams; the solve does not depend on the count
    FloatRows q(tokens, shape.query_heads * head_dim), k(tokens, shape.kv_heads * head_dim), v(k.rows(), k.cols());
    for (Index l = 0; l < shape.layers; ++l) {
      fill_activations(q, 10 + 3 * static_cast<std::uint64_t>(l));
      fill_activations(k, 11 + 3 * static_cast<std::uint64_t>(l));
      fill_activations(v, 12 + 3 * static_cast<std::uint64_t>(l));
      calibration.add(l, q, k, v);
    }
  }
  // One o_proj weight shared by the layers (2 GB for 32 distinct ones would not change the work).
  Eigen::MatrixXf o_proj(shape.query_heads * head_dim, shape.query_heads * head_dim);
  kqsvd_bench::random_fill(o_proj.data(), o_proj.size(), 99, 0.02f);
  const std::vector<Eigen::Map<const Eigen::MatrixXf>> weights(
      static_cast<std::size_t>(shape.layers), Eigen::Map<const Eigen::MatrixXf>(o_proj.data(), o_proj.rows(), o_proj.cols()));
  const kqsvd::FitOptions options = options_for(state.range(0));
  const auto start = std::chrono::steady_clock::now();
  const double start_cpu = kqsvd_bench::process_cpu_seconds();
  for (auto _ : state) {
    auto model = kqsvd::ModelProjections<float>::fit(calibration, weights, kqsvd::Method::kq_svd,
                                                     kqsvd::RankSelection::fixed(fit_rank),
                                                     kqsvd::RankSelection::fixed(fit_rank), options);
    benchmark::DoNotOptimize(model);
  }
  // CPU seconds of all threads per fit, and the share of the cores the process got: on a shared
  // machine, process_cpu_s / threads is what the fit takes on dedicated cores.
  const double cpu = kqsvd_bench::process_cpu_seconds() - start_cpu;
  state.counters["process_cpu_s"] = cpu / static_cast<double>(state.iterations());
  state.counters["cpu_share"] = cpu / (kqsvd_bench::seconds_since(start) * kqsvd_bench::thread_count());
  state.counters["solves"] = static_cast<double>(2 * shape.layers * shape.kv_heads);
  state.counters["threads"] = kqsvd_bench::thread_count();
}
BENCHMARK(BM_FitModel)->ArgName("svd")->Arg(0)->Arg(2)->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);

// --- the authors' route against ours, one head, n tokens -----------------------------------------

// QR of K and Q in place (the most memory-frugal form of the route), SVD of R_K R_Q^T, A and B.
kqsvd::LowRankProjection<float> qr_route(Eigen::MatrixXf& k, Eigen::MatrixXf& q) {
  Eigen::HouseholderQR<Eigen::Ref<Eigen::MatrixXf>> qr_k(k), qr_q(q);
  const Eigen::MatrixXd r_k = qr_k.matrixQR().topRows(head_dim).triangularView<Eigen::Upper>().toDenseMatrix().cast<double>();
  const Eigen::MatrixXd r_q = qr_q.matrixQR().topRows(head_dim).triangularView<Eigen::Upper>().toDenseMatrix().cast<double>();
  const Eigen::BDCSVD<Eigen::MatrixXd> svd(r_k * r_q.transpose(), Eigen::ComputeFullU);
  const Eigen::MatrixXd u = svd.matrixU().leftCols(fit_rank);
  const Eigen::MatrixXd encoder = r_k.triangularView<Eigen::Upper>().solve(u);  // R_K^-1 U_r
  const Eigen::MatrixXd decoder = r_k.transpose() * u;                           // R_K^T U_r
  return kqsvd::LowRankProjection<float>(kqsvd::Method::kq_svd, encoder.cast<float>(), decoder.cast<float>(),
                                         svd.singularValues());
}

kqsvd::LowRankProjection<float> gram_route(const FloatRows& k, const FloatRows& q) {
  kqsvd::GramAccumulator keys(head_dim), queries(head_dim);
  for (Index first = 0; first < k.rows(); first += stream_block) {
    const Index count = std::min(stream_block, k.rows() - first);
    keys.add(k.middleRows(first, count));
    queries.add(q.middleRows(first, count));
  }
  return kqsvd::fit_projection<float>(kqsvd::Method::kq_svd, keys, queries, kqsvd::RankSelection::fixed(fit_rank));
}

// Projections carrying only spectra (identity encoders): what the allocator reads.
kqsvd::ModelProjections<float> spectra_only_model() {
  const kqsvd::ModelShape shape{32, 32, 32, head_dim};
  const Eigen::MatrixXf identity = Eigen::MatrixXf::Identity(head_dim, head_dim);
  std::vector<kqsvd::LowRankProjection<float>> keys, values;
  std::vector<float> noise(static_cast<std::size_t>(head_dim));
  for (Index i = 0; i < 2 * shape.layers * shape.kv_heads; ++i) {
    kqsvd_bench::random_fill(noise.data(), head_dim, 1000 + static_cast<std::uint64_t>(i));
    Eigen::VectorXd s(head_dim);
    for (Index j = 0; j < head_dim; ++j) {
      s(j) = (1.0 + 0.1 * std::abs(noise[static_cast<std::size_t>(j)])) * std::exp(-static_cast<double>(j) / (8.0 + i % 24));
    }
    std::sort(s.data(), s.data() + head_dim, [](double a, double b) { return a > b; });
    (i % 2 == 0 ? keys : values).emplace_back(kqsvd::Method::kq_svd, identity, identity, s);
  }
  return kqsvd::ModelProjections<float>(shape, std::move(keys), std::move(values));
}

void BM_LossAwareAllocation(benchmark::State& state) {
  static const kqsvd::ModelProjections<float> model = spectra_only_model();
  kqsvd::LossWeights weights(model.shape());
  std::vector<float> noise(static_cast<std::size_t>(model.shape().layers));
  kqsvd_bench::random_fill(noise.data(), model.shape().layers, 7);
  for (Index l = 0; l < model.shape().layers; ++l) {
    weights.set_layer(l, 1.0 + std::abs(noise[static_cast<std::size_t>(l)]), 0.5 + std::abs(noise[static_cast<std::size_t>(l)]));
  }
  kqsvd::LossAwareOptions options;
  options.format = kqsvd::StorageFormat::parse(state.range(0) == 0 ? "f32" : "int4");
  const auto budget = kqsvd::MemoryBudget::fraction_of_full_cache(0.25);
  for (auto _ : state) {
    const kqsvd::LossAwareAllocation allocation = kqsvd::loss_aware_allocation(model, weights, budget, options);
    benchmark::DoNotOptimize(allocation.predicted_loss);
  }
  state.counters["ms_target"] = 50.0;
}
BENCHMARK(BM_LossAwareAllocation)->ArgName("format")->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond);

void BM_QrRoute(benchmark::State& state) {
  const Index tokens = state.range(0);
  const double peak = kqsvd_bench::peak_memory_mib([&] {
    Eigen::MatrixXf k(tokens, head_dim), q(tokens, head_dim);
    fill_activations(k, 1);
    fill_activations(q, 2);
    benchmark::DoNotOptimize(qr_route(k, q));
  });
  Eigen::MatrixXf k(tokens, head_dim), q(tokens, head_dim), k_work(tokens, head_dim), q_work(tokens, head_dim);
  fill_activations(k, 1);
  fill_activations(q, 2);
  for (auto _ : state) {
    state.PauseTiming();
    k_work = k;
    q_work = q;
    state.ResumeTiming();
    benchmark::DoNotOptimize(qr_route(k_work, q_work));
  }
  state.counters["peak_MiB"] = peak;
}

void BM_GramRoute(benchmark::State& state) {
  const Index tokens = state.range(0);
  const double peak = kqsvd_bench::peak_memory_mib([&] {
    kqsvd::GramAccumulator keys(head_dim), queries(head_dim);
    FloatRows k(stream_block, head_dim), q(stream_block, head_dim);
    for (Index first = 0; first < tokens; first += stream_block) {
      fill_activations(k, 1 + static_cast<std::uint64_t>(first));
      fill_activations(q, 2 + static_cast<std::uint64_t>(first));
      keys.add(k);
      queries.add(q);
    }
    benchmark::DoNotOptimize(
        kqsvd::fit_projection<float>(kqsvd::Method::kq_svd, keys, queries, kqsvd::RankSelection::fixed(fit_rank)));
  });
  FloatRows k(tokens, head_dim), q(tokens, head_dim);
  fill_activations(k, 1);
  fill_activations(q, 2);
  for (auto _ : state) benchmark::DoNotOptimize(gram_route(k, q));
  state.counters["peak_MiB"] = peak;
}

// Fixed iteration counts: each run of a route benchmark also measures peak memory and fills inputs,
// which Google Benchmark's iteration-count search would repeat.
void route_sizes(benchmark::internal::Benchmark* b) {
  b->ArgName("tokens")->UseRealTime()->Unit(benchmark::kMillisecond);
  for (Index tokens : {16384, 65536, 262144}) b->Arg(tokens);
}
BENCHMARK(BM_QrRoute)->Apply(route_sizes)->Iterations(3);
BENCHMARK(BM_GramRoute)->Apply(route_sizes)->Iterations(3);
// One million tokens: 1 GB of K and Q for the QR route; measured once.
BENCHMARK(BM_QrRoute)->ArgName("tokens")->Arg(1 << 20)->Iterations(1)->Repetitions(1)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_GramRoute)->ArgName("tokens")->Arg(1 << 20)->Iterations(1)->Repetitions(1)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace
