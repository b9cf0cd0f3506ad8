"""``x0 = chain(x_T, z)`` solved as one fixed point, as a differentiable torch function.

Forward: :func:`deqkern.sample` (parallel solve, optionally warm-started). Backward: the exact
implicit gradient (the chain's adjoint solved in parallel, :mod:`deqkern.inversion.adjoint`) or
DEQ-DDIM's phantom gradient. Gradients flow to ``x_T`` and to the pre-drawn step noise; model
parameters are treated as constants.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping

import torch
from torch.autograd.function import once_differentiable

from deqkern._config import config_from
from deqkern.config import SolveConfig, solve_config, split_solve_options
from deqkern.sampling import SampleResult, sample
from deqkern.inversion.adjoint import (
    ADJOINT_SOLVE, ChainVJP, GradConfig, GradMode, RecomputeVJP, adjoint_multipliers, phantom_gradient,
    solve_adjoint,
)
from deqkern.model import Guidance, ModelEvaluator, ModelFn
from deqkern.schedule import Schedule


#: The forward solve's defaults: x0 within 1e-4, so the loss being optimised is the chain's
IMPLICIT_FORWARD = SolveConfig(tol=1e-4)


@dataclass
class ImplicitStats:
    """Costs of the last forward and backward of :func:`sample_with_implicit_grad`.

    Model evaluations count model-batch rows (one latent at one timestep; two under classifier-free
    guidance); a vector-Jacobian product row through the model counts as one evaluation too (on
    a GPU it costs about two forwards, on a CPU about the same as one to two).
    """

    forward_rounds: int = 0
    forward_evals: int = 0
    forward_converged: bool = False
    forward_time: float = 0.0
    #: adjoint rounds (0 for the phantom gradient)
    backward_rounds: int = 0
    #: model rows of the backward: graph build + VJP rows (exact), or the unrolled steps (phantom)
    backward_evals: int = 0
    backward_converged: bool = False
    backward_time: float = 0.0
    adjoint_residuals: list[list[float]] = field(default_factory=list)
    #: ``[S+1, *x_T.shape]`` the forward fixed point (warm start of the next solve: ``[1:]``)
    trajectory: torch.Tensor | None = None


@dataclass
class _Backward:
    """What the backward needs besides the saved tensors; ``result`` is the forward's SampleResult."""

    ev: ModelEvaluator
    schedule: Schedule
    grad: GradMode
    grad_config: GradConfig
    stats: ImplicitStats
    result: SampleResult | None = None


class _ImplicitChain(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x_T: torch.Tensor, noise: torch.Tensor | None,
        solve: Callable[[torch.Tensor, torch.Tensor | None], SampleResult], bw: _Backward,
    ) -> torch.Tensor:
        res = solve(x_T.detach(), None if noise is None else noise.detach())
        st = bw.stats
        st.forward_rounds, st.forward_evals, st.forward_time = res.rounds, res.model_evals, res.wall_time
        st.forward_converged = res.all_converged
        st.trajectory = res.trajectory
        bw.result = res
        ctx.bw = bw
        ctx.save_for_backward(res.trajectory, noise)
        return res.x0

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x0: torch.Tensor):
        traj, noise = ctx.saved_tensors
        p: _Backward = ctx.bw
        st = p.stats
        s, batch = p.schedule.num_steps, grad_x0.shape[0]
        if p.grad == "exact" and not st.forward_converged:
            # the adjoint at a point that is not the chain's would be a wrong gradient, not an approximate one
            late = torch.nonzero(~p.result.converged).flatten().tolist()
            raise RuntimeError(f"x0: samples {late} did not converge in the forward solve (max_iters), so their "
                               "implicit gradient is not the chain's; raise max_iters or check result.converged")
        start = time.perf_counter()
        if p.grad == "phantom":
            g_x, g_z, evals, vjp_rows = phantom_gradient(
                p.ev, traj, noise, p.schedule, grad_x0, p.grad_config, noise_grad=ctx.needs_input_grad[1]
            )
            st.backward_rounds, st.backward_evals, st.backward_converged = 0, evals + vjp_rows, True
        else:
            vjp = (ChainVJP if p.grad_config.vjp == "stored" else RecomputeVJP)(p.ev, traj, p.schedule)
            mult = adjoint_multipliers(p.schedule, p.grad_config.form, grad_x0.device, grad_x0.dtype)
            sol = solve_adjoint(vjp, grad_x0.reshape(batch, -1), mult, p.grad_config)
            st.backward_rounds, st.backward_evals = sol.rounds, vjp.build_rows + sol.vjp_rows
            st.backward_converged, st.adjoint_residuals = bool(sol.converged.all()), sol.residuals
            g_x = sol.lam[0].reshape(grad_x0.shape)
            g_z = None
            if ctx.needs_input_grad[1]:
                # dL/dz_k = sigma_k lam_{k+1}
                sigma = p.schedule.sigma.to(grad_x0.device, grad_x0.dtype).view(s, 1, 1)
                g_z = (sigma * sol.lam[1:]).reshape(noise.shape)
        if grad_x0.device.type == "cuda":
            torch.cuda.synchronize(grad_x0.device)
        st.backward_time = time.perf_counter() - start
        return g_x, (g_z if ctx.needs_input_grad[1] else None), None, None


