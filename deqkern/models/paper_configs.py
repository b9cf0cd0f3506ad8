"""UNet architectures of the pretrained pixel-space DDPM/DDIM models used in the papers.

They let benchmarks time the real network sizes with random weights when no checkpoint
is on disk. The values follow the public diffusers conversions of the original DDPM
checkpoints (``google/ddpm-cifar10-32``, ``google/ddpm-celebahq-256``,
``google/ddpm-church-256``) and, for CelebA 64x64, the DDIM model
(``ch=128, ch_mult=(1, 2, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,)``) written
in the same conventions.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

__all__ = ["PAPER_UNETS", "paper_unet_config", "build_paper_unet"]

# Settings shared by every converted DDPM checkpoint: the original TF code uses sinusoidal
# embeddings without the sin/cos flip and with shift 1, asymmetric-padded stride-2 convs
# (downsample_padding=0) and GroupNorm(32, eps=1e-6).
_DDPM_COMMON: dict[str, Any] = {
    "_class_name": "UNet2DModel",
    "act_fn": "silu",
    "attention_head_dim": None,
    "center_input_sample": False,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "time_embedding_type": "positional",
}

# 256x256 models (DDPM's CelebA-HQ and LSUN): ch_mult (1, 1, 2, 2, 4, 4), attention at 16x16.
_DDPM_256: dict[str, Any] = {
    **_DDPM_COMMON,
    "sample_size": 256,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
}

PAPER_UNETS: dict[str, dict[str, Any]] = {
    # google/ddpm-cifar10-32: ch_mult (1, 2, 2, 2), attention at 16x16; 35.7M parameters.
    "ddpm-cifar10": {
        **_DDPM_COMMON,
        "sample_size": 32,
        "block_out_channels": [128, 256, 256, 256],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    },
    # DDIM's CelebA 64x64 model: ch_mult (1, 2, 2, 2, 4), attention at 16x16.
    "ddpm-celeba": {
        **_DDPM_COMMON,
        "sample_size": 64,
        "block_out_channels": [128, 256, 256, 256, 512],
        "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    },
    "ddpm-celebahq": _DDPM_256,  # google/ddpm-celebahq-256
    "ddpm-lsun-church": _DDPM_256,  # google/ddpm-church-256
    "ddpm-lsun-bedroom": _DDPM_256,  # google/ddpm-bedroom-256
}


def paper_unet_config(name: str) -> dict[str, Any]:
    """Return a fresh copy of the ``UNet2DModel`` config of a paper model.

    Args:
        name: one of `PAPER_UNETS` (``"ddpm-cifar10"``, ``"ddpm-celeba"``,
            ``"ddpm-celebahq"``, ``"ddpm-lsun-church"``, ``"ddpm-lsun-bedroom"``).

    Raises:
        KeyError: unknown name; the message lists the known ones.
    """
    try:
        config = PAPER_UNETS[name]
    except KeyError:
        raise KeyError(f"unknown paper UNet {name!r}; known: {', '.join(PAPER_UNETS)}") from None
    return copy.deepcopy(config)


def build_paper_unet(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """Build a paper-sized ``UNet2DModel`` with random weights, in eval mode, for timing."""
    from diffusers import UNet2DModel

    config = paper_unet_config(name)
    config.pop("_class_name")
    model = UNet2DModel(**config).to(device=device)
    # ModelMixin.to warns whenever a dtype is passed, so only cast when one is needed.
    if dtype != torch.float32:
        model = model.to(dtype=dtype)
    return model.eval()
