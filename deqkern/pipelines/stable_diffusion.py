"""Stable Diffusion (1.x/2.x, epsilon or v-prediction) and SDXL: a ``UNet2DConditionModel``
called as ``unet(x, t, encoder_hidden_states=..., added_cond_kwargs=...)``, guided as the
pipelines guide (``u + s (c - u)``, then ``rescale_noise_cfg`` when ``guidance_rescale > 0``).
"""
from __future__ import annotations

from typing import Any

import torch

from deqkern.model import Guidance
from deqkern.pipelines.core import Denoise, PipelineAdapter, register_adapter, set_timesteps, step_accepts

#: the arguments both families reproduce
_COMMON = frozenset({
    "prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds", "height", "width",
    "num_inference_steps", "guidance_scale", "guidance_rescale", "num_images_per_prompt", "eta", "generator",
    "latents", "output_type", "return_dict", "cross_attention_kwargs", "clip_skip", "callback_on_step_end",
    "callback_on_step_end_tensor_inputs",
})


def _batch(call: dict[str, Any]) -> int:
    """Prompts per call, as the pipelines count them (a string: 1, a list: its length, else the embeddings')."""
    prompt = call["prompt"]
    if isinstance(prompt, str):
        return 1
    return len(prompt) if prompt is not None else call["prompt_embeds"].shape[0]


def _guides(pipe: Any, call: dict[str, Any]) -> bool:
    """The pipelines' ``do_classifier_free_guidance``; a UNet with a guidance embedding (LCM) is refused."""
    if pipe.unet.config.time_cond_proj_dim is not None:
        raise ValueError(f"pipe: {type(pipe).__name__} with a guidance-embedding UNet (time_cond_proj_dim) is not "
                         "reproduced by deqkern.sample_pipeline")
    return call["guidance_scale"] > 1


def _pipeline_state(pipe: Any, call: dict[str, Any], steps: int) -> None:
    """The attributes the pipeline's ``__call__`` sets, which its properties (and callbacks) read."""
    pipe._guidance_scale, pipe._guidance_rescale = call["guidance_scale"], call["guidance_rescale"]
    pipe._clip_skip, pipe._cross_attention_kwargs = call["clip_skip"], call["cross_attention_kwargs"]
    pipe._num_timesteps = steps


def _denoise(pipe: Any, call: dict[str, Any], cond: dict[str, Any], uncond: dict[str, Any] | None,
             latents_dtype: torch.dtype, device: Any, callback_tensors: dict[str, Any]) -> Denoise:
    """The shared half of ``prepare``: timesteps, latents, the guided UNet call and the schedule options."""
    steps = call["num_inference_steps"]
    set_timesteps(pipe, steps, device)
    batch = _batch(call) * call["num_images_per_prompt"]
    latents = pipe.prepare_latents(batch, pipe.unet.config.in_channels, call["height"], call["width"], latents_dtype,
                                   device, call["generator"], call["latents"])
    shared = {} if call["cross_attention_kwargs"] is None else {"cross_attention_kwargs": call["cross_attention_kwargs"]}
    guidance = None
    if uncond is not None:
        guidance = Guidance(call["guidance_scale"], cond, uncond, rescale=max(call["guidance_rescale"], 0.0))
    else:
        shared.update(cond)
    _pipeline_state(pipe, call, steps)
    return Denoise(
        model=pipe.unet, latents=latents, num_inference_steps=steps, generator=call["generator"],
        model_kwargs=shared, guidance=guidance,
        schedule_kwargs={"eta": call["eta"]} if step_accepts(pipe, "eta") else {},
        callback_tensors=callback_tensors, state={"device": device, "dtype": latents_dtype},
    )


class StableDiffusionAdapter(PipelineAdapter):
    """``StableDiffusionPipeline``: one CLIP text encoder; ``encoder_hidden_states`` conditioning."""

    pipelines = ("StableDiffusionPipeline",)
    honoured = _COMMON

    def prepare(self, pipe: Any, call: dict[str, Any]) -> Denoise:
        if not call["height"] or not call["width"]:
            size = pipe.unet.config.sample_size
            h, w = (size, size) if isinstance(size, int) else size
            call["height"], call["width"] = h * pipe.vae_scale_factor, w * pipe.vae_scale_factor
        pipe.check_inputs(
            call["prompt"], call["height"], call["width"], None, call["negative_prompt"], call["prompt_embeds"],
            call["negative_prompt_embeds"], callback_on_step_end_tensor_inputs=call["callback_on_step_end_tensor_inputs"],
        )
        guide, device = _guides(pipe, call), pipe._execution_device
        cak = call["cross_attention_kwargs"]
        pe, npe = pipe.encode_prompt(
            call["prompt"], device, call["num_images_per_prompt"], guide, call["negative_prompt"],
            prompt_embeds=call["prompt_embeds"], negative_prompt_embeds=call["negative_prompt_embeds"],
            lora_scale=None if cak is None else cak.get("scale"), clip_skip=call["clip_skip"],
        )
        tensors = {"prompt_embeds": torch.cat([npe, pe]) if guide else pe, "negative_prompt_embeds": npe}
        return _denoise(pipe, call, {"encoder_hidden_states": pe}, {"encoder_hidden_states": npe} if guide else None,
                        pe.dtype, device, tensors)

    def decode(self, pipe: Any, x0: torch.Tensor, call: dict[str, Any], denoise: Denoise) -> Any:
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

        output_type = call["output_type"]
        if output_type == "latent":
            image, nsfw = x0, None
        else:
            image = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor, return_dict=False,
                                    generator=call["generator"])[0]
            image, nsfw = pipe.run_safety_checker(image, denoise.state["device"], denoise.state["dtype"])
        denormalize = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        image = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
        if not call["return_dict"]:
            return (image, nsfw)
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=nsfw)


