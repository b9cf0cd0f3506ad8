"""The denoiser of the transformer pipelines (DiT, PixArt, SD3, Flux) as a deqkern model.

Their transformers take the timestep by keyword (PixArt's second positional argument is the text
embedding), return a tuple with ``return_dict=False``, and some predict more than the latent's
channels (DiT and PixArt learn the variance in a second half of channels, which the pipelines
slice off before the scheduler's step).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch


@dataclass(frozen=True, eq=False)  # compared and hashed by identity, as the module it wraps
class TransformerDenoiser:
    """``model(x, t, **kw) = transformer(x, timestep=t', return_dict=False, **fixed, **kw)[0][:, :channels]``.

    ``t' = t`` as the scheduler gives it, or ``t.to(x.dtype) / timestep_divisor`` (Flux feeds
    ``t / 1000`` in the latents' dtype). ``channels``: the leading output channels the step uses
    (None: all). ``fixed``: keywords the pipeline passes unchanged to every row, which must not be
    gathered per sample (Flux's ``txt_ids``/``img_ids``, one ``[tokens, 3]`` table for all rows).
    """

    transformer: Any
    channels: int | None = None
    timestep_divisor: float | None = None
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.timestep_divisor is not None:
            t = t.to(x.dtype) / self.timestep_divisor
        out = self.transformer(x, timestep=t, return_dict=False, **self.fixed, **kwargs)[0]
        return out if self.channels is None else out[:, : self.channels]


def learned_variance_channels(transformer: Any) -> int | None:
    """The channels DiT's and PixArt's step uses: the latent's ``in_channels`` when the model also
    predicts a variance (``out_channels == 2 in_channels``), else all (None)."""
    c = transformer.config.in_channels
    return c if transformer.config.out_channels // 2 == c else None
