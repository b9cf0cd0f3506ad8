"""The ``x0`` stopping rule: ``tol`` bounds x0's error against the sequential sampler.

The per-row ``relative`` rule bounds residuals, and the solve can stop with x0 several ``tol``
away (``bench/results/stopping_rule_cpu.json``). The oracle here is the sequential sampler on
the embedded, trained digits UNet (a random model converges too easily to show the difference)
and on the float64 Gaussian-mixture denoiser; the bound is ``tol`` itself, per sample.
"""
from __future__ import annotations

import pytest
import torch
from conftest import digits_chain, rel_err

import deqkern
from deqkern.ops.reference import x0_accepted_rows


def test_x0_rule_rows_by_hand():
    """Leading rows within ``slide_tol`` plus one; all live rows when the window reaches x0
    (samples 1-3) and every one passes ``tol``. Sample 4 is inactive (no live rows)."""
    tol, slide_tol = 1e-3, 1e-4
    err = torch.tensor([
        [5e-5, 5e-5, 5e-4, 1e-5],  # window ends before x0: rows 0, 1 pass slide_tol, row 2 not -> 3
        [1e-4, 5e-4, 9e-4, 9e-4],  # reaches x0, all four pass tol -> 4
        [5e-5, 5e-4, 2e-3, 1e-5],  # reaches x0, row 2 fails tol: row 0 passes slide_tol -> 2
        [1e-4, 5e-4, 7.0, 7.0],    # final with 2 live rows (rows 2, 3 dead): both pass -> 2
        [7.0, 7.0, 7.0, 7.0],      # inactive -> 0
    ], dtype=torch.float64)
    n = torch.tensor([4, 4, 4, 2, 0])
    left = torch.tensor([9, 4, 4, 2, 0])
    live = torch.arange(4).unsqueeze(0) < n.unsqueeze(1)
    assert x0_accepted_rows(err, live, n, left, tol, slide_tol).tolist() == [3, 4, 2, 2, 0]


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
