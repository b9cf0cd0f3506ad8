"""Reliability of the engine: what an unconverged, diverging or out-of-memory solve returns, and
the errors that name a bad argument (issue 10: item 2, "Faults", engine-side unclear errors).

Oracles: the eager solve (same iterate) and the sequential sampler, float64, on fresh random
inputs; tolerances are stated per test.
"""
from __future__ import annotations

import pytest
import torch

import deqkern
from conftest import rel_err

AC = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


def _tanh(x, t):
    return torch.tanh(0.5 * x)


# ------------------------------------------------------------------ item 2: unconverged fixed-shape x0
@pytest.mark.parametrize("solver", ["picard", "anderson"])
@pytest.mark.parametrize("execution", ["static", "audit"])
@pytest.mark.parametrize("max_iters,rounds_per_graph", [(6, 4), (5, 3), (3, 4), (7, 2)])
def test_unconverged_fixed_shape_x0_is_the_eager_iterate(solver, execution, max_iters, rounds_per_graph):
    """A solve stopped by ``max_iters`` inside a fixed-shape chunk returns the same current
    estimate as the eager solve (rounds past max_iters are inactive and must leave the window
    alone), within 1e-12 relative in float64, and says it did not converge."""
    s = deqkern.Schedule.ddim(AC, list(range(980, -1, -40)))  # S = 25
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    kw = dict(solver=solver, max_iters=max_iters, window=10, tol=1e-8)
    eager = deqkern.sample(_tanh, x, s, execution="eager", **kw)
    fixed = deqkern.sample(_tanh, x, s, execution=execution, rounds_per_graph=rounds_per_graph, **kw)
    assert not eager.converged.any() and not fixed.converged.any()
    assert rel_err(fixed.x0, eager.x0) <= 1e-12
    seq = deqkern.sample_sequential(_tanh, x, s).x0
    assert rel_err(fixed.x0, seq) > 1e-6  # the test means something: x0 is an unfinished estimate


# ------------------------------------------------------------------ engine-side unclear errors
S10 = deqkern.Schedule.ddim(AC, list(range(999, -1, -111)))  # S = 10
ETA10 = deqkern.Schedule.ddim(AC, list(range(999, -1, -111)), eta=1.0)  # stochastic: takes noise


@pytest.mark.parametrize("shape", [(0, 3), (2, 0), (0,), (2, 0, 4)])
@pytest.mark.parametrize("fn", [deqkern.sample, deqkern.sample_sequential])
def test_empty_batch_or_latent_names_x_T(fn, shape):
    """A batch of 0 or a latent of size 0 is refused by name (it was an IndexError deep inside)."""
    with pytest.raises(ValueError, match=r"x_T: expected shape \[batch, \.\.\.latent\], batch and latent size >= 1"):
        fn(_tanh, torch.zeros(shape), S10)


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("fn", [deqkern.sample, deqkern.sample_sequential])
def test_non_finite_noise_is_blamed_on_noise(fn, where):
    """NaN in the step noise is refused by name before any model call (it was reported as a
    non-finite model output)."""
    x = torch.randn(2, 3, dtype=torch.float64)
    noise = torch.randn(10, 2, 3, dtype=torch.float64)
    noise[0 if where == "first" else -1, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="noise: contains NaN or inf"):
        fn(_tanh, x, ETA10, noise=noise)


def test_non_finite_init_is_blamed_on_init():
    """NaN (or inf) in the warm start is refused by name (it was reported as a non-finite model
    output)."""
    x = torch.randn(2, 3, dtype=torch.float64)
    init = torch.randn(10, 2, 3, dtype=torch.float64)
    init[7, 0, 1] = float("inf")
    with pytest.raises(ValueError, match="init: contains NaN or inf"):
        deqkern.sample(_tanh, x, S10, init=init)


@pytest.mark.parametrize("execution,rounds_per_graph", [("static", 4), ("audit", 3), ("static", 1)])
def test_fixed_shape_sequential_names_round_and_timestep(execution, rounds_per_graph):
    """A graphed/static sequential chain whose model output turns non-finite names the first
    step at fault and its timestep, as the eager chain does (it said "round unknown")."""
    bad = 6
    bad_t = int(S10.timesteps[bad])

    def model(x, t):
        return torch.where((t == bad_t).view(-1, 1), float("nan"), torch.tanh(x))

    x = torch.randn(2, 3, dtype=torch.float64)
    msg = rf"round {bad} at timestep\(s\) \[{bad_t}\]"
    with pytest.raises(deqkern.NonFiniteModelOutput, match=msg):
        deqkern.sample_sequential(model, x, S10, execution="eager")
    with pytest.raises(deqkern.NonFiniteModelOutput, match=msg):
        deqkern.sample_sequential(model, x, S10, execution=execution, rounds_per_graph=rounds_per_graph)


