#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before a device call: puts into .whl/ the wheels the
# GPU image lacks (it has torch, triton, pytest-benchmark, safetensors, huggingface_hub but no
# diffusers/torchdeq/nvtx) plus deqkern's own wheel. Then: device run with carry [".whl"] and
# command `bash bench/gpu_suite.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
py=(--only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}")
python3 -m pip download -q --no-deps "${py[@]}" -d .whl diffusers==0.42.1 importlib_metadata torchdeq==0.1.0 nvtx
python3 -m pip wheel -q --no-deps -w .whl .
ls -la .whl
