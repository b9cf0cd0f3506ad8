#!/usr/bin/env bash
# The whole GPU-only measurement in ONE device call (see bench/results/README.md, "GPU"):
#   1. GPU-marked tests + the kernel tests on CUDA tensors (graph capture/replay, Triton vs reference,
#      the capture audit on CUDA tensors)
#   2. kernel micro-benchmarks (GB/s vs a measured device-to-device copy)
#   3. end-to-end timings: graphed parallel vs graphed sequential, CIFAR10-size DDPM UNet, S=100
#   4. python -m deqkern.bench on the embedded model, and across the GPUs (torchrun --distributed)
# Results (JSON, logs) land in $OUT; a short table is printed last. Prepare wheels first with
# bench/gpu_wheels.sh and carry .whl. Budget: about 9 minutes in all (one device call).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
# NO_WHEELS=1 DEVICE=cpu E2E_MODEL=tiny bash bench/gpu_suite.sh   is the CPU dry run that proves this script
DEVICE=${DEVICE:-cuda}
E2E_MODEL=${E2E_MODEL:-ddpm-cifar10}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python3 - <<'PY' | tee "$OUT/versions.txt"
import torch, triton, deqkern
print("torch", torch.__version__, "triton", triton.__version__, "deqkern", deqkern.__version__, deqkern.__file__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
PY
rc=0
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_graphs.py tests/test_graph_audit.py tests/test_samplers.py \
  tests/test_interop.py \
  tests/test_kernels.py \
  -m "gpu or not interpreter" --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1 || rc=1
tail -3 "$OUT/gpu_tests.log"
timeout 150 python3 -m pytest -q -p no:cacheprovider bench/ --benchmark-only --benchmark-max-time=0.5 \
  --benchmark-json="$OUT/kernels.json" \
  > "$OUT/kernels.log" 2>&1 || rc=1
tail -3 "$OUT/kernels.log"
timeout 150 python3 bench/e2e_graphs.py --device "$DEVICE" --model "$E2E_MODEL" --steps 100 --batch 1 \
  --window 100 25 10 --out "$OUT" \
  > "$OUT/e2e.log" 2>&1 || rc=1
timeout 90 python3 -m deqkern.bench --device "$DEVICE" --steps 25 100 --out "$OUT/bench" > "$OUT/bench.log" 2>&1 || rc=1
# the distributed solve on NCCL, one rank per GPU (1 GPU: the NCCL collective inside a captured graph)
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$DEVICE" = cuda ] && [ "$NGPU" -ge 1 ]; then
  timeout 120 python3 -m torch.distributed.run --nproc-per-node "$NGPU" -m deqkern.bench --distributed --steps 25 100 \
    --solvers sequential anderson-tri anderson-tri-win --out "$OUT/bench_dist" > "$OUT/bench_dist.log" 2>&1 || rc=1
  tail -12 "$OUT/bench_dist.log"
fi
echo "=== end-to-end (graphed parallel vs graphed sequential) ==="
tail -8 "$OUT/e2e.log"
echo "=== deqkern.bench ==="
tail -20 "$OUT/bench.log"
exit $rc
