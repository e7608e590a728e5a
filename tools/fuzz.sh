#!/usr/bin/env bash
# Fuzzes the file readers with libFuzzer: builds fuzz/fuzz_<target> with clang, AddressSanitizer and
# UndefinedBehaviorSanitizer, then runs each target for N seconds (default 60) from its seed corpus
# fuzz/corpus/<target>/ and its regression files fuzz/regressions/<target>/.
#
#   bash tools/fuzz.sh              # 60 s per target (what CI runs)
#   bash tools/fuzz.sh 600          # longer
#   FUZZ_TARGETS="npy" JOBS=2 bash tools/fuzz.sh 30   # JOBS: targets built and run at a time
#
# Exits non-zero on any finding: a crash, a sanitizer report, an exception other than kqsvd::Error, a
# leak, an input taking more than 10 s, an allocation over FUZZ_MALLOC_LIMIT_MB (128 MiB, from inputs
# of at most 16 KiB) or a run over 2 GiB of memory. Each finding is copied to fuzz/regressions/<target>/,
# to commit together with its fix: tests/test_fuzz_regressions.cpp replays those files in the normal
# test suite. Prints libFuzzer's executions and coverage (cov: edges, ft: features) per target.
#
# Needs clang++ with libFuzzer (Debian: clang libclang-rt-14-dev); installs them when missing and
# running as root (or with sudo). The build goes to FUZZ_BUILD_DIR (default build-fuzz), and the
# corpus a run discovers to <build dir>/fuzz-work/<target>/, never into the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: bash tools/fuzz.sh [seconds per target, default 60]" >&2
  exit 2
fi
build_dir=${FUZZ_BUILD_DIR:-build-fuzz}
jobs=${JOBS:-$(nproc)}
malloc_limit_mb=${FUZZ_MALLOC_LIMIT_MB:-128}
read -r -a targets <<<"${FUZZ_TARGETS:-safetensors npy llama_checkpoint llama_tokenizer}"

# Largest input per target: a few times the largest seed, small enough to keep executions fast.
max_len_of() {
  case "$1" in
    safetensors | llama_tokenizer) echo 16384 ;;
    *) echo 8192 ;;
  esac
}

# --- toolchain ----------------------------------------------------------------------------------------
bash tools/install_dependencies.sh
has_libfuzzer() {
  command -v clang++ >/dev/null 2>&1 || return 1
  local probe
  probe=$(mktemp -d)
  echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' >"$probe/probe.cpp"
  clang++ -fsanitize=fuzzer,address,undefined "$probe/probe.cpp" -o "$probe/probe" >/dev/null 2>&1
  local status=$?
  rm -rf "$probe"
  return $status
}
if ! has_libfuzzer; then
  sudo_cmd=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo_cmd=(sudo); else
      echo "kqsvd fuzz: clang++ with libFuzzer is missing; run as root to install clang libclang-rt-14-dev" >&2
      exit 1
    fi
  fi
  echo "kqsvd fuzz: installing clang libclang-rt-14-dev" >&2
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
    clang libclang-rt-14-dev >/dev/null
  has_libfuzzer || { echo "kqsvd fuzz: clang++ -fsanitize=fuzzer still does not link" >&2; exit 1; }
fi

# --- build ------------------------------------------------------------------------------------------
cmake -S . -B "$build_dir" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DKQSVD_BUILD_FUZZERS=ON -DKQSVD_BUILD_TESTS=OFF -DKQSVD_BUILD_EXAMPLES=OFF -DKQSVD_BUILD_TOOLS=OFF -DKQSVD_BUILD_BENCHMARKS=OFF \
  -DKQSVD_WARNINGS_AS_ERRORS=ON >/dev/null
build_targets=()
for target in "${targets[@]}"; do build_targets+=("fuzz_$target"); done
cmake --build "$build_dir" -j "$jobs" --target "${build_targets[@]}"

# --- run ----------------------------------------------------------------------------------------------
# The targets write each input to a scratch file (the readers take paths); keep those in memory.
scratch_parent=/tmp
[ -d /dev/shm ] && [ -w /dev/shm ] && scratch_parent=/dev/shm
scratch=$(mktemp -d "$scratch_parent/kqsvd-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

# Each libFuzzer process is single-threaded: JOBS targets (default: one per core) run side by side, each
# for the full time on a core of its own.
run_target() {
  local target=$1
  local work="$build_dir/fuzz-work/$target"
  local artifacts="$build_dir/fuzz-artifacts/$target"
  local log="$build_dir/fuzz-logs/$target.log"
  local regressions="fuzz/regressions/$target"
  mkdir -p "$work" "$artifacts" "$(dirname "$log")" "$regressions"
  rm -f "$artifacts"/*
  local dict=()
  [ -f "fuzz/$target.dict" ] && dict=("-dict=fuzz/$target.dict")
  local status=0
  # The first directory receives the inputs that reach new coverage; the others are only read.
  TMPDIR="$scratch" "$build_dir/fuzz/fuzz_$target" \
    -max_total_time="$seconds" -max_len="$(max_len_of "$target")" -timeout=10 -rss_limit_mb=2048 \
    -malloc_limit_mb="$malloc_limit_mb" -use_value_profile=1 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "${dict[@]}" \
    "$work" "fuzz/corpus/$target" "$regressions" >"$log" 2>&1 || status=$?
  echo "$status" >"$log.status"
}

echo
echo "=== fuzzing ${targets[*]}: ${seconds} s each, $jobs at a time"
# A status left by an earlier run must not stand in for a target that failed to start.
for target in "${targets[@]}"; do rm -f "$build_dir/fuzz-logs/$target.log.status"; done
running=0
for target in "${targets[@]}"; do
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
  run_target "$target" &
  running=$((running + 1))
done
wait

failed=0
summary=()
for target in "${targets[@]}"; do
  artifacts="$build_dir/fuzz-artifacts/$target"
  log="$build_dir/fuzz-logs/$target.log"
  regressions="fuzz/regressions/$target"
  status=$(cat "$log.status" 2>/dev/null || echo "?")
  executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  per_second=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -n 1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corpus=$(sed -n 's/.* corp: \([0-9]*\/[0-9A-Za-z]*\).*/\1/p' <<<"$last")
  result=ok
  findings=("$artifacts"/*)
  echo
  echo "=== fuzz_$target"
  if [ "$status" != 0 ] || [ -e "${findings[0]}" ]; then
    result="FAILED (exit $status)"
    failed=1
    tail -n 60 "$log"
    for finding in "${findings[@]}"; do
      [ -e "$finding" ] || continue
      cp "$finding" "$regressions/"
      echo "kqsvd fuzz: finding saved as $regressions/$(basename "$finding") -- fix it and commit the file"
    done
  fi
  grep -E '^(#[0-9]+[[:space:]]+(INITED|DONE)|stat::)' "$log" || true
  summary+=("$(printf '%-18s %6s s  %12s execs  %8s exec/s  cov %6s  ft %7s  corpus %-12s %s' \
    "$target" "$seconds" "${executions:-?}" "${per_second:-?}" "${cov:-?}" "${ft:-?}" "${corpus:-?}" "$result")")
done

echo
echo "=== fuzzing summary (logs in $build_dir/fuzz-logs/)"
printf '%s\n' "${summary[@]}"
exit "$failed"
