"""A flow-matching (velocity) model made from an epsilon-prediction VP model by an exact change of
variables, no training: what ``FlowMatchEulerDiscreteScheduler`` needs, from the digits model.

A VP latent at training timestep t is ``x_vp = alpha x0 + sigma_vp eps`` (``alpha^2 = alphas_cumprod[t]``,
``sigma_vp^2 = 1 - alpha^2``); a flow-matching latent at sigma s is ``x_f = (1 - s) x0 + s eps``. They
are the same point up to a scale when the signal-to-noise ratios agree, ``sigma_vp / alpha = s / (1 - s)``::

    s     = sigma_vp / (alpha + sigma_vp)              (flow_sigma)
    x_vp  = x_f (alpha + sigma_vp) = x_f / c,          c = sqrt((1 - s)^2 + s^2)
    x0    = (x_vp - sigma_vp eps) / alpha = (x_f - s eps) / (1 - s)
    v     = eps - x0 = (eps - x_f) / (1 - s)

The model is asked for ``eps`` at the VP timestep of that SNR: the digits UNet takes a continuous
timestep (sinusoidal embedding), so between the training grid's integers the timestep is
interpolated linearly in log-SNR ``lambda = log(alpha^2 / sigma_vp^2)``; on the grid it is the
grid's integer, and the converted model is then exactly the epsilon model.

Why this is exact for sampling: with ``x0_hat``, ``eps_hat`` the model's predictions at ``x_f``, the
flow Euler step ``x_f' = x_f + (s' - s) v`` equals ``(1 - s') x0_hat + s' eps_hat``, and DDIM (eta = 0)
from ``x_vp = x_f / c`` lands on ``alpha' x0_hat + sigma' eps_hat = x_f' / c'``: on matched grids the two
chains visit the same points, every step, and end on the same x0 (tests/test_schedbench.py).
"""
from __future__ import annotations

from typing import Any

import torch

from deqkern.model import model_output_tensor

__all__ = ["FlowFromEpsilon", "flow_sigma"]

#: the flow convention of diffusers' FlowMatchEulerDiscreteScheduler: the model gets timestep 1000 s
FLOW_TIMESTEP_SCALE = 1000.0
#: flow sigmas travel as float32 (diffusers), so the grid's end timesteps come back off by rounding:
#: up to this many training timesteps past an end are that end, further is out of the model's range
_END_SLACK = 1e-3


def flow_sigma(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The flow sigma ``s = sigma_vp / (alpha + sigma_vp)`` of VP levels ``alpha^2 = alphas_cumprod`` (float64)."""
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    return sigma / (alpha + sigma)


class FlowFromEpsilon(torch.nn.Module):
    """``model(x_f, 1000 s) -> v``, the velocity of the epsilon model ``unet`` trained on ``alphas_cumprod``.

    Args:
        unet: ``unet(x_vp, t, **kwargs)`` predicting epsilon at (continuous) training timestep t.
        alphas_cumprod: ``[T]`` the training schedule's cumulative alphas, strictly decreasing in t.
    """

    def __init__(self, unet: torch.nn.Module, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        a = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
        if a.ndim != 1 or a.numel() < 2 or not bool(((a > 0) & (a < 1)).all()) or not bool((a[1:] < a[:-1]).all()):
            raise ValueError("alphas_cumprod: expected a 1-D tensor of >= 2 values in (0, 1), strictly decreasing")
        self.unet = unet
        # -lambda ascends with t (searchsorted needs ascending keys); float64 whatever the model's
        # dtype, so kept out of the module's buffers, with a copy per device made on first use
        self._neg_logsnr = {torch.device("cpu"): (1 - a).log() - a.log()}

    def vp_timestep(self, s: torch.Tensor) -> torch.Tensor:
        """The continuous training timestep of flow sigma ``s`` (float64), interpolated in log-SNR."""
        grid = self._grid(s.device)
        key = 2 * (s.log() - torch.log1p(-s))  # -lambda of s: log(s^2 / (1 - s)^2)
        j = torch.searchsorted(grid, key).clamp(1, grid.numel() - 1)
        t = (j - 1) + (key - grid[j - 1]) / (grid[j] - grid[j - 1])
        last = grid.numel() - 1
        bad = ~torch.isfinite(t) | (t < -_END_SLACK) | (t > last + _END_SLACK)
        # the check reads the device; a CUDA graph being captured cannot (its eager run checked)
        capturing = s.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and bool(bad.any()):
            i = int(torch.nonzero(bad)[0, 0])
            lo, hi = flow_sigma(torch.stack([(-grid[0]).sigmoid(), (-grid[-1]).sigmoid()])).tolist()
            raise ValueError(f"timestep: flow timestep {FLOW_TIMESTEP_SCALE * float(s[i])!r} (sigma {float(s[i])!r}) "
                             f"is outside the epsilon model's range: sigma in [{lo:.6g}, {hi:.6g}]")
        return t.clamp(0, last)

    def _grid(self, device: torch.device) -> torch.Tensor:
        if device not in self._neg_logsnr:
            self._neg_logsnr[device] = self._neg_logsnr[torch.device("cpu")].to(device)
        return self._neg_logsnr[device]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, **kwargs: Any) -> torch.Tensor:
        """The velocity ``v = (eps - x_f) / (1 - s)`` at flow latents ``sample`` and timesteps ``1000 s``."""
        n = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).to(torch.float64).reshape(-1).expand(n)
        s = t / FLOW_TIMESTEP_SCALE
        view = (n, *[1] * (sample.ndim - 1))
        scale = (1 / ((1 - s) ** 2 + s**2).sqrt()).to(sample.device, sample.dtype).reshape(view)
        eps = model_output_tensor(self.unet(sample * scale, self.vp_timestep(s), **kwargs))
        return (eps - sample) / (1 - s).to(sample.device, sample.dtype).reshape(view)