# ------------------------------------------------------------------ faults: out of memory
class _RowLimitedModel:
    """``tanh(x/2)`` that raises ``torch.OutOfMemoryError`` above ``limit`` rows per call, as a
    GPU model would; records the batch sizes it served."""

    def __init__(self, limit: int) -> None:
        self.limit, self.served = limit, []

    def __call__(self, x, t):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory ({x.shape[0]} rows)")
        self.served.append(x.shape[0])
        return _tanh(x, t)


@pytest.mark.parametrize("execution", ["eager", "static"])
def test_out_of_memory_halves_the_window(execution):
    """Out of memory at window 10 (20 rows) and 5 (10 rows): the solve runs at window 2 (4 rows),
    says so in info, and returns the sequential x0 within 1e-6 relative (float64, tol 1e-8); a
    second call of the same sampler starts at the window that fit (no call above the limit)."""
    x = torch.randn(2, 3, dtype=torch.float64)
    model = _RowLimitedModel(limit=8)
    sampler = deqkern.ParallelSampler(model, S10, "anderson", tol=1e-8, execution=execution)
    seq = deqkern.sample_sequential(_tanh, x, S10).x0
    for _ in range(2):
        r = sampler(x)
        assert r.info["window_oom"] == [10, 5] and r.info["window"] == 2
        assert r.all_converged and rel_err(r.x0, seq) <= 1e-6
    assert max(model.served) <= 8


def test_out_of_memory_at_window_1_propagates():
    """A model that cannot take even one row per sample: the OOM reaches the caller."""
    with pytest.raises(torch.OutOfMemoryError):
        deqkern.sample(_RowLimitedModel(limit=1), torch.randn(2, 3, dtype=torch.float64), S10)


# ------------------------------------------------------------------ faults: divergence
S25 = deqkern.Schedule.ddim(AC, torch.linspace(999, 0, 25).round().long().tolist())
AGGRESSIVE = dict(history=8, ridge=0.0, restart=None, mixing="row")  # no safeguard: diverges on stiff chains


def _stiff(x, t):
    """A chain whose parallel iterates blow up far ahead of the frozen rows (steps expand 1.5x)."""
    return 1.5 * x + torch.sin(5 * x)


def _bounded(model, bound: float):
    """``model`` where every row with some ``|x| > bound`` gets NaN, as a real network may far
    from its data; the sequential chain stays inside the bound, so it is finite."""

    def run(x, t, **kwargs):
        far = (x.abs() > bound).flatten(1).any(1).view(-1, *[1] * (x.ndim - 1))
        return torch.where(far, float("nan"), model(x, t, **kwargs))

    return run


@pytest.mark.parametrize("execution", ["eager", "static", "audit"])
@pytest.mark.parametrize("solver,options", [("picard", None), ("anderson", None), ("anderson", AGGRESSIVE)])
def test_diverging_solve_falls_back_to_the_sequential_answer(solver, options, execution):
    """Iterates far from the chain make the model NaN (the old engine raised NonFiniteModelOutput
    in round 1): each sample restarts from its frozen prefix with Picard steps and still ends at
    the sequential x0 within 1e-7 relative (float64, 10 x tol), converged, the fallback reported."""
    x = torch.randn(3, 8, dtype=torch.float64)
    traj = deqkern.sample_sequential(_stiff, x, S25, return_trajectory=True, execution="eager").trajectory
    model = _bounded(_stiff, 1.01 * float(traj.abs().max()))  # NaN just outside the chain's range
    r = deqkern.sample(model, x, S25, solver, tol=1e-8, solver_options=options, execution=execution)
    assert r.all_converged and rel_err(r.x0, traj[-1]) <= 1e-7
    assert len(r.info["diverged"]) == 3 and all(d > 0 for d in r.info["diverged"])


