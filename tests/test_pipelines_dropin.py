"""Drop-in pipelines: ``sample_pipeline(pipe, **kw)`` returns what ``pipe(**kw)`` returns.

Oracle: diffusers' own pipeline, called with the same arguments and a generator of the same seed
(tiny random-weight pipelines from ``tiny_pipes``, float32, 32x32 images, 4x8x8 latents). The
solve runs to ``tol=1e-6`` (x0's relative error against the sequential chain); the decoded
images (``output_type="np"``, in [0, 1]) then agree to ``IMAGE_TOL = 1e-4`` absolute: float32
rounding of the model (~1e-6 relative) and the tolerance, through a VAE of gain ~1.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tiny_pipes

import deqkern

TOL = 1e-6
IMAGE_TOL = 1e-4
STEPS = 6


def _kw(**extra):
    """A guided call with a prompt per sample and a negative prompt, seeded."""
    return dict(prompt=["a cat", "a hat"], negative_prompt=["dog", "cow"], num_inference_steps=STEPS,
                guidance_scale=4.0, output_type="np", **extra)


def _both(pipe, **kw):
    """``(pipe(**kw), sample_pipeline(pipe, **kw))`` from generators of the same seed."""
    ref = pipe(**kw, generator=torch.Generator().manual_seed(5))
    ours = deqkern.sample_pipeline(pipe, **kw, generator=torch.Generator().manual_seed(5), tol=TOL)
    return ref, ours


def _assert_same(ref, ours):
    assert type(ours) is type(ref)
    assert ours.deqkern.all_converged
    assert ours.images.shape == ref.images.shape
    assert np.abs(ours.images - ref.images).max() < IMAGE_TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sd_ddim_matches_pipeline(tmp_path, prediction_type):
    pipe = tiny_pipes.sd_pipeline(tmp_path, prediction_type=prediction_type)
    ref, ours = _both(pipe, **_kw(guidance_rescale=0.5))
    _assert_same(ref, ours)
    # one model call of 2 x B x S rows per round under guidance (nothing frozen in round 1)
    assert ours.deqkern.model_evals >= 2 * 2 * STEPS


def test_sdxl_matches_pipeline(tmp_path):
    pipe = tiny_pipes.sdxl_pipeline(tmp_path)
    ref, ours = _both(pipe, **_kw(negative_original_size=(16, 16), negative_target_size=(32, 32)))
    _assert_same(ref, ours)


def test_unsupported_pipeline_names_class_and_supported(tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    sd = tiny_pipes.sd_pipeline(tmp_path)
    pipe = StableDiffusionImg2ImgPipeline(**sd.components)
    with pytest.raises(TypeError, match="StableDiffusionImg2ImgPipeline.*StableDiffusionPipeline"):
        deqkern.sample_pipeline(pipe, prompt="a cat")
