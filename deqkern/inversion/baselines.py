"""The two baselines of inversion: DDIM encoding and backprop through the sequential chain."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from deqkern.model import ModelEvaluator
from deqkern.schedule import Schedule
from deqkern.sequential import ChainStep


@torch.no_grad()
def ddim_encode(
    ev: ModelEvaluator, x0: torch.Tensor, schedule: Schedule, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Approximate ``x_T`` with ``chain(x_T) ~= x0``: the chain run backwards, one model call per step.

    Step k is ``x[k+1] = A_k x[k] + B_k e(x[k], t_k) + sigma_k z_k`` when the x0 transform is
    inactive (``A_k = cx + c0 px``, ``B_k = co + c0 po``). Going from ``x[k+1]`` back to ``x[k]``
    needs ``e(x[k], t_k)`` at the unknown ``x[k]``; DDIM inversion (Song et al. 2021, diffusers'
    ``DDIMInverseScheduler``) uses the model at the known ``x[k+1]`` instead:

        x[k] = (x[k+1] - B_k e(x[k+1], t_k) - sigma_k z_k) / A_k.

    Two approximations, both small when steps are small: the model is evaluated one step off,
    and the x0 transform (``clip_sample`` / thresholding) is ignored — it is inactive wherever the
    predicted x0 stays in range, which holds for in-range targets except at the noisiest steps.
    With ``eta > 0`` the step's own noise ``z`` is subtracted (the inverse at fixed noise).
    """
    schedule.refuse_multistep("ddim_encode")
    s, batch = schedule.num_steps, x0.shape[0]
    dev, dt = x0.device, x0.dtype
    a = schedule.a_coef.to(dev, dt)
    if bool((a.abs() < 1e-12).any()):
        raise ValueError("schedule: a step's x coefficient is 0, so the chain cannot be run backwards")
    b = (schedule.co + schedule.c0 * schedule.po).to(dev, dt)
    sigma = schedule.sigma.to(dev, dt)
    ts = schedule.timesteps.to(dev)
    idx = torch.arange(batch, device=dev)
    x = x0
    for k in reversed(range(s)):
        e = ev(x, ts[k].expand(batch), idx, round_index=s - 1 - k)
        y = x - b[k] * e
        if noise is not None:
            y = y - sigma[k] * noise[k]
        x = y / a[k]
    return x


def sequential_chain(
    ev: ModelEvaluator, x_T: torch.Tensor, schedule: Schedule, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """``x0`` of the sequential chain, differentiable by plain autograd, each step checkpointed.

    ``torch.utils.checkpoint`` keeps only the S step inputs and recomputes each step's model
    activations during backward, so memory is O(S * latent) instead of O(S * activations), at
    the price of a second model forward per step: one optimisation step costs S model rows
    forward + S recomputed + S vector-Jacobian products per sample.
    """
    schedule.refuse_multistep("sequential_chain")  # checkpoint recomputes steps out of order
    step = ChainStep(ev, schedule, x_T)
    x = x_T
    for k in range(schedule.num_steps):
        z = None if noise is None else noise[k]
        x = checkpoint(step, x, k, z, use_reentrant=False)
    return x
