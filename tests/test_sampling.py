"""The parallel solve equals the sequential sampler (the oracle).

Models: the analytic Gaussian-mixture denoiser in float64 (bounds are the requested ``tol``:
``||x0 - x0_seq|| / ||x0_seq|| <= tol``) and a tiny random UNet2DModel in float32 (bound 1e-3).
"""
from __future__ import annotations

import pytest
import torch
from conftest import rel_err, tiny_unet

import deqkern

S = 20
SHAPE = (2, 2, 4)


def _sched(ddim, eta=0.0, clip=False, steps=S):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config({**ddim.config, "clip_sample": clip, "clip_sample_range": 1.5})
    return deqkern.Schedule.from_diffusers(sched, steps, eta=eta)


def _inputs(batch, eta, steps=S, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *SHAPE, generator=g, dtype=dtype)
    noise = torch.randn(steps, batch, *SHAPE, generator=g, dtype=dtype) if eta else None
    return x, noise


SOLVERS = [
    ("picard", None), ("anderson", {"mixing": "row"}), ("anderson", {"mixing": "sample"}),
    ("anderson", {"mixing": "triangular"}), ("anderson", {"mixing": "triangular", "restart": None, "history": 5}),
]
IDS = ["picard", "anderson-row", "anderson-sample", "anderson-tri", "anderson-tri-m5-norestart"]


@pytest.mark.parametrize("solver,opts", SOLVERS, ids=IDS)
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("window", [S, 6])
@pytest.mark.parametrize("batch", [1, 3])
def test_parallel_equals_sequential_drift(gmm64, ddim, solver, opts, eta, clip, window, batch):
    tol = 1e-4
    sched = _sched(ddim, eta, clip)
    x, noise = _inputs(batch, eta)
    with torch.no_grad():
        ref = deqkern.sample_sequential(gmm64, x, sched, noise)
        res = deqkern.sample(gmm64, x, sched, solver=solver, tol=tol, window=window, noise=noise, solver_options=opts)
    assert res.all_converged
    assert res.rounds <= S
    for b in range(batch):  # every sample within tol, not only the batch on average
        assert rel_err(res.x0[b], ref.x0[b]) <= tol


@pytest.mark.parametrize("solver,opts", SOLVERS, ids=IDS)
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("window", [S, 7])
def test_parallel_equals_sequential_scan_form(gmm64, ddim, solver, opts, eta, window):
    tol = 1e-4
    sched = _sched(ddim, eta).with_form("scan")
    x, noise = _inputs(2, eta, seed=1)
    with torch.no_grad():
        ref = deqkern.sample_sequential(gmm64, x, sched, noise)
        res = deqkern.sample(gmm64, x, sched, solver=solver, tol=tol, window=window, noise=noise, solver_options=opts)
    assert res.all_converged and rel_err(res.x0, ref.x0) <= tol


@pytest.mark.parametrize("solver,opts", SOLVERS[:2] + SOLVERS[3:4], ids=[IDS[0], IDS[1], IDS[3]])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("window", [S, 6])
def test_parallel_equals_sequential_secant_form(gmm64, ddim, solver, opts, eta, clip, window):
    """Any multipliers have the chain as fixed point: the secant form's adapted ones too."""
    tol = 1e-4
    sched = _sched(ddim, eta, clip).with_form("secant")
    x, noise = _inputs(3, eta)
    with torch.no_grad():
        ref = deqkern.sample_sequential(gmm64, x, sched, noise)
        res = deqkern.sample(gmm64, x, sched, solver=solver, tol=tol, window=window, noise=noise, solver_options=opts)
    assert res.all_converged and res.rounds <= S and res.info["form"] == "secant"
    for b in range(3):
        assert rel_err(res.x0[b], ref.x0[b]) <= tol


