"""``FluxPipeline``: a ``FluxTransformer2DModel`` on *packed* flow-matching latents.

The chain runs over the packed latents ``[B, tokens, 4 C]`` (2x2 patches of the ``[B, C, h, w]``
latents), as the loop does; the position tables ``txt_ids``/``img_ids`` are shared by every row.
As the loop does: ``transformer(x, timestep=t / 1000, guidance=g, pooled_projections=,
encoder_hidden_states=, txt_ids=, img_ids=, joint_attention_kwargs=)`` with ``t`` cast to the
latents' dtype; ``guidance`` is the guidance-distilled models' embedded ``guidance_scale`` (one
model call per row); true classifier-free guidance only with ``true_cfg_scale > 1`` and a negative
prompt (the pipeline makes two calls, deqkern one of 2x rows); sigmas ``linspace(1, 1/S, S)``
shifted by ``mu`` from the token count; the step gets no generator; decode: unpack, then
``vae.decode(x / scaling_factor + shift_factor)``.
"""
from __future__ import annotations

from typing import Any

import torch

from deqkern.model import Guidance
from deqkern.pipelines.core import Denoise, PipelineAdapter, register_adapter
from deqkern.pipelines.stable_diffusion import _batch  # prompts per call, counted as the pipelines count them
from deqkern.pipelines.transformer import TransformerDenoiser


def _timestep_options(pipe: Any, latents: torch.Tensor, steps: int, sigmas: Any) -> dict[str, Any]:
    """``set_timesteps``' ``sigmas`` and ``mu`` as the pipeline computes them."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = pipe.scheduler.config
    sigmas = np.linspace(1.0, 1 / steps, steps) if sigmas is None else sigmas
    if getattr(cfg, "use_flow_sigmas", False):
        sigmas = None
    mu = calculate_shift(latents.shape[1], cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    return {"mu": mu} if sigmas is None else {"sigmas": sigmas, "mu": mu}


class FluxAdapter(PipelineAdapter):
    """Every argument of ``FluxPipeline`` but IP-adapter images."""

    pipelines = ("FluxPipeline",)
    honoured = frozenset({
        "prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "true_cfg_scale", "height", "width",
        "num_inference_steps", "sigmas", "guidance_scale", "num_images_per_prompt", "generator", "latents",
        "prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds",
        "output_type", "return_dict", "joint_attention_kwargs", "callback_on_step_end",
        "callback_on_step_end_tensor_inputs", "max_sequence_length",
    })

    def prepare(self, pipe: Any, call: dict[str, Any]) -> Denoise:
        from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

        h = call["height"] = call["height"] or pipe.default_sample_size * pipe.vae_scale_factor
        w = call["width"] = call["width"] or pipe.default_sample_size * pipe.vae_scale_factor
        pipe.check_inputs(
            call["prompt"], call["prompt_2"], h, w, negative_prompt=call["negative_prompt"],
            negative_prompt_2=call["negative_prompt_2"], prompt_embeds=call["prompt_embeds"],
            negative_prompt_embeds=call["negative_prompt_embeds"], pooled_prompt_embeds=call["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=call["negative_pooled_prompt_embeds"],
            callback_on_step_end_tensor_inputs=call["callback_on_step_end_tensor_inputs"],
            max_sequence_length=call["max_sequence_length"],
        )
        # the attributes __call__ sets, which the pipeline's properties (and callbacks) read
        pipe._guidance_scale, pipe._interrupt = call["guidance_scale"], False
        jak = pipe._joint_attention_kwargs = call["joint_attention_kwargs"]
        device, n = pipe._execution_device, call["num_images_per_prompt"]
        negative = call["negative_prompt"] is not None or (
            call["negative_prompt_embeds"] is not None and call["negative_pooled_prompt_embeds"] is not None)
        true_cfg = call["true_cfg_scale"] > 1 and negative
        encode = lambda prompt, prompt_2, embeds, pooled: pipe.encode_prompt(  # noqa: E731
            prompt=prompt, prompt_2=prompt_2, prompt_embeds=embeds, pooled_prompt_embeds=pooled, device=device,
            num_images_per_prompt=n, max_sequence_length=call["max_sequence_length"],
            lora_scale=None if jak is None else jak.get("scale"))
        pe, pooled, text_ids = encode(call["prompt"], call["prompt_2"], call["prompt_embeds"],
                                      call["pooled_prompt_embeds"])
        if true_cfg:
            npe, npooled, negative_ids = encode(call["negative_prompt"], call["negative_prompt_2"],
                                                call["negative_prompt_embeds"], call["negative_pooled_prompt_embeds"])
            if not torch.equal(text_ids, negative_ids):
                raise ValueError("negative_prompt: its text ids differ from the prompt's; one model call sees both, "
                                 "so expected embeddings of the same length")
        latents, image_ids = pipe.prepare_latents(_batch(call) * n, pipe.transformer.config.in_channels // 4, h, w,
                                                  pe.dtype, device, call["generator"], call["latents"])
        options = _timestep_options(pipe, latents, call["num_inference_steps"], call["sigmas"])
        _, steps = retrieve_timesteps(pipe.scheduler, call["num_inference_steps"], device, **options)
        pipe._num_timesteps = steps
        shared: dict[str, Any] = {"joint_attention_kwargs": {} if jak is None else jak}
        if pipe.transformer.config.guidance_embeds:
            shared["guidance"] = torch.full([1], call["guidance_scale"], device=device, dtype=torch.float32)
        cond = {"encoder_hidden_states": pe, "pooled_projections": pooled}
        guidance = None
        if true_cfg:
            uncond = {"encoder_hidden_states": npe, "pooled_projections": npooled}
            guidance = Guidance(call["true_cfg_scale"], cond, uncond)
        else:
            shared.update(cond)
        model = TransformerDenoiser(pipe.transformer, timestep_divisor=1000.0,
                                    fixed={"txt_ids": text_ids, "img_ids": image_ids})
        return Denoise(model=model, latents=latents, num_inference_steps=steps, generator=None, model_kwargs=shared,
                       guidance=guidance, schedule_kwargs=options, callback_tensors={"prompt_embeds": pe})

    def decode(self, pipe: Any, x0: torch.Tensor, call: dict[str, Any], denoise: Denoise) -> Any:
        from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

        image = x0
        if call["output_type"] != "latent":
            latents = pipe._unpack_latents(x0, call["height"], call["width"], pipe.vae_scale_factor)
            latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.image_processor.postprocess(pipe.vae.decode(latents, return_dict=False)[0],
                                                     output_type=call["output_type"])
        return FluxPipelineOutput(images=image) if call["return_dict"] else (image,)


register_adapter(FluxAdapter())
