"""Drop-in transformer pipelines: ``sample_pipeline(pipe, **kw)`` returns what ``pipe(**kw)`` returns
for DiT, PixArt-alpha/sigma, Stable Diffusion 3 and Flux.

Oracle: diffusers' own pipeline, called with the same arguments and a generator of the same seed
(tiny random-weight pipelines from ``tiny_pipes2``, float32, 4x8x8 latents, 8x8 images); where the
pipeline's step draws its noise from torch's global RNG (DiT, SD3 ``stochastic_sampling``) that RNG
is seeded alike before both calls. The solve runs to ``tol=1e-6`` (x0's relative error against the
sequential chain); the decoded images (``output_type="np"``, in [0, 1]) then agree to
``IMAGE_TOL = 1e-4`` absolute: float32 rounding of the model (~1e-6 relative; the guided batch is
ordered differently from DiT's and made in one call instead of Flux's two) and the tolerance,
through a VAE of gain ~1.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tiny_pipes2

import deqkern

TOL = 1e-6
IMAGE_TOL = 1e-4
STEPS = 6


def _both(pipe, *args, solve=None, **kw):
    """``(pipe(*args, **kw), sample_pipeline(pipe, *args, **kw, **solve))`` from generators of the
    same seed, torch's global RNG seeded alike before each."""
    torch.manual_seed(11)
    ref = pipe(*args, **kw, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(11)
    ours = deqkern.sample_pipeline(pipe, *args, **kw, generator=torch.Generator().manual_seed(5),
                                   **{"tol": TOL, **(solve or {})})
    return ref, ours


def _assert_same(ref, ours):
    assert type(ours) is type(ref)
    assert ours.deqkern.all_converged
    assert ours.images.shape == ref.images.shape
    assert np.abs(ours.images - ref.images).max() < IMAGE_TOL


def _scheduler(name, **config):
    import diffusers

    return getattr(diffusers, name)(**config)


DDPM_FAMILY = [("DDIMScheduler", {"clip_sample": False}), ("DDPMScheduler", {}), ("EulerDiscreteScheduler", {}),
               ("EulerAncestralDiscreteScheduler", {})]


def _count_calls(module):
    """A list that grows by one per forward call of ``module``."""
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("name,config", DDPM_FAMILY)
def test_dit_matches_pipeline(name, config):
    pipe = tiny_pipes2.tiny_dit(_scheduler(name, **config))
    calls = _count_calls(pipe.transformer)
    ref, ours = _both(pipe, [3, 977], guidance_scale=4.0, num_inference_steps=STEPS, output_type="np")
    _assert_same(ref, ours)
    # guided: one transformer call of 2 x rows per round, not two
    assert len(calls) == STEPS + ours.deqkern.rounds


@pytest.mark.parametrize("learned_sigma", [True, False])
def test_dit_unguided_matches_pipeline(learned_sigma):
    pipe = tiny_pipes2.tiny_dit(learned_sigma=learned_sigma)
    ref, ours = _both(pipe, class_labels=[7], guidance_scale=1.0, num_inference_steps=STEPS, output_type="np")
    _assert_same(ref, ours)


def test_dit_default_output_is_pil_and_tuple():
    pipe = tiny_pipes2.tiny_dit()
    ref, ours = _both(pipe, [1, 2], num_inference_steps=3, return_dict=False)
    assert isinstance(ours, tuple) and len(ours) == len(ref) == 1
    assert [type(im) for im in ours[0]] == [type(im) for im in ref[0]]
    assert all(np.abs(np.asarray(a, float) - np.asarray(b, float)).max() <= 1 for a, b in zip(ours[0], ref[0]))


def _pixart_kw(**extra):
    return dict(prompt=["a photo of a cat", "a red dog"], negative_prompt="blurry", guidance_scale=4.5,
                num_inference_steps=STEPS, output_type="np", use_resolution_binning=False, max_sequence_length=8,
                clean_caption=False, **extra)


@pytest.mark.parametrize("name,config,eta", [(n, c, 0.0) for n, c in DDPM_FAMILY] + [("DDIMScheduler", {}, 0.7)])
def test_pixart_matches_pipeline(name, config, eta):
    pipe = tiny_pipes2.tiny_pixart(_scheduler(name, **config))
    ref, ours = _both(pipe, **_pixart_kw(eta=eta))
    _assert_same(ref, ours)


def test_pixart_sigma_unguided_matches_pipeline():
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline(**tiny_pipes2.tiny_pixart().components)
    pipe.set_progress_bar_config(disable=True)
    ref, ours = _both(pipe, **{**_pixart_kw(), "guidance_scale": 1.0, "num_images_per_prompt": 2})
    _assert_same(ref, ours)
    assert ours.images.shape[0] == 4


def test_pixart_micro_conditions_match_pipeline():
    # sample size 128: PixArt-alpha conditions on the resolution and aspect ratio (added_cond_kwargs)
    pipe = tiny_pipes2.tiny_pixart(sample_size=128, patch_size=8)
    assert pipe.transformer.use_additional_conditions
    ref, ours = _both(pipe, **{**_pixart_kw(), "num_inference_steps": 3})
    _assert_same(ref, ours)


def test_pixart_resolution_binning_matches_pipeline():
    # a 40 x 24 request is made at the nearest binned size (256 x 256) and resized and cropped back
    pipe = tiny_pipes2.tiny_pixart(sample_size=32, patch_size=8)
    ref, ours = _both(pipe, **{**_pixart_kw(), "num_inference_steps": 3, "use_resolution_binning": True,
                               "height": 40, "width": 24})
    _assert_same(ref, ours)
    assert ours.images.shape == (2, 40, 24, 3)


def _sd3_kw(**extra):
    return dict(prompt=["a photo of a cat", "a red dog"], negative_prompt="blurry", guidance_scale=5.0,
                num_inference_steps=STEPS, output_type="np", max_sequence_length=8, **extra)


@pytest.mark.parametrize("config", [{"shift": 3.0}, {"shift": 3.0, "stochastic_sampling": True},
                                    {"use_dynamic_shifting": True}])
def test_sd3_matches_pipeline(config):
    pipe = tiny_pipes2.tiny_sd3(_scheduler("FlowMatchEulerDiscreteScheduler", **config))
    calls = _count_calls(pipe.transformer)
    ref, ours = _both(pipe, **_sd3_kw())
    _assert_same(ref, ours)
    assert len(calls) == STEPS + ours.deqkern.rounds


def test_sd3_given_latents_and_embeddings_match_pipeline():
    pipe = tiny_pipes2.tiny_sd3()
    pe, npe, pooled, npooled = pipe.encode_prompt("a cat", None, None, negative_prompt="dog", max_sequence_length=8)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=pooled,
              negative_pooled_prompt_embeds=npooled, latents=latents,
              num_inference_steps=STEPS, output_type="np")
    ref, ours = _both(pipe, **kw)
    _assert_same(ref, ours)


