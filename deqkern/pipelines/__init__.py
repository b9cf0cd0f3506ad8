"""Drop-in parallel pipelines: ``deqkern.sample_pipeline(pipe, **kwargs)`` returns what
``pipe(**kwargs)`` returns, its denoising loop solved as one fixed point.

A pipeline family is one :class:`PipelineAdapter` (``prepare``: conditioning, denoiser, latents;
``decode``: the pipeline's output), registered by class name with :func:`register_adapter`;
:mod:`deqkern.pipelines.core` documents the protocol. Families here: DDIM/DDPM
(:mod:`~deqkern.pipelines.unconditional`), Stable Diffusion and SDXL
(:mod:`~deqkern.pipelines.stable_diffusion`), DiT, PixArt-alpha/sigma, Stable Diffusion 3 and Flux
(:mod:`~deqkern.pipelines.dit`, ``pixart``, ``sd3``, ``flux``). diffusers is imported on first use.
"""
# imported to register their adapters
from deqkern.pipelines import dit, flux, pixart, sd3, stable_diffusion, unconditional  # noqa: F401
from deqkern.pipelines.core import (
    Denoise, PipelineAdapter, adapter_for, register_adapter, sample_pipeline, supported_pipelines,
)

__all__ = ["Denoise", "PipelineAdapter", "adapter_for", "register_adapter", "sample_pipeline", "supported_pipelines"]
