"""The graph runner: fixed-shape, sync-free rounds in chunks with one convergence check each.

On CPU the captured-round callable runs eagerly ("static" execution): its results must equal
the eager solver's (float64 GMM, bound 1e-12 — both run the same arithmetic on the same rows).
Real capture/replay is GPU-marked: outputs poisoned after capture, replayed, compared
bit-exactly with the un-captured static run.
"""
from __future__ import annotations

import logging

import pytest
import torch
from conftest import digits_chain, rel_err

import deqkern
from deqkern.engine import Problem, SolveState, run_round
from deqkern.graphs import capture
from deqkern.model import ModelEvaluator
from deqkern.solvers import get_solver

S = 16
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graph capture)")


def _setup(ddim, eta=0.0, batch=2, seed=0):
    sched = deqkern.Schedule.from_diffusers(ddim, S, eta=eta)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, 2, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(S, batch, 2, 2, 4, generator=g, dtype=torch.float64) if eta else None
    return sched, x, noise


@pytest.mark.parametrize(
    "solver,opts", [("picard", None), ("anderson", {"mixing": "row"}), ("anderson", {"mixing": "sample"})]
)
@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("window,eta", [(S, 0.0), (5, 0.5)])
@pytest.mark.parametrize("stop", ["x0", "relative"])
def test_static_rounds_equal_eager(gmm64, ddim, solver, opts, k, window, eta, stop):
    sched, x, noise = _setup(ddim, eta)
    kw = dict(solver=solver, tol=1e-6, stop=stop, window=window, noise=noise, solver_options=opts, return_trajectory=True)
    with torch.no_grad():
        eager = deqkern.sample(gmm64, x, sched, execution="eager", **kw)
        static = deqkern.sample(gmm64, x, sched, execution="static", rounds_per_graph=k, **kw)
    assert static.info["execution"] == "static" and not static.info["graph"]
    assert rel_err(static.x0, eager.x0) < 1e-12
    assert rel_err(static.trajectory, eager.trajectory) < 1e-12
    assert static.converged.tolist() == eager.converged.tolist()
    assert static.rounds == eager.rounds and static.rounds_per_sample == eager.rounds_per_sample
    executed, tail = static.info["rounds_executed"], static.info["tail_chunks"]
    assert (executed - tail) % k == 0 and static.rounds <= executed < static.rounds + k
    assert tail == 0 or k > 1
    # every executed round evaluates all B*W rows; eager evaluates only live rows
    assert static.model_evals == executed * x.shape[0] * window >= eager.model_evals
    for a, b in zip(static.residuals, eager.residuals):
        assert a == pytest.approx(b, rel=1e-9, nan_ok=True)


def test_one_round_chunks_near_convergence_cut_the_rounds_past_it(gmm64, ddim, monkeypatch):
    """Near convergence (every live row within TAIL_FACTOR of its test) chunks shrink to one round, so
    the device computes fewer full model batches past convergence; the answer is unchanged."""
    import deqkern.engine as engine

    sched, x, _ = _setup(ddim)
    kw = dict(solver="anderson", tol=1e-8, execution="static", rounds_per_graph=4)
    with torch.no_grad():
        adaptive = deqkern.sample(gmm64, x, sched, **kw)
        monkeypatch.setattr(engine, "TAIL_FACTOR", 0.0)  # never near: whole chunks only
        whole = deqkern.sample(gmm64, x, sched, **kw)
    assert torch.equal(adaptive.x0, whole.x0) and adaptive.rounds == whole.rounds
    assert whole.info["tail_chunks"] == 0 and whole.info["rounds_executed"] % 4 == 0
    assert adaptive.info["tail_chunks"] > 0
    assert adaptive.rounds <= adaptive.info["rounds_executed"] <= whole.info["rounds_executed"]


