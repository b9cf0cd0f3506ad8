"""bench/gpu_suite.sh's CPU dry run (``DRY_RUN=1 NO_WHEELS=1 DEVICE=cpu E2E_MODEL=tiny``): every step
of the one-call GPU suite runs at toy size and writes its files, so a session lent a GPU spends its
minutes measuring. About a minute on an idle 2-core CPU (each step starts Python and imports torch)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "bench" / "gpu_suite.sh"
STEPS = ["versions", "kernel_tests", "gpu_tests", "kernel_bench", "e2e", "bench"]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.skipif(not SUITE.exists(), reason="run from a source checkout (bench/ is not installed)")
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="the suite is a bash script using coreutils' timeout")
def test_gpu_suite_dry_run_writes_every_result_file(tmp_path):
    # as on the GPU machine, no TRITON_INTERPRET (tests/conftest.py sets it for this process): the e2e
    # and bench steps then take the reference ops on CPU, and the kernel steps' conftests set it themselves;
    # nor this run's pytest-xdist worker variables, which would make the suite's pytest-benchmark refuse to time
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_XDIST")},
           "DRY_RUN": "1", "NO_WHEELS": "1", "DEVICE": "cpu", "E2E_MODEL": "tiny",
           "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TIMEOUT_SCALE": "3",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # the suite's own step timeouts bound it (3 x 475 s on a loaded CPU); this bound catches a hung shell
    run = subprocess.run(["bash", str(SUITE)], env=env, capture_output=True, text=True, timeout=1500)
    steps = _jsonl(tmp_path / "steps.jsonl")
    assert [s["step"] for s in steps] == STEPS, run.stdout[-3000:]
    failed = {s["step"]: (s, (tmp_path / f"{s['step']}.log").read_text()[-2000:]) for s in steps if s["rc"] != 0}
    assert not failed, failed
    assert run.returncode == 0
    assert json.loads((tmp_path / "versions.json").read_text())["deqkern_file"].startswith(str(ROOT))
    # one JSON line per test outcome, written as each test ended
    for name in ("kernel_tests", "gpu_tests", "kernel_bench"):
        lines = _jsonl(tmp_path / f"{name}.jsonl")
        assert lines and all({"nodeid", "when", "outcome", "duration_s"} <= set(r) for r in lines), name
        assert not [r for r in lines if r["outcome"] == "failed"], name
    bench_lines = [r for r in _jsonl(tmp_path / "kernel_bench.jsonl") if r["outcome"] == "passed"]
    assert bench_lines and all(r["benchmark"]["median"] > 0 and "gbps" in r["benchmark"]["extra_info"]
                               for r in bench_lines)
    assert json.loads((tmp_path / "kernel_bench.json").read_text())["benchmarks"]
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    assert e2e["tf32"] is False
    (rec,) = e2e["records"]
    assert set(rec["windows"]) == {"6", "auto"} and rec["model_timer"] == "clock"
    fixed, auto = rec["windows"]["6"]["solvers"]["anderson-tri"], rec["windows"]["auto"]["solvers"]["anderson-tri"]
    assert fixed["converged"] and fixed["x0_rel_err"] < 1e-3 and fixed["graph"] is False and fixed["chunk_s"] > 0
    assert auto["window_auto"]["choice"] in ("sequential", *range(2, 7)) and auto["x0_rel_err"] < 1e-3
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert bench["config"]["window"] == "auto" and bench["gpu_prediction"]["6"]["label"].startswith("PREDICTION")
    assert "graph" in run.stdout and "=== steps ===" in run.stdout
