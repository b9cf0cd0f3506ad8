"""``DiTPipeline``: a class-conditional ``DiTTransformer2DModel`` on latents.

Its loop (diffusers 0.42) differs from the text pipelines in three ways that the chain reproduces:
guidance conditions on the null class 1000 and guides the first ``in_channels`` output channels
(the learned-variance half is then sliced off); the latents are not scaled by
``init_noise_sigma``, and ``scheduler.step`` is applied to the *scaled* model input
``scale_model_input(x, t)`` (Euler: ``x / sqrt(sigma^2 + 1)``); and ``step`` gets no generator,
so a stochastic step draws from torch's global RNG, for the doubled guidance batch of which the
loop keeps the first half.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from deqkern.model import Guidance
from deqkern.pipelines.core import Denoise, PipelineAdapter, register_adapter
from deqkern.pipelines.transformer import TransformerDenoiser, learned_variance_channels
from deqkern.schedule import Schedule

#: the class label DiT's guidance conditions the unconditional half on (ImageNet's 1000 classes + 1)
NULL_CLASS = 1000


def stepped_on_scaled_input(schedule: Schedule) -> Schedule:
    """The chain of a loop that steps the scaled input: ``x[k+1] = cx (c_k x[k]) + co out``, with
    the x0 prediction also from ``c_k x[k]``, ``c_k`` the model-input scale; so ``cx``, ``px``
    and the scan multiplier ``A_k`` take the factor ``c_k`` (DDIM/DDPM: ``c_k = 1``, unchanged)."""
    inputs = schedule.step_inputs
    if inputs is None or inputs.scale is None:
        return schedule
    c = inputs.scale
    return replace(schedule, cx=schedule.cx * c, px=schedule.px * c, a_coef=schedule.a_coef * c)


class DiTAdapter(PipelineAdapter):
    """``DiTPipeline(class_labels, guidance_scale, generator, num_inference_steps, output_type,
    return_dict)``; ``class_labels`` may be passed positionally, as to the pipeline."""

    pipelines = ("DiTPipeline",)
    honoured = frozenset({"class_labels", "guidance_scale", "generator", "num_inference_steps", "output_type",
                          "return_dict"})
    positional = ("class_labels",)

    def prepare(self, pipe: Any, call: dict[str, Any]) -> Denoise:
        from diffusers.utils.torch_utils import randn_tensor

        labels, tr, device = call["class_labels"], pipe.transformer, pipe._execution_device
        if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__") or len(labels) == 0:
            raise ValueError(f"class_labels: expected a non-empty list of class ids, got {labels!r}")
        batch, c, size = len(labels), tr.config.in_channels, tr.config.sample_size
        latents = randn_tensor((batch, c, size, size), generator=call["generator"], device=device, dtype=tr.dtype)
        labels = torch.tensor(labels, device=device).reshape(-1)
        guide = call["guidance_scale"] > 1
        guidance = None
        if guide:
            guidance = Guidance(call["guidance_scale"], {"class_labels": labels},
                                {"class_labels": torch.full_like(labels, NULL_CLASS)})
        return Denoise(
            model=TransformerDenoiser(tr, learned_variance_channels(tr)), latents=latents,
            num_inference_steps=call["num_inference_steps"], generator=None,
            model_kwargs={} if guide else {"class_labels": labels}, guidance=guidance,
            noise_batch=2 * batch if guide else None, adjust_schedule=stepped_on_scaled_input,
        )

    def decode(self, pipe: Any, x0: torch.Tensor, call: dict[str, Any], denoise: Denoise) -> Any:
        from diffusers import ImagePipelineOutput

        image = (pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        if call["output_type"] != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if call["output_type"] == "pil":
                image = pipe.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if call["return_dict"] else (image,)


register_adapter(DiTAdapter())