def test_secant_form_fits_a_linear_chain_exactly(ddim):
    """Steps linear in x, ``step_k(x) = a_k x`` (model output ``beta x``): the secant multipliers
    become the exact ``a_k`` after two rounds, the scan is then Newton's method on a linear
    system, and round 3 lands on the sequential chain to rounding. The drift form (L = 1) still
    has a visible error after those three rounds. float64."""
    from deqkern.engine import Problem, SolveState, x0_row, run_round
    from deqkern.model import ModelEvaluator
    from deqkern.solvers import get_solver

    sched = _sched(ddim).with_form("secant")
    beta = 1.5
    a = sched.cx + sched.co * beta  # d step_k / dx, a scalar per step
    assert bool(((a > 0) & (a < 1)).all())  # inside SECANT_RANGE, so the fit is not clamped
    model = ModelEvaluator(lambda x, t: beta * x)
    x, _ = _inputs(2, 0.0, seed=5)
    p = Problem(
        coef=sched.packed(dtype=torch.float64), timesteps=sched.timesteps, noise_var=sched.noise_var, noise=None,
        init=None, transform=sched.transform, shape=x.shape, width=S, tol=1e-300, stop="relative", max_iters=S,
        form="secant",
    )
    st = SolveState.start(p, x, return_trajectory=True)
    cfg, factory = get_solver("picard")
    with torch.no_grad():
        for _ in range(2):
            run_round(p, st, factory(cfg), model, static=False)
        # rows still in the window fitted their step's a_k (positions k0 + j)
        pos = st.k0.unsqueeze(1) + torch.arange(S).unsqueeze(0)
        fitted = st.secants.valid & (pos < S)
        assert fitted.sum() >= S  # most of the window
        torch.testing.assert_close(st.secant[fitted], a[pos[fitted]], rtol=1e-10, atol=0)
        run_round(p, st, factory(cfg), model, static=False)
        ref = deqkern.sample_sequential(lambda x, t: beta * x, x, sched, return_trajectory=True).trajectory
        drift = deqkern.sample(lambda x, t: beta * x, x, sched.with_form("drift"), "picard", tol=1e-300, max_iters=3)
    assert rel_err(x0_row(p, st), ref[S]) < 1e-12  # the window's row at position S
    assert rel_err(drift.x0, ref[S]) > 1e-6


@pytest.mark.parametrize("stop", ["x0", "relative", "noise"])
def test_unet_float32(ddim, stop):
    """A real diffusers UNet2DModel (random weights), float32, batch 2, bound 1e-3."""
    from diffusers import DDIMScheduler

    unet = tiny_unet()
    sched = deqkern.Schedule.from_diffusers(DDIMScheduler.from_config({**ddim.config, "clip_sample": True}), 12)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    tol = 1e-3 if stop == "noise" else 1e-4
    with torch.no_grad():
        ref = deqkern.sample_sequential(unet, x, sched)
        res = deqkern.sample(unet, x, sched, tol=tol, stop=stop, window=5, max_batch=4)
    assert res.all_converged and rel_err(res.x0, ref.x0) <= 1e-3


def test_picard_is_exact_after_S_rounds(gmm64, ddim):
    """The triangular property (docs/math.md §2): after r Picard rounds, x[1..r] are the sequential
    latents exactly, so the unknowns x[1..S-1] are exact after S-1 rounds and x0 (which needs
    the model at x[S-1]) after S rounds of model calls. float64, bound 1e-12."""
    sched = _sched(ddim, eta=0.5)
    x, noise = _inputs(2, 0.5, seed=4)
    tiny = 1e-300  # no row may pass the stopping test early: only triangularity freezes rows
    with torch.no_grad():
        ref = deqkern.sample_sequential(gmm64, x, sched, noise, return_trajectory=True)
        part = deqkern.sample(gmm64, x, sched, "picard", tol=tiny, max_iters=S - 1, noise=noise, return_trajectory=True)
        full = deqkern.sample(gmm64, x, sched, "picard", tol=tiny, max_iters=S, noise=noise)
    assert rel_err(part.trajectory[1:S], ref.trajectory[1:S]) < 1e-12
    assert not part.converged.any()  # x0 still needs one more round: reported, not hidden
    assert full.all_converged and full.rounds == S
    assert rel_err(full.x0, ref.x0) < 1e-12


