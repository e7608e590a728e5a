#!/usr/bin/env bash
# README command 2: installs the dependencies, builds the test suite and the kqsvd tool with
# AddressSanitizer + UndefinedBehaviorSanitizer and Eigen's bounds assertions (warnings are errors), and
# runs every test.
#
#   bash tools/test.sh                     # sanitized build in build-test/ (what CI runs)
#   SANITIZE=none bash tools/test.sh       # plain Release build in build-test-release/, faster
#   ctest --test-dir build-test -R Gram    # afterwards: a subset
#
# Why one sanitized build rather than a Release build and a sanitized one: on a 2-core machine the
# sanitized build and run take about 13 minutes (measured: 762 s from a clean clone, of which 57 s
# running the tests; Eigen's decompositions are compiled once, see tools/eigen_instantiations/), and it
# finds everything the Release build
# does (the tests' tolerances hold at -O1 as at -O2) plus out-of-bounds accesses and undefined behaviour.
# -O1 is what ASan recommends, and Eigen at -O0 would make the suite ten times slower; -g1 (line tables)
# keeps sanitizer reports readable at a fraction of full debug information's build time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install_dependencies.sh
jobs=${JOBS:-$(nproc)}
common=(-DKQSVD_WARNINGS_AS_ERRORS=ON -DKQSVD_BUILD_TESTS=ON -DKQSVD_BUILD_TOOLS=ON
        -DKQSVD_BUILD_EXAMPLES=OFF -DKQSVD_BUILD_BENCHMARKS=OFF)
case "${SANITIZE:-address,undefined}" in
  none)
    build_dir=${BUILD_DIR:-build-test-release}
    flags=(-DCMAKE_BUILD_TYPE=Release -DKQSVD_SANITIZE=) ;;
  *)
    build_dir=${BUILD_DIR:-build-test}
    flags=(-DCMAKE_BUILD_TYPE=Debug "-DKQSVD_SANITIZE=${SANITIZE:-address,undefined}" -DCMAKE_CXX_FLAGS_DEBUG=-g1) ;;
esac
# shellcheck disable=SC2086  # CMAKE_ARGS is a list of extra arguments
cmake -S . -B "$build_dir" "${common[@]}" "${flags[@]}" ${CMAKE_ARGS:-} >/dev/null
cmake --build "$build_dir" -j "$jobs"
# Sanitizer findings abort the test (-fno-sanitize-recover); leaks are reported too.
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0} \
UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1} \
  ctest --test-dir "$build_dir" -j "$jobs" --output-on-failure
