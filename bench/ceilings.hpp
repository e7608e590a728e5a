// bench/ceilings.hpp -- this machine's ceilings, measured by the benchmark binary itself, interleaved
// with each benchmark, so that every result is also a ratio that survives a noisy (shared, virtualised)
// machine.
//
//   streaming read bandwidth  all OpenMP threads summing disjoint parts of a 512 MiB buffer (far past
//                             the last-level cache);
//   float / double GEMM       Eigen's 1024^3 matrix product on all threads.
//
// A ceiling measured minutes apart from a result says little on a shared machine whose neighbours come
// and go, so each benchmark measures the ceiling it is judged against *during* its run: one
// measurement before the timed loop, then (timing paused) another whenever the benchmark has run for
// as long as a measurement takes, and one after. Kernel and ceiling thus share the machine's conditions
// roughly half and half, and the ceiling is their time average. Reported counters:
//   <name>_ceiling   the ceiling during this run (GB/s or GFLOP/s),
//   frac_<name>      achieved / ceiling, as a rate counter (Google Benchmark divides by the time).
//   cpu_share        CPU time this process got / (wall time x threads) during the run: 1 on a quiet
//                    machine, lower when other processes took the cores.
// The "ceiling/..." benchmarks report the best of 3 measurements, the machine's peak at that moment.
//
//   kqsvd_bench::AdjacentCeiling bandwidth(kqsvd_bench::Ceiling::read_bandwidth);
//   for (auto _ : state) { ...; bandwidth.interleave(state); }
//   bandwidth.report(state, bytes_per_iteration);
#pragma once

#include <benchmark/benchmark.h>

#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <memory>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <sys/resource.h>

namespace kqsvd_bench {

// CPU seconds this process has used, all threads (user + system).
inline double process_cpu_seconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         1e-6 * static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
}

inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

inline int thread_count() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Work done and seconds taken by one measurement.
struct Sample {
  double work = 0.0, seconds = 0.0;
};

// One pass reading a buffer much larger than the last-level cache: bytes and seconds.
inline Sample read_bandwidth_sample() {
  constexpr Eigen::Index floats = Eigen::Index{512} << 20 >> 2;  // 512 MiB
  constexpr Eigen::Index chunk = Eigen::Index{1} << 14;
  static const std::unique_ptr<float[]> buffer = [] {
    std::unique_ptr<float[]> b(new float[floats]);
    // First touch by the threads that read it later.
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
#endif
    for (Eigen::Index i = 0; i < floats; i += chunk) Eigen::Map<Eigen::ArrayXf>(b.get() + i, chunk).setConstant(1.0f);
    return b;
  }();
  float total = 0.0f;
  const auto start = std::chrono::steady_clock::now();
#ifdef _OPENMP
#pragma omp parallel for schedule(static) reduction(+ : total)
#endif
  for (Eigen::Index i = 0; i < floats; i += chunk) total += Eigen::Map<const Eigen::ArrayXf>(buffer.get() + i, chunk).sum();
  const double elapsed = seconds_since(start);
  benchmark::DoNotOptimize(total);
  return {static_cast<double>(floats) * sizeof(float), elapsed};
}

// One n x n x n matrix product with Eigen (all threads): flops and seconds.
template <typename Scalar>
Sample gemm_sample() {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  constexpr Eigen::Index n = 1024;
  static const Matrix a = Matrix::Random(n, n), b = Matrix::Random(n, n);
  static Matrix c(n, n);
  const auto start = std::chrono::steady_clock::now();
  c.noalias() = a * b;
  const double elapsed = seconds_since(start);
  benchmark::DoNotOptimize(c.data());
  return {2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n), elapsed};
}

enum class Ceiling { read_bandwidth, float_gemm, double_gemm };

inline const char* name(Ceiling ceiling) {
  switch (ceiling) {
    case Ceiling::read_bandwidth: return "bw";
    case Ceiling::float_gemm: return "sgemm";
    case Ceiling::double_gemm: return "dgemm";
  }
  return "?";
}

inline Sample sample(Ceiling ceiling) {
  switch (ceiling) {
    case Ceiling::read_bandwidth: return read_bandwidth_sample();
    case Ceiling::float_gemm: return gemm_sample<float>();
    case Ceiling::double_gemm: return gemm_sample<double>();
  }
  return {};
}

// A ceiling measured during one benchmark run (see the header comment).
class AdjacentCeiling {
 public:
  explicit AdjacentCeiling(Ceiling ceiling)
      : ceiling_(ceiling), start_(std::chrono::steady_clock::now()), start_cpu_(process_cpu_seconds()) {
    measure();
  }

  // Call once per iteration inside the timed loop.
  void interleave(benchmark::State& state) {
    if (seconds_since(last_) < last_seconds_) return;
    state.PauseTiming();
    measure();
    state.ResumeTiming();
  }

  // `work_per_iteration`: bytes (bandwidth) or flops (GEMM) the benchmark counts as useful.
  double report(benchmark::State& state, double work_per_iteration) {
    measure();
    const double value = work_ / seconds_;
    const double total = work_per_iteration * static_cast<double>(state.iterations());
    const std::string key = name(ceiling_);
    const bool bytes = ceiling_ == Ceiling::read_bandwidth;
    state.counters[bytes ? "GBps" : "GFLOPps"] = benchmark::Counter(total / 1e9, benchmark::Counter::kIsRate);
    state.counters[key + "_ceiling"] = value / 1e9;
    state.counters["frac_" + key] = benchmark::Counter(total / value, benchmark::Counter::kIsRate);
    state.counters["cpu_share"] = (process_cpu_seconds() - start_cpu_) / (seconds_since(start_) * thread_count());
    return value;
  }

 private:
  void measure() {
    const Sample s = sample(ceiling_);
    work_ += s.work;
    seconds_ += s.seconds;
    last_seconds_ = s.seconds;
    last_ = std::chrono::steady_clock::now();
  }

  Ceiling ceiling_;
  std::chrono::steady_clock::time_point start_;
  double start_cpu_;
  double work_ = 0.0, seconds_ = 0.0, last_seconds_ = 0.0;
  std::chrono::steady_clock::time_point last_;
};

// The ceilings themselves, as benchmarks of their own (one iteration = one measurement).
inline void register_ceiling_benchmarks() {
  for (Ceiling ceiling : {Ceiling::read_bandwidth, Ceiling::float_gemm, Ceiling::double_gemm}) {
    benchmark::RegisterBenchmark((std::string("ceiling/") + name(ceiling)).c_str(),
                                 [ceiling](benchmark::State& state) {
                                   double value = 0.0;
                                   for (auto _ : state) {
                                     for (int pass = 0; pass < 3; ++pass) {
                                       const Sample s = sample(ceiling);
                                       value = std::max(value, s.work / s.seconds);
                                     }
                                   }
                                   state.counters[std::string(name(ceiling)) + "_ceiling"] = value / 1e9;
                                   state.counters["threads"] = thread_count();
                                 })
        ->Iterations(1)
        ->UseRealTime();
  }
}

// Every benchmark program including this header reports the ceilings too.
inline const bool ceiling_benchmarks_registered = (register_ceiling_benchmarks(), true);

}  // namespace kqsvd_bench
