#!/usr/bin/env bash
# README command 2: install dependencies, build everything (warnings are errors) and run all tests.
#   bash tools/test.sh                 # Release build in build/
#   BUILD_DIR=build-asan CMAKE_ARGS="-DCMAKE_BUILD_TYPE=Debug -DKQSVD_SANITIZE=address,undefined" bash tools/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install_dependencies.sh
build_dir=${BUILD_DIR:-build}
jobs=${JOBS:-$(nproc)}
# shellcheck disable=SC2086  # CMAKE_ARGS is a list of arguments
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DKQSVD_WARNINGS_AS_ERRORS=ON ${CMAKE_ARGS:-} >/dev/null
cmake --build "$build_dir" -j "$jobs"
ctest --test-dir "$build_dir" -j "$jobs" --output-on-failure