def test_tail_chunks_follow_the_stopping_rule_units():
    """The switch to one-round chunks compares each live row with its own stopping test: under
    ParaDiGMS' noise rule (tol 0.1 on a different scale than the relative residual) the solve
    keeps whole chunks until it is near its stop (a switch on the relative residual made it
    one sync per round: 12 syncs here). Trained digits UNet, DDPM S = 25, Picard, K = 4: 15
    rounds in 4 chunks (bench/results/tail_chunks_cpu.json)."""
    unet, schedule = digits_chain(25, "ddpm")
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(8, 1, 8, 8, generator=g), torch.randn(25, 8, 1, 8, 8, generator=g)
    with torch.no_grad():
        r = deqkern.sample(unet, x, schedule, "picard", noise=noise, tol=0.1, stop="noise", execution="static",
                           rounds_per_graph=4)
    executed, tail = r.info["rounds_executed"], r.info["tail_chunks"]
    assert r.all_converged and executed - r.rounds <= 3
    assert (executed - tail) // 4 + tail <= r.rounds // 4 + 2  # host syncs: about one per 4 rounds


def test_static_respects_max_iters(gmm64, ddim):
    sched, x, _ = _setup(ddim)
    with torch.no_grad():
        res = deqkern.sample(
            gmm64, x, sched, "anderson", tol=1e-14, max_iters=5, execution="static", rounds_per_graph=4
        )
    assert res.rounds == 5 and not res.converged.any() and res.info["rounds_executed"] == 8


def test_static_non_finite_output_is_reported(ddim):
    sched, x, _ = _setup(ddim)
    bad_t = int(sched.timesteps[2])

    def model(x, t):
        return torch.where((t == bad_t).view(-1, 1, 1, 1), float("nan"), torch.zeros_like(x))

    # raised in the round whose exact anchor row hits bad_t (earlier rows ahead are divergence)
    with pytest.raises(deqkern.NonFiniteModelOutput, match=rf"round \d+ at timestep\(s\) \[{bad_t}\]"):
        deqkern.sample(model, x, sched, execution="static")


def test_graph_request_on_cpu_falls_back_with_reason(gmm64, ddim, caplog):
    sched, x, _ = _setup(ddim)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="deqkern"):
        res = deqkern.sample(gmm64, x, sched, execution="graph", tol=1e-6)
        seq = deqkern.sample_sequential(gmm64, x, sched, execution="graph", rounds_per_graph=5)
        ref = deqkern.sample_sequential(gmm64, x, sched, execution="eager")
    assert "CUDA device" in res.info["graph_fallback"] and "CUDA device" in caplog.text
    assert rel_err(res.x0, ref.x0) < 1e-6
    assert seq.info["graph_fallback"] and rel_err(seq.x0, ref.x0) < 1e-14 and seq.model_evals == S * 2


def test_state_buffers_are_reused_in_place(gmm64, ddim):
    """Graph replay needs fixed addresses: no round may reallocate solver or solve state."""
    sched, x, _ = _setup(ddim)
    p = Problem(
        coef=sched.packed(dtype=torch.float64), timesteps=sched.timesteps, noise_var=sched.noise_var, noise=None,
        init=None, transform=sched.transform, shape=x.shape, width=6, tol=1e-6, stop="relative", max_iters=S,
        form="drift",
    )
    st = SolveState.start(p, x, return_trajectory=True)
    cfg, factory = get_solver("anderson")
    solver = factory(cfg, 2, 6, x[0].numel(), x.device, x.dtype)
    ev = ModelEvaluator(gmm64)
    from deqkern.graphs import state_tensors

    before = [t.data_ptr() for t in state_tensors(st, solver)]
    with torch.no_grad():
        for _ in range(3):
            run_round(p, st, solver, ev, static=True)
    assert [t.data_ptr() for t in state_tensors(st, solver)] == before


def _cuda_setup(ddim):
    """An fp32 GMM denoiser, schedule and x_T on the GPU."""
    from gmm import GMMDenoiser

    model = GMMDenoiser(ddim.alphas_cumprod, (2, 2, 4), dtype=torch.float32).cuda()
    sched, x, _ = _setup(ddim)
    return model, sched, x.float().cuda()


