#!/usr/bin/env bash
# The Python module kqsvd: installs the Debian packages it needs, builds it into a virtual environment
# (offline: no package index, Debian's numpy and pybind11 seen through --system-site-packages) and runs
# its tests (tests/python, pytest).
#
#   bash tools/test_python.sh                 # build-python/venv
#   build-python/venv/bin/python -c "import kqsvd; print(kqsvd.__version__)"
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install_dependencies.sh --python
venv=${VENV:-build-python/venv}
# Debian's interpreter: the one apt installed numpy, pybind11 and pytest for.
[ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$venv"
python=$(cd "$venv" && pwd)/bin/python
"$python" -m pip install --no-build-isolation --no-index --no-deps --quiet .
# From outside the source tree, so that the installed module is the one imported.
(cd tests/python && "$python" -m pytest -q -p no:cacheprovider .)
