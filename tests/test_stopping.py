"""The ``x0`` stopping rule: ``tol`` bounds x0's error against the sequential sampler.

The per-row ``relative`` rule bounds residuals, and the solve can stop with x0 several ``tol``
away (``bench/results/stopping_rule_cpu.json``). The oracle here is the sequential sampler on
the embedded, trained digits UNet (a random model converges too easily to show the difference)
and on the float64 Gaussian-mixture denoiser; the bound is ``tol`` itself, per sample.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import digits_chain, rel_err

import deqkern
from deqkern.ops.reference import LINEAR_REACH, SECANT_SAFETY, x0_accepted_rows, x0_row_costs


def test_x0_row_costs_by_hand():
    """Unmeasured: ``c_j = ||F_j|| (1 / ||G_j|| + |L_{j+1}| / ||G_{j+1}||)``, 0 where row j + 1 is
    not live: a row before a tiny ``G`` (a shrinking last step) costs a hundredfold more."""
    f_sq = torch.tensor([[1e-6, 4e-6, 1e-6, 9.0]], dtype=torch.float64)
    g_sq = torch.tensor([[1.0, 4.0, 1e-4, 1.0]], dtype=torch.float64)
    mult = torch.tensor([[1.0, -0.5, 1.0, 2.0]], dtype=torch.float64)
    live = torch.tensor([[True, True, True, False]])
    none = torch.full((1, 4), float("nan"), dtype=torch.float64)
    want = [1e-3 * (1 + 0.5 / 2), 2e-3 * (1 / 2 + 1 / 1e-2), 0.0, 0.0]
    assert torch.allclose(x0_row_costs(f_sq, g_sq, mult, live, none, none)[0],
                          torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_x0_row_costs_past_linear_reach_by_hand():
    """A row whose residual exceeds ``LINEAR_REACH`` of its latent costs inf (the rule is first
    order; a larger frozen residual can reach a slope no secant saw), however small its secants;
    at the reach exactly, the usual cost."""
    f_sq = torch.tensor([[LINEAR_REACH**2 * 1.0001, LINEAR_REACH**2, 1e-6, 0.0]], dtype=torch.float64)
    g_sq = torch.ones(1, 4, dtype=torch.float64)
    mult = torch.zeros(1, 4, dtype=torch.float64)
    live = torch.ones(1, 4, dtype=torch.bool)
    dev = torch.full((1, 4), 1e-9, dtype=torch.float64)
    gain = torch.full((1, 4), float("nan"), dtype=torch.float64)
    got = x0_row_costs(f_sq, g_sq, mult, live, gain, dev)[0].tolist()
    assert got[0] == math.inf
    assert got[1] == pytest.approx(LINEAR_REACH * SECANT_SAFETY * 1e-9, rel=1e-12)
    assert got[2] == pytest.approx(1e-3 * SECANT_SAFETY * 1e-9, rel=1e-12)
    assert got[3] == 0.0  # the last live row: no next row to reach


def test_x0_rule_rows_by_hand():
    """A sliding window: leading rows whose running cost fits ``(tol - spent) (j + 2) / left``, plus
    one; the freeze pays the running cost of its rows but the last. A window holding every row left
    (``n = left``): the running cost fits ``(tol - spent)`` times the rows' share of the window's
    weight, all of it where the freeze reaches x0. Sample 4 is inactive (no live rows)."""
    tol = 1e-3
    cost = torch.tensor([
        [1e-4, 1e-4, 5e-4, 0.0],  # left 10: allowances 2e-4, 3e-4, 4e-4: rows 0, 1 pass -> 3, pays 2e-4
        [1e-4, 2e-4, 1e-4, 0.0],  # reaches x0 (left 4), half spent: shares 1/4, 3/4, 1 of 5e-4: all -> 4, pays 4e-4
        [1e-4, 2e-4, 3e-4, 0.0],  # spent past tol: only zero-cost rows pass: none -> 1, pays 0
        [3e-4, 1e-4, 1e-4, 0.0],  # left 4, nothing spent: share 1/4 (2.5e-4; by rows 5e-4): none -> 1, pays 0
        [7.0, 7.0, 7.0, 7.0],     # inactive -> 0
    ], dtype=torch.float64)
    weight = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [1.0, 2.0, 1.0, 0.0],
                           [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    n = torch.tensor([4, 4, 4, 4, 0])
    left = torch.tensor([10, 4, 4, 4, 0])
    spent = torch.tensor([0.0, 5e-4, 2e-3, 0.0, 0.0], dtype=torch.float64)
    live = torch.arange(4).unsqueeze(0) < n.unsqueeze(1)
    assert x0_accepted_rows(cost, weight, live, n, left, tol, spent).tolist() == [3, 4, 1, 1, 0]
    assert torch.allclose(spent, torch.tensor([2e-4, 9e-4, 2e-3, 0.0, 0.0], dtype=torch.float64), rtol=1e-12, atol=0)


def test_x0_rule_shares_a_whole_window_by_weight():
    """In a window holding every row left, a row's weight (its cost per unit residual) decides its
    share of the budget, not its count: three rows of weight 1 at residual 5e-5 before one of
    weight 97 at 1e-6 (costs 5e-5 each and 9.7e-5). By weight, row 0's share is 1e-5 of tol 1e-3,
    so it waits and the freeze is the first row alone (the plus one); by count (the same rows in a
    sliding window, 20 rows left) each passes, 1e-4 to 2.5e-4 against running costs 5e-5 to
    2.47e-4, and the freeze takes all five. Nothing spent before either."""
    tol = 1e-3
    cost = torch.tensor([[5e-5, 5e-5, 5e-5, 9.7e-5, 0.0]], dtype=torch.float64)
    weight = torch.tensor([[1.0, 1.0, 1.0, 97.0, 0.0]], dtype=torch.float64)
    live = torch.ones(1, 5, dtype=torch.bool)
    n = torch.tensor([5])
    whole = x0_accepted_rows(cost, weight, live, n, torch.tensor([5]), tol, torch.zeros(1, dtype=torch.float64))
    sliding = x0_accepted_rows(cost, weight, live, n, torch.tensor([20]), tol, torch.zeros(1, dtype=torch.float64))
    assert whole.tolist() == [1] and sliding.tolist() == [5]


@pytest.mark.parametrize("solver,opts", [("picard", None), ("anderson", {"mixing": "triangular"})],
                         ids=["picard", "anderson-tri"])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_x0_rule_keeps_every_sample_within_tol(solver, opts, window, scheduler):
    """Trained digits UNet, S = 20, batch 8, two fresh seeds: every sample's x0 within ``tol`` of
    the sequential x0 (float32 model; the rounding floor, about 1e-6, is far below ``tol``)."""
    steps, tol = 20, 1e-4
    unet, sched = digits_chain(steps, scheduler)
    for seed in (11, 12):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(8, 1, 8, 8, generator=g)
        noise = torch.randn(steps, 8, 1, 8, 8, generator=g) if scheduler == "ddpm" else None
        with torch.no_grad():
            ref = deqkern.sample_sequential(unet, x, sched, noise, execution="eager").x0
            res = deqkern.sample(unet, x, sched, solver, tol=tol, stop="x0", window=window, noise=noise,
                                 solver_options=opts, execution="eager")
        assert res.all_converged
        worst = max(rel_err(res.x0[b], ref[b]) for b in range(8))
        assert worst <= tol, (seed, worst)


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("window", [20, 6])
def test_x0_rule_float64_oracle(gmm64, ddim, eta, window):
    """Float64 Gaussian-mixture denoiser, batch 3: x0 within ``tol`` = 1e-6 of sequential."""
    steps, tol = 20, 1e-6
    sched = deqkern.Schedule.from_diffusers(ddim, steps, eta=eta)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 2, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(steps, 3, 2, 2, 4, generator=g, dtype=torch.float64) if eta else None
    with torch.no_grad():
        ref = deqkern.sample_sequential(gmm64, x, sched, noise).x0
        res = deqkern.sample(gmm64, x, sched, "anderson", tol=tol, stop="x0", window=window, noise=noise)
    assert res.all_converged and res.rounds <= steps
    assert max(rel_err(res.x0[b], ref[b]) for b in range(3)) <= tol


@pytest.mark.parametrize("window", [16, 5])
def test_x0_rule_static_rounds_equal_eager_and_pass_the_audit(gmm64, ddim, window):
    """Fixed-shape rounds (chunks of 3) make the same decisions as eager ones, bit for bit, and
    the rule adds no host sync: the capture audit replays the chunk op for op."""
    sched = deqkern.Schedule.from_diffusers(ddim, 16)
    x = torch.randn(2, 2, 2, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kw = dict(solver="picard", tol=1e-6, stop="x0", window=window, rounds_per_graph=3, return_trajectory=True)
    with torch.no_grad():
        eager = deqkern.sample(gmm64, x, sched, execution="eager", **{k: v for k, v in kw.items() if k != "rounds_per_graph"})
        static = deqkern.sample(gmm64, x, sched, execution="static", **kw)
        audit = deqkern.sample(gmm64, x, sched, execution="audit", **kw)
    assert rel_err(static.trajectory, eager.trajectory) < 1e-12
    assert static.rounds == eager.rounds and static.rounds_per_sample == eager.rounds_per_sample
    assert torch.equal(audit.x0, static.x0) and audit.rounds == static.rounds


def test_stop_rule_is_checked(gmm64, ddim):
    sched = deqkern.Schedule.from_diffusers(ddim, 4)
    with pytest.raises(ValueError, match="stop: expected 'relative', 'noise' or 'x0'"):
        deqkern.ParallelSampler(gmm64, sched, stop="x0-error")
