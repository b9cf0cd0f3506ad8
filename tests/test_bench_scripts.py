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
    res = e2e.main(["--device", "cpu", "--model", "tiny", "--steps", "6", "--window", "6", "3", "--batch", "2",
                    "--repeats", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "e2e.json").read_text())
    rec = res["records"][0]
    assert saved["device"] == "cpu" and rec["steps"] == 6 and list(rec["windows"]) == [6, 3]
    # the cost curve: the batch, powers of two between, and every window's rows (B W)
    assert list(rec["model_batch_curve_s"]) == [2, 4, 6, 8, 12] and all(t > 0 for t in rec["model_batch_curve_s"].values())
    for width, win in rec["windows"].items():
        assert win["model_batch_rows"] == 2 * width
        for name, r in win["solvers"].items():
            assert r["converged"] and r["x0_rel_err"] < 1e-3, (width, name)
            assert r["rounds"] <= 6 and r["wall_s"] > 0 and r["first_call_s"] > 0 and r["solver_s_per_round"] > 0
            # a regression guard on the round's op count (reference ops on CPU: up to 564 with the divergence
            # guard and the x0 budget's measured secants, 655 with their reach and rounding slack, 726 with
            # the far rows' lent gain and the last row's latent estimate, 816 with the split lend and a
            # whole window's budget shared by weight, 876 with the charge past the window), not a target
            assert 50 < r["aten_ops_per_round"] < 900, r["aten_ops_per_round"]
            assert 0 < r["kernel_ops_per_round"] < r["aten_ops_per_round"]
            assert r["rounds"] <= r["rounds_executed"]


@pytest.mark.skipif(not (ROOT / "bench" / "solver_studies.py").exists(), reason="run from a source checkout")
@pytest.mark.parametrize("study", ["adjoint-vjp", "ops-per-round", "stopping-rule", "stopping-x0", "tail-chunks",
                                   "divergence", "euler-coords", "budget", "lend", "entering", "floors",
                                   "starts", "safety", "clipped", "reach", "multistep-excess", "direction",
                                   "past-charge"])