def test_divergence_is_per_sample():
    """Only the sample whose iterates leave its model's range falls back (per-sample models through
    conditioning: sample 0 stiff and NaN just outside its sequential chain's range, sample 1 tame); the other's solve is the one it has alone
    (same rounds, x0 to 1e-12 relative) and both end at the sequential x0 (1e-7 relative: 10 x tol)."""

    def mixed(x, t, stiff):
        return torch.where(stiff.view(-1, 1) > 0, _stiff(x, t), _tanh(x, t))

    x = torch.randn(2, 8, dtype=torch.float64)
    kw = dict(model_kwargs={"stiff": torch.tensor([1.0, 0.0], dtype=torch.float64)})
    traj = deqkern.sample_sequential(mixed, x, S25, return_trajectory=True, execution="eager", **kw).trajectory
    bound = 1.01 * float(traj[:, 0].abs().max())  # the stiff sample's own chain stays inside

    def model(x, t, stiff):
        far = (x.abs() > bound).any(-1) & (stiff > 0)
        return torch.where(far.view(-1, 1), float("nan"), mixed(x, t, stiff))

    both = deqkern.sample(model, x, S25, "anderson", tol=1e-8, execution="static", **kw)
    alone = deqkern.sample(model, x[1:], S25, "anderson", tol=1e-8, execution="static",
                           model_kwargs={"stiff": torch.zeros(1, dtype=torch.float64)})
    assert both.info["diverged"][0] > 0 and both.info["diverged"][1] == 0 and alone.info["diverged"] == [0]
    assert both.rounds_per_sample[1] == alone.rounds_per_sample[0]
    assert rel_err(both.x0[1:], alone.x0) <= 1e-12 and rel_err(both.x0, traj[-1]) <= 1e-7


def test_growing_residual_falls_back_without_non_finite_values(monkeypatch):
    """An unguarded Anderson solve whose window residual grows DIVERGE_ROUNDS rounds in a row
    (finite throughout: with the growth test off, nothing falls back) restarts each sample with
    Picard steps, reports it, and still reaches the sequential x0 (1e-7 relative, float64: 10 x tol)."""
    import deqkern.engine as engine

    # the mechanism at any growth: this chain's residual grows, but by less than DIVERGE_GROWTH
    monkeypatch.setattr(engine, "DIVERGE_GROWTH", 1.0)

    def model(x, t):
        return 0.5 * x + torch.sin(5 * x)

    x = torch.randn(3, 8, dtype=torch.float64)
    seq = deqkern.sample_sequential(model, x, S25).x0
    kw = dict(tol=1e-8, solver_options=AGGRESSIVE, execution="static")
    r = deqkern.sample(model, x, S25, "anderson", **kw)
    assert r.all_converged and rel_err(r.x0, seq) <= 1e-7 and any(d > 0 for d in r.info["diverged"])
    monkeypatch.setattr(engine, "DIVERGE_ROUNDS", 10**9)
    assert deqkern.sample(model, x, S25, "anderson", **kw).info["diverged"] == [0, 0, 0]


@pytest.mark.parametrize("execution", ["eager", "static"])
def test_non_finite_output_at_the_exact_row_raises(execution):
    """A non-finite output at the frozen anchor (the sequential chain's own step) is not a
    divergence: it raises, naming the round and the timestep, even if it appears first at a
    row ahead."""
    bad_t = int(S10.timesteps[4])

    def model(x, t):
        return torch.where((t == bad_t).view(-1, 1), float("nan"), torch.tanh(x))

    with pytest.raises(deqkern.NonFiniteModelOutput, match=rf"round \d+ at timestep\(s\) \[{bad_t}\]"):
        deqkern.sample(model, torch.randn(2, 3, dtype=torch.float64), S10, "anderson", execution=execution)


@pytest.mark.parametrize("execution", ["eager", "static", "audit"])
@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_unconverged_trajectory_ends_at_the_current_x0(execution, solver):
    """An unconverged sample's trajectory holds the window's current iterates past its frozen
    prefix (not zeros), so ``trajectory[S] == x0``; converged samples' rows equal the sequential
    chain's to float64 rounding (rtol 1e-12)."""
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    sched = deqkern.Schedule.ddim(ac, list(range(999, -1, -111)))
    x = torch.randn(3, 2, dtype=torch.float64)
    model = lambda v, t: torch.tanh(v) * (1 + t[:, None] / 1000)  # noqa: E731
    res = deqkern.sample(model, x, sched, solver, max_iters=3, return_trajectory=True, execution=execution,
                         rounds_per_graph=2)
    assert not res.all_converged
    assert torch.equal(res.trajectory[-1], res.x0)
    assert torch.equal(res.trajectory[0], x)
    assert bool(torch.isfinite(res.trajectory).all()) and not bool((res.trajectory[1:] == 0).all(-1).any())
    full = deqkern.sample(model, x, sched, solver, tol=1e-12, return_trajectory=True, execution=execution)
    seq = deqkern.sample_sequential(model, x, sched, return_trajectory=True)
    assert full.all_converged
    assert float((full.trajectory - seq.trajectory).norm() / seq.trajectory.norm()) < 1e-10
