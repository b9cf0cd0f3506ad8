"""``window="auto"`` (deqkern/autowindow.py): a model whose cost per call is known exactly — it
advances a clock the chooser reads — so the measured cost curve, the predictions and the choice
are deterministic; results against the sequential oracle in float64."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from gmm import GMMDenoiser

import deqkern
from deqkern._validate import OptionError
from deqkern.autowindow import PRIOR, AutoWindowConfig, RoundsModel, candidate_windows, fit_rounds

ROOT = Path(__file__).resolve().parent.parent
S, B, SHAPE = 32, 2, (1, 4, 4)
#: x0 within tol of the sequential x0 under stop="x0" (the bound is first order: 2x for margin)
TOL = 1e-4


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CostedModel(torch.nn.Module):
    """A GMM denoiser whose every call on ``n`` rows takes ``cost(n)`` seconds of ``clock``."""

    def __init__(self, ddim, cost, clock: FakeClock) -> None:
        super().__init__()
        self.inner = GMMDenoiser(ddim.alphas_cumprod, SHAPE, dtype=torch.float64)
        self.cost, self.clock = cost, clock

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.cost(x.shape[0])
        return self.inner(x, t)


def linear(rows: int) -> float:
    return 1e-3 * rows


def flat_then_linear(rows: int) -> float:
    """Flat up to 16 rows (window 8 at B = 2), then linear: a GPU that fills at 16 rows."""
    return 1e-3 * max(1.0, rows / 16)


def _setup(ddim, cost):
    clock = FakeClock()
    model = CostedModel(ddim, cost, clock)
    sched = deqkern.Schedule.from_diffusers(ddim, S)
    x_T = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sampler = deqkern.ParallelSampler(model, sched, tol=TOL, window="auto", window_auto={"clock": clock})
    return model, sched, x_T, sampler


def test_linear_cost_runs_sequentially_and_exactly(ddim):
    model, sched, x_T, sampler = _setup(ddim, linear)
    res = sampler(x_T)
    auto = res.info["window_auto"]
    assert auto["choice"] == "sequential" and res.info["exact"] and res.info["window"] is None
    assert res.all_converged and res.rounds == S and auto["reason"].startswith("no window")
    # every window's predicted time is above sequential's: rounds(W) W >= S when t is linear
    assert all(c["time_s"] > 0.9 * auto["sequential_s"] for c in auto["candidates"])
    ref = deqkern.sample_sequential(model, x_T, sched)
    assert torch.equal(res.x0, ref.x0)


def test_flat_then_linear_cost_picks_the_predicted_best_window(ddim):
    model, sched, x_T, sampler = _setup(ddim, flat_then_linear)
    res = sampler(x_T)
    auto = res.info["window_auto"]
    curve = auto["cost_curve"]["seconds"]
    # the measured curve is the model's cost at B W rows, exactly (the fake clock); the measurement
    # stops after two doublings that cost 2x each and extrapolates the rest linearly
    assert curve == {w: pytest.approx(flat_then_linear(B * w)) for w in candidate_windows(S)}
    assert auto["cost_curve"]["measured"] == [1, 2, 4, 8, 16, 32]
    best = min(auto["candidates"], key=lambda c: c["time_s"])
    model_r = RoundsModel(**{k: auto["rounds_model"][k] for k in ("a", "c")})
    for c in auto["candidates"]:
        assert c["rounds"] == model_r.predict(S, c["window"], S)
        assert c["time_s"] == pytest.approx(c["rounds"] * curve[c["window"]])
    # with the prior rounds ~ 1.7 S/W + 13.6, window 8 (the last flat one) wins
    assert auto["choice"] == best["window"] == res.info["window"] == 8
    assert auto["sequential_s"] == pytest.approx(S * flat_then_linear(B)) and auto["measured_now"]
    ref = deqkern.sample_sequential(model, x_T, sched)
    assert res.all_converged and rel_err(res.x0, ref.x0) <= 2 * TOL


def test_later_calls_reuse_the_curve_and_calibrate_rounds(ddim):
    model, sched, x_T, sampler = _setup(ddim, flat_then_linear)
    first = sampler(x_T)
    clock_after_first = model.clock.now
    second = sampler(x_T + 0.01)
    auto = second.info["window_auto"]
    assert not auto["measured_now"] and auto["rounds_model"]["observations"] == 1
    expected = fit_rounds([(S / first.info["window"], first.rounds)], PRIOR)
    assert (auto["rounds_model"]["a"], auto["rounds_model"]["c"]) == pytest.approx((expected.a, expected.c))
    # no measurement on the second call: the clock moved by the solve's model calls only
    solve_cost = model.clock.now - clock_after_first
    assert solve_cost <= second.info.get("rounds_executed", second.rounds) * flat_then_linear(B * S) + 1e-12


def test_fit_rounds_recovers_a_line_and_the_prior_matches_its_data():
    assert (fit_rounds([(1, 5), (10, 23), (100, 203)]).a, fit_rounds([(1, 5), (10, 23)]).c) == pytest.approx((2, 3))
    # one observation moves the fit from the prior towards it, not all the way
    moved = fit_rounds([(10, 100)], PRIOR)
    assert PRIOR.predict(100, 10) < moved.predict(100, 10) < 100
    rows = json.loads((ROOT / "bench/results/stopping_x0_cpu.json").read_text())["rows"]
    points = [(r["steps"] / (r["window"] or r["steps"]), n) for r in rows
              if r["stop"] == "x0" and r["solver"] == "anderson-tri" for n in r["rounds"]]
    fitted = fit_rounds(points)
    assert (PRIOR.a, PRIOR.c) == pytest.approx((fitted.a, fitted.c), rel=1e-3)


def test_rounds_prediction_stays_in_what_a_window_can_take():
    m = RoundsModel(a=2.0, c=50.0)
    assert m.predict(100, 10) == 70 and m.predict(100, 1) == 100 and m.predict(100, 100, max_iters=20) == 20
    assert RoundsModel(a=0.1, c=0.0).predict(100, 10) == 10  # at most W rows freeze per round
    assert candidate_windows(1) == [1] and candidate_windows(8) == [1, 2, 4, 8] and candidate_windows(9)[-2:] == [8, 9]


@pytest.mark.parametrize("value", ["Auto", "full", 0, -1, 2.5, True])
def test_bad_window_values_are_named(ddim, value):
    sched = deqkern.Schedule.from_diffusers(ddim, 8)
    with pytest.raises(OptionError, match=r"^window: .*'auto'"):
        deqkern.ParallelSampler(lambda x, t: x, sched, window=value)


@pytest.mark.parametrize(("field", "value"), [("budget_s", 0), ("repeats", 0), ("margin", 1.5), ("clock", 3),
                                              ("prior", (1, 2))])
def test_bad_window_auto_options_are_named(ddim, field, value):
    sched = deqkern.Schedule.from_diffusers(ddim, 8)
    with pytest.raises(OptionError, match=rf"^window_auto\.{field}: expected"):
        deqkern.ParallelSampler(lambda x, t: x, sched, window="auto", window_auto={field: value})
    with pytest.raises(ValueError, match=r"^window_auto: \['speed'\] are not options"):
        deqkern.ParallelSampler(lambda x, t: x, sched, window="auto", window_auto={"speed": 1})


def test_budget_bounds_the_measurement(ddim):
    """A budget below one call's cost: W = 1 and 2 are measured, the rest extrapolated linearly."""
    clock = FakeClock()
    model = CostedModel(ddim, flat_then_linear, clock)
    sched = deqkern.Schedule.from_diffusers(ddim, S)
    x_T = torch.randn(B, *SHAPE, dtype=torch.float64)
    sampler = deqkern.ParallelSampler(model, sched, tol=TOL, window="auto",
                                      window_auto=AutoWindowConfig(budget_s=1e-6, clock=clock))
    res = sampler(x_T)
    curve = res.info["window_auto"]["cost_curve"]
    assert curve["measured"] == [1, 2]
    assert curve["seconds"][32] == pytest.approx(curve["seconds"][2] * 16)
    assert res.info["window_auto"]["choice"] == "sequential" and res.all_converged
    assert math.isfinite(res.info["window_auto"]["sequential_s"])


