"""Drop-in parallel sampling for diffusers' unconditional ``DDIMPipeline`` / ``DDPMPipeline``.

``sample_pipeline(pipe, batch_size, num_inference_steps, generator=g)`` draws x_T and every
step's noise from ``g`` in exactly the order the pipeline's own loop does, then solves the chain
in parallel: with the same generator seed it returns the pipeline's images (to the solver
tolerance) in far fewer rounds of model calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from deqkern.sampling import SampleResult, sample
from deqkern.schedule import Schedule


@dataclass
class PipelineResult:
    """``images`` as the pipeline returns them (``output_type``), plus the solve's statistics."""

    images: Any
    result: SampleResult


def sample_pipeline(
    pipe: Any,
    batch_size: int = 1,
    num_inference_steps: int = 50,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    output_type: Literal["np", "pt", "pil"] = "np",
    **sample_kwargs: Any,
) -> PipelineResult:
    """Run ``pipe`` (a diffusers ``DDIMPipeline`` or ``DDPMPipeline``) with :func:`deqkern.sample`.

    ``eta`` is DDIM's (a DDPM pipeline refuses it). ``sample_kwargs`` go to :func:`deqkern.sample`
    (solver, tol, window, ...).
    """
    from diffusers.utils.torch_utils import randn_tensor

    kind = type(pipe).__name__
    if kind not in ("DDIMPipeline", "DDPMPipeline"):
        raise TypeError(f"pipe: expected a diffusers DDIMPipeline or DDPMPipeline, got {kind}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if output_type not in ("np", "pt", "pil"):
        raise ValueError(f"output_type: expected 'np', 'pt' or 'pil', got {output_type!r}")
    unet = pipe.unet
    size = unet.config.sample_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    shape = (batch_size, unet.config.in_channels, *hw)
    ddim = kind == "DDIMPipeline"
    if not ddim and eta != 0.0:
        raise ValueError("eta: applies to DDIMPipeline only; DDPMPipeline's noise is set by its variance_type")
    schedule = Schedule.from_diffusers(pipe.scheduler, num_inference_steps, eta=eta if ddim else None)
    draw = lambda: randn_tensor(shape, generator=generator, device=unet.device, dtype=unet.dtype)  # noqa: E731
    # Same draws in the same order as the pipeline: x_T, then one per step that adds noise
    # (DDIM: every step when eta > 0; DDPM: every step whose timestep is > 0).
    x_T = draw()
    noise = None
    if schedule.is_stochastic:
        noise = torch.stack([draw() if (ddim or int(t) > 0) else torch.zeros_like(x_T) for t in schedule.timesteps])
    with torch.no_grad():
        res = sample(unet, x_T, schedule, noise=noise, **sample_kwargs)
    images = (res.x0 / 2 + 0.5).clamp(0, 1)
    if output_type != "pt":
        images = images.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            images = pipe.numpy_to_pil(images)
    return PipelineResult(images=images, result=res)
