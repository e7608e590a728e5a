#!/usr/bin/env bash
# README command 1: build the kqsvd tool and compare KQ-SVD with K-SVD and Eigen Attention on real
# attention activations shipped in the repository (data/activations/tinyllama-h64, see its README).
#   bash tools/demo.sh             # prints the table, writes out/demo_compare.svg
#   RANK=8 bash tools/demo.sh      # another rank (1 .. 64, the model's head_dim)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install_dependencies.sh
build_dir=${BUILD_DIR:-build}
# Configure once (later builds reconfigure themselves when needed); build only the tool.
if [ ! -f "$build_dir/CMakeCache.txt" ]; then
  cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
cmake --build "$build_dir" -j "${JOBS:-$(nproc)}" --target kqsvd_cli >/dev/null
mkdir -p out
data=data/activations/tinyllama-h64
# Rank 16 of head_dim 64: keys and values keep a quarter of their dimensions (a 4x smaller cache).
"$build_dir/tools/kqsvd/kqsvd" compare --calib "$data/calib.safetensors" --data "$data/eval.safetensors" \
  --rank "${RANK:-16}" --plot out/demo_compare.svg
