"""DPM-Solver multistep (DPMSolverMultistepScheduler, orders 1 and 2) reproduces diffusers (issue 11).

Oracle: the diffusers loop ``x = x_T; for t in timesteps: x = step(model(scale_model_input(x, t), t), t, x,
generator=g).prev_sample`` with a small model whose output depends on x and on the timestep it
receives, run with float64 latents and with the scheduler's ``sigmas`` upcast to float64 (the same
float32 values diffusers made, so the same chain; its ``step()`` then computes the coefficients in
float64 as deqkern does instead of hiding errors below float32 ones). ``step()`` still casts the
sample to float32 every step.

Tolerances, relative L2 error at x0:

* ``SEQ_RTOL`` (deqkern's sequential sampler vs the loop): that float32 cast, ~6e-8 per step,
  through S = 10-16 steps whose gains reach e^h (noise-prediction algorithms); measured at most 2.8e-7;
* the parallel solve vs the sequential sampler: its documented bound, ``||x0 - x0_seq|| <= tol
  max(||x0_seq||, 1e-3 ||x_T||)`` per sample (:func:`test_x0_bound.bound_ratio` <= 1).
"""
from __future__ import annotations

import pytest
import torch
from conftest import rel_err, tiny_unet
from test_schedulers_parity import model
from test_x0_bound import bound_ratio

import deqkern

SEQ_RTOL = 1e-6
STEPS, SHAPE = 10, (2, 1, 4, 4)
PARALLEL_TOL = 1e-4
NAME = "DPMSolverMultistepScheduler"


def _make(cfg: dict):
    import diffusers

    return diffusers.DPMSolverMultistepScheduler(**cfg)


def _final(algorithm: str) -> str:
    # diffusers refuses final_sigmas_type="zero" for the noise-prediction algorithms
    return "zero" if algorithm.endswith("++") else "sigma_min"