def test_max_iters_reports_not_converged(gmm64, ddim):
    sched = _sched(ddim)
    x, _ = _inputs(2, 0.0)
    with torch.no_grad():
        res = deqkern.sample(gmm64, x, sched, "anderson", tol=1e-12, max_iters=2)
    assert res.rounds == 2 and res.converged.tolist() == [False, False]
    assert len(res.residuals) == 2 and all(len(r) == 2 for r in res.residuals)


def test_independent_convergence_per_sample(gmm64, ddim):
    """An easy sample (warm-started at its answer) freezes early: in its first round where its
    residuals are exactly 0 (the scan takes differences first, ops.window.residual_scan, and this
    model rounds alike in both samplers), else in its second (the x0 rule freezes one row in a
    solve's first round before anything is measured: StepSecants.before_any_measurement); a hard
    one keeps going."""
    sched = _sched(ddim)
    x, _ = _inputs(2, 0.0, seed=7)
    with torch.no_grad():
        ref = deqkern.sample_sequential(gmm64, x, sched, return_trajectory=True)
        init = ref.trajectory[1:].clone()
        init[:, 1] = x[1]  # sample 1 gets no warm start
        res = deqkern.sample(gmm64, x, sched, "picard", tol=1e-8, init=init)
    assert res.rounds_per_sample[0] <= 2 < res.rounds_per_sample[1]
    assert res.all_converged and rel_err(res.x0, ref.x0) < 1e-8


def test_max_batch_chunks_give_same_result(gmm64, ddim):
    sched = _sched(ddim)
    x, _ = _inputs(3, 0.0)
    with torch.no_grad():
        a = deqkern.sample(gmm64, x, sched, tol=1e-6)
        calls = gmm64.calls
        b = deqkern.sample(gmm64, x, sched, tol=1e-6, max_batch=7)
    assert torch.allclose(a.x0, b.x0, rtol=0, atol=1e-12)
    assert a.model_evals == b.model_evals and gmm64.calls - calls > a.rounds


def test_trajectory_and_statistics(gmm64, ddim):
    sched = _sched(ddim)
    x, _ = _inputs(1, 0.0)
    with torch.no_grad():
        ref = deqkern.sample_sequential(gmm64, x, sched, return_trajectory=True)
        res = deqkern.sample(gmm64, x, sched, "picard", tol=1e-10, window=5, return_trajectory=True)
    assert rel_err(res.trajectory, ref.trajectory) < 1e-9
    assert res.model_evals >= S and res.wall_time > 0
    assert ref.model_evals == S and ref.rounds == S


def test_warm_start_slides_through_init(gmm64, ddim):
    """An exact warm start with a window W < S: every round accepts the whole window, and rows
    entering the window start from ``init`` at their position, so S/W rounds suffice."""
    sched = _sched(ddim)
    x, _ = _inputs(2, 0.0, seed=9)
    with torch.no_grad():
        ref = deqkern.sample_sequential(gmm64, x, sched, return_trajectory=True)
        res = deqkern.sample(gmm64, x, sched, "anderson", tol=1e-8, window=5, init=ref.trajectory[1:].clone())
    assert res.all_converged and res.rounds == S // 5
    assert rel_err(res.x0, ref.x0) < 1e-10


def test_on_round_reports_x0_estimates(gmm64, ddim):
    sched = _sched(ddim)
    x, _ = _inputs(2, 0.0, seed=3)
    seen = []
    with torch.no_grad():
        res = deqkern.sample(gmm64, x, sched, "anderson", tol=1e-8, window=6, on_round=lambda est: seen.append(est))
    assert len(seen) == res.rounds
    assert torch.isnan(seen[0]).all()  # a window of 6 cannot reach x0 of a 20-step chain in round 1
    assert torch.equal(seen[-1], res.x0)
    with pytest.raises(ValueError, match="on_round"):
        deqkern.sample(gmm64, x, sched, execution="static", on_round=print)