def test_solver_studies_run_quick(tmp_path, study):
    """The studies behind bench/results/README.md, at --quick sizes."""
    studies = _load("solver_studies")
    out = tmp_path / "report.json"
    report = studies.main([study, "--quick", "--out", str(out)])
    assert json.loads(out.read_text())["study"] == study and report["rows"]
    if study == "adjoint-vjp":
        assert {(r["vjp"], r["window"]) for r in report["rows"]} == {
            ("stored", None), ("recompute", None), ("recompute", 25), ("recompute", 10)}
        assert all(r["adjoint_rounds"] >= 1 and r["peak_rss_mb"] >= r["peak_rss_after_forward_mb"] for r in report["rows"])
    elif study == "ops-per-round":
        assert all(50 < r["aten_ops"] < 2000 for r in report["rows"])
        by = {(r["backend"], r["solver"], r["window"]): r for r in report["rows"]}
        for (backend, solver, window), r in by.items():
            assert 0 < r["kernel_ops"] < r["aten_ops"]
            if backend == "triton":  # the kernels replace most small ops: fewer launches in all
                ref = by[("reference", solver, window)]
                assert r["triton_launches"] in (3, 5) and r["kernel_ops"] + 5 < ref["kernel_ops"]
    elif study == "stopping-rule":
        assert all(len(r["worst_error_over_tol"]) == 2 for r in report["rows"])
    elif study == "divergence":  # a converging solve is no divergence
        assert all(r["samples_fallen_back"] == [0] and r["worst_error_over_tol"][0] <= 1 for r in report["rows"])
    elif study == "tail-chunks":
        for row in report["rows"]:
            cells = row["settings"]
            assert len({c["rounds"] for c in cells}) == 1  # the chunking never changes the answer
            assert all(c["rounds"] <= c["executed"] < c["rounds"] + c["rounds_per_graph"] for c in cells)
    elif study == "direction":  # both leans keep the bound on the digits model
        assert all(r[k]["converged"] and r[k]["worst_error_over_tol"] <= 1 for r in report["rows"]
                   for k in ("first", "returned"))
    elif study == "past-charge":  # with and without the charge, the digits chains within the bound
        assert all(r[k]["converged"] and r[k]["worst_error_over_tol"] <= 1 for r in report["rows"]
                   for k in ("none", "charged"))
    elif study == "euler-coords":  # both coordinates of each Euler chain, every solve within its bound
        assert {(r["scheduler"], r["coords"]) for r in report["rows"]} >= {("euler", "vp"), ("euler", "ve")}
        assert all(r["converged"] and r["worst_error_over_tol"] <= 1 for r in report["rows"])
    elif study == "budget":  # the library's defaults keep their bound; the secant check ran on frozen rows
        assert all(r["worst_error_over_tol"] <= 1 and r["rounds"] >= 1 for r in report["rows"])
        assert report["secant_check"]["rows"] >= 1
    elif study == "lend":  # the three lends keep the bound; the check ran on rows that borrowed, both lends
        assert all(r[k]["converged"] and r[k]["worst_error_over_tol"] <= 1
                   for r in report["rows"] for k in ("triangle", "box", "measured"))
        assert {c["lend"] for c in report["lend_check"]} == {"box", "measured"}
        assert all(c["rows"] >= 1 for c in report["lend_check"])
    elif study == "multistep-excess":  # one-step-like configs near 1, the noise/sample class far above;
        # both runs of each chain within the bound; the saved case inside with the excess only
        by = {(r["algorithm"], r["prediction"]): r["max_excess"] for r in report["excess"]}
        assert max(by[("dpmsolver++", "epsilon")].values()) < 2 < max(by[("dpmsolver", "sample")].values())
        assert all(r[k]["worst_error_over_tol"] <= 1 for r in report["rows"] for k in ("with", "without"))
        case = report["noise_algorithm_case"]
        assert case["with"]["bound_ratio"] <= 1 < case["without"]["bound_ratio"]
    elif study == "floors":  # Newton's errors per round for both chains, guesses per distance
        assert {r["scheduler"] for r in report["rows"]} == {"ddim", "ddpm"}
        assert all(len(r["newton_worst_x0_error"]) == 4 for r in report["rows"])
        assert all(len(g["held"]) == len(g["linear"]) >= 1 for g in report["entering_guess_errors"])
    elif study == "starts":  # every start converges within the bound, at both windows
        assert [r["start"] for r in report["rows"]][:3] == ["default", "DDIM jump", "coarse K=3"]
        assert all(r[k]["converged"] and r[k]["worst_error_over_tol"] <= 1
                   for r in report["rows"] for k in ("window_12", "window_4"))
    elif study == "safety":  # every factor ran; the library's is restored afterwards
        from deqkern.ops.reference import SECANT_SAFETY

        assert SECANT_SAFETY == 8.0 and list(report["rows"][0]["values"]) == ["8.0", "4.0", "2.0", "1.0"]
        assert all(v["rounds"] >= 1 for v in report["rows"][0]["values"].values())
        assert report["rows"][0]["values"]["8.0"]["worst_error_over_tol"] <= 1
    elif study == "clipped":  # clipped chains converge within the bound
        assert all(r["converged"] and r["worst_error_over_tol"] <= 1 for r in report["rows"])
    elif study == "reach":  # every reach ran and converged; the library's is restored afterwards
        from deqkern.ops.reference import LINEAR_REACH

        assert LINEAR_REACH == 0.1 and list(report["rows"][0]["values"]) == ["inf", "0.1"]
        assert all(v["converged"] and v["worst_error_over_tol"] <= 1 for v in report["rows"][0]["values"].values())
    elif study == "entering":  # every entering rule converges within the bound
        assert all(r[k]["converged"] and r[k]["worst_error_over_tol"] <= 1
                   for r in report["rows"] for k in ("copy", "linear", "model"))
    else:
        assert {(r["stop"], r["tol"]) for r in report["rows"]} == {("relative", 1e-3), ("x0", 1e-3)}
        assert all(len(r["rounds"]) == len(r["worst_error_over_tol"]) == 1 for r in report["rows"])
