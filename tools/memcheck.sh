#!/usr/bin/env bash
# valgrind memcheck of the kqsvd command-line tool on the demo data (data/activations/tinyllama-h64): every
# subcommand once, plus a usage error and a truncated input file, which must fail with their exit codes
# (2 and 1) and still free everything. Fails on any invalid read or write, use of uninitialised memory,
# or definite/indirect leak. CI runs it on the Release binary (sanitizers and valgrind do not mix).
#
#   bash tools/memcheck.sh [KQSVD_BINARY]     # default: build/tools/kqsvd/kqsvd
#
# Installs valgrind from the Debian registry when missing (needs root or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
binary=${1:-build/tools/kqsvd/kqsvd}
[ -x "$binary" ] || { echo "kqsvd memcheck: no executable at $binary (build the kqsvd_cli target first)" >&2; exit 1; }

if ! command -v valgrind >/dev/null 2>&1; then
  sudo_cmd=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo_cmd=(sudo); else
      echo "kqsvd memcheck: valgrind is missing; run as root to install it" >&2
      exit 1
    fi
  fi
  echo "kqsvd memcheck: installing valgrind" >&2
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends valgrind >/dev/null
fi

data=data/activations/tinyllama-h64
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# One OpenMP thread: libgomp keeps its worker threads' stacks until exit, which memcheck would list as
# "possibly lost"; the code paths are the same.
export OMP_NUM_THREADS=1
failures=0

# check EXPECTED_EXIT DESCRIPTION -- ARGS...
check() {
  local expected=$1 description=$2
  shift 3
  local status=0
  valgrind --quiet --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect \
    --show-leak-kinds=definite,indirect "$binary" "$@" >"$scratch/stdout" 2>"$scratch/stderr" || status=$?
  if [ "$status" -eq "$expected" ]; then
    echo "memcheck ok   (exit $status) $description"
  else
    echo "memcheck FAIL (exit $status, expected $expected; 99 = a valgrind error) $description" >&2
    tail -n 40 "$scratch/stderr" >&2
    failures=$((failures + 1))
  fi
}

check 0 "fit" -- fit --calib "$data/calib.safetensors" --method kqsvd --rank 16 --out "$scratch/proj.safetensors"
# The held-out file has no o_proj weights; the calibration file carries them (docs/activations.md).
check 0 "eval --json" -- eval --proj "$scratch/proj.safetensors" --data "$data/eval.safetensors" \
  --weights "$data/calib.safetensors" --json
check 0 "compare --plot" -- compare --calib "$data/calib.safetensors" --data "$data/eval.safetensors" --rank 16 \
  --plot "$scratch/compare.svg"
check 0 "analyze" -- analyze --data "$data/eval.safetensors"
check 2 "usage error" -- fit --calib "$data/calib.safetensors" --rank 16
head -c 100000 "$data/eval.safetensors" >"$scratch/truncated.safetensors"
check 1 "truncated data file" -- eval --proj "$scratch/proj.safetensors" --data "$scratch/truncated.safetensors" \
  --weights "$data/calib.safetensors"

[ "$failures" -eq 0 ] || { echo "kqsvd memcheck: $failures failing run(s)" >&2; exit 1; }
echo "kqsvd memcheck: no memory errors, no leaks"
