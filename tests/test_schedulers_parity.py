"""The first-order sigma-space schedulers and the DDIM/DDPM Parallel twins reproduce diffusers (issue 11).

Oracle: the diffusers loop ``x = x_T; for t in timesteps: x = step(model(scale_model_input(x, t), t),
t, x, generator=g).prev_sample``, run in float64 with a small model whose output depends on x and
on the timestep it receives (so a wrong input scale or timestep shows at x0).

Tolerances, relative L2 error at x0:

* ``SEQ_RTOL`` (deqkern's sequential sampler vs the loop): Euler, Euler ancestral and flow-matching
  Euler cast the sample to float32 inside ``step()``, and every scheduler here computes its
  coefficients from float32 sigmas/alphas where we use float64, so the loop is float32-exact
  only: S = 10 roundings of ~6e-8 each, through steps of gain about 1 (measured: at most 2.3e-7);
* the parallel solve vs the sequential sampler: its documented bound, ``||x0 - x0_seq|| <= tol
  max(||x0_seq||, 1e-3 ||x_T||)`` per sample (:func:`test_x0_bound.bound_ratio` <= 1).
"""
from __future__ import annotations

import pytest
import torch
from conftest import rel_err, tiny_unet
from test_x0_bound import bound_ratio

import deqkern

SEQ_RTOL = 2e-6
STEPS, SHAPE = 10, (2, 1, 4, 4)
PARALLEL_TOL = 1e-4


