"""SolveConfig (issue 13): every solve option declared and checked once, shared by the sampler,
the inversion's forward and adjoint solves and the benchmark's variants."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import rel_err

import deqkern
from deqkern._validate import OptionError
from deqkern.bench.runner import OURS, BenchConfig
from deqkern.inversion import GradConfig, invert, sample_with_implicit_grad
from deqkern.inversion.function import grad_config
from deqkern.solvers import AndersonConfig, PicardConfig

S = 8


@pytest.fixture
def sched(ddim):
    return deqkern.Schedule.from_diffusers(ddim, S)


@pytest.fixture
def noisy(ddim):
    return deqkern.Schedule.from_diffusers(ddim, S, eta=0.5)


@pytest.mark.parametrize(
    "field,value",
    [
        ("solver", "broyden"), ("solver", 3), ("solver_options", {"histroy": 3}), ("solver_options", {"history": 20}),
        ("solver_options", PicardConfig()), ("solver_options", [2]), ("tol", 0.0), ("tol", -1e-3),
        ("tol", float("nan")), ("tol", True), ("tol", "1e-3"), ("stop", "abs"), ("form", "picard"), ("window", 0),
        ("window", 2.0), ("max_iters", 0), ("max_iters", True), ("extrapolate", "yes"), ("execution", "fast"),
        ("rounds_per_graph", 0),
    ],
)
def test_bad_field_is_named(field, value):
    with pytest.raises(OptionError) as err:
        deqkern.SolveConfig(**{field: value})
    assert err.value.name == field and str(err.value).startswith(f"{field}: ")


def test_mappings_become_the_solvers_config_and_numbers_python_numbers():
    tol = torch.tensor(1e-4, dtype=torch.float64)
    c = deqkern.SolveConfig("anderson", {"history": 3}, tol=tol, window=torch.tensor(4))
    assert c.solver_options == AndersonConfig(history=3)
    assert type(c.tol) is float and c.tol == 1e-4 and type(c.window) is int and c.window == 4
    # None stays "the solver's defaults", so another solver can be swapped in
    assert dataclasses.replace(deqkern.SolveConfig(), solver="picard").solver_options is None


def test_frozen_and_replace_revalidates():
    c = deqkern.SolveConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.tol = 1.0
    with pytest.raises(OptionError, match="^tol: "):
        dataclasses.replace(c, tol=-1.0)
    with pytest.raises(OptionError, match="^solver_options: "):
        dataclasses.replace(c, solver="picard", solver_options={"history": 3})


def test_resolved_fills_the_schedule_defaults(sched, noisy):
    r = deqkern.SolveConfig().resolved(sched)
    assert (r.window, r.max_iters, r.form, r.extrapolate) == (S, S, "drift", "model")
    r = deqkern.SolveConfig(window=3, max_iters=5, form="scan", extrapolate=True).resolved(noisy)
    assert (r.window, r.max_iters, r.form, r.extrapolate) == (3, 5, "scan", True)
    assert deqkern.SolveConfig().resolved(noisy).extrapolate == "model"
    with pytest.raises(OptionError, match=rf"^window: expected an int in \[1, S={S}\], got 9"):
        deqkern.SolveConfig(window=9).resolved(sched)


def test_extrapolate_model_only_where_the_steps_allow(ddim, sched, noisy):
    """``extrapolate=None`` picks the held model output on one-step affine chains (deterministic
    or not), the linear step on a deterministic clipped one, a copy on a stochastic clipped one;
    asking for ``"model"`` where it does not apply is an error naming the option; other strings too."""
    clipped = deqkern.Schedule.ddim(ddim.alphas_cumprod, sched.timesteps, transform=deqkern.X0Transform("clip"))
    noisy_clipped = deqkern.Schedule.ddim(ddim.alphas_cumprod, sched.timesteps, eta=0.5,
                                          transform=deqkern.X0Transform("clip"))
    assert deqkern.SolveConfig().resolved(clipped).extrapolate is True
    assert deqkern.SolveConfig().resolved(noisy_clipped).extrapolate is False
    assert deqkern.SolveConfig(extrapolate=True).resolved(sched).extrapolate is True
    assert deqkern.SolveConfig(extrapolate="model").resolved(noisy).extrapolate == "model"
    for bad in (clipped, noisy_clipped):
        with pytest.raises(OptionError, match="^extrapolate: 'model' steps entering rows"):
            deqkern.SolveConfig(extrapolate="model").resolved(bad)
    with pytest.raises(OptionError, match="^extrapolate: expected True, False, 'model' or None"):
        deqkern.SolveConfig(extrapolate="linear")


def test_keywords_and_config_solve_bit_for_bit(gmm64, noisy):
    """The keyword API, ``config=SolveConfig`` and ``config=`` a mapping build the same solve."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 2, 4, generator=gen, dtype=torch.float64)
    noise = torch.randn(S, *x.shape, generator=gen, dtype=torch.float64)
    kw = dict(solver="anderson", tol=1e-6, window=5, stop="relative", solver_options={"mixing": "row"},
              extrapolate=False, max_iters=20)
    by_kw = deqkern.ParallelSampler(gmm64, noisy, **kw)
    by_cfg = deqkern.ParallelSampler(gmm64, noisy, config=deqkern.SolveConfig(**kw))
    by_map = deqkern.ParallelSampler(gmm64, noisy, config=kw)
    assert by_kw.config == by_cfg.config == by_map.config
    results = [s(x, noise) for s in (by_kw, by_cfg, by_map)]
    for r in results[1:]:
        assert torch.equal(r.x0, results[0].x0) and r.rounds == results[0].rounds
    ref = deqkern.sample_sequential(gmm64, x, noisy, noise).x0
    assert results[0].all_converged and rel_err(results[0].x0, ref) <= 1e-5  # relative stop 1e-6, S = 8


