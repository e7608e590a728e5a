#!/usr/bin/env bash
# Fails when a header of the library includes a header of a higher layer (docs/architecture.md).
#
#   bash tools/check_layers.sh
#
# The core's layers, lowest first: core, calibration, solvers, cache, kernels, metrics; the file formats
# (io) sit on top of them. A header under include/kqsvd/<layer>/ (its detail/ folder included) may
# include only headers of its own layer or of lower ones. kqsvd/version.hpp is below every layer, the
# umbrella kqsvd/kqsvd.hpp above the core's (not io's), and the library never includes the reference
# model (kqsvd/llama/, under reference/).
set -euo pipefail
cd "$(dirname "$0")/.."

rank_of() {
  case "$1" in
    version.hpp) echo 0 ;;
    core) echo 1 ;;
    calibration) echo 2 ;;
    solvers) echo 3 ;;
    cache) echo 4 ;;
    kernels) echo 5 ;;
    metrics) echo 6 ;;
    kqsvd.hpp) echo 7 ;;
    io) echo 8 ;;
    llama) echo 100 ;;  # the reference model: never included by the library
    *) echo -1 ;;
  esac
}

# The layer of a path relative to include/kqsvd: its first component.
layer_of() { echo "${1%%/*}"; }

violations=0
checked=0
while IFS= read -r header; do
  relative=${header#include/kqsvd/}
  own=$(layer_of "$relative")
  own_rank=$(rank_of "$own")
  if [ "$own_rank" -lt 0 ]; then
    echo "check_layers: $header is in no layer (expected include/kqsvd/<core|calibration|solvers|cache|kernels|metrics|io>/)" >&2
    violations=$((violations + 1))
    continue
  fi
  checked=$((checked + 1))
  while IFS= read -r line; do
    included=$(sed -E 's/^#include ["<]kqsvd\/([^">]+)[">].*/\1/' <<<"$line")
    other=$(layer_of "$included")
    other_rank=$(rank_of "$other")
    if [ "$other_rank" -lt 0 ] || [ "$other_rank" -gt "$own_rank" ]; then
      echo "check_layers: $header ($own) includes kqsvd/$included ($other), a higher layer" >&2
      violations=$((violations + 1))
    fi
  done < <(grep -E '^#include ["<]kqsvd/' "$header" || true)
done < <(find include/kqsvd -name '*.hpp' | sort)

if [ "$violations" -ne 0 ]; then
  echo "check_layers: $violations include(s) against the layering" >&2
  exit 1
fi
echo "check_layers: $checked headers, every include within its layer or below"
