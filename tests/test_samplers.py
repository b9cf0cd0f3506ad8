"""Reusable samplers: a second call on a kept workspace (state reloaded in place, the chunk —
on a GPU, the captured CUDA graph — reused) gives exactly what a fresh one-shot solve gives.

Bounds: bit-identical (``torch.equal``) — the same arithmetic on the same rows; only the
buffers are reused. The audit execution checks on CPU that the reloaded rounds still replay
the captured chunk op for op.
"""
from __future__ import annotations

import pytest
import torch
from conftest import rel_err

import deqkern

S = 12


def _inputs(seed, batch=2, eta=0.0, with_init=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, 2, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(S, batch, 2, 2, 4, generator=g, dtype=torch.float64) if eta else None
    init = torch.randn(S, batch, 2, 2, 4, generator=g, dtype=torch.float64) if with_init else None
    return x, noise, init


@pytest.mark.parametrize("execution", ["eager", "static", "audit"])
@pytest.mark.parametrize(
    "solver,opts,eta,window,with_init,form",
    [("picard", None, 0.0, S, False, "drift"), ("anderson", {"mixing": "triangular"}, 0.5, 5, False, "drift"),
     ("anderson", {"mixing": "row"}, 0.0, S, True, "drift"), ("picard", None, 0.5, 5, True, "secant")],
)
def test_reused_workspace_equals_a_fresh_solve(gmm64, ddim, execution, solver, opts, eta, window, with_init, form):
    sched = deqkern.Schedule.from_diffusers(ddim, S, eta=eta).with_form(form)
    kw = dict(solver=solver, tol=1e-6, window=window, solver_options=opts, rounds_per_graph=3)
    sampler = deqkern.ParallelSampler(gmm64, sched, execution=execution, **kw)
    with torch.no_grad():
        for call, seed in enumerate((0, 1, 0)):
            x, noise, init = _inputs(seed, eta=eta, with_init=with_init)
            got = sampler(x, noise, init=init, return_trajectory=True)
            want = deqkern.sample(gmm64, x, sched, noise=noise, init=init, execution=execution,
                                  return_trajectory=True, **kw)
            assert got.info["reused_workspace"] == (call > 0)
            assert torch.equal(got.x0, want.x0) and torch.equal(got.trajectory, want.trajectory)
            assert got.rounds == want.rounds and got.model_evals == want.model_evals
            torch.testing.assert_close(torch.tensor(got.residuals), torch.tensor(want.residuals), rtol=0, atol=0,
                                       equal_nan=True)
            assert got.info["fallbacks"] == want.info["fallbacks"]
            if execution == "audit":  # every call's chunks were checked against call 0's capture
                assert got.info["audited_calls"] > want.info["audited_calls"] or call == 0
            if call == 0:
                first = got
    assert rel_err(first.x0, got.x0) == 0.0  # call 2 repeats call 0's inputs


def test_results_do_not_alias_the_workspace(gmm64, ddim):
    sched = deqkern.Schedule.from_diffusers(ddim, S)
    sampler = deqkern.ParallelSampler(gmm64, sched, execution="static", tol=1e-6)
    with torch.no_grad():
        a = sampler(_inputs(0)[0], return_trajectory=True)
        x0, traj = a.x0.clone(), a.trajectory.clone()
        sampler(_inputs(1)[0], return_trajectory=True)
    assert torch.equal(a.x0, x0) and torch.equal(a.trajectory, traj)


def test_workspaces_are_kept_per_shape_up_to_cache_size(gmm64, ddim):
    sched = deqkern.Schedule.from_diffusers(ddim, S)
    sampler = deqkern.ParallelSampler(gmm64, sched, execution="static", tol=1e-6, cache_size=2)
    with torch.no_grad():
        reused = [sampler(_inputs(0, batch=b)[0]).info["reused_workspace"] for b in (1, 2, 1, 3, 2, 1)]
    # least recently used out: 3 evicts 2, then 2 evicts 1, then 1 evicts 3
    assert reused == [False, False, True, False, False, False]
    with pytest.raises(ValueError, match="cache_size: expected an int >= 1"):
        deqkern.ParallelSampler(gmm64, sched, cache_size=0)


@pytest.mark.parametrize("execution", ["static", "audit"])
def test_sequential_sampler_reuses_its_chunk(gmm64, ddim, execution):
    sched = deqkern.Schedule.from_diffusers(ddim, S, eta=0.5)
    sampler = deqkern.SequentialSampler(gmm64, sched, execution=execution, rounds_per_graph=5)
    with torch.no_grad():
        for call, seed in enumerate((0, 1)):
            x, noise, _ = _inputs(seed, eta=0.5)
            got = sampler(x, noise)
            want = deqkern.sample_sequential(gmm64, x, sched, noise, execution="eager")
            assert got.info["reused_workspace"] == (call > 0)
            assert rel_err(got.x0, want.x0) < 1e-14 and got.model_evals == S * 2


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graph capture)")


@needs_cuda
@pytest.mark.gpu
def test_graph_is_captured_once_and_replayed_by_later_calls(ddim):
    """On a GPU: the second call replays the first call's graph (no new capture) and still
    gives exactly the un-captured fixed-shape result for its own inputs."""
    from gmm import GMMDenoiser

    model = GMMDenoiser(ddim.alphas_cumprod, (2, 2, 4), dtype=torch.float32).cuda()
    sched = deqkern.Schedule.from_diffusers(ddim, S)
    sampler = deqkern.ParallelSampler(model, sched, tol=1e-5, execution="graph", rounds_per_graph=4)
    with torch.no_grad():
        for call, seed in enumerate((0, 1)):
            x = _inputs(seed)[0].float().cuda()
            got = sampler(x)
            want = deqkern.sample(model, x, sched, tol=1e-5, execution="static", rounds_per_graph=4)
            assert got.info["graph"] and got.info["reused_workspace"] == (call > 0)
            assert torch.equal(got.x0, want.x0) and got.rounds == want.rounds


def test_the_parallel_solve_never_records_autograd(ddim):
    """A model with trainable parameters, grad mode on: the rounds record nothing (a graph over
    every round would grow memory and block CUDA graphs); the eager oracle stays differentiable."""
    from conftest import tiny_unet

    unet = tiny_unet()
    sched = deqkern.Schedule.from_diffusers(ddim, 6)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.is_grad_enabled() and any(p.requires_grad for p in unet.parameters())
    for execution in ("eager", "static"):
        assert not deqkern.sample(unet, x, sched, execution=execution).x0.requires_grad
        assert not deqkern.sample_sequential(unet, x, sched, execution="static").x0.requires_grad
    assert deqkern.sample_sequential(unet, x, sched, execution="eager").x0.requires_grad


@pytest.mark.parametrize("execution", ["eager", "static"])
def test_inference_mode_and_normal_calls_share_a_sampler(gmm64, ddim, execution):
    """Buffers made under torch.inference_mode cannot be updated outside it (and the reverse):
    each mode gets its own workspace."""
    sched = deqkern.Schedule.from_diffusers(ddim, S)
    sampler = deqkern.ParallelSampler(gmm64, sched, execution=execution, tol=1e-6)
    seq = deqkern.SequentialSampler(gmm64, sched, execution="static")
    x = _inputs(0)[0]
    with torch.inference_mode():
        a, sa = sampler(x), seq(x)
    with torch.no_grad():
        b, sb = sampler(x), seq(x)
    c = sampler(x)
    assert not b.info["reused_workspace"] and c.info["reused_workspace"]
    assert torch.equal(a.x0, b.x0) and torch.equal(b.x0, c.x0) and torch.equal(sa.x0, sb.x0)
