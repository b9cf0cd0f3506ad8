"""``PixArtAlphaPipeline`` and ``PixArtSigmaPipeline``: a ``PixArtTransformer2DModel`` conditioned
on T5 embeddings and their attention mask, called with the timestep by keyword.

As their loops do: guidance ``u + s (c - u)`` on all output channels, then the learned-variance half
sliced; ``added_cond_kwargs`` carries PixArt-alpha's resolution and aspect ratio at sample size 128
(None otherwise); with ``use_resolution_binning`` the latents are made at the nearest binned size
and the decoded image is resized and cropped back. The step gets the call's generator and ``eta``
(where it takes them), as in Stable Diffusion.
"""
from __future__ import annotations

from typing import Any

import torch

from deqkern.model import Guidance
from deqkern.pipelines.core import Denoise, PipelineAdapter, register_adapter, step_accepts
from deqkern.pipelines.transformer import TransformerDenoiser, learned_variance_channels


def _aspect_ratio_bins(pipe: Any) -> dict:
    """The pipeline's table of binned sizes for its transformer's sample size (the pipelines know
    these sizes only, and raise the same error otherwise)."""
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha, pipeline_pixart_sigma as sigma

    bins = {128: alpha.ASPECT_RATIO_1024_BIN, 64: alpha.ASPECT_RATIO_512_BIN, 32: alpha.ASPECT_RATIO_256_BIN}
    if type(pipe).__name__ == "PixArtSigmaPipeline":
        bins[256] = sigma.ASPECT_RATIO_2048_BIN
    size = pipe.transformer.config.sample_size
    if size not in bins:
        raise ValueError("Invalid sample size")
    return bins[size]


def _micro_conditions(pipe: Any, h: int, w: int, batch: int, dtype: torch.dtype, device: Any) -> dict[str, Any]:
    """``added_cond_kwargs``: PixArt-alpha at sample size 128 conditions on ``[h, w]`` and ``h / w``."""
    if type(pipe).__name__ != "PixArtAlphaPipeline" or pipe.transformer.config.sample_size != 128:
        return {"resolution": None, "aspect_ratio": None}
    resolution = torch.tensor([h, w]).repeat(batch, 1).to(dtype=dtype, device=device)
    aspect_ratio = torch.tensor([float(h / w)]).repeat(batch, 1).to(dtype=dtype, device=device)
    return {"resolution": resolution, "aspect_ratio": aspect_ratio}


class PixArtAdapter(PipelineAdapter):
    """Every argument of the PixArt pipelines but the legacy ``callback``/``callback_steps``."""

    pipelines = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    honoured = frozenset({
        "prompt", "negative_prompt", "num_inference_steps", "timesteps", "sigmas", "guidance_scale",
        "num_images_per_prompt", "height", "width", "eta", "generator", "latents", "prompt_embeds",
        "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask", "output_type",
        "return_dict", "clean_caption", "use_resolution_binning", "max_sequence_length",
    })

    def prepare(self, pipe: Any, call: dict[str, Any]) -> Denoise:
        from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import retrieve_timesteps
        from diffusers.utils.torch_utils import maybe_adjust_dtype_for_device

        tr, device = pipe.transformer, pipe._execution_device
        h = call["height"] or tr.config.sample_size * pipe.vae_scale_factor
        w = call["width"] or tr.config.sample_size * pipe.vae_scale_factor
        size = (h, w)
        if call["use_resolution_binning"]:
            h, w = pipe.image_processor.classify_height_width_bin(h, w, ratios=_aspect_ratio_bins(pipe))
        pipe.check_inputs(call["prompt"], h, w, call["negative_prompt"], 1, call["prompt_embeds"],
                          call["negative_prompt_embeds"], call["prompt_attention_mask"],
                          call["negative_prompt_attention_mask"])
        guide = call["guidance_scale"] > 1.0
        pe, pm, npe, npm = pipe.encode_prompt(
            call["prompt"], guide, negative_prompt=call["negative_prompt"],
            num_images_per_prompt=call["num_images_per_prompt"], device=device, prompt_embeds=call["prompt_embeds"],
            negative_prompt_embeds=call["negative_prompt_embeds"], prompt_attention_mask=call["prompt_attention_mask"],
            negative_prompt_attention_mask=call["negative_prompt_attention_mask"], clean_caption=call["clean_caption"],
            max_sequence_length=call["max_sequence_length"],
        )
        adjust = lambda m: m.to(maybe_adjust_dtype_for_device(m.dtype, m.device))  # noqa: E731  (as the loop does)
        _, steps = retrieve_timesteps(pipe.scheduler, call["num_inference_steps"], device, call["timesteps"],
                                      call["sigmas"])
        if steps == 1 and type(pipe).__name__ == "PixArtAlphaPipeline":
            raise ValueError("num_inference_steps: PixArtAlphaPipeline returns the one step's predicted x0, not its "
                             "latents, at 1 step; deqkern.sample_pipeline reproduces 2 steps or more")
        batch = pe.shape[0]
        latents = pipe.prepare_latents(batch, tr.config.in_channels, h, w, pe.dtype, device, call["generator"],
                                       call["latents"])
        shared = {"added_cond_kwargs": _micro_conditions(pipe, h, w, batch, pe.dtype, device)}
        cond = {"encoder_hidden_states": pe, "encoder_attention_mask": adjust(pm)}
        guidance = None
        if guide:
            guidance = Guidance(call["guidance_scale"], cond,
                                {"encoder_hidden_states": npe, "encoder_attention_mask": adjust(npm)})
        else:
            shared.update(cond)
        options = {k: call[k] for k in ("timesteps", "sigmas") if call[k] is not None}
        if step_accepts(pipe, "eta"):
            options["eta"] = call["eta"]
        return Denoise(model=TransformerDenoiser(tr, learned_variance_channels(tr)), latents=latents,
                       num_inference_steps=steps, generator=call["generator"], model_kwargs=shared,
                       guidance=guidance, schedule_kwargs=options, state={"size": size})

    def decode(self, pipe: Any, x0: torch.Tensor, call: dict[str, Any], denoise: Denoise) -> Any:
        from diffusers import ImagePipelineOutput

        image = x0
        if call["output_type"] != "latent":
            if type(pipe).__name__ == "PixArtSigmaPipeline":
                x0 = x0.to(pipe.vae.dtype)
            image = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor, return_dict=False)[0]
            if call["use_resolution_binning"]:
                h, w = denoise.state["size"]
                image = pipe.image_processor.resize_and_crop_tensor(image, w, h)
            image = pipe.image_processor.postprocess(image, output_type=call["output_type"])
        return ImagePipelineOutput(images=image) if call["return_dict"] else (image,)


register_adapter(PixArtAdapter())
