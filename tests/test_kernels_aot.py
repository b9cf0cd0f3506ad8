"""Every Triton kernel compiles for sm_80 and sm_90 without a GPU, with no register spills.

The compilation runs ``python -m deqkern.kernels.aot`` in a subprocess with ``TRITON_INTERPRET``
removed from its environment: in this pytest process the kernel tests may have set it, and kernels
decorated under the interpreter cannot be compiled. The subprocess prints the table (shown with
``pytest -s``) and writes its report as JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

#: Largest dynamic shared memory per block (bytes): A100 (sm_80) and H100 (sm_90).
SMEM_LIMIT = {80: 166912, 90: 232448}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "deqkern.kernels.aot", "--out", str(out)], capture_output=True, text=True, env=env,
        timeout=600,
    )
    print(proc.stdout)
    assert out.exists(), proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_kernel_compiles_without_spills(report):
    rows = report["rows"]
    assert {r["kernel"] for r in rows} == {
        "_scan_residual_kernel", "_anderson_solve_kernel", "_anderson_mix_kernel", "_commit_window_kernel",
        "_round_status_kernel",
    }
    for sm in SMEM_LIMIT:
        assert {r["config"] for r in rows if r["sm"] == sm} == {r["config"] for r in rows}, f"sm_{sm} missing configs"
    spilled = [f"{r['kernel']} {r['config']} sm_{r['sm']}" for r in rows if r["n_spills"]]
    assert not spilled, f"register spills: {spilled}"
    too_big = [r for r in rows if r["shared_bytes"] > SMEM_LIMIT[r["sm"]]]
    assert not too_big, f"shared memory over the device limit: {too_big}"


def test_scan_row_loop_is_software_pipelined(report):
    """The scan kernel relies on Triton pipelining its row loop (cp.async into shared memory)."""
    scan = [r for r in report["rows"] if r["kernel"] == "_scan_residual_kernel"]
    assert scan and all(r["cp_async"] for r in scan)