@needs_cuda
@pytest.mark.gpu
def test_capture_replay_is_bit_exact(ddim):
    model, sched, x = _cuda_setup(ddim)
    with torch.no_grad():
        static = deqkern.sample(model, x, sched, execution="static", rounds_per_graph=4, return_trajectory=True)
        graph = deqkern.sample(model, x, sched, execution="graph", rounds_per_graph=4, return_trajectory=True)
    assert graph.info["graph"], graph.info
    assert torch.equal(graph.x0, static.x0) and torch.equal(graph.trajectory, static.trajectory)


@needs_cuda
@pytest.mark.gpu
def test_poisoned_outputs_are_rewritten_by_replay(ddim):
    model, sched, x = _cuda_setup(ddim)
    dev = x.device
    p = Problem(
        coef=sched.packed(dev), timesteps=sched.timesteps.to(dev), noise_var=sched.noise_var.to(dev), noise=None,
        init=None, transform=sched.transform, shape=x.shape, width=S, tol=1e-5, stop="relative", max_iters=S,
        form="drift",
    )
    cfg, factory = get_solver("picard")
    with torch.no_grad():
        ref = SolveState.start(p, x, True)
        for _ in range(4):
            run_round(p, ref, factory(cfg), ModelEvaluator(model), static=True)
        st = SolveState.start(p, x, True)
        solver = factory(cfg)
        graph, reason = capture(lambda: [run_round(p, st, solver, ModelEvaluator(model), True) for _ in range(4)],
                                [st.xw, st.k0, st.rounds, st.done_round, st.res_log, st.bad_t, st.traj])
        assert graph is not None, reason
        st.traj[1:].fill_(float("nan"))
        st.res_log.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(st.xw, ref.xw) and torch.equal(st.k0, ref.k0)
    assert torch.equal(st.traj[: int(ref.k0.min()) + 1], ref.traj[: int(ref.k0.min()) + 1])
    assert torch.equal(st.res_log[:4], ref.res_log[:4])


def test_static_rounds_with_guidance_and_conditioning(gmm64, ddim):
    """Fixed-shape rounds gather per-sample conditioning and double the batch for CFG exactly as
    the eager path does."""
    sched, x, _ = _setup(ddim, batch=3)

    def model(x, t, shift):
        return gmm64(x, t) + shift.view(-1, 1, 1, 1)

    guidance = deqkern.Guidance(2.5, cond={"shift": torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)},
                                uncond={"shift": torch.zeros(1, dtype=torch.float64)})
    kw = dict(tol=1e-9, window=6, guidance=guidance, max_batch=8)
    with torch.no_grad():
        seq = deqkern.sample_sequential(model, x, sched, guidance=guidance)
        eager = deqkern.sample(model, x, sched, execution="eager", **kw)
        static = deqkern.sample(model, x, sched, execution="static", rounds_per_graph=3, **kw)
    assert rel_err(static.x0, eager.x0) < 1e-12 and rel_err(eager.x0, seq.x0) < 1e-8


@pytest.mark.parametrize("execution", ["eager", "static"])
def test_low_precision_model_with_fp32_state(ddim, execution):
    """The model runs in bfloat16 while latents, scan and solver stay float32; fixed-shape rounds
    write the next model input straight in bfloat16. Oracle: the sequential chain with the same
    bf16 model (bound 1e-3: the solve itself is exact to its tolerance)."""
    from conftest import tiny_unet

    unet = tiny_unet().to(torch.bfloat16)
    sched = deqkern.Schedule.from_diffusers(ddim, 10)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = deqkern.sample_sequential(unet, x, sched, model_dtype=torch.bfloat16)
        res = deqkern.sample(unet, x, sched, tol=1e-5, model_dtype=torch.bfloat16, execution=execution)
    assert res.x0.dtype == torch.float32 and res.all_converged
    assert rel_err(res.x0, ref.x0) < 1e-3