def test_differentiable_auto_forward_and_the_adjoint_refusing_auto(ddim):
    """x0 of an auto-window sample is differentiable (the forward's window is chosen per call, the
    adjoint's is S); the adjoint's own solve has no 'auto'."""
    from deqkern.inversion.adjoint import GradConfig

    model, sched, x_T, sampler = _setup(ddim, linear)
    x = x_T.clone().requires_grad_(True)
    res = sampler(x)
    res.x0.sum().backward()
    xs = x_T.clone().requires_grad_(True)
    deqkern.sample_sequential(model, xs, sched).x0.sum().backward()
    assert res.info["window_auto"]["choice"] == "sequential" and rel_err(x.grad, xs.grad) <= 1e-2
    with pytest.raises(OptionError, match=r"^grad_options\.solve\.window: expected an integer"):
        GradConfig(solve={"window": "auto"})


def test_fit_holds_a_at_one_or_more():
    """One full-window solve far below the prior cannot make rounds fall as the window shrinks."""
    m = fit_rounds([(1.0, 6.0)], PRIOR)
    assert m.a == 1.0 and m.c == pytest.approx((PRIOR.c + 5.0) / 2)


def test_bench_window_auto_and_the_labelled_gpu_prediction(tmp_path, capsys):
    """``python -m deqkern.bench --window auto``: the *-win solver runs window="auto" and says what
    it chose; the report and JSON carry the CIFAR10 prediction, labelled as one."""
    from deqkern.bench.__main__ import main

    out = tmp_path / "b.json"
    assert main(["--quick", "--steps", "6", "--solvers", "sequential", "paradigms", "anderson-tri", "anderson-tri-win",
                 "--window", "auto", "--no-progress", "--no-plots", "--threads", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    saved = json.loads(out.read_text())
    runs = {r["solver"]: r for r in saved["runs"]}
    assert runs["anderson-tri-win"]["window"] == "auto" and runs["paradigms"]["window"] == 6
    assert any(n.startswith("window auto chose ") for n in runs["anderson-tri-win"]["notes"])
    assert runs["anderson-tri-win"]["x0_rel_err"] <= 1e-3
    pred = saved["gpu_prediction"]["6"]
    assert pred["label"].startswith("PREDICTION") and pred["speedup"] >= 1.0 and "PREDICTION" in text


@pytest.mark.parametrize("flag", ["0", "x", "Auto"])
def test_bench_bad_window_flag_is_named(flag, capsys):
    from deqkern.bench.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--window", flag])
    assert exc.value.code == 2 and "argument --window: expected an integer >= 1 or 'auto'" in capsys.readouterr().err


def test_measured_solver_work_per_round_turns_the_next_call_sequential(ddim):
    """Model calls that cost the same at every size, but rounds that cost 50x a call on top (the
    solver's work, here added through on_round, which eager rounds call once each): the first call
    cannot know it and runs window 8; the next one has measured it and runs sequentially."""
    model, sched, x_T, sampler = _setup(ddim, flat_then_linear)
    per_round = 0.05

    def solver_work(_x0: torch.Tensor) -> None:
        model.clock.now += per_round

    first = sampler(x_T, on_round=solver_work)
    second = sampler(x_T, on_round=solver_work)
    assert first.info["window_auto"]["choice"] == 8 and first.info["window_auto"]["overhead_s_per_round"] == 0
    auto = second.info["window_auto"]
    # eager rounds evaluate only the live rows: at most t(8), at least t(1) = t(8) here (flat)
    assert auto["overhead_s_per_round"] == pytest.approx(per_round)
    assert auto["choice"] == "sequential" and second.info["exact"] and torch.equal(
        second.x0, deqkern.sample_sequential(model, x_T, sched).x0)
