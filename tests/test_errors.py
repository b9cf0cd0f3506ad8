"""Bad input gets a clear exception naming the argument; nothing is silently dropped."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import deqkern


@pytest.fixture
def sched(ddim):
    return deqkern.Schedule.from_diffusers(ddim, 8)


@pytest.fixture
def noisy(ddim):
    return deqkern.Schedule.from_diffusers(ddim, 8, eta=1.0)


X = torch.zeros(2, 2, 2, 4)


@pytest.mark.parametrize("fn", [deqkern.sample, deqkern.sample_sequential])
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(x_T=torch.zeros(2, 2, 2, 4, dtype=torch.int64)), "x_T"),
        (dict(x_T=torch.zeros(4)), "x_T"),
        (dict(x_T=torch.full((1, 2, 2, 4), float("nan"))), "x_T"),
        (dict(noise=torch.zeros(7, 2, 2, 2, 4)), "noise"),
        (dict(noise=torch.zeros(8, 2, 2, 2, 4, dtype=torch.float64)), "noise"),
        (dict(noise=torch.zeros(8, 2, 2, 2, 4, device="meta")), "noise"),
        (dict(schedule="ddim"), "schedule"),
    ],
)
def test_bad_tensors(fn, gmm64, sched, kwargs, match):
    args = dict(model=gmm64, x_T=X, schedule=sched)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        fn(**args)


def test_stochastic_schedule_needs_noise(gmm64, noisy):
    with pytest.raises(ValueError, match="noise"):
        deqkern.sample(gmm64, X, noisy)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(tol=0.0), "tol"), (dict(tol=-1e-3), "tol"), (dict(tol=float("nan")), "tol"),
        (dict(max_iters=0), "max_iters"), (dict(window=0), "window"), (dict(window=9), "window"),
        (dict(stop="abs"), "stop"), (dict(solver="broyden"), "solver"),
        (dict(solver_options={"histroy": 3}), "histroy"), (dict(solver_options={"history": 20}), "history"),
        (dict(solver_options={"mixing": "global"}), "mixing"), (dict(solver_options={"restart": 0.0}), "restart"),
        (dict(max_batch=0), "max_batch"),
        (dict(init=torch.zeros(8, 1, 2, 2, 4)), "init"), (dict(form="picard"), "form"),
        (dict(model_kwargs={"cond": torch.zeros(3, 5)}), "model_kwargs"),
    ],
)
def test_bad_options(gmm64, sched, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        deqkern.sample(gmm64, X, sched, **kwargs)


def test_scan_form_refused_for_clipped_steps(gmm64):
    from diffusers import DDIMScheduler

    clipped = deqkern.Schedule.from_diffusers(DDIMScheduler(clip_sample=True), 8)
    with pytest.raises(ValueError, match="drift form"):
        deqkern.sample(gmm64, X, clipped, form="scan")


@pytest.mark.parametrize("fn", [deqkern.sample, deqkern.sample_sequential])
def test_non_finite_model_output_names_round_and_timestep(sched, fn):
    bad_t = int(sched.timesteps[3])

    def model(x, t):
        out = torch.zeros_like(x)
        out[t == bad_t] = float("nan")
        return out

    with pytest.raises(deqkern.NonFiniteModelOutput, match=rf"round \d+ at timestep\(s\) \[{bad_t}\]"):
        fn(model, X, sched)


def test_model_output_types(sched):
    class Out:
        def __init__(self, s):
            self.sample = s

    x = torch.randn(1, 2, 2, 4)
    ref = deqkern.sample_sequential(lambda x, t: torch.ones_like(x), x, sched).x0
    for wrap in (lambda y: Out(y), lambda y: (y,)):
        got = deqkern.sample_sequential(lambda x, t: wrap(torch.ones_like(x)), x, sched).x0
        assert torch.equal(got, ref)
    with pytest.raises(TypeError, match="model"):
        deqkern.sample_sequential(lambda x, t: "nope", x, sched)


def test_import_is_light():
    code = (
        "import sys, deqkern; heavy = [m for m in ('diffusers', 'triton', 'matplotlib', 'cupy', 'sklearn') "
        "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
