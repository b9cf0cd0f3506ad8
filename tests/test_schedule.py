"""Schedule coefficients reproduce diffusers' DDIM/DDPM ``step()`` under every config option.

Oracle: the scheduler's own ``step()``. One step is compared in float64 (relative error bound
1e-6: diffusers computes its coefficients from float32 alphas, we from the same float32 alphas
in float64), whole chains with a tiny random UNet in float32 (bound 2e-5).
"""
from __future__ import annotations

import itertools

import pytest
import torch
from conftest import rel_err, tiny_unet

import deqkern
from deqkern.ops import step_rows

DDIM_CONFIGS = [
    dict(beta_schedule=b, set_alpha_to_one=a, steps_offset=o, timestep_spacing=sp)
    for b, a, o, sp in itertools.product(
        ["linear", "scaled_linear", "squaredcos_cap_v2"], [True, False], [0, 1], ["leading", "linspace", "trailing"]
    )
] + [
    dict(prediction_type="sample"), dict(prediction_type="v_prediction"),
    dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    dict(clip_sample=True), dict(clip_sample=True, clip_sample_range=0.5, prediction_type="v_prediction"),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
    dict(thresholding=True, prediction_type="sample"),
]

DDPM_CONFIGS = [
    dict(beta_schedule=b, timestep_spacing=sp, steps_offset=o)
    for b, sp, o in itertools.product(["linear", "squaredcos_cap_v2"], ["leading", "linspace", "trailing"], [0, 1])
] + [
    dict(prediction_type="sample"), dict(prediction_type="v_prediction"), dict(variance_type="fixed_large"),
    dict(variance_type="fixed_small_log"), dict(clip_sample=True), dict(thresholding=True, sample_max_value=2.0),
]


def _ddim(**cfg):
    from diffusers import DDIMScheduler

    base = dict(num_train_timesteps=1000, clip_sample=False)
    return DDIMScheduler(**{**base, **cfg})


def _ddpm(**cfg):
    from diffusers import DDPMScheduler

    base = dict(num_train_timesteps=1000, clip_sample=False)
    return DDPMScheduler(**{**base, **cfg})