CASES = [
    # every algorithm x order x solver type x prediction type
    *[(dict(algorithm_type=alg, solver_order=order, solver_type=st, prediction_type=pr, final_sigmas_type=_final(alg)),
       {}, STEPS)
      for alg in ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver") for order in (1, 2)
      for st in ("midpoint", "heun") for pr in ("epsilon", "v_prediction", "sample")],
    # final step: lower_order_final off, euler_at_final, sigma_min above 15 steps (second-order last step)
    (dict(lower_order_final=False), {}, STEPS),
    (dict(lower_order_final=False, final_sigmas_type="sigma_min", solver_type="heun"), {}, STEPS),
    (dict(euler_at_final=True, final_sigmas_type="sigma_min"), {}, 16),
    (dict(final_sigmas_type="sigma_min", algorithm_type="dpmsolver"), {}, 16),
    # sigma schedules
    (dict(use_karras_sigmas=True), {}, STEPS),
    (dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", algorithm_type="dpmsolver"), {}, STEPS),
    (dict(use_lu_lambdas=True, solver_type="heun"), {}, STEPS),
    (dict(use_exponential_sigmas=True, prediction_type="v_prediction"), {}, STEPS),
    (dict(use_beta_sigmas=True, beta_schedule="scaled_linear"), {}, STEPS),
    # spacings, betas, custom timesteps
    (dict(timestep_spacing="trailing", beta_schedule="scaled_linear"), {}, STEPS),
    (dict(timestep_spacing="leading", steps_offset=1), {}, STEPS),
    (dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"), {}, STEPS),
    (dict(lambda_min_clipped=-5.1, beta_schedule="squaredcos_cap_v2"), {}, STEPS),
    (dict(), dict(timesteps=[999, 950, 800, 640, 500, 333, 250, 101, 40, 1]), STEPS),
    # thresholding (the reference path), both families
    (dict(thresholding=True, prediction_type="sample", sample_max_value=1.5), {}, STEPS),
    (dict(thresholding=True, solver_type="heun", algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), {},
     STEPS),
    (dict(thresholding=True, algorithm_type="sde-dpmsolver++", prediction_type="v_prediction"), {}, STEPS),
]


def _ids(v):
    return str(v) if isinstance(v, dict) else str(v)


def diffusers_loop(sched, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x0, noise)``: the diffusers loop from ``x`` (float64, sigmas upcast: module docstring) with a
    generator seeded ``seed``, and the noise its steps drew (``noise[k]`` = step k's
    ``randn_tensor(shape, generator, float32)``, replayed from a twin generator; None for the ODEs)."""
    from diffusers.utils.torch_utils import randn_tensor

    sched.sigmas = sched.sigmas.double()
    gen, twin = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    noise = None
    if sched.config.algorithm_type.startswith("sde"):
        noise = torch.stack([randn_tensor(x.shape, generator=twin, dtype=torch.float32).double()
                             for _ in sched.timesteps])
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), t.expand(x.shape[0]))
        x = sched.step(out, t, x, generator=gen).prev_sample
    return x, noise


def _case(cfg: dict, kw: dict, steps: int, seed: int = 0):
    """``(schedule, x_T, diffusers x0, noise)`` of one case."""
    s = deqkern.Schedule.from_diffusers(_make(cfg), steps, **kw)
    assert s.num_steps == steps and s.is_multistep
    twin = _make(cfg)
    if "timesteps" in kw:
        twin.set_timesteps(**kw)
    else:
        twin.set_timesteps(steps, **kw)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
    x_T = x_T * float(twin.init_noise_sigma)
    ref, noise = diffusers_loop(twin, x_T.clone(), seed=7 + seed)
    assert s.is_stochastic == (noise is not None)  # the chain draws noise exactly where the loop does
    return s, x_T, ref, noise


@pytest.mark.parametrize("cfg,kw,steps", CASES, ids=_ids)
def test_sequential_equals_diffusers_loop(cfg, kw, steps):
    s, x_T, ref, noise = _case(cfg, kw, steps)
    ours = deqkern.sample_sequential(model, x_T, s, noise=noise, execution="eager")
    assert rel_err(ours.x0, ref) < SEQ_RTOL
    static = deqkern.sample_sequential(model, x_T, s, noise=noise, execution="static", rounds_per_graph=3)
    assert rel_err(static.x0, ref) < SEQ_RTOL


@pytest.mark.parametrize("cfg,kw,steps", CASES[::5] + CASES[-12:], ids=_ids)
def test_parallel_within_bound(cfg, kw, steps):
    """Picard and Anderson, full window and window 3, eager and static: x0 within the x0 rule's
    bound (the window's first row reads the frozen row before it: SolveState.prev_u)."""
    s, x_T, _, noise = _case(cfg, kw, steps)
    seq = deqkern.sample_sequential(model, x_T, s, noise=noise, execution="eager").x0
    for solver in ("picard", "anderson"):
        for window in (None, 3):
            for execution in ("eager", "static"):
                res = deqkern.sample(model, x_T, s, solver=solver, tol=PARALLEL_TOL, window=window, noise=noise,
                                     execution=execution)
                where = (solver, window, execution)
                assert bool(res.converged.all()), where
                assert float(bound_ratio(res.x0, seq, x_T, PARALLEL_TOL).max()) <= 1.0, where


@pytest.mark.parametrize("form", ["drift", "scan", "secant"])
@pytest.mark.parametrize("window", [None, 1, 4])
def test_exact_picard_is_the_sequential_chain(form, window):
    """Picard with a stopping test nothing passes freezes one row per round: x0 after S rounds is the
    sequential chain's to float64 rounding (1e-12) in every form and window — the previous-output
    term is carried across the window's edge exactly."""
    s = deqkern.Schedule.from_diffusers(_make(dict(solver_type="heun", algorithm_type="sde-dpmsolver++")), STEPS)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    noise = torch.randn(STEPS, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    seq = deqkern.sample_sequential(model, x_T, s, noise=noise, execution="eager").x0
    res = deqkern.sample(model, x_T, s, solver="picard", tol=1e-300, window=window, noise=noise, stop="relative",
                         form=form)
    assert res.rounds == STEPS and rel_err(res.x0, seq) < 1e-12


def test_warm_start_and_extrapolation():
    """A warm start (``init``) and linear extrapolation of entering rows still land within the bound."""
    s = deqkern.Schedule.from_diffusers(_make({}), STEPS)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    seq = deqkern.sample_sequential(model, x_T, s, execution="eager", return_trajectory=True)
    init = seq.trajectory[1:] + 1e-2 * torch.randn_like(seq.trajectory[1:])
    for kw in (dict(init=init), dict(extrapolate=True), dict(extrapolate=False)):
        res = deqkern.sample(model, x_T, s, solver="anderson", tol=PARALLEL_TOL, window=4, **kw)
        assert bool(res.converged.all()) and float(bound_ratio(res.x0, seq.x0, x_T, PARALLEL_TOL).max()) <= 1.0


def test_repeated_final_sigma_is_an_identity_step():
    """Karras sigmas with final_sigmas_type="sigma_min" end on a repeated sigma (h = 0). With heun
    and a second-order last step diffusers computes 0/0 there (NaN x0); the step is the identity,
    which is what its first-order last step (euler_at_final) computes: ours equals that loop."""
    cfg = dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", solver_type="heun")
    steps = 16  # >= 15: lower_order_final does not apply
    s, x_T, ref, _ = _case(cfg, {}, steps)
    assert not bool(torch.isfinite(ref).all())
    _, _, euler_final, _ = _case({**cfg, "euler_at_final": True}, {}, steps)
    ours = deqkern.sample_sequential(model, x_T, s, execution="eager").x0
    assert rel_err(ours, euler_final) < SEQ_RTOL


def test_tiny_unet_dpm_solver_pp_2m():
    """A random-weight diffusers UNet2DModel under DPM-Solver++(2M) (Karras sigmas, as SD pipelines
    use it), float32 as a pipeline runs it: sequential == loop to float32 rounding (2e-5, the
    DDIM/DDPM chain tests' bound) and the parallel solve within its bound."""
    unet = tiny_unet()
    cfg = dict(use_karras_sigmas=True, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s = deqkern.Schedule.from_diffusers(_make(cfg), STEPS)
    sched = _make(cfg)
    sched.set_timesteps(STEPS)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * float(sched.init_noise_sigma)
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
        seq = deqkern.sample_sequential(unet, x_T, s, execution="eager")
        par = deqkern.sample(unet, x_T, s, solver="anderson", tol=1e-3, window=4)
    assert rel_err(seq.x0, x) < 2e-5
    assert bool(par.converged.all()) and float(bound_ratio(par.x0, seq.x0, x_T, 1e-3).max()) <= 1.0


@pytest.mark.parametrize(
    "cfg,kw,match",
    [
        (dict(solver_order=3), {}, "solver_order=3"),
        (dict(variance_type="learned_range"), {}, "variance_type"),
        (dict(use_flow_sigmas=True, prediction_type="flow_prediction"), {}, "use_flow_sigmas"),
        (dict(), dict(mu=0.5), "mu"),
    ],
    ids=_ids,
)
def test_unsupported_is_named(cfg, kw, match):
    with pytest.raises(deqkern.UnsupportedSchedulerOption, match=match):
        deqkern.Schedule.from_diffusers(_make(cfg), STEPS, **kw)


def test_unsupported_message_lists_the_supported():
    with pytest.raises(deqkern.UnsupportedSchedulerOption, match="DPMSolverMultistepScheduler.*Euler"):
        deqkern.Schedule.from_diffusers(dict(_class_name="UniPCMultistepScheduler"), STEPS)


@pytest.mark.parametrize(
    "make,match",
    [
        # a repeated step sigma: h = 0 divides the second-order term (1/r0 = h / h0)
        (lambda: deqkern.Schedule.dpm_solver(torch.tensor([8.0, 4.0, 4.0, 1.0, 0.0]), torch.arange(4)), "step 2"),
        (lambda: deqkern.Schedule.dpm_solver(torch.tensor([8.0, float("inf"), 1.0, 0.0]), torch.arange(3)),
         "step 1"),
        # a repeated timestep in a custom list: diffusers' sigmas repeat at step 3
        (lambda: deqkern.Schedule.from_diffusers(_make({}), 5, timesteps=[900, 700, 500, 500, 100]), "step 3"),
        (lambda: deqkern.Schedule.dpm_solver(torch.tensor([8.0, 4.0, 1.0]), torch.arange(3)), "shapes"),
    ],
)
def test_bad_chain_names_the_step(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_multistep_coefficients_are_checked():
    """A non-finite multistep coefficient names its step; step 0 has no previous output."""
    s = deqkern.Schedule.from_diffusers(_make({}), STEPS)
    ms = s.multistep
    bad = ms.c1.clone()
    bad[4] = float("nan")
    from dataclasses import replace

    with pytest.raises(ValueError, match="multistep.c1: non-finite coefficient at step 4"):
        replace(s, multistep=replace(ms, c1=bad))
    first = ms.c1.clone()
    first[0] = 0.5
    with pytest.raises(ValueError, match="step 0 has no previous output"):
        replace(s, multistep=replace(ms, c1=first))
