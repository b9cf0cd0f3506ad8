"""``python -m deqkern.bench`` end to end on CPU (``--quick``: S = 6 and 10, batch 2), in-process.

Every solver's x0 is checked against the sequential oracle with the bound its own stopping rule
supports (relative L2, worst sample):

* deqkern solvers and torchdeq, relative tolerance ``--tol 1e-4`` on ``||G(X) - X|| / ||G(X)||``:
  converged and within 1e-3 (float32 model; the bound of tests/test_sampling.py's UNet test).
* deq-ddim: its own fixed rule, global relative residual 1e-3 over all S*B rows at most 15 map
  evaluations. A global residual can hide a larger error in the x0 row, so 1e-2 when it converged;
  when its budget ran out (it does not freeze converged rows, so it may) only 0.2 — not diverged.
* paradigms / paradigms-full: tolerance 0.1 on ``||dx||^2 / (D var_t)``: an accepted latent may be
  off by 0.1 posterior standard deviations (RMS) and is never revisited, so x0 errors of a few
  percent are within its rule (measured 1-3e-2 on the digits model); we assert 0.1.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import tiny_unet

from deqkern.bench import runner
from deqkern.bench.__main__ import build_parser, config_from_args, main, parse_args
from deqkern.bench.runner import ALL_SOLVERS, OURS, BenchConfig, RunRecord, interleaved

DIGITS = Path(__file__).resolve().parent.parent / "deqkern" / "assets" / "digits" / "unet" / "config.json"


def _bound(run: dict) -> float:
    name = run["solver"]
    if name in OURS or name == "torchdeq":
        assert run["converged"], f"{name} did not converge"
        return 1e-3
    if name == "deq-ddim":
        return 1e-2 if run["converged"] else 0.2
    if name.startswith("paradigms"):
        return 0.1
    assert name == "sequential"
    return 0.0


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A diffusers pipeline dir: a random tiny UNet2DModel and the DDPM CIFAR-style scheduler."""
    from diffusers import DDPMScheduler

    root = tmp_path_factory.mktemp("tiny_model")
    tiny_unet().save_pretrained(root / "unet")
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    scheduler.save_pretrained(root / "scheduler")
    return root