def differentiable_solve(
    solve: Callable[[torch.Tensor, torch.Tensor | None], SampleResult],
    x_T: torch.Tensor,
    noise: torch.Tensor | None,
    ev: ModelEvaluator,
    schedule: Schedule,
    grad_options: GradConfig | Mapping[str, Any] | None = None,
    grad: GradMode = "exact",
    stats: ImplicitStats | None = None,
) -> SampleResult:
    """``solve(x_T, noise)`` (detached inputs; its result must hold the trajectory) with ``x0``
    made a differentiable function of ``x_T`` and ``noise``: backward solves the adjoint
    ``lam_k = J_k^T lam_{k+1}`` at the forward's trajectory (``grad="exact"``, the gradient of
    the sequential chain to the adjoint's ``tol``; it refuses a forward that did not converge) or
    takes the phantom gradient. The model's Jacobians come from ``ev``; model parameters and
    conditioning are constants. ``result.info["grad"]`` is the :class:`ImplicitStats`, its
    backward fields filled by ``backward()``.
    """
    config = grad_config(grad_options)
    if grad == "exact":
        # fail before the forward solve, not in the middle of backward()
        adjoint_multipliers(schedule, config.form, "cpu", torch.float64)
    bw = _Backward(ev=ev, schedule=schedule, grad=grad, grad_config=config,
                   stats=stats if stats is not None else ImplicitStats())
    x0 = _ImplicitChain.apply(x_T, noise, solve, bw)
    return replace(bw.result, x0=x0, info={**bw.result.info, "grad": bw.stats})


def sample_with_implicit_grad(
    model: ModelFn,
    x_T: torch.Tensor,
    schedule: Schedule,
    noise: torch.Tensor | None = None,
    grad: GradMode = "exact",
    *,
    config: SolveConfig | Mapping[str, Any] | None = None,
    max_batch: int | None = None,
    model_kwargs: Mapping[str, torch.Tensor] | None = None,
    guidance: Guidance | None = None,
    init: torch.Tensor | None = None,
    grad_options: GradConfig | Mapping[str, Any] | None = None,
    stats: ImplicitStats | None = None,
    **solve_options: Any,
) -> torch.Tensor:
    """``x0`` of the chain from ``x_T`` (and step noise), differentiable w.r.t. ``x_T`` and ``noise``.

    The forward is :func:`deqkern.sample` as ``config`` says (a :class:`SolveConfig` or a mapping
    of its fields over :data:`IMPLICIT_FORWARD`, tol 1e-4), its fields also accepted as keywords
    (``solver``, ``tol``, ``window``, ... which win), warm-started from ``init`` (default
    max_iters = S, so it always converges). ``grad="exact"`` gives the implicit gradient
    (equal to backprop through the sequential chain up to the adjoint's ``tol`` and the forward's
    ``tol``); ``grad="phantom"`` the DEQ-DDIM phantom gradient (an approximation). ``grad_options``
    (a :class:`GradConfig` or a mapping of its fields) configures either. Pass an
    :class:`ImplicitStats` to read rounds, model evaluations, timings and the trajectory back.

        >>> x_T = x_T.requires_grad_()
        >>> x0 = sample_with_implicit_grad(unet, x_T, sched)
        >>> ((x0 - target) ** 2).mean().backward()      # x_T.grad
    """
    if grad not in ("exact", "phantom"):
        raise ValueError(f"grad: expected 'exact' or 'phantom', got {grad!r}")
    forward = config_from(SolveConfig, solve_options, "sample_with_implicit_grad() options",
                          base=config_from(SolveConfig, config, "config", base=IMPLICIT_FORWARD))

    def solve(x: torch.Tensor, z: torch.Tensor | None) -> SampleResult:
        return sample(
            model, x, schedule, noise=z, config=forward, model_kwargs=model_kwargs, guidance=guidance,
            max_batch=max_batch, init=init, return_trajectory=True,
        )

    ev = ModelEvaluator(model, model_kwargs or {}, guidance, max_batch, inputs=schedule.step_inputs)
    return differentiable_solve(solve, x_T, noise, ev, schedule, grad_options, grad, stats).x0


#: GradConfig's own fields: a key of grad_options that is one of them is not an adjoint solve option
_GRAD_FIELDS = {f.name for f in fields(GradConfig)}


def grad_config(options: GradConfig | Mapping[str, Any] | None) -> GradConfig:
    """A :class:`GradConfig` from itself, a mapping of its fields (unknown keys are named) or None.
    A mapping may also give the adjoint solve's fields directly (``{"tol": 1e-4}``): they
    override its ``solve``."""
    if isinstance(options, Mapping):
        flat, options = split_solve_options(options, _GRAD_FIELDS)
        if flat:
            base = solve_config(options.get("solve"), "grad_options.solve", base=ADJOINT_SOLVE)
            options = {**options, "solve": solve_config(flat, "grad_options", base=base)}
    return config_from(GradConfig, options, "grad_options")
