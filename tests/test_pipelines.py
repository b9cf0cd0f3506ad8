"""``sample_pipeline`` returns what diffusers' own pipeline returns for the same generator seed
(float32 tiny UNet; bound: max abs pixel difference 1e-4 at solver tol 1e-6)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_unet

import deqkern
from deqkern.pipelines import sample_pipeline


@pytest.mark.parametrize("kind,eta", [("ddim", 0.0), ("ddim", 0.6), ("ddpm", None)])
def test_matches_diffusers_pipeline(kind, eta):
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, ImagePipelineOutput

    unet = tiny_unet(seed=1)
    if kind == "ddim":
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
        kw = dict(eta=eta)
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
        kw = {}
    pipe.set_progress_bar_config(disable=True)
    steps = 12
    gen = torch.Generator().manual_seed(7)
    ref = pipe(batch_size=2, num_inference_steps=steps, generator=gen, output_type="np", **kw).images
    # deqkern's positional (batch_size, num_inference_steps), kept from before the registry
    ours = sample_pipeline(pipe, 2, steps, generator=torch.Generator().manual_seed(7), tol=1e-6, output_type="np",
                           **kw)
    assert isinstance(ours, ImagePipelineOutput)
    assert ours.deqkern.all_converged and ours.deqkern.rounds <= steps
    assert ours.images.shape == ref.shape
    assert np.abs(ours.images - ref).max() < 1e-4


def test_bad_pipeline_arguments():
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    ddpm = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000))
    with pytest.raises(TypeError, match="eta"):  # DDPMPipeline has no eta
        sample_pipeline(ddpm, 1, 5, eta=0.5)
    with pytest.raises(TypeError, match="pipe"):
        sample_pipeline(object(), 1, 5)
    ddim = DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(num_train_timesteps=1000))
    with pytest.raises(ValueError, match="batch_size"):
        sample_pipeline(ddim, 0, 5)
    with pytest.raises(deqkern.UnsupportedSchedulerOption):
        sample_pipeline(DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(variance_type="learned")), 1, 5)