def test_row_slide_moves_each_sample_by_its_own_count():
    """``t[b, j] <- t[b, j + delta[b]]``, ``fill`` past the end, in place, also through a
    permuted view (how the Anderson history ``[m, B, W, D]`` is slid)."""
    from deqkern.ops.window import RowSlide

    g = torch.Generator().manual_seed(0)
    hist = torch.randn(3, 4, 6, 5, generator=g)  # [m, B, W, D]
    delta = torch.tensor([0, 1, 5, 6])
    want = torch.full_like(hist, -1.0)
    for b, d in enumerate(delta.tolist()):
        want[:, b, : 6 - d] = hist[:, b, d:]
    slide = RowSlide(delta, 6)
    slide.apply(hist.permute(1, 2, 0, 3), -1.0)
    assert torch.equal(hist, want)
    flags = torch.ones(4, 6, dtype=torch.bool)
    slide.apply(flags, False)
    assert flags.sum(1).tolist() == [6, 5, 1, 0]


def test_anderson_history_slides_with_the_window():
    """After ``shift(delta)`` row j of every history tensor holds what row j + delta held; rows
    entering the window start with no history (age 0)."""
    from deqkern.solvers import get_solver

    cfg, factory = get_solver("anderson", {"history": 3})
    st = factory(cfg, 2, 5, 4, torch.device("cpu"), torch.float64)
    g = torch.Generator().manual_seed(1)
    for t in (st.hist_x, st.hist_f, st.gram, st.prev_f_sq):
        t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype))
    st.age.copy_(torch.randint(1, 4, st.age.shape, generator=g))
    before = {k: getattr(st, k).clone() for k in ("hist_x", "hist_f", "gram", "age", "prev_f_sq")}
    st.shift(torch.tensor([2, 0]))
    assert torch.equal(st.hist_x[:, 0, :3], before["hist_x"][:, 0, 2:])
    assert torch.equal(st.hist_f[:, 0, :3], before["hist_f"][:, 0, 2:])
    assert torch.equal(st.gram[0, :3], before["gram"][0, 2:]) and torch.equal(st.age[0, :3], before["age"][0, 2:])
    assert st.age[0, 3:].eq(0).all() and st.prev_f_sq[0, 3:].isinf().all()
    for k, v in before.items():  # delta 0: untouched
        assert torch.equal(getattr(st, k)[:, 1] if k.startswith("hist") else getattr(st, k)[1],
                           v[:, 1] if k.startswith("hist") else v[1])


def test_entering_rows_continue_the_last_step():
    """``commit_window(extrapolate=True)``: on a window whose rows lie on a line, ``full[j] = a +
    j v``, the rows entering after the slide land on the same line (``a + src v``), while the
    default copies the last computed row."""
    from deqkern.ops.reference import commit_window

    width, dim = 6, 3
    a, v = torch.randn(2, 1, dim, dtype=torch.float64).unbind(0)
    line = a + torch.arange(width + 1, dtype=torch.float64).view(-1, 1) * v  # [W+1, D]
    n, delta = torch.tensor([4, 1]), torch.tensor([2, 0])
    for extrapolate in (True, False):
        xw = line.expand(2, -1, -1).clone()
        commit_window(xw, xw[:, 1:].clone(), xw[:, 1:].clone(), delta, n, extrapolate=extrapolate)
        for b in range(2):
            for i in range(width + 1):
                src = i + int(delta[b])
                want = a[0] + (src if extrapolate else min(src, int(n[b]))) * v[0]
                torch.testing.assert_close(xw[b, i], want, rtol=1e-12, atol=1e-12)
