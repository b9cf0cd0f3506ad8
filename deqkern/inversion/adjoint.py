"""Gradients through the fixed point: the chain's adjoint, solved in parallel (docs/math.md §5).

The chain is ``x[k+1] = step_k(x[k], e_k, z_k)`` with ``e_k = model(x[k], t_k)``, ``k = 0 .. S-1``,
``x[0] = x_T`` and ``x[S] = x0``. Reverse-mode differentiation of a loss ``L(x0)`` through the
sequential chain is the backward recursion

    lam_S = dL/dx0,     lam_k = J_k^T lam_{k+1}   (k = S-1 .. 0),     J_k = d step_k / d x[k]

(``J_k`` includes the model Jacobian and the x0 transform), after which ``dL/dx_T = lam_0`` and
``dL/dz_k = sigma_k lam_{k+1}`` (the noise enters each step additively). The recursion is a linear
fixed point over all ``lam`` at once whose map is *upper*-triangular (``lam_k`` depends only on
later ``lam``), i.e. the forward's lower-triangular structure with time reversed. Each round of a
parallel solve is ONE batched vector-Jacobian product over all S steps, from one autograd graph
of ``step_rows(X, model(X, t), z)`` built at the forward fixed point.

Like the forward (docs/math.md §3), the map is written for a per-step scalar ``L_k`` as the scan

    lam'_S = lam_S,    lam'_k = L_k lam'_{k+1} + (J_k^T lam_{k+1} - L_k lam_{k+1})

over the old iterate ``lam``: ``L = 0`` is the plain recursion (``"plain"``), ``L = A_k`` the
scan form (``"scan"``, affine steps only) and ``L = 1`` the drift form (``"drift"``), a reverse
cumulative sum of the increments ``J_j^T lam_{j+1} - lam_{j+1}``. All have the chain's adjoint
as their unique fixed point and Picard on any of them is exact after S rounds; the drift form
converges fastest when ``J_k`` is near the identity, which is what a trained denoiser's steps
look like (the identity part of the model Jacobian cancels the ``x`` term of the step).

The solve IS the engine's: reversing the time axis (position ``p`` holds ``lam_{S-p}``) turns
the adjoint into the forward's lower-triangular shape, so :func:`deqkern.engine.solve` runs it
with the VJP rows in place of model rows — any registered solver, the same stopping rule, and
the freezing rule (the leading rows that pass the test, plus one) that ends it in S rounds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from deqkern.engine import Problem, Workspace, solve
from deqkern.model import ModelEvaluator
from deqkern.ops import step_rows
from deqkern.ops.window import linear_scan
from deqkern.schedule import COEF_FIELDS, Schedule, X0Transform
from deqkern._validate import OptionError
from deqkern.config import DEFAULT_TOL, SolveConfig, solve_config

AdjointForm = Literal["drift", "scan", "plain"]
VJPMode = Literal["stored", "recompute"]
GradMode = Literal["exact", "phantom"]


#: The adjoint solve's defaults: the relative stop on ``lam`` (the x0 and noise rules are the
#: forward chain's), rows entering a window extrapolated (the adjoint chain is deterministic).
ADJOINT_SOLVE = SolveConfig(tol=1e-3, stop="relative", extrapolate=True, execution="eager")


@dataclass(frozen=True)
class GradConfig:
    """How the backward pass through the fixed point is computed.

    Exact (``grad="exact"``): the adjoint solved as ``solve`` says (a :class:`SolveConfig`, or a
    mapping of its fields over :data:`ADJOINT_SOLVE`: any registered solver and its options,
    ``tol`` for ``||lam' - lam|| <= tol ||lam'||`` on every row, at most ``max_iters`` rounds
    (default S, which is exact), ``window`` adjoint rows per sample per round (default S)) in
    the adjoint ``form`` (``solve.form`` stays None: the adjoint's forms are its own). Its
    vector-Jacobian products: ``vjp="stored"`` builds one autograd graph of all S steps at the
    fixed point (one model batch of S*B rows; each round is then one backward pass; the graph's
    activations, O(S B), stay in memory for the whole solve), ``vjp="recompute"`` evaluates the
    model with grad on just the round's live rows and backpropagates (a forward and a backward
    per row and round; memory O(window B)) — for models whose S-step graph does not fit.

    Phantom (``grad="phantom"``): ``phantom_steps`` damped unrolled steps with damping
    ``phantom_tau`` from the detached fixed point (see :func:`phantom_gradient`).

    Solver, form and tol defaults: measured once on the digits model, no study yet; the VJP
    modes: bench/solver_studies.py adjoint-vjp.
    """

    solve: SolveConfig = ADJOINT_SOLVE
    form: AdjointForm = "drift"
    vjp: VJPMode = "stored"
    phantom_steps: int = 1
    phantom_tau: float = 0.1

    def __post_init__(self) -> None:
        solve = solve_config(self.solve, "grad_options.solve", base=ADJOINT_SOLVE)
        object.__setattr__(self, "solve", solve)  # frozen: the mapping, as a config, once
        if solve.stop != "relative":
            raise OptionError("grad_options.solve.stop", f"the adjoint stops on 'relative' only, got {solve.stop!r}")
        if solve.form is not None:
            raise OptionError("grad_options.solve.form", f"expected None (the adjoint's form is grad_options.form), "
                                                         f"got {solve.form!r}")
        if solve.window == "auto":
            raise OptionError("grad_options.solve.window", "expected an integer >= 1 or None (S): 'auto' times "
                                                           "model calls, the adjoint makes VJPs")
        if solve.execution not in ("auto", "eager"):
            raise OptionError("grad_options.solve.execution", f"the adjoint runs eager rounds (an autograd "
                                                              f"backward per round), got {solve.execution!r}")
        if self.form not in ("drift", "scan", "plain"):
            raise ValueError(f"grad_options.form: expected 'drift', 'scan' or 'plain', got {self.form!r}")
        if self.vjp not in ("stored", "recompute"):
            raise ValueError(f"grad_options.vjp: expected 'stored' or 'recompute', got {self.vjp!r}")
        if not isinstance(self.phantom_steps, int) or self.phantom_steps < 1:
            raise ValueError(f"grad_options.phantom_steps: expected an int >= 1, got {self.phantom_steps!r}")
        if not 0 < self.phantom_tau <= 1:
            raise ValueError(f"grad_options.phantom_tau: expected 0 < tau <= 1, got {self.phantom_tau!r}")


def adjoint_multipliers(schedule: Schedule, form: AdjointForm, device, dtype) -> torch.Tensor:
    """``[S]`` scan multipliers ``L_k`` of the adjoint form (see the module docstring)."""
    schedule.refuse_multistep("the adjoint (implicit and phantom gradients)")
    if form == "drift":
        return torch.ones(schedule.num_steps, device=device, dtype=dtype)
    if form == "plain":
        return torch.zeros(schedule.num_steps, device=device, dtype=dtype)
    if not schedule.is_affine:
        raise ValueError(
            f"grad_options.form: 'scan' needs affine steps; this schedule's x0 transform is "
            f"{schedule.transform.kind!r} (use 'drift')"
        )
    return schedule.a_coef.to(device=device, dtype=dtype)


class ChainVJP:
    """``v -> [J_k^T v_k for all k]``: one autograd graph of every step at the fixed point.

    ``trajectory``: ``[S+1, B, *shape]`` forward fixed point. The graph is built once (one model
    batch of ``S*B`` rows) and each call is one batched vector-Jacobian product over all steps
    (``retain_graph`` keeps it for the next round). Only ``x`` is differentiated: model
    parameters get no gradient. The noise is left out of the graph because it enters each step
    additively and so does not change ``J_k``.
    """

    def __init__(self, ev: ModelEvaluator, trajectory: torch.Tensor, schedule: Schedule) -> None:
        s, batch = schedule.num_steps, trajectory.shape[1]
        shape = trajectory.shape[2:]
        dev, dt = trajectory.device, trajectory.dtype
        self.shape = (s, batch, math.prod(shape))
        ts = schedule.timesteps.to(dev).repeat_interleave(batch)
        idx = torch.arange(batch, device=dev).repeat(s)
        coef = schedule.packed(dev, dt).unsqueeze(1).expand(s, batch, -1)
        with torch.enable_grad():
            self.x = trajectory[:s].detach().requires_grad_()
            e = ev(self.x.reshape(s * batch, *shape), ts, idx, round_index=0)
            self.out = step_rows(self.x.reshape(self.shape), e.reshape(self.shape), None, coef, schedule.transform)
        #: model rows evaluated to build the graph, and VJP rows computed since (each latent row
        #: is ev.rows_per_latent model rows: two under guidance)
        self.build_rows = s * batch * ev.rows_per_latent
        self.rows_per_latent = ev.rows_per_latent
        self.vjp_rows = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """``v``: ``[S, B, D]`` cotangents of ``x[1..S]``; returns ``[S, B, D]`` ``J_k^T v_k``."""
        self.vjp_rows += self.shape[0] * self.shape[1] * self.rows_per_latent
        (r,) = torch.autograd.grad(self.out, self.x, grad_outputs=v, retain_graph=True)
        return r.reshape(self.shape)

    def rows(self, v: torch.Tensor, step: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """``J_k^T v`` for rows ``(step k, sample b)``: scattered into one batched VJP over the
        whole chain (steps are independent, so the other steps' zeros cost only time)."""
        full = torch.zeros(self.shape, device=v.device, dtype=v.dtype)
        full[step, sample] = v
        return self(full)[step, sample]


class RecomputeVJP:
    """``J_k^T v`` for any rows ``(step k, sample b)``, recomputing each row's step with autograd
    on the call: memory O(rows), a model forward and backward per row (``vjp="recompute"``)."""

    def __init__(self, ev: ModelEvaluator, trajectory: torch.Tensor, schedule: Schedule) -> None:
        s, batch = schedule.num_steps, trajectory.shape[1]
        self.ev, self.schedule = ev, schedule
        self.x = trajectory[:s].detach().reshape(s, batch, -1)
        self.shape = trajectory.shape[2:]
        self.ts = schedule.timesteps.to(trajectory.device)
        self.coef = schedule.packed(trajectory.device, trajectory.dtype)
        self.build_rows = 0  #: no graph is built up front
        self.vjp_rows = 0

    def rows(self, v: torch.Tensor, step: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = self.x[step, sample].requires_grad_()
            e = self.ev(x.reshape(-1, *self.shape), self.ts[step], sample, round_index=0).reshape(x.shape)
            out = step_rows(x, e, None, self.coef[step], self.schedule.transform)
            (r,) = torch.autograd.grad(out, x, grad_outputs=v)
        self.vjp_rows += step.numel() * self.ev.rows_per_latent
        return r


@dataclass
class AdjointSolution:
    """``lam``: ``[S+1, B, D]`` adjoints ``lam_k = dL/dx[k]`` (``lam[0] = dL/dx_T``)."""

    lam: torch.Tensor
    rounds: int
    converged: torch.Tensor
    #: per round, per sample: ``||lam' - lam|| / ||lam'||`` over the sample's live rows
    residuals: list[list[float]] = field(default_factory=list)
    #: vector-Jacobian product rows computed (S*B per round, in model rows: twice that under guidance)
    vjp_rows: int = 0
    fallbacks: int = 0


def solve_adjoint(
    vjp: ChainVJP | RecomputeVJP, lam_S: torch.Tensor, multipliers: torch.Tensor, config: GradConfig
) -> AdjointSolution:
    """Solve ``lam_k = J_k^T lam_{k+1}`` for all k at once (module docstring).

    ``vjp``: row VJPs ``vjp.rows(v, step, sample) = J_step^T v``; ``lam_S``: ``[B, D]``;
    ``multipliers``: ``[S]`` the form's ``L_k``. Every ``lam_k`` starts at ``lam_S``, as every
    forward latent starts at ``x_T`` (warm-starting from the previous optimisation step's adjoint
    is not offered: ``lam_S = dL/dx0`` changes direction from step to step).

    It is the engine's solve (:func:`deqkern.engine.solve`) in reversed time: position ``p``
    holds ``lam_{S-p}``, the "model" of the row at position ``p`` is the VJP of step ``S-1-p``
    with its value as cotangent, and the step is that output plus the form's scan, i.e. the
    coefficients ``L = L_{S-1-p}``, ``co = 1`` and all others 0. Same rounds, stopping rule,
    freezing, solvers and window as sampling.
    """
    batch, dim = lam_S.shape
    s = multipliers.numel()
    dev, dt = lam_S.device, lam_S.dtype
    c = config.solve
    width = s if c.window is None else min(c.window, s)
    coef = torch.zeros(s, len(COEF_FIELDS), device=dev, dtype=dt)
    coef[:, COEF_FIELDS.index("L")] = multipliers.flip(0)
    coef[:, COEF_FIELDS.index("co")] = 1.0
    p = Problem(
        coef=coef, timesteps=torch.arange(s, device=dev), noise_var=torch.ones(s, device=dev, dtype=torch.float64),
        noise=None, init=None, transform=X0Transform(), shape=torch.Size((batch, dim)), width=width,
        tol=DEFAULT_TOL if c.tol is None else c.tol, stop=c.stop,
        max_iters=s if c.max_iters is None else c.max_iters,
        # the plain and scan adjoints are both scans with the multipliers in coef's L column
        form="drift" if config.form == "drift" else "scan",
        entering="copy" if c.extrapolate is False else "linear",
    )
    before = vjp.vjp_rows

    def rows_vjp(u: torch.Tensor, pos: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        # the live rows (sample, position) of one round; position p is lam_{S-p}, step S-1-p
        return vjp.rows(u, s - 1 - pos, sample)

    ev = ModelEvaluator(rows_vjp, {"sample": torch.arange(batch, device=dev)})
    ws = Workspace(p, lam_S, ev, c.solver, c.solver_options, return_trajectory=True)
    out = solve(ws)
    return AdjointSolution(
        lam=ws.st.traj[: s + 1].flip(0), rounds=out.rounds, converged=out.converged, residuals=out.residuals,
        vjp_rows=vjp.vjp_rows - before, fallbacks=out.info["fallbacks"],
    )


def phantom_gradient(
    ev: ModelEvaluator, trajectory: torch.Tensor, noise: torch.Tensor | None, schedule: Schedule,
    grad_x0: torch.Tensor, config: GradConfig, noise_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """DEQ-DDIM's damped phantom gradient (Pokle et al. 2022; locuslab/deq-ddim, ``find_source_noise_deq``).

    From the detached fixed point ``Z* = trajectory`` (positions 0..S, row 0 = x_T), unroll
    ``k = phantom_steps`` damped steps of the fixed-point map ``G`` in the schedule's form,

        Z_0 = stopgrad(Z*),    Z_{i+1} = (1 - tau) Z_i + tau G(Z_i; x_T, z),

    where ``G(Z)_0 = x_T`` and ``G(Z)_{k+1} = L_k G(Z)_k + step_k(Z_k, model(Z_k), z_k) - L_k Z_k``
    (``L = 1`` drift, ``L = A`` the paper's scan form), and backpropagate ``dL/dx0`` through
    ``x0 = Z_k[S]`` to ``x_T`` and ``z``. Because ``Z_0`` is detached, the first unrolled step
    reaches ``x_T`` and ``z`` only through their *explicit* appearance in ``G`` — the anchor and
    the additive noise — so with ``k = 1`` (the paper's setting, ``tau = 0.1``) the model
    Jacobian is dropped entirely and

        dL/dx_T ~= tau (prod_k L_k) dL/dx0,        dL/dz_k ~= tau sigma_k (prod_{j>k} L_j) dL/dx0,

    i.e. a scaled copy of the output residual (``prod L = 1`` in the drift form,
    ``sqrt(a_final / a_T)`` in the scan form). With ``k > 1`` the later unrolled steps evaluate the
    model at inputs that depend on ``x_T`` (weight ``tau``), so model Jacobians enter there, as in
    the paper's code. It is not the gradient of anything in general; Adam's per-coordinate
    normalisation makes its scale irrelevant, only its direction matters.

    Returns ``(dL/dx_T, dL/dz (None without noise or ``noise_grad``), model rows evaluated, VJP rows)``.
    """
    s, batch = schedule.num_steps, trajectory.shape[1]
    shape = trajectory.shape[2:]
    dim = math.prod(shape)
    dev, dt = trajectory.device, trajectory.dtype
    coef = schedule.packed(dev, dt).unsqueeze(1).expand(s, batch, -1)
    # the secant form's multipliers adapt during a solve; its map starts as the drift form's
    mult = adjoint_multipliers(schedule, "drift" if schedule.form == "secant" else schedule.form, dev, dt)
    ts = schedule.timesteps.to(dev).repeat_interleave(batch)
    idx = torch.arange(batch, device=dev).repeat(s)
    steps, tau = config.phantom_steps, config.phantom_tau
    evals = vjp_rows = 0
    with torch.enable_grad():
        x_T = trajectory[0].detach().requires_grad_()
        z = None if noise is None else noise.detach().requires_grad_(noise_grad)
        zs = None if z is None else z.reshape(s, batch, dim)
        it = trajectory.detach().reshape(s + 1, batch, dim)
        for i in range(steps):
            x_in = it[:s]
            if steps == 1:
                # Only the gradient of the single unrolled step is used, and with a detached
                # input it does not depend on the model output: skip the model batch.
                e = torch.zeros_like(x_in)
            elif i == 0:
                with torch.no_grad():
                    e = ev(x_in.reshape(s * batch, *shape), ts, idx, round_index=i).reshape(s, batch, dim)
                evals += s * batch * ev.rows_per_latent
            else:
                e = ev(x_in.reshape(s * batch, *shape), ts, idx, round_index=i).reshape(s, batch, dim)
                evals += s * batch * ev.rows_per_latent
                vjp_rows += s * batch * ev.rows_per_latent
            inc = step_rows(x_in, e, zs, coef, schedule.transform) - mult.view(s, 1, 1) * x_in
            anchor = x_T.reshape(batch, dim)
            g = linear_scan(anchor, mult.view(1, s).expand(batch, s), inc.transpose(0, 1)).transpose(0, 1)
            it = (1 - tau) * it + tau * torch.cat([anchor.unsqueeze(0), g])
        with_z = z is not None and noise_grad
        wrt = [x_T, z] if with_z else [x_T]
        grads = torch.autograd.grad(it[s].reshape(grad_x0.shape), wrt, grad_outputs=grad_x0, allow_unused=True)
    g_x = torch.zeros_like(x_T) if grads[0] is None else grads[0]
    g_z = None if not with_z else (torch.zeros_like(z) if grads[1] is None else grads[1])
    return g_x, g_z, evals, vjp_rows
