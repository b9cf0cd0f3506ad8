#!/usr/bin/env bash
# The kernel tests (Triton interpreter against the float64 reference) and the AOT compile for
# sm_80/sm_90, once more under the Triton of the lent GPU image (3.6; the default install takes
# the newest). A kernel that uses a newer language feature, or a typing rule that changed between
# releases, then fails here on CPU instead of on a GPU. CI runs it after tests/run.sh.
#   bash tests/compat_triton.sh [triton version, default 3.6.0]
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.6.0}"
venv=".ci-venv-triton-$version"
rm -rf "$venv"
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install --quiet --upgrade pip
# CPU torch first (an unpinned torch would pull a CUDA build); hypothesis for tests/conftest.py. numpy < 2.3: triton 3.6's
# interpreter turns 1-element arrays into Python ints with int(), which numpy 2.3 refuses.
python -m pip install --quiet torch==2.13.0 "triton==$version" "numpy<2.3" pytest pytest-xdist hypothesis
python -m pip install --quiet --no-deps .
python -c "import triton; assert triton.__version__ == '$version', triton.__version__"
pytest -n auto -q -rs -p no:cacheprovider tests/test_kernels.py tests/test_kernels_aot.py