def test_keywords_override_config(gmm64, sched):
    sampler = deqkern.ParallelSampler(gmm64, sched, tol=1e-6, config=deqkern.SolveConfig("picard", tol=1e-2, window=4))
    assert (sampler.config.solver, sampler.config.tol, sampler.config.window) == ("picard", 1e-6, 4)


def test_bad_option_fails_with_one_message_through_every_entry_point(gmm64, sched):
    """The same check, the same message, wherever the solve option is given; nested, its name
    says where."""
    bad = {"solver_options": {"history": 20}}
    x = torch.zeros(2, 2, 2, 4, dtype=torch.float64)
    entry_points = {
        "solver_options": [
            lambda: deqkern.SolveConfig(**bad),
            lambda: deqkern.sample(gmm64, x, sched, **bad),
            lambda: deqkern.ParallelSampler(gmm64, sched, **bad),
            lambda: deqkern.ParallelSampler(gmm64, sched, config=bad),
            lambda: sample_with_implicit_grad(gmm64, x, sched, **bad),
            lambda: invert(gmm64, x, sched, **bad),
        ],
        "grad_options.solve.solver_options": [
            lambda: GradConfig(solve=bad),
            lambda: invert(gmm64, x, sched, grad_options={"solve": bad}),
        ],
        "grad_options.solver_options": [lambda: grad_config(bad)],
    }
    messages = set()
    for name, calls in entry_points.items():
        for call in calls:
            with pytest.raises(OptionError) as err:
                call()
            assert err.value.name == name
            messages.add(err.value.message)
    assert len(messages) == 1 and "history" in messages.pop()


def test_inversion_holds_solve_configs():
    g = grad_config({"tol": 1e-5, "solver": "picard", "form": "plain", "vjp": "recompute"})
    got = (g.solve.solver, g.solve.tol, g.solve.stop, g.form, g.vjp)
    assert got == ("picard", 1e-5, "relative", "plain", "recompute")
    with pytest.raises(OptionError, match="^grad_options.solve.stop: "):
        GradConfig(solve={"stop": "x0"})
    with pytest.raises(OptionError, match="^grad_options.solve.form: "):
        GradConfig(solve={"form": "scan"})
    with pytest.raises(OptionError, match="^grad_options.solve.execution: "):
        GradConfig(solve={"execution": "graph"})
    assert deqkern.inversion.InvertConfig().solve == deqkern.SolveConfig(tol=1e-4)


def test_bench_variants_are_solve_configs():
    cfg = BenchConfig(history=3, window=10, tol=1e-5, stop="x0", max_iters=40)
    assert OURS["anderson-tri-win"].solve_config(cfg, 25) == deqkern.SolveConfig(
        "anderson", AndersonConfig(history=3, ridge=1e-3, mixing="triangular"), tol=1e-5, stop="x0", form="drift",
        window=10, max_iters=40,
    )
    assert OURS["picard-secant"].solve_config(cfg, 25) == deqkern.SolveConfig(
        "picard", tol=1e-5, stop="x0", form="secant", max_iters=40
    )