def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Depends on x nonlinearly and on the timestep it receives (t up to 1000: a term up to 1)."""
    return torch.tanh(0.3 * x) + 1e-3 * t.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))


def _make(cls_name: str, cfg: dict):
    import diffusers

    return getattr(diffusers, cls_name)(**cfg)


CASES = [
    # EulerDiscreteScheduler: spacings x prediction types, sigma schedules, final sigma, options
    *[("EulerDiscreteScheduler", dict(timestep_spacing=sp, prediction_type=pr), {})
      for sp in ("linspace", "leading", "trailing") for pr in ("epsilon", "v_prediction", "sample")],
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True), {}),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"), {}),
    ("EulerDiscreteScheduler", dict(use_exponential_sigmas=True, prediction_type="v_prediction"), {}),
    ("EulerDiscreteScheduler", dict(use_beta_sigmas=True, beta_schedule="scaled_linear"), {}),
    ("EulerDiscreteScheduler", dict(final_sigmas_type="sigma_min", timestep_spacing="trailing"), {}),
    ("EulerDiscreteScheduler", dict(steps_offset=1, timestep_spacing="leading", beta_schedule="scaled_linear"), {}),
    ("EulerDiscreteScheduler", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                    timestep_spacing="trailing"), {}),
    ("EulerDiscreteScheduler", dict(interpolation_type="log_linear"), {}),
    ("EulerDiscreteScheduler", dict(timestep_type="continuous", prediction_type="v_prediction"), {}),
    ("EulerDiscreteScheduler", dict(), dict(s_churn=0.0)),
    ("EulerDiscreteScheduler", dict(), dict(sigmas=[14.6, 10.0, 7.0, 5.0, 3.5, 2.2, 1.3, 0.7, 0.3, 0.1, 0.0])),
    ("EulerDiscreteScheduler", dict(), dict(timesteps=[999, 950, 800, 640, 500, 333, 250, 101, 40, 1])),
    # EulerAncestralDiscreteScheduler (no sample prediction in diffusers)
    *[("EulerAncestralDiscreteScheduler", dict(timestep_spacing=sp), {}) for sp in ("linspace", "leading", "trailing")],
    ("EulerAncestralDiscreteScheduler", dict(prediction_type="v_prediction", beta_schedule="scaled_linear"), {}),
    ("EulerAncestralDiscreteScheduler", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                             timestep_spacing="trailing"), {}),
    # FlowMatchEulerDiscreteScheduler
    ("FlowMatchEulerDiscreteScheduler", dict(), {}),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), {}),
    ("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True), dict(mu=0.8)),
    ("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(mu=1.2)),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0, shift_terminal=0.1), {}),
    ("FlowMatchEulerDiscreteScheduler", dict(use_karras_sigmas=True), {}),
    ("FlowMatchEulerDiscreteScheduler", dict(use_exponential_sigmas=True), {}),
    ("FlowMatchEulerDiscreteScheduler", dict(use_beta_sigmas=True), {}),
    ("FlowMatchEulerDiscreteScheduler", dict(stochastic_sampling=True, shift=2.0), {}),
    ("FlowMatchEulerDiscreteScheduler", dict(), dict(sigmas=[1.0, 0.9, 0.8, 0.65, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])),
    # the Parallel twins of DDIM and DDPM (the step keywords in the third slot: eta)
    ("DDIMParallelScheduler", dict(clip_sample=False), {}),
    ("DDIMParallelScheduler", dict(clip_sample=False, prediction_type="v_prediction", timestep_spacing="trailing"),
     dict(eta=0.5)),
    ("DDPMParallelScheduler", dict(clip_sample=False), {}),
    ("DDPMParallelScheduler", dict(clip_sample=True, prediction_type="v_prediction"), {}),
]


def diffusers_loop(sched, x: torch.Tensor, kw: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x0, noise)``: the diffusers loop from ``x`` (float64) with a generator seeded ``seed``, and
    the noise its steps drew, ``noise[k]`` = step k's draw, as deqkern takes it (None if none).

    The draws are replayed from a twin generator exactly as each ``step()`` makes them
    (``randn_tensor(shape, generator, dtype)``): Euler ancestral in the model output's dtype
    (float64 here), flow matching in float32 (its step casts the sample first), DDPM's
    ``variance_noise`` only at timesteps > 0. DDIM with eta takes ``variance_noise`` directly."""
    from diffusers.utils.torch_utils import randn_tensor

    name = type(sched).__name__
    set_kw = {k: v for k, v in kw.items() if k not in ("eta", "s_churn")}
    step_kw = {k: v for k, v in kw.items() if k in ("eta", "s_churn")}
    if ("sigmas" in set_kw or "timesteps" in set_kw) and name == "EulerDiscreteScheduler":
        sched.set_timesteps(**set_kw)
    else:
        sched.set_timesteps(STEPS, **set_kw)
    gen, twin = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    draws = []
    for t in sched.timesteps:
        if name == "EulerAncestralDiscreteScheduler":
            draws.append(randn_tensor(x.shape, generator=twin, dtype=x.dtype))
        elif name == "FlowMatchEulerDiscreteScheduler" and sched.config.stochastic_sampling:
            draws.append(randn_tensor(x.shape, generator=twin, dtype=torch.float32).double())
        elif name == "DDPMParallelScheduler":
            draws.append(randn_tensor(x.shape, generator=twin, dtype=x.dtype) if t > 0 else torch.zeros_like(x))
        elif kw.get("eta", 0.0) > 0:
            draws.append(torch.randn(x.shape, generator=twin, dtype=x.dtype))
    noise = torch.stack(draws) if draws else None
    for k, t in enumerate(sched.timesteps):
        xin = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        out = model(xin, t.expand(x.shape[0]))
        extra = dict(step_kw, generator=gen)
        if extra.get("eta", 0.0) > 0:  # DDIM takes its noise directly, refusing a generator next to it
            extra.update(variance_noise=noise[k], generator=None)
        x = sched.step(out, t, x, **extra).prev_sample
    return x, noise


def _case(cls_name: str, cfg: dict, kw: dict, seed: int = 0):
    """``(schedule, x_T, diffusers x0, noise)`` of one case, x_T scaled by ``init_noise_sigma``."""
    sched = _make(cls_name, cfg)
    s = deqkern.Schedule.from_diffusers(sched, STEPS, **kw)
    assert s.num_steps == STEPS
    g = torch.Generator().manual_seed(100 + seed)
    twin = _make(cls_name, cfg)
    x_T = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    set_kw = {k: v for k, v in kw.items() if k not in ("eta", "s_churn")}
    if ("sigmas" in set_kw or "timesteps" in set_kw) and cls_name == "EulerDiscreteScheduler":
        twin.set_timesteps(**set_kw)
    else:
        twin.set_timesteps(STEPS, **set_kw)
    x_T = x_T * float(getattr(twin, "init_noise_sigma", 1.0))  # flow matching has none: it starts at 1
    ref, noise = diffusers_loop(twin, x_T.clone(), kw, seed=7 + seed)
    assert s.is_stochastic == (noise is not None)  # the chain draws noise exactly where the loop does
    return s, x_T, ref, noise