@pytest.mark.parametrize("cfg", DDIM_CONFIGS, ids=str)
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("clipped_eps", [False, True])
def test_ddim_step_matches_diffusers(cfg, eta, clipped_eps):
    steps = 13
    sched = _ddim(**cfg)
    s = deqkern.Schedule.from_diffusers(sched, steps, eta=eta, use_clipped_model_output=clipped_eps)
    sched.set_timesteps(steps)
    assert torch.equal(s.timesteps, sched.timesteps)
    coef = s.packed(dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for k, t in enumerate(sched.timesteps):
        x, out, z = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
        ref = sched.step(out, t, x, eta=eta, use_clipped_model_output=clipped_eps, variance_noise=z).prev_sample
        ours = step_rows(x.reshape(3, -1), out.reshape(3, -1), z.reshape(3, -1), coef[k].expand(3, -1), s.transform)
        assert rel_err(ours.reshape(ref.shape), ref) < 1e-6, (k, int(t))


@pytest.mark.parametrize("cfg", DDPM_CONFIGS, ids=str)
def test_ddpm_step_matches_diffusers(cfg):
    steps = 11
    sched = _ddpm(**cfg)
    s = deqkern.Schedule.from_diffusers(sched, steps)
    sched.set_timesteps(steps)
    coef = s.packed(dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for k, t in enumerate(sched.timesteps):
        x, out = (torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
        seed = 100 + k
        ref = sched.step(out, t, x, generator=torch.Generator().manual_seed(seed)).prev_sample
        # diffusers draws randn(shape) from the generator only when t > 0
        z = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        ours = step_rows(x.reshape(2, -1), out.reshape(2, -1), z.reshape(2, -1), coef[k].expand(2, -1), s.transform)
        assert rel_err(ours.reshape(ref.shape), ref) < 1e-6, (k, int(t))


def _diffusers_loop(unet, sched, x, steps, eta=0.0, noise=None):
    sched.set_timesteps(steps)
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            out = unet(x, t).sample
            if type(sched).__name__ == "DDIMScheduler":
                vn = noise[k] if eta > 0 else None
                x = sched.step(out, t, x, eta=eta, variance_noise=vn).prev_sample
            else:
                x = sched.step(out, t, x, generator=noise).prev_sample
    return x


@pytest.mark.parametrize(
    "kind,cfg,eta",
    [
        ("ddim", dict(), 0.0), ("ddim", dict(clip_sample=True), 0.0), ("ddim", dict(set_alpha_to_one=False,
         steps_offset=1, timestep_spacing="trailing"), 0.0), ("ddim", dict(prediction_type="v_prediction"), 0.5),
        ("ddim", dict(thresholding=True), 1.0), ("ddpm", dict(), None), ("ddpm", dict(clip_sample=True,
         timestep_spacing="trailing"), None),
    ],
    ids=str,
)
def test_sequential_equals_diffusers_loop(kind, cfg, eta):
    """sample_sequential == a plain diffusers loop (same UNet, same noise) in float64, rel err < 1e-6.

    float64 so that only the schedules differ: diffusers' ``step`` rounds its coefficients from the
    float32 ``alphas_cumprod`` in float32 (~1e-7 relative; measured up to 3.1e-7 on the clipped
    chain). In float32 the clipped chain amplifies the model's own rounding to 2.9e-5 on one CPU
    and below 2e-5 on another (the kink of the clip), which says nothing about the schedule."""
    steps, shape, dt = 10, (2, 1, 8, 8), torch.float64
    unet = tiny_unet().double()  # nn.Module.double(): diffusers' .to(dtype) warns about fp32 modules
    sched = _ddim(**cfg) if kind == "ddim" else _ddpm(**cfg)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=dt)
    s = deqkern.Schedule.from_diffusers(sched, steps, eta=eta)
    if kind == "ddim":
        noise = torch.randn(steps, *shape, generator=torch.Generator().manual_seed(4), dtype=dt) if eta else None
        ref = _diffusers_loop(unet, sched, x, steps, eta or 0.0, noise)
    else:
        sched.set_timesteps(steps)
        gen = torch.Generator().manual_seed(5)
        draws = torch.Generator().manual_seed(5)  # the draws diffusers' step makes, in the sample's dtype
        noise = torch.stack([torch.randn(shape, generator=draws, dtype=dt) if t > 0 else torch.zeros(shape, dtype=dt)
                             for t in sched.timesteps])
        ref = _diffusers_loop(unet, sched, x, steps, noise=gen)
    with torch.no_grad():
        ours = deqkern.sample_sequential(unet, x, s, noise=noise if s.is_stochastic else None)
    assert ours.x0.dtype == dt
    assert rel_err(ours.x0, ref) < 1e-6


def test_from_config_dict_and_no_mutation():
    sched = _ddim(timestep_spacing="trailing")
    before = sched.num_inference_steps
    a = deqkern.Schedule.from_diffusers(sched, 20)
    b = deqkern.Schedule.from_diffusers({**sched.config, "_class_name": "DDIMScheduler"}, 20)
    assert sched.num_inference_steps == before
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.cx, b.cx)


def test_raw_alphas_constructor_matches_diffusers_ddim():
    sched = _ddim(set_alpha_to_one=True)
    sched.set_timesteps(50)
    raw = deqkern.Schedule.ddim(sched.alphas_cumprod, sched.timesteps, eta=0.3)
    ours = deqkern.Schedule.from_diffusers(sched, 50, eta=0.3)
    # leading spacing: the next listed timestep is exactly t - T // S
    for name in ("cx", "co", "sigma"):
        assert torch.allclose(getattr(raw, name), getattr(ours, name), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: deqkern.Schedule.from_diffusers(_ddpm(variance_type="learned_range"), 10), "variance_type"),
        (lambda: deqkern.Schedule.from_diffusers(_ddpm(variance_type="fixed_large_log"), 10), "variance_type"),
        (lambda: deqkern.Schedule.from_diffusers(dict(_class_name="PNDMScheduler"), 10), "PNDMScheduler"),
        (lambda: deqkern.Schedule.from_diffusers(_ddpm(), 10, eta=0.5), "eta"),
        (lambda: deqkern.Schedule.from_diffusers(_ddim(), 0), "num_inference_steps"),
        (lambda: deqkern.Schedule.from_diffusers(_ddim(clip_sample=True), 10, form="scan"), "form='scan'"),
        (lambda: deqkern.Schedule.ddim(_ddim().alphas_cumprod, [10, 500, 900]), "descending"),
        (lambda: deqkern.Schedule.ddim(_ddim().alphas_cumprod, torch.tensor([], dtype=torch.int64)), "S >= 1"),
        (lambda: deqkern.Schedule.ddim(_ddim().alphas_cumprod, [900, 500], eta=-1.0), "eta"),
        (lambda: deqkern.Schedule.ddim(_ddim().alphas_cumprod, [900.0, 500.0]), "integer"),
    ],
)
def test_schedule_bad_input(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_unsupported_option_is_named():
    with pytest.raises(deqkern.UnsupportedSchedulerOption, match="learned"):
        deqkern.Schedule.from_diffusers(_ddpm(variance_type="learned"), 10)
