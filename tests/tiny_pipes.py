"""Tiny diffusers pipelines built offline (random weights, nothing downloaded) for the drop-in tests.

Images are 32x32 (VAE scale factor 4, latents 4x8x8); the text encoders are ``transformers``
``CLIPTextModel``/``CLIPTextModelWithProjection`` from configs, the tokenizers ``CLIPTokenizer``s
read from a hand-made ``vocab.json``/``merges.txt`` (the letters, with and without ``</w>``, and
two merges) written to a directory the caller gives (pytest's ``tmp_path``).
"""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch

#: tokens per prompt (the tokenizers' ``model_max_length``, within the encoders' positions)
MAX_TOKENS = 12
IMAGE = 32


def tokenizer(directory: Path):
    """A ``CLIPTokenizer`` from a small hand-made vocabulary written to ``directory``."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab.update({c + suffix: len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({"ca": len(vocab), "cat</w>": len(vocab) + 1})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    # positional: transformers 4 names them vocab_file/merges_file, 5 vocab/merges
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=MAX_TOKENS)


def text_encoder(hidden: int, projection_dim: int | None = None, seed: int = 0):
    """A 2-layer CLIP text encoder (with a projection head when ``projection_dim`` is given)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=56, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, projection_dim=projection_dim or hidden)
    torch.manual_seed(seed)
    cls = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    return cls(cfg).eval()


def vae(seed: int = 0):
    """An ``AutoencoderKL`` with scale factor 4 (3 blocks): 32x32 images, 4x8x8 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4,
        sample_size=IMAGE,
    ).eval()


def unet(cross_attention_dim: int, seed: int = 0, **extra: Any):
    """A ``UNet2DConditionModel`` on 4x8x8 latents (``extra``: SDXL's added-condition options)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=IMAGE // 4, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=4, **extra,
    ).eval()


def sd_pipeline(directory: Path, scheduler: Any = None, prediction_type: str = "epsilon"):
    """A tiny ``StableDiffusionPipeline`` (no safety checker), DDIM by default."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sched = scheduler or DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
                                       steps_offset=1)
    sched = type(sched).from_config(sched.config, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(
        vae=vae(), text_encoder=text_encoder(16), tokenizer=tokenizer(directory), unet=unet(16), scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline(directory: Path, scheduler: Any = None):
    """A tiny ``StableDiffusionXLPipeline``: two text encoders (16 + 16 wide, the second projected to 8),
    a UNet with SDXL's ``text_time`` added conditioning (6 time ids x 8 + the pooled 8)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    sched = scheduler or EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                                beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
                                                steps_offset=1)
    net = unet(32, addition_embed_type="text_time", addition_time_embed_dim=8,
               projection_class_embeddings_input_dim=6 * 8 + 8)
    pipe = StableDiffusionXLPipeline(
        vae=vae(), text_encoder=text_encoder(16), text_encoder_2=text_encoder(16, projection_dim=8, seed=1),
        tokenizer=tokenizer(directory), tokenizer_2=tokenizer(directory / "2"), unet=net, scheduler=sched,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
