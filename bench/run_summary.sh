#!/usr/bin/env bash
# Builds the benchmark suite (Release, -march=native) if needed, runs every program with JSON output
# and prints the summary tables (Markdown) with PASS/MISS per target.
#
#   bash bench/run_summary.sh                 # ~36 minutes on a 2-core machine (2026-12-01)
#
# Environment: KQSVD_BENCH_BUILD_DIR (default: build-bench), KQSVD_BENCH_JOBS (default 2),
# KQSVD_BENCH_REPETITIONS (default 3; the summary takes medians), OMP_NUM_THREADS (default: all cores).
# Raw results: <build dir>/bench-results/*.json. Progress goes to stderr, the summary to stdout.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${KQSVD_BENCH_BUILD_DIR:-$root/build-bench}
jobs=${KQSVD_BENCH_JOBS:-2}
repetitions=${KQSVD_BENCH_REPETITIONS:-3}
programs=(bench_gram bench_fit bench_compress bench_decode bench_prefill)

cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release >&2
cmake --build "$build" -j "$jobs" --target kqsvd_benchmarks >&2

results=$build/bench-results
mkdir -p "$results"
for program in "${programs[@]}"; do
  echo "== $program" >&2
  "$build/bench/$program" --benchmark_repetitions="$repetitions" --benchmark_display_aggregates_only=true \
    --benchmark_out="$results/$program.json" --benchmark_out_format=json >&2
done

echo "Command: bash bench/run_summary.sh (OMP_NUM_THREADS=${OMP_NUM_THREADS:-all cores}, $repetitions repetitions," \
  "medians), $(date -u +%Y-%m-%d), commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo
"$build/bench/kqsvd_bench_summary" $(for p in "${programs[@]}"; do printf "%s " "$results/$p.json"; done)
