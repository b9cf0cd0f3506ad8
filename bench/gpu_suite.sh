#!/usr/bin/env bash
# The whole GPU-only measurement in ONE device call (see bench/results/README.md, "GPU"), in this order:
#   1. the kernel tests on CUDA tensors (Triton vs the float64 reference): first, so that whatever
#      comes later, the kernels' verdict is in
#   2. the other GPU-marked tests (graph capture/replay, the capture audit on CUDA tensors, samplers)
#   3. kernel micro-benchmarks (GB/s vs a measured device-to-device copy)
#   4. end-to-end timings: graphed parallel vs graphed sequential, CIFAR10-size DDPM UNet, S=100,
#      windows 100 25 10 and window="auto"
#   5. python -m deqkern.bench on the embedded model, --window auto
#   6. on 2+ GPUs only (beyond the 475 s): the bench across them (torchrun --distributed, NCCL)
# Every step has its own timeout (with the wheels' install and the tables they add up to 475 s: the
# suite fits an 8-minute call) and none stops the next (no pytest -x). Every result is written as
# soon as it is measured: the tests one JSON line each (bench/pytest_jsonl.py), e2e.json rewritten
# after every row, one line per finished step in steps.jsonl; a step its timeout kills keeps what it
# wrote (the bench writes bench.json at its end: it runs last, on a subset of solvers). TF32 is off
# for every error check (the tests' conftest, e2e_graphs.py, the bench). The tables are printed
# last, from the files.
# Prepare wheels first with bench/gpu_wheels.sh and carry .whl.
#
# DRY_RUN=1 NO_WHEELS=1 DEVICE=cpu E2E_MODEL=tiny bash bench/gpu_suite.sh: the CPU proof of this
# script at toy sizes (tests/test_gpu_suite_dryrun.py runs it). TIMEOUT_SCALE=3 multiplies every
# step's timeout (a loaded CPU starts Python more slowly than the GPU machine does).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
DEVICE=${DEVICE:-cuda}
E2E_MODEL=${E2E_MODEL:-ddpm-cifar10}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
  timeout 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/bench"  # the pytest_jsonl plugin
if [ -n "${DRY_RUN:-}" ]; then
  # toy sizes: one kernel test file's CPU share, two small test files, one micro-benchmark
  KERNEL_TESTS=(tests/test_kernels.py) GPU_TESTS=(tests/test_interop.py) BENCH_K=(-k "scan_residual and picard and triton")
  E2E=(--steps 6 --window 6 auto --batch 2 --repeats 1 --solvers anderson-tri)
  BENCH=(--quick --steps 6 --solvers sequential paradigms anderson-tri anderson-tri-win --repeats 1 --no-progress --no-plots)
else
  KERNEL_TESTS=(tests/test_kernels.py)
  GPU_TESTS=(tests/test_graphs.py tests/test_graph_audit.py tests/test_samplers.py tests/test_interop.py)
  BENCH_K=()
  E2E=(--steps 100 --batch 1 --window 100 25 10 auto --solvers anderson-tri picard anderson-row anderson-tri-secant)
  BENCH=(--steps 100 --solvers sequential paradigms paradigms-full torchdeq picard anderson-tri anderson-tri-win
         --no-progress)
fi
rm -f "$OUT"/*.jsonl
rc=0

# step NAME TIMEOUT CMD...: run CMD under its timeout, log to OUT/NAME.log, one JSON line in steps.jsonl
step() {
  local name=$1 limit=$(( $2 * ${TIMEOUT_SCALE:-1} )) start code
  shift 2
  start=$(date +%s%N)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  code=$?
  [ "$code" -eq 0 ] || rc=1
  printf '{"step": "%s", "rc": %d, "timed_out": %s, "timeout_s": %d, "ms": %d}\n' "$name" "$code" \
    "$([ "$code" -eq 124 ] && echo true || echo false)" "$limit" "$(( ($(date +%s%N) - start) / 1000000 ))" \
    >> "$OUT/steps.jsonl"
  echo "--- $name: rc=$code"
  tail -3 "$OUT/$name.log"
}

timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
step versions 25 "$PY" -c '
import json, sys, torch, deqkern
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
info = {"torch": torch.__version__, "triton": tv, "deqkern": deqkern.__version__, "deqkern_file": deqkern.__file__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}
json.dump(info, open(sys.argv[1], "w")); print(info)' "$OUT/versions.json"
PYTEST=("$PY" -m pytest -q -rfEs -p no:cacheprovider -p pytest_jsonl)
step kernel_tests 90 "${PYTEST[@]}" "${KERNEL_TESTS[@]}" -m "gpu or not interpreter" \
  --jsonl "$OUT/kernel_tests.jsonl" --junitxml="$OUT/kernel_tests.xml"
step gpu_tests 70 "${PYTEST[@]}" "${GPU_TESTS[@]}" -m "gpu or not interpreter" \
  --jsonl "$OUT/gpu_tests.jsonl" --junitxml="$OUT/gpu_tests.xml"
step kernel_bench 50 "${PYTEST[@]}" bench/ "${BENCH_K[@]}" --benchmark-only --benchmark-max-time=0.5 \
  --jsonl "$OUT/kernel_bench.jsonl" --benchmark-json="$OUT/kernel_bench.json"
step e2e 120 "$PY" bench/e2e_graphs.py --device "$DEVICE" --model "$E2E_MODEL" "${E2E[@]}" --out "$OUT"
step bench 65 "$PY" -m deqkern.bench --device "$DEVICE" "${BENCH[@]}" --window auto --out "$OUT/bench"
NGPU=$(timeout 20 "$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$DEVICE" = cuda ] && [ "$NGPU" -ge 2 ]; then
  step bench_dist 60 "$PY" -m torch.distributed.run --nproc-per-node "$NGPU" -m deqkern.bench --distributed --steps 100 \
    --solvers sequential anderson-tri anderson-tri-win --no-progress --no-plots --out "$OUT/bench_dist"
fi
echo "=== steps ==="
cat "$OUT/steps.jsonl"
echo "=== end-to-end (graphed parallel vs graphed sequential; from e2e.json) ==="
[ -f "$OUT/e2e.json" ] && timeout 15 "$PY" bench/e2e_graphs.py --table "$OUT/e2e.json"
echo "=== deqkern.bench ==="
tail -25 "$OUT/bench.log"
exit $rc
