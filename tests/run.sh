#!/usr/bin/env bash
# The whole test suite (what the README and CI run). Tests import the *installed* deqkern.
set -euo pipefail
cd "$(dirname "$0")/.."
pytest "$@"
