"""``StableDiffusion3Pipeline``: an ``SD3Transformer2DModel`` on flow-matching latents, conditioned
on CLIP + T5 token embeddings and the two CLIP encoders' pooled projections.

As its loop does: ``transformer(x, timestep=t, encoder_hidden_states=, pooled_projections=,
joint_attention_kwargs=)`` with the scheduler's float timesteps (``1000 sigma``), guidance
``u + s (c - u)``, ``mu`` from the latent size when the scheduler shifts dynamically; the step gets
no generator (``stochastic_sampling`` draws from torch's global RNG); decode
``vae.decode(x / scaling_factor + shift_factor)``.
"""
from __future__ import annotations

from typing import Any

import torch

from deqkern.model import Guidance
from deqkern.pipelines.core import Denoise, PipelineAdapter, register_adapter
from deqkern.pipelines.stable_diffusion import _batch  # prompts per call, counted as the pipelines count them
from deqkern.pipelines.transformer import TransformerDenoiser


def _shift(pipe: Any, latents: torch.Tensor, mu: float | None) -> dict[str, Any]:
    """``set_timesteps``' ``mu``: the call's, else the pipeline's resolution-dependent shift when the
    scheduler shifts dynamically (from the latents' tokens: (h / patch) (w / patch))."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    cfg = pipe.scheduler.config
    if mu is None and cfg.get("use_dynamic_shifting", None):
        patch = pipe.transformer.config.patch_size
        tokens = (latents.shape[2] // patch) * (latents.shape[3] // patch)
        mu = calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
    return {} if mu is None else {"mu": mu}


class StableDiffusion3Adapter(PipelineAdapter):
    """Every argument of ``StableDiffusion3Pipeline`` but IP-adapter images and skip-layer guidance."""

    pipelines = ("StableDiffusion3Pipeline",)
    honoured = frozenset({
        "prompt", "prompt_2", "prompt_3", "height", "width", "num_inference_steps", "sigmas", "guidance_scale",
        "negative_prompt", "negative_prompt_2", "negative_prompt_3", "num_images_per_prompt", "generator", "latents",
        "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
        "output_type", "return_dict", "joint_attention_kwargs", "clip_skip", "callback_on_step_end",
        "callback_on_step_end_tensor_inputs", "max_sequence_length", "mu",
    })

    def prepare(self, pipe: Any, call: dict[str, Any]) -> Denoise:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

        h = call["height"] = call["height"] or pipe.default_sample_size * pipe.vae_scale_factor
        w = call["width"] = call["width"] or pipe.default_sample_size * pipe.vae_scale_factor
        pipe.check_inputs(
            call["prompt"], call["prompt_2"], call["prompt_3"], h, w, negative_prompt=call["negative_prompt"],
            negative_prompt_2=call["negative_prompt_2"], negative_prompt_3=call["negative_prompt_3"],
            prompt_embeds=call["prompt_embeds"], negative_prompt_embeds=call["negative_prompt_embeds"],
            pooled_prompt_embeds=call["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=call["negative_pooled_prompt_embeds"],
            callback_on_step_end_tensor_inputs=call["callback_on_step_end_tensor_inputs"],
            max_sequence_length=call["max_sequence_length"],
        )
        # the attributes __call__ sets, which the pipeline's properties (and callbacks) read
        pipe._guidance_scale, pipe._clip_skip = call["guidance_scale"], call["clip_skip"]
        pipe._joint_attention_kwargs, pipe._interrupt = call["joint_attention_kwargs"], False
        guide, device, jak = pipe.do_classifier_free_guidance, pipe._execution_device, call["joint_attention_kwargs"]
        pe, npe, pooled, npooled = pipe.encode_prompt(
            prompt=call["prompt"], prompt_2=call["prompt_2"], prompt_3=call["prompt_3"],
            negative_prompt=call["negative_prompt"], negative_prompt_2=call["negative_prompt_2"],
            negative_prompt_3=call["negative_prompt_3"], do_classifier_free_guidance=guide,
            prompt_embeds=call["prompt_embeds"], negative_prompt_embeds=call["negative_prompt_embeds"],
            pooled_prompt_embeds=call["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=call["negative_pooled_prompt_embeds"], device=device,
            clip_skip=call["clip_skip"], num_images_per_prompt=call["num_images_per_prompt"],
            max_sequence_length=call["max_sequence_length"], lora_scale=None if jak is None else jak.get("scale"),
        )
        batch = _batch(call) * call["num_images_per_prompt"]
        latents = pipe.prepare_latents(batch, pipe.transformer.config.in_channels, h, w, pe.dtype, device,
                                       call["generator"], call["latents"])
        options = _shift(pipe, latents, call["mu"])
        if call["sigmas"] is not None:
            options["sigmas"] = call["sigmas"]
        _, steps = retrieve_timesteps(pipe.scheduler, call["num_inference_steps"], device, **options)
        pipe._num_timesteps = steps
        cond = {"encoder_hidden_states": pe, "pooled_projections": pooled}
        shared: dict[str, Any] = {"joint_attention_kwargs": jak}
        guidance = None
        if guide:
            uncond = {"encoder_hidden_states": npe, "pooled_projections": npooled}
            guidance = Guidance(call["guidance_scale"], cond, uncond)
        else:
            shared.update(cond)
        both = (lambda u, c: torch.cat([u, c])) if guide else (lambda u, c: c)
        tensors = {"prompt_embeds": both(npe, pe), "pooled_prompt_embeds": both(npooled, pooled)}
        return Denoise(model=TransformerDenoiser(pipe.transformer), latents=latents, num_inference_steps=steps,
                       generator=None, model_kwargs=shared, guidance=guidance, schedule_kwargs=options,
                       callback_tensors=tensors)

    def decode(self, pipe: Any, x0: torch.Tensor, call: dict[str, Any], denoise: Denoise) -> Any:
        from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput

        image = x0
        if call["output_type"] != "latent":
            latents = x0 / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.image_processor.postprocess(pipe.vae.decode(latents, return_dict=False)[0],
                                                     output_type=call["output_type"])
        return StableDiffusion3PipelineOutput(images=image) if call["return_dict"] else (image,)


register_adapter(StableDiffusion3Adapter())
