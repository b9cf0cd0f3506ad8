"""diffusers' unconditional ``DDIMPipeline`` and ``DDPMPipeline``: ``unet(x, t)`` on pixels."""
from __future__ import annotations

from typing import Any

import torch

from deqkern.pipelines.core import Denoise, PipelineAdapter, register_adapter


class UnconditionalAdapter(PipelineAdapter):
    """``DDIMPipeline`` (``eta``, ``use_clipped_model_output``) and ``DDPMPipeline``. Positionally
    ``sample_pipeline(pipe, batch_size, num_inference_steps)``, deqkern's signature before the
    registry (the pipelines' own order puts ``generator`` second)."""

    pipelines = ("DDIMPipeline", "DDPMPipeline")
    honoured = frozenset({"batch_size", "generator", "eta", "num_inference_steps", "use_clipped_model_output",
                          "output_type", "return_dict"})
    positional = ("batch_size", "num_inference_steps")

    def prepare(self, pipe: Any, call: dict[str, Any]) -> Denoise:
        from diffusers.utils.torch_utils import randn_tensor

        batch, unet = call["batch_size"], pipe.unet
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch!r}")
        size = unet.config.sample_size
        shape = (batch, unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
        if isinstance(call["generator"], list) and len(call["generator"]) != batch:
            raise ValueError(f"generator: a list of {len(call['generator'])} generators for batch_size {batch}")
        x_T = randn_tensor(shape, generator=call["generator"], device=pipe._execution_device, dtype=unet.dtype)
        options = {}
        if "eta" in call:  # DDIMPipeline's step options
            options = {"eta": call["eta"], "use_clipped_model_output": bool(call["use_clipped_model_output"])}
        return Denoise(model=unet, latents=x_T, num_inference_steps=call["num_inference_steps"],
                       generator=call["generator"], schedule_kwargs=options)

    def decode(self, pipe: Any, x0: torch.Tensor, call: dict[str, Any], denoise: Denoise) -> Any:
        from diffusers import ImagePipelineOutput

        image = (x0 / 2 + 0.5).clamp(0, 1)
        if call["output_type"] != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if call["output_type"] == "pil":
                image = pipe.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if call["return_dict"] else (image,)


register_adapter(UnconditionalAdapter())