def check_parallel_within_bound(m, x_T, s, noise, tol) -> None:
    """Picard and Anderson, full window and window 3, eager and static: every sample converged, x0
    within the x0 rule's bound (:func:`test_x0_bound.bound_ratio`) of the sequential sampler's."""
    seq = deqkern.sample_sequential(m, x_T, s, noise=noise, execution="eager").x0
    for solver in ("picard", "anderson"):
        for window in (None, 3):
            for execution in ("eager", "static"):
                res = deqkern.sample(m, x_T, s, solver=solver, tol=tol, window=window, noise=noise,
                                     execution=execution)
                where = (solver, window, execution)
                assert bool(res.converged.all()), where
                assert float(bound_ratio(res.x0, seq, x_T, tol).max()) <= 1.0, where


def check_unet_against_diffusers_loop(unet, sched, s) -> None:
    """A real diffusers model through ``sched``'s own loop (``scale_model_input``, ``step``) equals
    deqkern's sequential sampler of ``s`` (float32: 2e-5), and the parallel solve lands within its bound."""
    sched.set_timesteps(s.num_steps)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * float(sched.init_noise_sigma)
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
        seq = deqkern.sample_sequential(unet, x_T, s, execution="eager")
        par = deqkern.sample(unet, x_T, s, solver="anderson", tol=1e-3, window=4)
    assert rel_err(seq.x0, x) < 2e-5
    assert bool(par.converged.all()) and float(bound_ratio(par.x0, seq.x0, x_T, 1e-3).max()) <= 1.0

@pytest.mark.parametrize("cls_name,cfg,kw", CASES, ids=lambda v: str(v) if isinstance(v, dict) else v)
def test_sequential_equals_diffusers_loop(cls_name, cfg, kw):
    s, x_T, ref, noise = _case(cls_name, cfg, kw)
    ours = deqkern.sample_sequential(model, x_T, s, noise=noise if s.is_stochastic else None, execution="eager")
    assert rel_err(ours.x0, ref) < SEQ_RTOL
    static = deqkern.sample_sequential(model, x_T, s, noise=noise if s.is_stochastic else None, execution="static",
                                       rounds_per_graph=3)
    assert rel_err(static.x0, ref) < SEQ_RTOL


@pytest.mark.parametrize("cls_name,cfg,kw", CASES, ids=lambda v: str(v) if isinstance(v, dict) else v)
def test_parallel_within_bound(cls_name, cfg, kw):
    """Picard and Anderson, full window and window 3, eager and static: x0 within the x0 rule's bound."""
    s, x_T, _, noise = _case(cls_name, cfg, kw)
    check_parallel_within_bound(model, x_T, s, noise if s.is_stochastic else None, PARALLEL_TOL)


def test_model_receives_the_loops_inputs():
    """The model gets exactly what the diffusers loop passes it: Euler's scaled input and its float
    timesteps, not the int64 step labels the kernels carry."""
    seen = []

    def recording(x, t):
        seen.append((x.clone(), t.clone()))
        return model(x, t)

    steps = 7  # linspace(0, 999, 7): fractional timesteps
    sched = _make("EulerDiscreteScheduler", dict(timestep_spacing="linspace"))
    s = deqkern.Schedule.from_diffusers(sched, steps)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    deqkern.sample_sequential(recording, x_T, s, execution="eager")
    sched.set_timesteps(steps)
    assert sched.timesteps.dtype == torch.float32 and not bool((sched.timesteps == sched.timesteps.round()).all())
    for (_, t), want in zip(seen, sched.timesteps, strict=True):
        assert t.dtype == want.dtype and bool((t == want).all())
    first = sched.scale_model_input(x_T, sched.timesteps[0])
    assert rel_err(seen[0][0], first) < 1e-7  # diffusers takes the root in float32


