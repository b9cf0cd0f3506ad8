"""The GPU-session scripts run on CPU too (tiny model, seconds): their command lines are
proven here so a session lent a GPU spends its minutes measuring, not debugging."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not (ROOT / "bench" / "e2e_graphs.py").exists(), reason="run from a source checkout")
def test_e2e_graphs_script_on_cpu(tmp_path):
    e2e = _load("e2e_graphs")
    res = e2e.main(["--device", "cpu", "--model", "tiny", "--steps", "6", "--repeats", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "e2e.json").read_text())
    assert saved["device"] == "cpu" and saved["records"][0]["steps"] == 6
    for name, r in res["records"][0]["solvers"].items():
        assert r["converged"] and r["x0_rel_err"] < 1e-3, name
        assert r["rounds"] <= 6 and r["wall_s"] > 0 and r["solver_s_per_round"] > 0