def _recorder(stop_at=None):
    """A ``callback_on_step_end`` that records each step's latents and interrupts after ``stop_at``."""
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, float(t), tensors["latents"].clone(), tensors["prompt_embeds"].shape))
        if i == stop_at:
            pipe._interrupt = True
        return {}
    return seen, callback


@pytest.mark.parametrize("stop_at", [None, 2])
def test_sd3_and_flux_step_callbacks_see_the_pipelines_latents(stop_at):
    for pipe, kw in [(tiny_pipes2.tiny_sd3(), _sd3_kw()),
                     (tiny_pipes2.tiny_flux(), dict(prompt="a cat", num_inference_steps=STEPS, height=8, width=8,
                                                    output_type="np", max_sequence_length=8))]:
        (seen_ref, cb_ref), (seen, cb) = _recorder(stop_at), _recorder(stop_at)
        torch.manual_seed(11)
        ref = pipe(**kw, generator=torch.Generator().manual_seed(5), callback_on_step_end=cb_ref,
                   callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
        ours = deqkern.sample_pipeline(pipe, **kw, generator=torch.Generator().manual_seed(5), tol=TOL,
                                       callback_on_step_end=cb,
                                       callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
        _assert_same(ref, ours)
        assert [s[:2] for s in seen] == [s[:2] for s in seen_ref] and [s[3] for s in seen] == [s[3] for s in seen_ref]
        for (*_, x, _), (*_, x_ref, _) in zip(seen, seen_ref):
            assert (x - x_ref).abs().max() < 1e-4 * x_ref.abs().max()


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
def test_denoisers_replay_safely(family):
    # the CPU audit of a CUDA graph's replay (no host syncs, the same ops every call) on the guided denoisers
    pipe, kw = {
        "dit": (tiny_pipes2.tiny_dit(), dict(class_labels=[1, 2])),
        "pixart": (tiny_pipes2.tiny_pixart(), _pixart_kw()),
        "sd3": (tiny_pipes2.tiny_sd3(), _sd3_kw()),
        "flux": (tiny_pipes2.tiny_flux(), dict(prompt="a cat", negative_prompt="dog", true_cfg_scale=2.0, height=8,
                                               width=8, max_sequence_length=8)),
    }[family]
    ref, ours = _both(pipe, **{"num_inference_steps": 4, "output_type": "np", **kw}, solve={"execution": "audit"})
    _assert_same(ref, ours)


def test_sd3_unguided_with_sigmas_matches_pipeline():
    pipe = tiny_pipes2.tiny_sd3()
    ref, ours = _both(pipe, **{**_sd3_kw(), "guidance_scale": 1.0, "sigmas": [1.0, 0.8, 0.5, 0.3, 0.1]})
    _assert_same(ref, ours)


@pytest.mark.parametrize("true_cfg_scale,stochastic", [(1.0, False), (3.0, False), (3.0, True)])
def test_flux_matches_pipeline(true_cfg_scale, stochastic):
    pipe = tiny_pipes2.tiny_flux(_scheduler("FlowMatchEulerDiscreteScheduler", use_dynamic_shifting=True,
                                            stochastic_sampling=stochastic))
    calls = _count_calls(pipe.transformer)
    ref, ours = _both(pipe, prompt=["a photo of a cat", "a red dog"], negative_prompt="blurry",
                      true_cfg_scale=true_cfg_scale, guidance_scale=3.5, num_inference_steps=STEPS, height=8, width=8,
                      output_type="np", max_sequence_length=8)
    _assert_same(ref, ours)
    # the pipeline makes two calls per step under true CFG, deqkern one of 2 x rows per round
    assert len(calls) == (2 if true_cfg_scale > 1 else 1) * STEPS + ours.deqkern.rounds


def test_unsupported_options_are_named():
    dit = tiny_pipes2.tiny_dit(_scheduler("UniPCMultistepScheduler"))
    with pytest.raises(deqkern.UnsupportedSchedulerOption, match="UniPCMultistepScheduler"):
        deqkern.sample_pipeline(dit, [1], num_inference_steps=3)
    with pytest.raises(ValueError, match="class_labels"):
        deqkern.sample_pipeline(tiny_pipes2.tiny_dit(), [], num_inference_steps=3)
    pixart = tiny_pipes2.tiny_pixart()
    with pytest.raises(ValueError, match="callback_steps"):
        deqkern.sample_pipeline(pixart, **_pixart_kw(callback_steps=2))
    with pytest.raises(ValueError, match="num_inference_steps.*2 steps or more"):
        deqkern.sample_pipeline(pixart, **{**_pixart_kw(), "num_inference_steps": 1})
    with pytest.raises(ValueError, match="skip_guidance_layers"):
        deqkern.sample_pipeline(tiny_pipes2.tiny_sd3(), **_sd3_kw(skip_guidance_layers=[0]))
    with pytest.raises(ValueError, match="ip_adapter_image_embeds"):
        deqkern.sample_pipeline(tiny_pipes2.tiny_flux(), prompt="a cat", ip_adapter_image_embeds=[torch.zeros(1, 4)])