class StableDiffusionXLAdapter(PipelineAdapter):
    """``StableDiffusionXLPipeline``: two text encoders, and SDXL's added conditioning
    ``added_cond_kwargs = {text_embeds: pooled embeddings, time_ids: size and crop ids}``."""

    pipelines = ("StableDiffusionXLPipeline",)
    honoured = _COMMON | {
        "prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "original_size",
        "crops_coords_top_left", "target_size", "negative_original_size", "negative_crops_coords_top_left",
        "negative_target_size",
    }

    def prepare(self, pipe: Any, call: dict[str, Any]) -> Denoise:
        h = call["height"] = call["height"] or pipe.default_sample_size * pipe.vae_scale_factor
        w = call["width"] = call["width"] or pipe.default_sample_size * pipe.vae_scale_factor
        pipe.check_inputs(
            call["prompt"], call["prompt_2"], h, w, None, call["negative_prompt"], call["negative_prompt_2"],
            call["prompt_embeds"], call["negative_prompt_embeds"], call["pooled_prompt_embeds"],
            call["negative_pooled_prompt_embeds"], callback_on_step_end_tensor_inputs=call["callback_on_step_end_tensor_inputs"],
        )
        guide, device = _guides(pipe, call), pipe._execution_device
        cak = call["cross_attention_kwargs"]
        pe, npe, pooled, npooled = pipe.encode_prompt(
            prompt=call["prompt"], prompt_2=call["prompt_2"], device=device,
            num_images_per_prompt=call["num_images_per_prompt"], do_classifier_free_guidance=guide,
            negative_prompt=call["negative_prompt"], negative_prompt_2=call["negative_prompt_2"],
            prompt_embeds=call["prompt_embeds"], negative_prompt_embeds=call["negative_prompt_embeds"],
            pooled_prompt_embeds=call["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=call["negative_pooled_prompt_embeds"],
            lora_scale=None if cak is None else cak.get("scale"), clip_skip=call["clip_skip"],
        )
        proj = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim

        def time_ids(original: Any, crop: Any, target: Any) -> torch.Tensor:
            return pipe._get_add_time_ids(original or (h, w), crop, target or (h, w), dtype=pe.dtype,
                                          text_encoder_projection_dim=proj).to(device)

        ids = time_ids(call["original_size"], call["crops_coords_top_left"], call["target_size"])
        nids = ids
        if call["negative_original_size"] is not None and call["negative_target_size"] is not None:
            nids = time_ids(call["negative_original_size"], call["negative_crops_coords_top_left"],
                            call["negative_target_size"])
        batch = _batch(call) * call["num_images_per_prompt"]
        # the pipeline tiles [negative; positive] ids over its doubled batch, so with distinct
        # negative ids the rows alternate rather than split in halves: the same rows here
        tiled = (torch.cat([nids, ids]) if guide else ids).repeat(batch, 1)
        cond = {"encoder_hidden_states": pe, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": tiled[-batch:]}}
        uncond = {"encoder_hidden_states": npe, "added_cond_kwargs": {"text_embeds": npooled, "time_ids": tiled[:batch]}}
        both = (lambda u, c: torch.cat([u, c])) if guide else (lambda u, c: c)
        tensors = {"prompt_embeds": both(npe, pe), "add_text_embeds": both(npooled, pooled), "add_time_ids": tiled}
        return _denoise(pipe, call, cond, uncond if guide else None, pe.dtype, device, tensors)

    def decode(self, pipe: Any, x0: torch.Tensor, call: dict[str, Any], denoise: Denoise) -> Any:
        from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

        output_type = call["output_type"]
        image = x0
        if output_type != "latent":
            image = pipe.image_processor.postprocess(_sdxl_decode(pipe, x0), output_type=output_type)
        return StableDiffusionXLPipelineOutput(images=image) if call["return_dict"] else (image,)


def _sdxl_decode(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """SDXL's decode: the VAE upcast to float32 when it is float16 with ``force_upcast``, the
    latents un-normalised by the VAE's ``latents_mean``/``latents_std`` when it has them (else by
    its scaling factor), then the watermark when the pipeline has one."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        pipe.upcast_vae()
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        view = lambda v: torch.tensor(v).view(1, 4, 1, 1).to(latents.device, latents.dtype)  # noqa: E731
        latents = latents * view(std) / vae.config.scaling_factor + view(mean)
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    if upcast:
        vae.to(dtype=torch.float16)
    return image if pipe.watermark is None else pipe.watermark.apply_watermark(image)


register_adapter(StableDiffusionAdapter())
register_adapter(StableDiffusionXLAdapter())
