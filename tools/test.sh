#!/usr/bin/env bash
# README command 2: installs the dependencies, builds the test suite and the two tools (warnings are
# errors, Eigen's bounds assertions on, -O1), and runs every test.
#
#   bash tools/test.sh                              # build-test/: the contributor's loop
#   SANITIZE=address,undefined bash tools/test.sh   # build-test-sanitized/: also ASan + UBSan (CI runs both)
#   ctest --test-dir build-test -R Gram             # afterwards: a subset
#
# Why -O1 without debug information: the suite's time is almost all compilation of Eigen's and the
# library's templates; -O1 compiles in about 60 % of -O3's time and Eigen at -O0 runs ten times slower.
# Each suite and tool is one translation unit (KQSVD_UNITY_BUILD, tests/CMakeLists.txt). Measured from
# a clean clone on the 2-core machine: README.md gives the numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install_dependencies.sh
jobs=${JOBS:-$(nproc)}
common=(-DKQSVD_WARNINGS_AS_ERRORS=ON -DKQSVD_BUILD_TESTS=ON -DKQSVD_BUILD_TOOLS=ON
        -DKQSVD_BUILD_EXAMPLES=OFF -DKQSVD_BUILD_BENCHMARKS=OFF -DCMAKE_BUILD_TYPE=Debug)
case "${SANITIZE:-none}" in
  none)
    build_dir=${BUILD_DIR:-build-test}
    # The AVX2 kernels are tested here (where the CPU has AVX2), the portable ones under the sanitizers.
    flags=(-DKQSVD_SANITIZE= -DKQSVD_AVX2=ON -DCMAKE_CXX_FLAGS_DEBUG=-O1) ;;
  *)
    # -O1 is what ASan recommends; -g1 (line tables) keeps sanitizer reports readable. Without MPI: Open
    # MPI's own allocations would be reported as leaks; the plain build runs the MPI tests.
    build_dir=${BUILD_DIR:-build-test-sanitized}
    flags=("-DKQSVD_SANITIZE=$SANITIZE" -DKQSVD_AVX2=OFF -DKQSVD_MPI=OFF "-DCMAKE_CXX_FLAGS_DEBUG=-O1 -g1") ;;
esac
# shellcheck disable=SC2086  # CMAKE_ARGS is a list of extra arguments
cmake -S . -B "$build_dir" "${common[@]}" "${flags[@]}" ${CMAKE_ARGS:-} >/dev/null
cmake --build "$build_dir" -j "$jobs"
# Sanitizer findings abort the test (-fno-sanitize-recover); leaks are reported too.
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0} \
UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1} \
  ctest --test-dir "$build_dir" -j "$jobs" --output-on-failure
