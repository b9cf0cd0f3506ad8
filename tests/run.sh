#!/usr/bin/env bash
# The whole test suite (what the README and CI run). Tests import the *installed* deqkern.
#   1. tests/: reference (float64), kernels under the Triton interpreter, AOT compile for
#      sm_80/sm_90, CPU runs of the graph runner; GPU-marked tests skip with a reason on CPU.
#   2. bench/: the kernel micro-benchmarks run once each (--benchmark-disable) to prove they work;
#      numbers come from `pytest bench/ --benchmark-only` on a GPU (bench/gpu_suite.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# one worker per core (pytest-xdist): the tests run single-threaded (tests/conftest.py); `-n 0` runs
# them in this process
pytest -n auto -rs "$@" tests
pytest -q -p no:cacheprovider bench --benchmark-disable