def test_tiny_unet_euler_float_timesteps():
    """A random-weight diffusers UNet2DModel under Euler (linspace spacing: fractional float32
    timesteps), float32 as a pipeline runs it: sequential == loop to float32 rounding (2e-5, the
    DDIM/DDPM chain tests' bound), and the parallel solve within its bound."""
    unet = tiny_unet()
    sched = _make("EulerDiscreteScheduler", dict(prediction_type="v_prediction"))
    check_unet_against_diffusers_loop(unet, sched, deqkern.Schedule.from_diffusers(sched, STEPS))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: deqkern.Schedule.from_diffusers(_make("EulerDiscreteScheduler", {}), 10, s_churn=0.5), "s_churn"),
        (lambda: deqkern.Schedule.from_diffusers(_make("EulerAncestralDiscreteScheduler",
                                                       dict(prediction_type="sample")), 10), "prediction_type"),
        (lambda: deqkern.Schedule.from_diffusers(_make("FlowMatchEulerDiscreteScheduler",
                                                       dict(invert_sigmas=True)), 10), "invert_sigmas"),
        (lambda: deqkern.Schedule.from_diffusers(dict(_class_name="DPMSolverSinglestepScheduler"), 10),
         "DPMSolverSinglestepScheduler.*EulerDiscreteScheduler"),
        (lambda: deqkern.Schedule.from_diffusers(dict(_class_name="UniPCMultistepScheduler"), 10), "UniPC"),
        (lambda: deqkern.Schedule.from_diffusers(dict(_class_name="HeunDiscreteScheduler"), 10), "Heun"),
        (lambda: deqkern.Schedule.from_diffusers(_make("DDIMScheduler", {}), 10, mu=0.5), "mu"),
    ],
)
def test_unsupported_is_named(make, match):
    with pytest.raises(deqkern.UnsupportedSchedulerOption, match=match):
        make()


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: deqkern.Schedule.euler(torch.tensor([2.0, 2.0, 1.0, 0.0]), torch.tensor([900.0, 800.0, 700.0])),
         "step 1"),
        (lambda: deqkern.Schedule.flow_match(torch.tensor([1.0, 0.5, float("nan"), 0.0]),
                                             torch.tensor([1000.0, 500.0, 250.0])), "step 2"),
        (lambda: deqkern.Schedule.euler(torch.tensor([2.0, 1.0]), torch.tensor([900.0, 800.0])), "shapes"),
        # alpha_cumprod 1 at step 1's timestep: sample prediction divides by sqrt(1 - alpha_cumprod)
        (lambda: deqkern.Schedule.ddim(torch.full((1000,), 0.5).index_fill(0, torch.tensor([500]), 1.0), [999, 500],
                                       prediction_type="sample"), "non-finite coefficient at step 1"),
        (lambda: deqkern.Schedule.from_diffusers(_make("EulerDiscreteScheduler", {}), 10, eta=0.5), "eta"),
        (lambda: deqkern.Schedule.from_diffusers(_make("FlowMatchEulerDiscreteScheduler", {}), 4,
                                                 sigmas=[1.0, 0.5, 0.25]), "sigmas"),
    ],
)
def test_bad_chain_names_the_step(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("cls_name,cfg", [("EulerDiscreteScheduler", dict(prediction_type="v_prediction")),
                                          ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0))], ids=str)
def test_implicit_gradient_matches_autograd(cls_name, cfg):
    """The parallel sampler's gradient w.r.t. x_T (implicit adjoint, which calls the model through the
    same evaluator: scaled inputs, float timesteps) equals autograd through the eager sequential chain,
    float64, relative error < 1e-6 at tol 1e-9."""
    s = deqkern.Schedule.from_diffusers(_make(cls_name, cfg), STEPS)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    grads = []
    for run in (lambda x: deqkern.sample_sequential(model, x, s, execution="eager"),
                lambda x: deqkern.sample(model, x, s, solver="anderson", tol=1e-9)):
        x = x_T.clone().requires_grad_()
        (run(x).x0 * w).sum().backward()
        grads.append(x.grad)
    assert rel_err(grads[1], grads[0]) < 1e-6


def test_scaled_inputs_are_capture_safe():
    """The input scale and float timesteps add no host sync and no per-replay difference: "audit"
    execution (a CUDA graph's warm-up, restore and replays checked op by op, on the CPU) of an Euler
    ancestral chain, parallel with a sliding window and sequential, still equals the diffusers loop."""
    s, x_T, ref, noise = _case("EulerAncestralDiscreteScheduler", {}, {})
    par = deqkern.sample(model, x_T, s, noise=noise, tol=PARALLEL_TOL, window=4, execution="audit")
    seq = deqkern.sample_sequential(model, x_T, s, noise=noise, execution="audit", rounds_per_graph=3)
    assert par.info["audited_calls"] > 0 and seq.info["audited_calls"] > 0
    assert bool(par.converged.all()) and float(bound_ratio(par.x0, seq.x0, x_T, PARALLEL_TOL).max()) <= 1.0
    assert rel_err(seq.x0, ref) < SEQ_RTOL
