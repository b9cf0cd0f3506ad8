"""Drop-in pipelines with ``DPMSolverMultistepScheduler``: ``sample_pipeline(pipe, **kw)`` returns what
``pipe(**kw)`` returns for Stable Diffusion, SDXL, DiT and PixArt, deterministic DPM-Solver(++) and the
SDE variants.

Oracle: diffusers' own pipeline, called with the same arguments and a generator of the same seed
(tiny random-weight pipelines from ``tiny_pipes``/``tiny_pipes2``, float32, 4x8x8 latents); DiT's step
draws its SDE noise from torch's global RNG, seeded alike before both calls. The SDE variants draw one
float32 ``randn`` of the model output's shape per step from the step's generator (diffusers'
``DPMSolverMultistepScheduler.step``); ``sample_pipeline`` draws the same tensors in the same order up
front, so the generator ends in the same state. The solve runs to ``tol=1e-6`` (x0's relative error
against the sequential chain); the decoded images (``output_type="np"``, in [0, 1]) then agree to
``IMAGE_TOL = 1e-4`` absolute: float32 rounding of the model and of diffusers' float32 step (~1e-6),
and the tolerance, through a VAE of gain ~1.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tiny_pipes
import tiny_pipes2

import deqkern

TOL = 1e-6
IMAGE_TOL = 1e-4
STEPS = 6

#: SD's betas; the options on top, each a chain the tests below run end to end
SD_BETAS = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                steps_offset=1)
#: (id, DPMSolverMultistepScheduler options): the default 2M, its variants, and the SDE variants
#: (diffusers refuses a final sigma 0 for "dpmsolver" and "sde-dpmsolver")
CONFIGS = [
    ("2m", {}),
    # a second-order last step (Karras sigmas would repeat sigma_min there: diffusers' Heun step is 0/0)
    ("2m-heun-second-order-final", dict(solver_type="heun", lower_order_final=False, final_sigmas_type="sigma_min")),
    ("dpmsolver-order1", dict(algorithm_type="dpmsolver", solver_order=1, final_sigmas_type="sigma_min")),
    ("sde-2m", dict(algorithm_type="sde-dpmsolver++")),
    ("sde-dpmsolver-sigma-min", dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min")),
]


def _dpm(**options):
    import diffusers

    return diffusers.DPMSolverMultistepScheduler(**{**SD_BETAS, **options})


def _both(pipe, *args, **kw):
    """``(pipe(**kw), sample_pipeline(pipe, **kw), after)`` from generators of the same seed, torch's
    global RNG seeded alike before each; ``after``: each call's next draws from its generator and
    from the global RNG."""
    gens = [torch.Generator().manual_seed(5) for _ in range(2)]
    torch.manual_seed(11)
    ref = pipe(*args, **kw, generator=gens[0])
    ref_global = torch.randn(4)
    torch.manual_seed(11)
    ours = deqkern.sample_pipeline(pipe, *args, **kw, generator=gens[1], tol=TOL)
    ours_global = torch.randn(4)
    return ref, ours, [torch.cat([torch.randn(4, generator=g), r]) for g, r in zip(gens, (ref_global, ours_global))]


def _assert_same(ref, ours, after):
    assert type(ours) is type(ref)
    assert ours.deqkern.all_converged
    assert ours.images.shape == ref.images.shape
    assert np.abs(ours.images - ref.images).max() < IMAGE_TOL
    # the same draws from the generator(s) and the global RNG, no more, no fewer
    assert torch.equal(*after)


def _sd_kw(**extra):
    return {**dict(prompt=["a cat", "a hat"], negative_prompt=["dog", "cow"], num_inference_steps=STEPS,
                   guidance_scale=4.0, output_type="np"), **extra}


@pytest.mark.parametrize("options", [c for _, c in CONFIGS], ids=[i for i, _ in CONFIGS])
def test_sd_matches_pipeline(tmp_path, options):
    pipe = tiny_pipes.sd_pipeline(tmp_path, scheduler=_dpm(**options))
    _assert_same(*_both(pipe, **_sd_kw()))


@pytest.mark.parametrize("options", [{}, dict(algorithm_type="sde-dpmsolver++")], ids=["2m", "sde-2m"])
def test_sd_v_prediction_matches_pipeline(tmp_path, options):
    pipe = tiny_pipes.sd_pipeline(tmp_path, scheduler=_dpm(**options), prediction_type="v_prediction")
    _assert_same(*_both(pipe, **_sd_kw(guidance_rescale=0.5)))


def test_sd_sde_with_a_generator_per_sample(tmp_path):
    """A list of generators: each sample's latents and step noise come from its own generator."""
    pipe = tiny_pipes.sd_pipeline(tmp_path, scheduler=_dpm(algorithm_type="sde-dpmsolver++"))
    gens = [[torch.Generator().manual_seed(s) for s in (5, 6)] for _ in range(2)]
    ref = pipe(**_sd_kw(), generator=gens[0])
    ours = deqkern.sample_pipeline(pipe, **_sd_kw(), generator=gens[1], tol=TOL)
    after = [torch.stack([torch.randn(4, generator=g) for g in pair]) for pair in gens]
    _assert_same(ref, ours, after)


@pytest.mark.parametrize("options", [dict(use_karras_sigmas=True), dict(algorithm_type="sde-dpmsolver++")],
                         ids=["2m-karras", "sde-2m"])
def test_sdxl_matches_pipeline(tmp_path, options):
    pipe = tiny_pipes.sdxl_pipeline(tmp_path, scheduler=_dpm(**options))
    _assert_same(*_both(pipe, **_sd_kw()))


@pytest.mark.parametrize("options", [{}, dict(algorithm_type="sde-dpmsolver++")], ids=["2m", "sde-2m"])
def test_dit_matches_pipeline(options):
    """DiT's loop steps its doubled guidance batch with no generator: the SDE noise comes from
    torch's global RNG, drawn for 2 x batch rows of which the first half is kept. The scheduler
    is made from the pipeline's DDIM config, as diffusers' DiT example swaps it in."""
    import diffusers

    pipe = tiny_pipes2.tiny_dit()
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **options)
    ref, ours, after = _both(pipe, [3, 977], guidance_scale=4.0, num_inference_steps=STEPS, output_type="np")
    _assert_same(ref, ours, after)


@pytest.mark.parametrize("options", [{}, dict(algorithm_type="sde-dpmsolver++")], ids=["2m", "sde-2m"])
def test_pixart_matches_pipeline(options):
    """PixArt's own scheduler config: DPM-Solver++(2M), linear betas, ``lower_order_final``."""
    pipe = tiny_pipes2.tiny_pixart(_dpm(**{"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                                           "steps_offset": 0, **options}))
    kw = dict(prompt=["a photo of a cat", "a red dog"], negative_prompt="blurry", guidance_scale=4.5,
              num_inference_steps=STEPS, output_type="np", use_resolution_binning=False, max_sequence_length=8,
              clean_caption=False)
    _assert_same(*_both(pipe, **kw))


@pytest.mark.parametrize("options,named", [
    (dict(solver_order=3), "solver_order"),
    (dict(use_flow_sigmas=True, prediction_type="flow_prediction"), "use_flow_sigmas"),
])
def test_unreproduced_options_are_named(tmp_path, options, named):
    pipe = tiny_pipes.sd_pipeline(tmp_path, scheduler=_dpm(**options))
    with pytest.raises(deqkern.UnsupportedSchedulerOption, match=named):
        deqkern.sample_pipeline(pipe, **_sd_kw())