def _run(argv: list[str], out: Path) -> dict:
    threads = torch.get_num_threads()
    assert main([*argv, "--quick", "--no-progress", "--tol", "1e-4", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads
    return json.loads((out / "bench.json").read_text())


def _check(data: dict, solvers: tuple[str, ...]) -> None:
    for key in ("schema", "config", "environment", "model", "schedules", "quality", "solvers", "runs"):
        assert key in data, key
    assert data["environment"]["device"] == "cpu" and data["environment"]["torch"]
    steps = data["config"]["steps"]
    assert steps == [6, 10] and data["config"]["batch"] == 2
    record_fields = {f.name for f in fields(RunRecord)}
    runs = data["runs"]
    assert {(r["steps"], r["solver"]) for r in runs} == {(s, n) for s in steps for n in solvers}
    for run in runs:
        assert set(run) == record_fields
        where = f"S={run['steps']} {run['solver']}"
        assert run["skipped"] is None, f"{where}: {run['skipped']}"
        for key in ("rounds", "model_evals", "wall_s", "speedup", "x0_rel_err"):
            assert run[key] is not None and math.isfinite(run[key]), f"{where}: {key}"
        assert run["x0_rel_err"] <= _bound(run), f"{where}: x0 error {run['x0_rel_err']:.3g}"
        assert run["model_evals"] >= run["rounds"] * 2 * (run["solver"] != "sequential")
        if run["solver"] != "sequential":
            assert len(run["x0_err_per_round"]) == run["rounds"] == len(run["residual_per_round"])
            assert len(run["rounds_to_target_per_sample"]) == 2
        if run["solver"] in OURS and not OURS[run["solver"]].windowed:
            assert run["rounds"] <= run["steps"]  # the lower-triangular map: exact after S rounds


def test_quick_all_solvers_tiny_model(tiny_model_dir, tmp_path):
    data = _run(["--model", str(tiny_model_dir)], tmp_path)
    _check(data, ALL_SOLVERS)
    assert data["quality"] == {}  # the digits classifier only scores the embedded model
    for name in ("convergence.png", "samples.png"):
        assert (tmp_path / name).stat().st_size > 1000
    notes = [n for r in data["runs"] if r["solver"] == "paradigms" for n in r["notes"]]
    assert any("final alpha" in n and "does not bite" in n for n in notes)


def test_quick_ddpm_stochastic(tiny_model_dir, tmp_path):
    """DDPM: stochastic chain with step noise drawn once, shared by every solver (the x0 bounds
    above hold only if every solver sees the same noise)."""
    solvers = ("sequential", "paradigms", "deq-ddim", "torchdeq", "picard", "anderson-row-scan")
    data = _run(["--model", str(tiny_model_dir), "--scheduler", "ddpm", "--solvers", *solvers, "--no-plots",
                 "--rounds-md", str(tmp_path / "rounds.md")], tmp_path)
    _check(data, solvers)
    assert all(s["stochastic"] for s in data["schedules"].values())
    assert "Rounds to reach x0 relative error" in (tmp_path / "rounds.md").read_text()


@pytest.mark.skipif(not DIGITS.is_file(), reason="embedded digits model not shipped in this checkout")
def test_quick_default_digits_model(tmp_path):
    solvers = ("sequential", "paradigms", "torchdeq", "picard", "anderson-sample", "anderson-row-win")
    data = _run(["--solvers", *solvers, "--no-plots"], tmp_path)
    _check(data, solvers)
    assert data["model"]["digits"]
    q = data["quality"]
    assert q["noise"]["n"] == 2 and 0 <= q["noise"]["mean_confidence"] <= 1
    assert set(q) == {"noise", "6", "10"} and "sequential" in q["10"]


def test_quick_x0_stop_rule(tiny_model_dir, tmp_path):
    """``--stop x0``: our solvers run under the x0 rule (recorded per run) and stay within the
    same bound."""
    solvers = ("sequential", "picard", "anderson-tri", "picard-win")
    data = _run(["--model", str(tiny_model_dir), "--stop", "x0", "--solvers", *solvers, "--no-plots"], tmp_path)
    _check(data, solvers)
    assert data["config"]["stop"] == "x0"
    assert {r["stop"] for r in data["runs"] if r["solver"] != "sequential"} == {"x0 0.0001"}
    assert all(r["x0_rel_err"] <= 1e-4 for r in data["runs"])  # the rule's own bound, tol


def test_clip_sample_skips_scan_form(tiny_model_dir, tmp_path, capsys):
    """With the model's x0 clipping kept the chain is nonlinear: scan-form solvers are reported as
    skipped (with the reason), the others still run."""
    data = _run(["--model", str(tiny_model_dir), "--clip-sample", "--solvers", "sequential", "deq-ddim",
                 "picard-scan", "picard", "--no-plots"], tmp_path)
    by = {(r["steps"], r["solver"]): r for r in data["runs"]}
    assert "affine" in by[(6, "deq-ddim")]["skipped"] and "affine" in by[(10, "picard-scan")]["skipped"]
    assert by[(10, "picard")]["converged"] and by[(10, "picard")]["x0_rel_err"] <= 1e-3
    assert "skipped" in capsys.readouterr().out


def test_help_explains_solvers_and_columns(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in (*ALL_SOLVERS, "r@tgt", "PSNR", "speedup", "--steps", "--quick"):
        assert word in text


def test_module_entry_point():
    """``python -m deqkern.bench`` resolves (the console script deqkern-bench calls the same main)."""
    out = subprocess.run([sys.executable, "-m", "deqkern.bench", "--help"], capture_output=True, text=True, check=True)
    assert "ParaDiGMS" in out.stdout


def test_flag_defaults_are_the_config_defaults():
    assert config_from_args(build_parser().parse_args([])) == BenchConfig()


def test_bad_arguments_exit_2(capsys):
    """A conflict only the config sees is still reported by flag, as argparse reports its own
    (every flag: tests/test_cli_errors.py)."""
    with pytest.raises(SystemExit) as exc:
        main(["--scheduler", "ddpm", "--eta", "0.5"])
    assert exc.value.code == 2
    assert "error: argument --eta: " in capsys.readouterr().err


def test_quick_sizes_only_the_flags_not_given():
    args = parse_args(build_parser(), ["--quick", "--steps", "5", "--window", "3"])
    assert (args.steps, args.window, args.batch) == ([5], 3, 2)


def _fake_clock_runs(names: tuple[str, ...], calls: list[str], fail: dict[str, int] | None = None):
    """Methods that record their call order on a fake clock; the k-th call of all takes k seconds,
    so the walls show the order too. ``fail[name] = n``: that method's n-th run raises."""
    now = [0.0]

    def method(name: str):
        def run():
            calls.append(name)
            now[0] += len(calls)
            if fail and calls.count(name) == fail.get(name):
                raise RuntimeError(f"{name} diverged")
            return name.upper()
        return run

    return {n: method(n) for n in names}, lambda: now[0]


def test_timed_runs_interleave_round_robin():
    """Repetition r of every method runs before repetition r + 1 of any, so load that comes and goes
    hits every method alike (a contended run once timed sequential alone at 24x its idle time)."""
    calls: list[str] = []
    names = ("sequential", "paradigms", "picard")
    runs, clock = _fake_clock_runs(names, calls)
    out = interleaved(runs, 3, torch.device("cpu"), clock=clock)
    assert calls == list(names) * 3
    assert {n: (o, w) for n, (o, w) in out.items()} == {
        "sequential": ("SEQUENTIAL", [1.0, 4.0, 7.0]), "paradigms": ("PARADIGMS", [2.0, 5.0, 8.0]),
        "picard": ("PICARD", [3.0, 6.0, 9.0]),
    }


def test_a_failing_timed_run_drops_only_that_method():
    calls: list[str] = []
    runs, clock = _fake_clock_runs(("sequential", "picard"), calls, fail={"picard": 2})
    out = interleaved(runs, 3, torch.device("cpu"), clock=clock, tolerate=(RuntimeError,))
    assert calls == ["sequential", "picard", "sequential", "picard", "sequential"]
    assert out["sequential"] == ("SEQUENTIAL", [1.0, 3.0, 5.0])
    failed, walls = out["picard"]
    assert isinstance(failed, RuntimeError) and walls == [2.0]


def test_repeats_report_median_min_max(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """``--repeats 3``: the bench times through :func:`interleaved` (one sweep set per S over the
    oracle and every solver), and each record and the table carry the median and the min-max."""
    sweeps = []

    def recording(runs, repeats, *args, **kwargs):
        sweeps.append((list(runs), repeats))
        return interleaved(runs, repeats, *args, **kwargs)

    monkeypatch.setattr(runner, "interleaved", recording)
    solvers = ("sequential", "paradigms", "picard")
    data = _run(["--model", str(tiny_model_dir), "--solvers", *solvers, "--repeats", "3", "--no-plots"], tmp_path)
    _check(data, solvers)
    assert sweeps == [(list(solvers), 3)] * 2
    for run in data["runs"]:
        walls = run["wall_s_runs"]
        assert len(walls) == 3
        assert run["wall_s"] == sorted(walls)[1] and (run["wall_s_min"], run["wall_s_max"]) == (min(walls), max(walls))
    table = capsys.readouterr().out
    picard = next(r for r in data["runs"] if r["solver"] == "picard" and r["steps"] == 10)
    assert f"{picard['wall_s']:.3f} ({picard['wall_s_min']:.3f}-{picard['wall_s_max']:.3f})" in table
    assert "interleaved" in table
