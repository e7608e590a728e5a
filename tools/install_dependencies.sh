#!/usr/bin/env bash
# Installs what kqsvd needs to build, test and benchmark on Debian 12 (or Ubuntu), from the Debian
# package registry only. Does nothing when everything is already there.
set -euo pipefail

# Open MPI: mpirun -np N kqsvd fit (built when CMake finds MPI; the tests run it).
packages=(cmake make g++ libeigen3-dev nlohmann-json3-dev googletest libgtest-dev libbenchmark-dev libopenmpi-dev openmpi-bin)
# --python: also what the Python module needs to build and test (tools/test_python.sh).
if [ "${1:-}" = --python ]; then
  packages+=(pkg-config python3-dev python3-pip python3-venv python3-setuptools python3-wheel python3-pybind11 pybind11-dev
             python3-numpy python3-pytest python3-torch)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "kqsvd: missing packages: ${missing[*]}; run this script as root to install them" >&2
    exit 1
  fi
fi
echo "kqsvd: installing ${missing[*]}" >&2
${SUDO:-} apt-get update -qq
DEBIAN_FRONTEND=noninteractive ${SUDO:-} apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
