#!/usr/bin/env bash
# Regenerates docs/end-to-end/: what KV-cache compression costs real models (kqsvd-llama quality) for
# every method, RoPE mode, budget, rank allocation (uniform, eps, layer-eps, loss-aware with a joint or
# separate budget) and window, plus quantized latents with and without a Hadamard rotation, and the
# quality-per-byte frontier of every cache (kqsvd-llama frontier: full caches in every format, low rank,
# H2O, online SVD) on both models, and what decoding 4- and 2-bit caches with integer dot products costs.
#   bash tools/end_to_end.sh            # ~25 minutes on 2 cores
# Environment: BUILD_DIR (default build-e2e), ONLY=tinyllama|stories|quantized|frontier|arithmetic to run
# one part.
set -euo pipefail
# One OpenMP thread: the sweep runs configurations on every core itself, and decode timings are per core.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build-e2e}
if [ ! -f "$build/CMakeCache.txt" ]; then
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DKQSVD_BUILD_BENCHMARKS=OFF -DKQSVD_BUILD_TESTS=OFF >/dev/null
fi
cmake --build "$build" -j "${JOBS:-$(nproc)}" --target kqsvd_llama_cli >/dev/null
tool=$build/tools/kqsvd_llama/kqsvd-llama
text=data/text/tinystories/tinystories_sample.txt
out=docs/end-to-end
mkdir -p "$out"
tiny=(--model data/models/tinyllama-h64/model.bin --tokenizer data/models/tinyllama-h64/tok512.bin --text "$text")
small=(--model data/models/stories260K/stories260K.bin --tokenizer data/models/stories260K/tok512.bin --text "$text")
all_allocations=uniform,eps,layer-eps,loss-aware,loss-aware-separate

if [ -z "${ONLY:-}" ] || [ "$ONLY" = tinyllama ]; then
  "$tool" quality "${tiny[@]}" --calib-stories 0:200 --eval-stories 2100:2120 --probe-stories 200:216 \
    --max-tokens 256 --ratios 0.25,0.5,0.75 --window 32 --allocations $all_allocations \
    --json $out/tinyllama-h64.json --plot $out/tinyllama-h64.svg > $out/tinyllama-h64.txt
fi
if [ -z "${ONLY:-}" ] || [ "$ONLY" = stories ]; then
  "$tool" quality "${small[@]}" --calib-stories 100:300 --eval-stories 0:20 --probe-stories 300:320 \
    --max-tokens 512 --ratios 0.25,0.5,0.75 --window 32 --allocations $all_allocations \
    --json $out/stories260K.json --plot $out/stories260K.svg > $out/stories260K.txt
fi
if [ -z "${ONLY:-}" ] || [ "$ONLY" = quantized ]; then
  for format in int4/16 int8; do
    "$tool" quality "${tiny[@]}" --calib-stories 0:200 --eval-stories 2100:2120 --probe-stories 200:216 \
      --max-tokens 256 --ratios 0.25,0.5 --window 0 --rope post --format $format --rotate none,hadamard \
      --allocations uniform,loss-aware --json $out/tinyllama-h64-${format%%/*}.json > $out/tinyllama-h64-${format%%/*}.txt
  done
fi
if [ -z "${ONLY:-}" ] || [ "$ONLY" = frontier ]; then
  "$tool" frontier "${tiny[@]}" --calib-stories 0:200 --eval-stories 2100:2120 --probe-stories 200:216 \
    --max-tokens 256 --budget-bits 3 \
    --json $out/frontier-tinyllama-h64.json --plot $out/frontier-tinyllama-h64.svg > $out/frontier-tinyllama-h64.txt
  # head_dim 8: the formats whose blocks fit rows of 8 (and latents of 4; rank 2 holds no int4 block).
  "$tool" frontier "${small[@]}" --calib-stories 100:300 --eval-stories 0:20 --probe-stories 300:320 \
    --max-tokens 512 --full-formats f16,bf16,fp8_e4m3,fp8_e5m2,int8,int4/8,int2/8 --latent-formats f16,int8,int4/4,int2/4 \
    --json $out/frontier-stories260K.json --plot $out/frontier-stories260K.svg > $out/frontier-stories260K.txt
fi
if [ -z "${ONLY:-}" ] || [ "$ONLY" = arithmetic ]; then
  # The 4- and 2-bit caches decoded token by token in float and with int8 dot products, side by side;
  # built with the AVX2 kernels (KQSVD_AVX2), as the speeds compare the two arithmetics' SIMD paths.
  if [ ! -f "$build-avx2/CMakeCache.txt" ]; then
    cmake -S . -B "$build-avx2" -DCMAKE_BUILD_TYPE=Release -DKQSVD_AVX2=ON -DKQSVD_BUILD_BENCHMARKS=OFF \
      -DKQSVD_BUILD_TESTS=OFF >/dev/null
  fi
  cmake --build "$build-avx2" -j "${JOBS:-$(nproc)}" --target kqsvd_llama_cli >/dev/null
  "$build-avx2/tools/kqsvd_llama/kqsvd-llama" frontier "${tiny[@]}" --calib-stories 0:200 --eval-stories 2100:2120 --max-tokens 256 \
    --ratios 0.25,0.5 --methods kqsvd --window 0 --h2o 0.5 --full-formats q4_0,int4,int2,int2/16 \
    --latent-formats int4,int4/16,int2/16 --decode-arithmetic float32,int8_dot_products --decode-tokens 256 \
    --json $out/arithmetic-tinyllama-h64.json > $out/arithmetic-tinyllama-h64.txt
fi
