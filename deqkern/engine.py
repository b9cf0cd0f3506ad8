"""The parallel fixed-point solve: its problem, state, rounds and reusable workspace (the public
samplers built on it are in :mod:`deqkern.sampling`).

One round (docs/math.md §2-§4, §6), per sample ``b`` with frozen prefix ``x[0..k0_b]``:

1. evaluate the model on the live rows ``x[k0_b + j]``, ``j < n_b = min(W, S - k0_b)``, of all
   samples in one batch (chunked by ``max_batch``);
2. ``scan_residual``: new iterate ``G(X)``, residual, row norms (and the Anderson Gram row);
3. ``round_status``: the stopping rule per row; the leading rows that pass *plus one* are
   frozen at their ``G`` value (the first failing row's ``G`` is computed from accepted inputs,
   and row 0's ``G`` is always exact, so the window advances by at least one row per round: the
   solve ends in at most S rounds and Picard reproduces the sequential chain exactly; the x0
   rule refines which rows pass); the residual log and the distance to the stop;
4. the solver (Picard, Anderson, ...) proposes the next iterate of the other rows (a sample that
   diverged takes Picard steps from its frozen prefix instead: :class:`DivergenceGuard`);
5. ``commit_window``: each sample's window slides by its own frozen count (new rows start from
   ``init``, or step the chain with the last model output held (one-step affine chains), or
   continue the last step linearly (other deterministic chains), or copy the last computed row
   as ParaDiGMS does) and, in fixed-shape rounds, the next model input is written
   in the model's dtype — one pass.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import torch

from deqkern._nvtx import annotate
from deqkern.errors import NonFiniteModelOutput
from deqkern.graphs import ChunkRunner, snapshot, state_tensors
from deqkern.model import ModelEvaluator
from deqkern.ops import (
    LINEAR_REACH, SECANT_SAFETY, ScanResult, carry_converted, commit_window, latent_gain_bound, latent_gains,
    past_window_factor, round_status, rounding_floor, scan_residual, step_secants,
)
from deqkern.ops.window import RowSlide
from deqkern.schedule import Form, X0Transform
from deqkern.solvers import Solver, get_solver

StopRule = Literal["relative", "noise", "x0"]
Entering = Literal["copy", "linear", "held"]
Execution = Literal["auto", "eager", "static", "graph", "audit"]
#: a solve's progress bar: off (False), on (True), or on with these tqdm options
Progress = bool | Mapping[str, Any]


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Problem:
    """Everything constant during one parallel solve, on the solve's device."""

    coef: torch.Tensor  #: [S, 7] step coefficients (COEF_FIELDS order)
    timesteps: torch.Tensor  #: [S] int64
    noise_var: torch.Tensor  #: [S] float64, scale of the noise stopping rule
    noise: torch.Tensor | None  #: [S, B, D]
    init: torch.Tensor | None  #: [S+1, B, D] warm start by position
    transform: X0Transform
    shape: torch.Size  #: x_T.shape
    width: int
    tol: float
    stop: StopRule
    max_iters: int
    #: the fixed-point form: "drift" (every L = 1), "scan" (L from ``coef``) or "secant" (L per
    #: sample and row, adapted every round: SolveState.secant)
    form: Form
    #: how rows entering a sliding window start (ops.commit_window): a copy of the last computed
    #: row, the last step continued linearly, or the chain stepped with the last model output held
    #: (affine chains, a multistep one holding its converted output: ``ahead``, docs/math.md §2);
    #: chosen by bench/solver_studies.py entering
    entering: Entering = "copy"
    #: [S, 7] the steps with the last model output held (Schedule.packed_held), read when ``entering`` is "held"
    held_coef: torch.Tensor | None = None
    #: [S, 4] a multistep chain's previous-output coefficients (Schedule.packed_multistep), None otherwise
    ms_coef: torch.Tensor | None = None
    #: [S, 3] float64 a multistep chain's terms of the x0 rule (Multistep.packed_x0), None otherwise
    x0_extra: torch.Tensor | None = None
    #: [S, 5] float64 a multistep chain's steps for a scalar model (Schedule.multistep_linear), None otherwise
    ms_linear: torch.Tensor | None = None
    #: [S+1] the latents' scale against VP coordinates (Schedule.coords), None: VP already. The
    #: drift form's L is then not 1 (the scan is no plain cumulative sum), the first guess of row k
    #: is x_T's VP latent in row k's coordinates, ``x_T coords[k] / coords[0]``, and rows entering
    #: the window are copied or extrapolated in VP coordinates (ops.commit_window)
    coords: torch.Tensor | None = None
    #: [S] float64 the model's input scale per step (StepInputs.scale: Euler's ``1 / sqrt(sigma^2 +
    #: 1)``), None: 1. The x0 rule lends the model's Jacobian in the model's own input units, so a
    #: slope measured at one step carries to another whose latents are 150x larger (StepSecants.lend)
    input_scale: torch.Tensor | None = None
    #: ``arange(W)`` and ``arange(B)`` on the device, made once: every round indexes with them, and
    #: inside a captured graph each arange would be a kernel node of every round
    row_index: torch.Tensor = field(init=False, repr=False)
    sample_index: torch.Tensor = field(init=False, repr=False)
    #: ``[B, W]`` NaN: the steps' secants when none are measured (stopping rules other than x0 do not read them)
    unmeasured: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.row_index = torch.arange(self.width, device=self.coef.device)
        self.sample_index = torch.arange(self.batch, device=self.coef.device)
        self.unmeasured = torch.full((self.batch, self.width), math.nan, dtype=torch.float64, device=self.coef.device)

    @property
    def drift(self) -> bool:
        """Every ``L`` is 1: the drift form in latents that are VP coordinates already."""
        return self.form == "drift" and self.coords is None

    @property
    def secant(self) -> bool:
        return self.form == "secant"

    @property
    def steps(self) -> int:
        return self.coef.shape[0]

    @property
    def batch(self) -> int:
        return self.shape[0]

    @property
    def dim(self) -> int:
        return math.prod(self.shape[1:])


@dataclass
class SolveState:
    """The mutable device state of a solve. Rounds update it *in place* and never sync with the
    host, so a chunk of rounds can be captured once as a CUDA graph and replayed."""

    xw: torch.Tensor  #: [B, W+1, D] window latents; row 0 is the frozen anchor x[k0]
    k0: torch.Tensor  #: [B] int64 frozen prefix length (x[0..k0] final)
    rounds: torch.Tensor  #: () int64 rounds in which some sample was active
    done_round: torch.Tensor  #: [B] int64 round at which the sample's last row froze (0: not yet)
    res_log: torch.Tensor  #: [max_iters+1, B] float64 per-round relative residual (last row: scratch)
    bad_t: torch.Tensor  #: [max_iters+1] int64 largest timestep with non-finite output (-1: none)
    #: [B] float64 the last round's worst live row in units of the stopping test (``err / tol``,
    #: 0 once inactive): how near the solve is to its stop, whatever the rule
    worst: torch.Tensor
    #: [B] float64 the x0 rule's error budget spent so far, in units of ||x0|| (ops.reference.x0_accepted_rows)
    spent: torch.Tensor
    traj: torch.Tensor | None  #: [S+2, B, D] latents by position (last row: scratch)
    guard: DivergenceGuard  #: per sample: has it diverged, and how its residual went
    #: [B, W, D] the next model input in the model's dtype (fixed-shape rounds only): written by
    #: the round's commit, read by the next model call
    model_in: torch.Tensor | None = None
    #: the secant form's multipliers ``L`` [B, W] (:func:`secant_update`; start at 1, the drift form)
    secant: torch.Tensor | None = None
    #: the steps' secants per window row (the x0 rule, the secant form), rows like ``xw[:, :W]``
    secants: StepSecants | None = None
    #: [B, D] multistep chains: the converted output of the row before the anchor, x[k0-1]
    #: (zero at k0 = 0, whose step reads none), slid with the window (ops.reference.carry_converted)
    prev_u: torch.Tensor | None = None

    @classmethod
    def start(cls, p: Problem, x_T: torch.Tensor, return_trajectory: bool) -> "SolveState":
        b, d, dev = p.batch, p.dim, x_T.device
        flat = x_T.reshape(b, d)
        if p.init is None:
            xw = flat.unsqueeze(1).repeat(1, p.width + 1, 1)
            if p.coords is not None:  # every row at x_T in VP coordinates (docs/math.md §3)
                xw.mul_((p.coords[: p.width + 1] / p.coords[0]).to(xw.dtype).view(1, -1, 1))
        else:
            xw = p.init[: p.width + 1].transpose(0, 1).clone()
        traj = None
        if return_trajectory:
            traj = torch.zeros(p.steps + 2, b, d, device=dev, dtype=x_T.dtype)
            traj[0] = flat
        secant = torch.ones(b, p.width, device=dev, dtype=p.coef.dtype) if p.secant else None
        secants = (StepSecants.start(b, p.width, d, dev, x_T.dtype, secant_form=p.secant,
                                     transform=p.transform if p.stop == "x0" and p.transform.kind != "none"
                                     else None, multistep=p.ms_coef is not None)
                   if p.secant or p.stop == "x0" else None)
        prev_u = None if p.ms_coef is None else torch.zeros(b, d, device=dev, dtype=x_T.dtype)
        return cls(
            xw=xw, k0=torch.zeros(b, dtype=torch.int64, device=dev), secant=secant, secants=secants,
            guard=DivergenceGuard.start(b, dev),
            rounds=torch.zeros((), dtype=torch.int64, device=dev),
            done_round=torch.zeros(b, dtype=torch.int64, device=dev),
            res_log=torch.full((p.max_iters + 1, b), float("nan"), dtype=torch.float64, device=dev),
            bad_t=torch.full((p.max_iters + 1,), -1, dtype=torch.int64, device=dev), traj=traj,
            worst=torch.full((b,), math.inf, dtype=torch.float64, device=dev),
            spent=torch.zeros(b, dtype=torch.float64, device=dev), prev_u=prev_u,
        )


#: Range of the secant form's multipliers: above 1 the scan stops being a contraction.
#: Measured once on the digits model, no study yet.
SECANT_RANGE = (0.0, 1.0)


#: ulps of the inputs and outputs a secant's ``ds - L dx`` can carry from rounding (s is recovered
#: from the scan, two rounds apart); added to the secants over ``||dx||``
SECANT_ROUNDING = 4.0
#: a secant counts only where that rounding slack is at most this (else the row keeps its last one,
#: as for no move): chosen from 1, 0.1 and 0.01 on two digits chains, one-off runs of 2026-11-30
#: (docs/math.md §4.3 has their rounds; not a study)
SECANT_SLACK_CAP = 0.01
#: the ``dev`` of a row the x0 rule has nothing to bound with (StepSecants.before_any_measurement):
#: finite, so a row with an exactly zero residual still costs 0, and no other residual fits the budget
NO_BOUND = 1e200


def incoming_residual(f: torch.Tensor) -> torch.Tensor:
    """``[B, W, D]`` float64: the residual each window row's input carries when the row before it is
    frozen, ``f[:, j - 1]``, and zero on row 0 (its input is the anchor). ``f``: the round's residuals."""
    return torch.cat([torch.zeros_like(f[:, :1]), f[:, :-1]], dim=1).to(torch.float64)


@dataclass
class StepSecants:
    """Per window row ``(b, j)``: the row's input and step output of the last round, whether they
    hold the row's position, and the secants of its step measured from them (the x0 rule's gains,
    :func:`deqkern.ops.reference.step_secants`; the secant form's fit)."""

    x: torch.Tensor  #: [B, W, D] last round's input x_j
    s: torch.Tensor  #: [B, W, D] last round's step output step_j(x_j)
    valid: torch.Tensor  #: [B, W] bool: x and s hold the row's position
    gain: torch.Tensor  #: [B, W] float64 the latest measured ||J dx|| / ||dx|| (NaN: none)
    dev: torch.Tensor  #: [B, W] float64 the latest measured ||(J - L) dx|| / ||dx|| (NaN: none)
    #: [B, W] float64 the measurement before it at the same position (NaN: none); read in the secant form
    dev_prev: torch.Tensor
    #: [B, W] float64 the tightest secant, slack included, along a move within the reach since the
    #: row last moved past it or entered (NaN: none): a secant whose rounding slack was over
    #: SECANT_SLACK_CAP is no measurement to replace one, but better than the latent's gain on a row
    #: with nothing else (a warm start close to the chain, or a half-precision model, moves its rows
    #: too little for a measurement: docs/math.md §4.3)
    dev_loose: torch.Tensor
    #: [B, W] bool: the row's last move was past LINEAR_REACH; its ``J - L`` falls back to the
    #: latent-gain bound with a margin (:meth:`_borrowed`), not the lend (a lend from the few rows
    #: measured near could cancel against the row's own coefficients: the deep profile, a
    #: secant-form "sample" chain, 2.2x outside)
    far: torch.Tensor
    #: [B, W] bool: the row has moved past LINEAR_REACH since its last measurement
    jumped: torch.Tensor
    #: [B, W] bool: the row's measurement this round is its first since a move past LINEAR_REACH
    #: (:meth:`first_direction` tilts it: such a move is not yet a correction of the row's residual);
    #: rewritten by every :meth:`measure`, so the slide leaves it
    returned: torch.Tensor
    #: [B, 4] float64 what rows not measured yet borrow (:meth:`rule_dev`), over every row measured
    #: so far in the solve (NaN: none yet): with ``u = dx / ||dx||``, the least and largest ``<u, E u>``,
    #: the largest ``||E u||^2`` and the largest ``||E u||^2 - <u, E u>^2``, the part of ``E u`` off
    #: ``u`` (E: the model's Jacobian in its own input's units, the latent's Jacobian over the
    #: step's input scale: Problem.input_scale)
    lend: torch.Tensor
    #: [B, W] float64 the row's latest ``<dx, E dx> / ||dx||^2`` (model-input units; NaN: none), the
    #: model's slope where the row is, which a multistep chain's excess reads (:func:`multistep_dev`)
    slope: torch.Tensor
    #: the secant form: ``L`` is fitted to the previous secant, so the latest ``dev`` (the newest
    #: secant against it) can vanish by coincidence; :meth:`rule_dev` takes the larger of the last two
    secant_form: bool = False
    #: chains with an x0 transform (clip, threshold) under the x0 rule: the transform (a step
    #: secant can cross its kink; :meth:`measure`, :meth:`transformed_bounds`); None on affine chains
    transform: X0Transform | None = None
    #: [B, W, D] last round's model outputs, whose secants measure the model's Jacobian ``E``
    #: directly (:meth:`measure`); zeros until the first round
    e: torch.Tensor | None = None
    #: multistep chains: a step also reads the previous row's converted output, so its secant
    #: ``ds`` (from the scan) carries that row's move too (a DPM-Solver chain of ``tanh(0.019 x)``
    #: read model slopes of -8.9 and 389 from ``(ds - cx dx) / co``)
    multistep: bool = False

    @classmethod
    def start(cls, batch: int, width: int, dim: int, device, dtype, secant_form: bool = False,
              transform: X0Transform | None = None, multistep: bool = False) -> "StepSecants":
        nan = torch.full((batch, width), math.nan, device=device, dtype=torch.float64)
        return cls(
            x=torch.zeros(batch, width, dim, device=device, dtype=dtype),
            s=torch.zeros(batch, width, dim, device=device, dtype=dtype),
            valid=torch.zeros(batch, width, device=device, dtype=torch.bool), gain=nan, dev=nan.clone(),
            dev_prev=nan.clone(), dev_loose=nan.clone(), far=torch.zeros(batch, width, device=device, dtype=torch.bool),
            jumped=torch.zeros(batch, width, device=device, dtype=torch.bool),
            returned=torch.zeros(batch, width, device=device, dtype=torch.bool),
            secant_form=secant_form,
            lend=torch.full((batch, 4), math.nan, device=device, dtype=torch.float64), slope=nan.clone(),
            transform=transform, e=torch.zeros(batch, width, dim, device=device, dtype=dtype), multistep=multistep,
        )

    def measure(
        self, xw: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, live: torch.Tensor, e: torch.Tensor,
        f: torch.Tensor | None = None, scale: torch.Tensor | None = None, coarse: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Record this round's inputs, step outputs and model outputs and the secants they give;
        returns ``(dx, ds, valid)``, the moves since the last round and where they are one row's
        (for the secant form).

        ``s_j = g_j - L_j (g_{j-1} - x_j)`` is recovered from the scan (``g_{-1}`` = the anchor).
        The model's Jacobian along the move is the model outputs' own secant, ``E dx = de``. On an
        affine one-step chain (``s = cx x + co e + sigma z``, the noise the position's own) the step's
        secants are built from it in float64, ``ds = cx dx + co de``, which leaves only the model's
        own rounding, ``|co|`` times ulps of ``e``. The scan's ``ds`` carries the float32 rounding of
        ``g`` and ``s`` on the scale of the latent, a slack of ``24 eps ||x|| / ||dx||``: 0.01 on a
        move of 3e-4 of the latent, where DDIM S = 1000 measures ``J - L`` of 0.001, and no
        measurement at all below (docs/math.md §4.3). Chains with an x0 transform
        (:meth:`_measure_transformed`), multistep chains (:attr:`multistep`) and half-precision
        models (``coarse``) keep the scan's ``ds``. Fixed shapes, no host sync. ``xw``: the
        window ``[B, W+1, D]`` before the commit; ``coef``: ``[B, W, 7]`` this round's step
        coefficients with the scan's ``L`` in field 0; ``e``, ``f``: ``[B, W, D]`` the round's
        model outputs and residuals (``f`` read on chains
        with an x0 transform: how far a freeze can move the next row); ``scale``: ``[B, W]`` float64
        the rows' model-input scales (Problem.input_scale; None: 1), which the lend divides out;
        ``coarse``: the model rounds coarser than ``x``'s dtype (a half-precision ``model_dtype``):
        the secants come from the scan."""
        width = g.shape[1]
        x = xw[:, :width]
        mult = coef[..., 0]
        g_prev = torch.cat([xw[:, :1], g[:, :-1]], dim=1)
        s = g - mult.unsqueeze(-1).to(g.dtype) * (g_prev - x)
        dx, ds = x - self.x, s - self.s
        c = coef.to(torch.float64)
        dx64 = dx.to(torch.float64)
        den = dx64.square().sum(-1)
        x_sq = x.to(torch.float64).square().sum(-1)
        e_dx = (e - self.e).to(torch.float64)  # exact: both are the model's outputs in x's dtype
        nrm = lambda v: v.to(torch.float64).square().sum(-1).sqrt()  # noqa: E731
        eps = torch.finfo(x.dtype).eps
        # what rounding can put in ds - L dx, over ||dx||: a move of a few ulps measured dev = 0 in
        # float32 and froze a row at tol 1e-30 (the deep profile, _ulp_move). Secants carry it, and
        # one with more than SECANT_SLACK_CAP is no measurement (carrying any slack cost DPM-Solver++
        # S = 100 W = 25 26 rounds; dropping every secant below its slack, DDIM S = 1000 W = 10 69)
        # a half-precision model's secants come from the scan, its rounding counted in the slope: as
        # slack on its outputs (1e-3 in float16) it left no secant a measurement (docs/math.md §4.3)
        exact = self.transform is None and not self.multistep and not coarse
        e_slack = None
        if exact:
            # from the model outputs: only their own rounding (ulps of e) is left; the rounding of
            # the model's outputs over ||dx|| is the slack of E dx itself (the digits UNet's float32
            # outputs differ by 2 ulps between batches)
            e_slack = SECANT_ROUNDING * eps * (nrm(e) + nrm(self.e)) / den.sqrt()
            ds64 = c[..., 1:2] * dx64 + c[..., 2:3] * e_dx
            gain, dev = step_secants(dx64, ds64, c[..., 0])
            slack = c[..., 2].abs() * e_slack
        else:
            gain, dev = step_secants(dx, ds, mult)
            slack = (SECANT_ROUNDING * eps * (nrm(s) + nrm(self.s) + 2 * mult.to(torch.float64).abs()
                     * (x_sq.sqrt() + nrm(self.x))) / den.sqrt())
        loose = dev + slack
        gain = torch.where(slack <= SECANT_SLACK_CAP, gain + slack, math.nan)
        dev = torch.where(slack <= SECANT_SLACK_CAP, dev + slack, math.nan)
        valid = self.valid & live
        # a secant across a long move is no bound on J - L at the row (LINEAR_REACH): neither the
        # row's own nor what other rows borrow (lend). Its gain stays on affine chains: the rule takes
        # the larger of it and the latent's gain, which alone misleads where the latent shrinks (the
        # deep profile: a DDPM chain near x0 = 0, 1.01x outside); transformed chains lend one instead
        near = valid & (den <= LINEAR_REACH**2 * x_sq)
        measured = valid & torch.isfinite(gain) & torch.isfinite(dev)
        fresh = measured & near
        self.forget(valid & ~near)
        # rounds near the position that measure nothing (no move, or one within the rounding slack)
        # leave the row jumped: its first measurement is still the one after the jump
        self.returned.copy_(fresh & self.jumped)
        self.jumped.copy_((self.jumped | (valid & ~near)) & ~fresh)
        self.far.copy_(torch.where(valid, ~near, self.far))
        self.gain.copy_(torch.where(measured if self.transform is None else fresh, gain, self.gain))
        self.dev_prev.copy_(torch.where(fresh, self.dev, self.dev_prev))
        self.dev.copy_(torch.where(fresh, dev, self.dev))
        # a row keeps the tightest loose bound it has measured near its position: once a row sits at
        # the rounding floor its moves are a few ulps and their slack grows as 1 / ||dx|| (a float16
        # model at tol 1e-2, DDIM S = 100, while its rounding was charged as slack: the latest took
        # 77 rounds, the tightest 14)
        self.dev_loose.copy_(torch.where(valid & near & torch.isfinite(loose), torch.fmin(loose, self.dev_loose),
                                         self.dev_loose))
        # the model's Jacobian along dx as the two numbers rule_dev needs to rebuild ||(J - L) dx||
        # for other coefficients
        ok = (near if self.transform is not None else fresh) & (den > 0)
        if exact:
            # the lend lends E to rows of any co: only secants whose E the rounding leaves alone (a
            # row of small co measured dev within the cap along a move of an ulp, E 2x off)
            ok = ok & (e_slack <= SECANT_SLACK_CAP)
        p = torch.where(ok, (dx64 * e_dx).sum(-1) / den, math.nan)
        q = torch.where(ok, e_dx.square().sum(-1) / den, math.nan)
        if self.transform is not None:
            self._measure_transformed(x, e, f, e_dx, dx64, den, q, c, ok)
        else:
            self.e.copy_(e)
        if scale is not None:  # the lend in the model's input units: E = scale E_model
            p, q = p / scale, q / scale.square()
        self.slope.copy_(torch.where(ok, p, self.slope))
        off = q - p * p  # ||E u||^2 = <u, E u>^2 + ||E u - <u, E u> u||^2 (u = dx / ||dx||)
        stats = torch.stack([
            torch.where(ok, p, math.inf).amin(dim=1), torch.where(ok, p, -math.inf).amax(dim=1),
            torch.where(ok, q, -math.inf).amax(dim=1), torch.where(ok, off, -math.inf).amax(dim=1),
        ], dim=1)
        # the extremes over every row measured so far in the solve, not only this round's: a lend
        # from the latest (saturated) rows froze a warm-started residual 1.3x its latent (x0 2.8x
        # outside, _SATURATED_LEND), and from the one or two rows of a window of 2 a DDPM chain's
        # x0 1.9x outside (tests/test_contract.py _thin_lend, the contract suite's deep profile)
        seen = torch.stack([
            torch.fmin(self.lend[:, 0], stats[:, 0]), torch.fmax(self.lend[:, 1], stats[:, 1]),
            torch.fmax(self.lend[:, 2], stats[:, 2]), torch.fmax(self.lend[:, 3], stats[:, 3])], dim=1)
        self.lend.copy_(torch.where(ok.any(dim=1, keepdim=True), seen, self.lend))
        self.x.copy_(x)
        self.s.copy_(s)
        self.valid.copy_(live)
        return dx, ds, valid

    def before_any_measurement(
        self, gain: torch.Tensor, dev: torch.Tensor, first: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gain, dev)`` ``[B, W]`` for samples that have measured nothing yet (:attr:`lend` NaN),
        on rows with nothing of their own. With no step's gain known, the x0 rule takes an error to
        keep its size where the latent shrinks (``gain`` 1: ``r = max(log(1 / h), 0)``), not to
        shrink with it; and in the solve's first round (``first``, a bool tensor) such rows get
        :data:`NO_BOUND`: a freeze there rests on the initial guess alone. The latents' gains let a
        DPM-Solver chain whose latent shrinks 40x in one step, while the error shrank 3x, freeze a
        second row in its first round, x0 4.7x outside its bound (the harsh fuzz, thresholded
        DPM-Solver; ``tests/test_x0_bound_harsh.py: test_first_round_freezes_one_row``). Later rounds
        keep the unmeasured bound, so an exact warm start, whose rows do not move and so are never
        measured, still freezes its window each round."""
        nothing = ~torch.isfinite(self.lend[:, 2:3])
        gain = torch.where(nothing & ~torch.isfinite(gain), 1.0, gain)
        return gain, torch.where(nothing & first & ~torch.isfinite(dev), NO_BOUND, dev)

    def forget(self, rows: torch.Tensor) -> None:
        """Drop the secants of ``rows`` ``[B, W]`` (their bound falls back to the lend, then the
        latent's gain)."""
        for v in (self.gain, self.dev, self.dev_prev, self.dev_loose):
            v.masked_fill_(rows, math.nan)

    @property
    def model_gain(self) -> torch.Tensor:
        """``[B]`` float64 the model's largest measured gain ``||E dx|| / ||dx||`` in its own input's
        units (NaN: none yet; :attr:`lend`)."""
        return self.lend[:, 2].sqrt()

    def rule_gain(self, coef: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, W]`` float64 the ``||J||`` the x0 rule uses on an affine chain: the measured gain
        (NaN: none), and on rows whose last move went past LINEAR_REACH (:attr:`far`) at least the
        gain lent from the model's Jacobian measured near (:attr:`lend`, ``J = cx I + co E``). A
        long move's secant averages the slope over the move: a sample-prediction Euler chain of a
        ``sin`` model read 0.028 for a last-but-one step whose gain along the error was about 0.7,
        and its latent shrinks 40x there, so x0 ended 1.6x outside its bound (the fuzz of diffusers'
        Euler configs; test_far_row_gain_takes_the_lend). ``scale``: the rows' model-input scales."""
        c = coef.to(torch.float64)
        lent = self._lent(c[..., 1], _in_latent(c[..., 2], scale))
        return torch.where(self.far, torch.fmax(self.gain, lent), self.gain)

    def rule_dev(self, coef: torch.Tensor, h: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, W]`` float64 the ``||J - L||`` the x0 rule uses (``h``: ``[B, W]`` the latents'
        gains, ops.reference.latent_gains; ``scale``: the rows' model-input scales, None: 1): the
        measured secant ``dev``, and on rows not measured yet (rows entering the window) the step's
        own coefficients applied to the model's Jacobian measured on the others. A step without
        an x0 transform has ``J - L = a I + b E`` (``a = cx - L``, ``b = co``), so along a measured
        row's move ``dx`` (unit, ``E dx`` measured) ``||(J - L) dx||^2 = (a + b <dx, E dx>)^2 + b^2
        (||E dx||^2 - <dx, E dx>^2)``; the rule bounds it over the measured rows (:attr:`lend`, :meth:`_lent`). The first part keeps
        the cancellation of ``a`` against ``b E`` (``J`` near ``L``) that the triangle bound ``|a| +
        |b| ||E||`` loses: 20-40x on DDIM S = 1000, window 10 (bench/solver_studies.py lend). With
        nothing to borrow, a row's loose secant (:attr:`dev_loose`); before any measurement: NaN, the
        rule's latent-gain bound; on rows whose last move went past LINEAR_REACH (:attr:`far`): that
        bound with a safety margin (:meth:`_borrowed`); chains with an x0 transform use
        :meth:`transformed_bounds` instead. Lending rows with nothing measured the window's largest
        measured ``dev`` instead missed ``J - L`` up to 760x near x0 (it grows toward x0 with ``co``)
        and x0's bound 2.6x."""
        c = coef.to(torch.float64)
        dev = self._measured_dev()
        lent = self._borrowed(self._lent(c[..., 1] - c[..., 0], _in_latent(c[..., 2], scale)), self.gain, c[..., 0], h)
        return torch.where(torch.isfinite(dev), dev, torch.where(torch.isfinite(lent), lent, self.dev_loose))

    def first_direction(self, dev: torch.Tensor, gain: torch.Tensor, dx: torch.Tensor, f: torch.Tensor,
                        mult: torch.Tensor, h: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """``dev`` ``[B, W]`` (:meth:`rule_dev`) tilted toward the unmeasured bound, on a row's first
        measurement of a kind, by how far the error the row will carry lies off the move its secant
        was measured along.

        A secant bounds ``J - L`` along its move ``dx``; the error a frozen row leaves in row ``j``'s
        input is the row before's residual ``F_{j-1}``. Where ``J - L`` differs between elements the
        two can see very different slopes, so a measured row takes ``cos dev + sin max(dev, bound)``,
        ``cos = |<F_{j-1}, dx>| / (||F_{j-1}|| ||dx||)`` and ``bound`` the latent-gain bound
        (ops.reference.latent_gain_bound) over SECANT_SAFETY, which the rule puts back. It applies
        where the move is not yet a correction of the row's residual:

        * every measured row of a sample in its first measuring round (``first``, ``[B]`` bool: its
          lend empty before :meth:`measure`), whose move is the first one off the initial guess: on a
          flow chain of ``tanh(-3.13 x)`` it ran through saturated elements and read 0.0016 where
          the residual's elements saw 70x that, x0 2.0x outside its bound
          (tests/test_x0_bound_harsh.py: test_flow_secant_direction);
        * a row measured for the first time since a move past LINEAR_REACH (:attr:`returned`),
          whose move is still the solver's jump: on a float64 DDPM chain of ``tanh(0.1 x)`` whose x0
          is 150x x_T such secants read ``J - L`` 10-40x below its value along the residuals, x0
          1.4x outside its bound (tests/test_contract.py: test_amplified_ddpm_rows_back_from_far).

        Later moves are the solver's corrections, which follow the residuals; charging every round
        cost 1-5 rounds on the digits chains, and on every round of the secant form (whose ``L`` is
        fitted along the last move) DDIM S = 1000's full window 17 -> 179 (docs/math.md §4.3).
        ``gain``, ``mult``: the rows' gains (NaN: none) and ``L``; ``dx``, ``f``: ``[B, W, D]``
        this round's moves (:meth:`measure`) and residuals; ``h``: the latents' gains."""
        dx64 = dx.to(torch.float64)
        f_in = incoming_residual(f)
        dx_sq = dx64.square().sum(-1)
        den = (dx_sq * f_in.square().sum(-1)).sqrt()
        cos = torch.where(den > 0, (dx64 * f_in).sum(-1).abs() / den, 1.0).clamp(max=1.0)
        sin = (1.0 - cos * cos).clamp(min=0.0).sqrt()
        bound = latent_gain_bound(gain, h, mult) / SECANT_SAFETY
        tilted = cos * dev + sin * torch.fmax(dev, bound)
        return torch.where((first.unsqueeze(1) | self.returned) & (dx_sq > 0) & torch.isfinite(dev), tilted, dev)

    def _borrowed(self, lent: torch.Tensor, gain: torch.Tensor, mult: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``lent`` where a row may borrow ``J - L``; on rows whose last move went past LINEAR_REACH
        (:attr:`far`), the rule's latent-gain bound ``max(h, gain) + |L|``, which the rule then
        takes as a measured ``J - L``, times SECANT_SAFETY. Without that factor it had no margin
        where ``L`` is small: a scan-form "sample" chain's last step (``L = 0``) read ``||J|| = 0.52``
        where it was 0.88 at the row, x0 1.58x outside its bound (``_sin_scan``,
        tests/test_contract.py). ``gain``, ``mult``, ``h``: ``[B, W]`` the rows' gains as the rule
        reads them (NaN: none), their ``L`` and their latent gains (ops.reference.latent_gains)."""
        return torch.where(self.far, torch.fmax(gain, h) + mult.abs(), lent)

    def _measured_dev(self) -> torch.Tensor:
        """``[B, W]`` the latest measured ``dev``; in the secant form the larger of the last two:
        ``L`` was fitted to the previous secant, so the newest can match it by chance while ``J`` at
        the iterate does not (the contract suite's deep run: a 1-D shrinking chain, dev 4e-5 where
        ``|J - L|`` was about 1e-3, x0 2.9x outside the bound)."""
        if not self.secant_form:
            return self.dev
        return torch.where(torch.isfinite(self.dev_prev), torch.maximum(self.dev, self.dev_prev), self.dev)

    def _lent(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``[B, W]`` float64 a bound on ``||(a I + b E) u||`` over the unit moves ``u`` measured so
        far (:attr:`lend`), the smaller of two. Split ``E u`` along ``u`` and off it: ``||(a I + b E)
        u||^2 = (a + b <u, E u>)^2 + b^2 (||E u||^2 - <u, E u>^2)``; the first part is convex in ``<u,
        E u>``, so its largest over the measured rows is at one of their extremes, and the second
        takes their largest. Or expand it, ``a^2 + 2ab <u, E u> + b^2 ||E u||^2``, with the cross term
        at an extreme and the largest ``||E u||^2``. The second alone charged one row's slope with
        another's gain where ``a`` and ``b E`` cancel (``J`` near ``L``): DDIM S = 1000, window 10
        took 113 rounds instead of 106 (bench/solver_studies.py lend). The first alone pairs one row's
        slope with another's part off ``u``; each bounds every measured row's own value."""
        split, expanded = self._lent_squares(a, b)
        return torch.minimum(split, expanded).clamp(min=0.0).sqrt()

    def _lent_squares(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(split, expanded)`` ``[B, W]`` float64: the squares of :meth:`_lent`'s two bounds."""
        lo, hi, q, off = (v.unsqueeze(1) for v in self.lend.unbind(dim=1))
        split = torch.maximum((a + b * lo).square(), (a + b * hi).square()) + b * b * off.clamp(min=0.0)
        return split, a * a + torch.maximum(2 * a * b * lo, 2 * a * b * hi) + b * b * q

    def _measure_transformed(self, x: torch.Tensor, e: torch.Tensor, f: torch.Tensor, e_dx: torch.Tensor,
                             dx: torch.Tensor, den: torch.Tensor, q: torch.Tensor, c: torch.Tensor,
                             ok: torch.Tensor) -> None:
        """A transformed chain's ``gain`` and ``dev`` along the row's move ``dx`` (float64, ``e_dx``
        the model's secant ``E dx``): the step's Jacobian at this round's input, ``J = a + b E -
        c0 (I - J_f)(px + po E)`` (:meth:`transformed_bounds`), applied to ``dx``, ``J_f`` at the
        row's predicted x0 (X0Transform.jacobian_gap), instead of a step secant across the kink;
        ``den`` = ``||dx||^2`` and ``q`` = ``||E dx||^2 / ||dx||^2`` from :meth:`measure` (NaN off ``ok``).
        Freezing the row before leaves its residual ``F`` in this row's input, which moves the
        predicted x0 by ``px F + po E F``: elements within that reach of the kink (``E F`` bounded by
        the secant's gain times ``||F||``) count on both sides, as do those within the move. ``dev``
        is at least ``F``'s own mix of the two sides (docs/math.md §4.3): ``J - L`` inside the range
        and outside it, each along ``dx`` as if it held everywhere, weighed by ``F``'s share of norm
        on each side (``f``: this round's residuals; row ``j``'s ``F`` is ``f[j - 1]``)."""
        L, cx, co, c0, px, po = (c[..., i : i + 1] for i in range(6))
        x0 = (px * x.to(torch.float64) + po * e.to(torch.float64)).flatten(0, 1)
        f_in = incoming_residual(f)
        f_sq = f_in.square()
        f_norm = f_sq.sum(-1, keepdim=True).sqrt()
        reach = px.abs() * f_in.abs() + po.abs() * q.unsqueeze(-1).sqrt() * f_norm
        move = (px * dx + po * e_dx).flatten(0, 1)  # the move of the predicted x0
        sides = self.transform.slopes(x0, torch.maximum(move.abs(), reach.flatten(0, 1)))
        gap, rest = self.transform.jacobian_gap(x0, move, slopes=sides)
        jdx = (cx + c0 * px) * dx + (co + c0 * po) * e_dx - c0 * gap.view_as(dx)
        norm = den.sqrt()
        extra = c0[..., 0].abs() * rest.view(norm.shape)
        gain = (jdx.square().sum(-1).sqrt() + extra) / norm
        dev = ((jdx - L * dx).square().sum(-1).sqrt() + extra) / norm
        # J - L along dx weighs the elements inside and outside f's range as dx does; F, which the
        # freeze leaves, can lie elsewhere (the deep profile: a move through clipped elements read
        # J - L = 0.04 where F's unclipped elements see 0.99, x0 4.6x outside the bound, _clip_secant).
        # Each side's J - L is a kink-free operator, measured along dx as if it held on every element
        # and weighed by F's share on that side (elements within the move or F's reach of the edge
        # on both)
        slope, near = sides[0].view_as(dx), sides[1].view_as(dx)
        j_in = slope.amax(-1, keepdim=True)  # the slope inside the range: 1 (clip) or 1 / s (threshold)
        side_in = ((cx - L + c0 * px * j_in) * dx + (co + c0 * po * j_in) * e_dx).square().sum(-1) / den
        side_out = ((cx - L) * dx + co * e_dx).square().sum(-1) / den
        share_in = (f_sq * torch.maximum((slope > 0).to(f_sq.dtype), near)).sum(-1)
        share_out = (f_sq * torch.maximum((slope == 0).to(f_sq.dtype), near)).sum(-1)
        split = (side_in * share_in + side_out * share_out).sqrt() / f_norm[..., 0] + extra / norm
        dev = torch.where(f_norm[..., 0] > 0, torch.fmax(dev, split), dev)
        self.gain.copy_(torch.where(ok, gain, self.gain))
        self.dev_prev.copy_(torch.where(ok, self.dev, self.dev_prev))
        self.dev.copy_(torch.where(ok, dev, self.dev))
        self.e.copy_(e)

    def transformed_bounds(self, coef: torch.Tensor, kink: float, h: torch.Tensor,
                           scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gain, dev)`` ``[B, W]`` float64 for the x0 rule on a chain with an x0 transform ``f``
        (clip, threshold): bounds on ``||J||`` and ``||J - L||`` along the row's move from the
        model's own measured secant, not the step's (which can cross ``f``'s kink; the contract
        suite's deep run found a clipped "sample"-prediction chain 1.8x outside its bound with the
        latent-gain bound these chains used before: a model with a large Jacobian on a shrinking
        latent). A step is ``cx x + co e + c0 f(px x + po e)``, so with ``J_f`` the transform's
        Jacobian, ``a = cx + c0 px``, ``b = co + c0 po``,

            J - L = (a - L) I + b E - c0 (I - J_f)(px I + po E),

        measured along the row's move where it has one (:meth:`_measure_transformed`, ``J_f`` exact
        at the row), else bounded: the first part as in :meth:`rule_dev` from the window's
        :attr:`lend`, the second by ``|c0| kink (|px| + |po| ||E||)``, ``kink`` a bound on
        ``||I - J_f||`` (:func:`transform_kink`). ``gain`` is the same
        with ``L = 0``. NaN before any measurement (the rule's latent-gain bound); ``h``: ``[B, W]``
        the latents' gains, read on rows whose last move was long (:meth:`_borrowed`); ``scale``: the
        rows' model-input scales (None: 1)."""
        c = coef.to(torch.float64)
        L, cx, co, c0, px, po = (c[..., i] for i in range(6))
        a, b = cx + c0 * px, _in_latent(co + c0 * po, scale)
        corr = c0.abs() * kink * (px.abs() + _in_latent(po, scale).abs() * self.model_gain.unsqueeze(1))
        dev = self._measured_dev()
        gain = torch.where(torch.isfinite(self.gain), self.gain, self._lent(a, b) + corr)
        return gain, torch.where(torch.isfinite(dev), dev, self._borrowed(self._lent(a - L, b) + corr, gain, L, h))

    def slide(self, slide: RowSlide) -> None:
        """Slide with the window; rows entering have no history and no secants (:meth:`rule_dev`)."""
        slide.apply(self.x, 0.0)
        slide.apply(self.s, 0.0)
        slide.apply(self.e, 0.0)
        slide.apply(self.valid, False)
        slide.apply(self.gain, math.nan)
        slide.apply(self.dev, math.nan)
        slide.apply(self.dev_prev, math.nan)
        slide.apply(self.dev_loose, math.nan)
        slide.apply(self.far, False)
        slide.apply(self.jumped, False)
        slide.apply(self.slope, math.nan)


def _in_latent(b: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A step's coefficient ``b`` on the latent's model Jacobian as one on the model's own,
    ``b E = (b scale) E_model`` (StepSecants.lend); ``scale`` None: 1."""
    return b if scale is None else b * scale


def secant_update(mult: torch.Tensor, dx: torch.Tensor, ds: torch.Tensor, valid: torch.Tensor) -> None:
    """The secant form: each row's next multiplier, a scalar secant estimate of its step's Jacobian.

    The scan of a round, ``g_j = L_j (g_{j-1} - x_j) + s_j`` (``g_{-1}`` = the anchor), has
    the chain as its fixed point for ANY multipliers; they only decide the speed, and Newton's
    method is ``L_j = d step_j / d x_j``. The drift form takes ``L = 1``, the scan form the step's
    affine part. This form fits a scalar per (sample, row) to the step as the solve moves:

        L_j = <s_j - s'_j, x_j - x'_j> / ||x_j - x'_j||^2,   clamped to SECANT_RANGE

    (``'``: the same position one round earlier, :meth:`StepSecants.measure`). A row without a
    previous round (``valid`` False), or whose input did not move, keeps its ``L`` (``mult`` ``[B,
    W]``, in place). Fixed shapes, no host sync.
    """
    num = (ds * dx).sum(-1).to(mult.dtype)
    den = (dx * dx).sum(-1).to(mult.dtype)
    tiny = torch.finfo(den.dtype).tiny
    fit = (num / den.clamp(min=tiny)).clamp(*SECANT_RANGE)
    mult.copy_(torch.where(valid & (den > tiny), fit, mult))


#: A sample whose window residual grew this many rounds in a row counts as diverging (as do
#: non-finite rows at once). Converging Anderson solves of the digits model grew at most 2 rounds
#: in a row; 2 restarted up to 10 of 16 samples, 3 none (chosen by bench/solver_studies.py divergence).
DIVERGE_ROUNDS = 3
#: ...each time by more than this factor: the window slides, so its residual also rises a little
#: as fresh rows enter (checked by hand: bench/results/README.md, "Divergence guard")
DIVERGE_GROWTH = 2.0


def finite_rows(res: ScanResult, n: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """``[B]`` the live rows before each sample's first non-finite row, and at least row 0: its
    input is the exact anchor, so a non-finite output there is the sequential chain's own (the
    round's ``bad_t`` reports it); any later row's is an iterate's. A row is non-finite when its
    ``||G||`` or ``||G - x||`` is: a non-finite model output or input makes its ``G`` so.
    ``j``: ``arange(W)``."""
    finite = res.f_sq + res.g_sq <= torch.finfo(res.f_sq.dtype).max  # False for inf and NaN
    first_bad = torch.where(finite, j.numel(), j).amin(dim=1)
    return torch.minimum(n, first_bad.clamp(min=1))


@dataclass
class DivergenceGuard:
    """Per sample: whether its solve diverged, and the residual trend that tells.

    A sample diverges when a live row turns non-finite (rows past :func:`finite_rows`) or,
    unless the solver's steps are Picard's already, its window residual ``||F|| / ||G||`` grew
    by more than ``DIVERGE_GROWTH`` times ``DIVERGE_ROUNDS`` rounds in a row. Then, on the device and for that sample only, its live
    rows restart from its frozen prefix (the rows past the finite ones, or past the frozen ones
    when the residual grew, are refilled as rows entering the window are) and it takes Picard
    steps ``x <- G(x)`` to the end of the solve; the solver no longer sees it (its history of
    the sample is dropped, never mixed again). Row 0's ``G`` is exact, so the sample still
    advances at least one row per round, to the sequential answer whenever that is finite.
    """

    fallback: torch.Tensor  #: [B] bool: the sample takes Picard steps (it diverged)
    diverged: torch.Tensor  #: [B] int64 rounds in which it diverged (and restarted)
    grew: torch.Tensor  #: [B] int64 consecutive rounds its window residual grew
    last: torch.Tensor  #: [B] float64 its last window residual (inf: none yet)

    @classmethod
    def start(cls, batch: int, device) -> "DivergenceGuard":
        return cls(
            fallback=torch.zeros(batch, dtype=torch.bool, device=device),
            diverged=torch.zeros(batch, dtype=torch.int64, device=device),
            grew=torch.zeros(batch, dtype=torch.int64, device=device),
            last=torch.full((batch,), math.inf, dtype=torch.float64, device=device),
        )

    def check(
        self, n: torch.Tensor, n_ok: torch.Tensor, delta: torch.Tensor, resid: torch.Tensor | None
    ) -> torch.Tensor:
        """One round's verdict, in place: marks ``fallback`` and returns ``[B]`` the rows of each
        sample the commit keeps (the finite ones after a non-finite row, the frozen ones after
        residual growth, all live ones otherwise). ``resid``: ``[B]`` the round's window residual
        (NaN when inactive), None to not judge growth (the solver steps as Picard does)."""
        broke = n_ok < n
        restart, kept = broke, n
        if resid is not None:
            up = resid > DIVERGE_GROWTH * self.last
            self.grew.mul_(up).add_(up)  # +1 while growing, else 0 (fallen-back samples: unread)
            self.last.copy_(resid)
            growing = (self.grew >= DIVERGE_ROUNDS) & ~self.fallback
            restart, kept = broke | growing, torch.where(growing, delta, n)
        rows = torch.where(broke, n_ok, kept)
        self.fallback.logical_or_(restart)
        self.diverged.add_(restart)
        return rows


def x0_multipliers(
    p: Problem, coef: torch.Tensor, pos: torch.Tensor, res: ScanResult, anchor: torch.Tensor
) -> torch.Tensor:
    """``[B, W]`` the multipliers the x0 rule reads (ops.reference.x0_row_costs), which charges row
    ``j - 1`` ``||F_{j-1}|| (1 / ||G_{j-1}|| + m_j / ||G_j||)``: the scan's ``|L_j|``, and for a
    multistep chain what a second-order step adds, with ``r_j = ||G_j|| / ||G_{j-1}||`` (the step's
    gain; ``G_{-1}`` the anchor) and ``q_j = ||G_j|| / ||G_{j+1}||`` (1 past the window)::

        m_j = |L_j| + (|kappa| - 1) r_j + |1 - kappa| |A| + rho q_j (r_j + |A|)

    (docs/math.md §1.1; 0 added for a first-order step and next step)."""
    if p.x0_extra is None or p.stop != "x0":
        return coef[..., 0]
    norm = res.g_sq.to(torch.float64).sqrt()
    tiny = torch.finfo(torch.float64).tiny
    before = torch.cat([anchor.to(torch.float64).norm(dim=1, keepdim=True), norm[:, :-1]], dim=1)
    after = torch.cat([norm[:, 1:], norm[:, -1:]], dim=1)
    r, q = norm / before.clamp(min=tiny), norm / after.clamp(min=tiny)
    kappa, rho, abs_a = p.x0_extra[pos].unbind(-1)
    extra = (kappa.abs() - 1) * r + (1 - kappa).abs() * abs_a + rho * q * (r + abs_a)
    return coef[..., 0].abs() + extra.to(coef.dtype)


def _mul2(p: tuple[torch.Tensor, ...], q: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The product ``p q`` of 2x2 matrices given by their entries ``(a, b, c, d)``, elementwise."""
    a, b, c, d = p
    e, f, g, h = q
    return a * e + b * g, a * f + b * h, c * e + d * g, c * f + d * h


def multistep_excess(chain: torch.Tensor, lam: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``[..., S+1]`` float64: how much more an error in latent ``x[m]`` moves x0, relative to
    x0, than the latent at ``m`` moves it, for a model of scalar slope ``lam`` at each step
    (``[..., S]``, in the model's input units; ``scale``: ``[S]`` the input scales, None: 1) on a multistep chain
    (``chain``: Schedule.multistep_linear). The chain's state is ``(x[m], u_{m-1})`` and step ``m``
    maps it by ``M_m = [[J_m, c1_m], [U_m, 0]]``; an error of ``x[m]`` alone enters as ``(1, 0)``
    while the latent carries its converted output along, so with ``Q_m = M_{S-1} ... M_m`` and the
    latents ``x_m = (M_{m-1} ... M_0)_{00}`` from ``(1, 0)``::

        R_m = |(Q_m)_{00}| |x_m| / |x_S|        (1 for a one-step chain, where c1 = 0)

    The second-order recurrence has a root near ``-c1``: DPM-Solver's noise algorithm with sample
    prediction has ``|c1|`` up to 3.6, an error grows 20-30x where its latent shrinks 160x, and R
    reaches 5000 (docs/math.md §4.3). Both products by doubling: ``log2 S`` rounds of 2x2 products,
    fixed shapes. ``0/0`` (a step to sigma 0 wipes the state) reads 1; a latent that vanishes
    alone, ``inf``."""
    steps = chain.shape[0]
    slope = lam * (1.0 if scale is None else scale.to(torch.float64))
    j_, u_ = chain[:, 0] + chain[:, 1] * slope, chain[:, 3] + chain[:, 4] * slope
    one, zero = torch.ones_like(j_[..., :1]), torch.zeros_like(j_[..., :1])
    # 2x2 matrices as their entries (a, b; c, d), [..., S+1] each: elementwise products took 6.4 ms
    # against a batched matmul's 16 (S = 1000, batch 8, one CPU thread)
    m = (j_, chain[:, 2].expand_as(j_), u_, torch.zeros_like(u_))
    eye = (one, zero, zero, one)
    suffix = tuple(torch.cat([v, e], dim=-1) for v, e in zip(m, eye))  # over [k, k + 1), doubled: [k, S)
    prefix = tuple(torch.cat([e, v], dim=-1) for v, e in zip(m, eye))  # over [k - 1, k), doubled: [0, k)
    d = 1
    while d < steps + 1:
        later = tuple(torch.cat([v[..., d:], e.expand(*v.shape[:-1], d)], dim=-1) for v, e in zip(suffix, eye))
        earlier = tuple(torch.cat([e.expand(*v.shape[:-1], d), v[..., :-d]], dim=-1) for v, e in zip(prefix, eye))
        suffix, prefix = _mul2(later, suffix), _mul2(prefix, earlier)
        d *= 2
    x = prefix[0].abs()
    r = suffix[0].abs() * x / x[..., -1:]
    return torch.where(torch.isnan(r), 1.0, r)


def transform_kink(transform: X0Transform, dim: int) -> float:
    """A bound on ``||I - J_f||`` for the x0 transform ``f`` anywhere, for rows
    without a measured move (StepSecants.transformed_bounds): a clip is a 0/1 diagonal (1); the
    threshold ``clamp(x0, -s, s) / s``, ``s`` a quantile of ``|x0|`` clamped to ``[1, max_value]``,
    adds the rescale by ``s``: at most ``1 + 1/s + ||clamp(x0)|| / s^2 <= 1 + (1 + sqrt(D)) / s``
    (the quantile moves with one or two elements). Not 0 where ``f`` is the identity at the row: a
    frozen error can take the row across the kink, where ``J`` differs (tests/test_sampling.py found
    a clipped element 10x outside tol when the row's own side was trusted)."""
    if transform.kind == "clip":
        return 1.0
    return 1.0 + (1.0 + math.sqrt(dim)) / min(1.0, transform.max_value)


def run_round(p: Problem, st: SolveState, solver: Solver, ev: ModelEvaluator, static: bool) -> None:
    """One round of the parallel solve (see the module docstring), in place on ``st``.

    ``static=False`` evaluates the model on the live rows only (dynamic shapes, host syncs).
    ``static=True`` evaluates all B*W rows and records non-finite outputs on the device instead
    of raising, so the round has fixed shapes and no host sync (CUDA-graph capturable).
    """
    s, width, batch, dim = p.steps, p.width, p.batch, p.dim
    dev = st.xw.device
    j, b_idx = p.row_index, p.sample_index
    active = (st.k0 < s) & (st.rounds < p.max_iters)
    n = (s - st.k0).clamp(max=width) * active
    live = j < n.unsqueeze(1)
    pos = (st.k0.unsqueeze(1) + j).clamp(max=s - 1)
    coef = p.coef[pos]
    if st.secant is not None:
        coef = torch.cat([st.secant.unsqueeze(-1), coef[..., 1:]], dim=-1)
    t = p.timesteps[pos]
    scale = None if p.input_scale is None else p.input_scale[pos]
    ms = None if p.ms_coef is None else p.ms_coef[pos]
    model_dtype = getattr(ev, "model_dtype", None)
    model_eps = None if model_dtype is None else torch.finfo(model_dtype).eps
    # a half-precision model: its rounding is coarser than the state's (secants, rounding floor)
    coarse = model_eps is not None and model_eps > torch.finfo(st.xw.dtype).eps
    # the x0 rule leaves a half model's rounding uncharged: the model call reports what it scales with
    rounding = p.stop == "x0" and coarse
    e_norm = None
    with annotate("model"):
        if static:
            rows_b = b_idx.unsqueeze(1).expand(batch, width).reshape(-1)
            x_in = st.xw[:, :width] if st.model_in is None else st.model_in
            # dead rows' outputs are ignored by the scan; live rows' non-finite outputs are
            # counted by it and recorded in bad_t by round_status: no pass of its own over e
            out = ev.raw(x_in.reshape(-1, *p.shape[1:]), t.reshape(-1), rows_b, rounding=rounding)
            if rounding:
                out, row_scale = out
                e_norm = row_scale.reshape(batch, width)
            e = out.to(st.xw.dtype).reshape(batch, width, dim)
        else:
            rows_b = b_idx.unsqueeze(1).expand(batch, width)[live]
            # unchecked: a non-finite output past row 0 is a diverged iterate (DivergenceGuard)
            out = ev.raw(st.xw[:, :width][live].reshape(-1, *p.shape[1:]), t[live], rows_b, rounding=rounding)
            e = torch.zeros(batch, width, dim, device=dev, dtype=st.xw.dtype)
            if rounding:
                out, row_scale = out
                e_norm = torch.zeros(batch, width, device=dev, dtype=torch.float64)
                e_norm[live] = row_scale
            e[live] = out.reshape(-1, dim)
    z = None if p.noise is None else p.noise[pos, b_idx.unsqueeze(1)]
    with annotate("scan"):
        history = solver.gram_history() if hasattr(solver, "gram_history") else None  # optional (Solver)
        res = scan_residual(st.xw, e, z, coef, n, p.transform, history, drift=p.drift, ms=ms, u_prev=st.prev_u)
    # the stopping rule judges the rows before the first non-finite one (row 0 always)
    n_ok = finite_rows(res, n, j)
    moves = None
    if st.secants is not None:  # this round's secants of the steps, before the x0 rule reads them
        first = ~torch.isfinite(st.secants.lend[:, 2])  # samples measuring for the first time
        moves = st.secants.measure(st.xw, res.g, coef, live, e, res.f, scale, coarse)
    gain, dev = p.unmeasured, p.unmeasured
    latent_sq = res.g_sq
    if p.stop == "x0":
        # the latent the x0 rule telescopes to (its last live row): the smaller of G and the step's
        # own output s (measure recovered it). G = s + L F carries the residual from upstream, which
        # on a row far from converged can dwarf the latent: a drift-form last step mapping 1e13 to
        # 1.7 read 5.5e11 for x0's norm, and an error the step magnified ended x0 81x outside its
        # bound (tests/test_x0_bound_harsh.py: test_latent_estimate_leaves_out_the_upstream_residual).
        # Only there: on every row it cost clipped DDIM S = 100 five rounds (16 -> 21)
        last = j == (n - 1).unsqueeze(1)
        s_sq = st.secants.s.to(res.g_sq.dtype).square().sum(-1)
        latent_sq = torch.where(last, torch.minimum(res.g_sq, s_sq), res.g_sq)
    h = latent_gains(latent_sq)[1]  # the latents' gains, read by every bound below
    if st.secants is not None and st.secants.transform is not None:
        # a clip or threshold bends the step: a secant across its kink can miss J (test_contract found
        # a clipped DDPM chain 2.8x outside the bound), so these chains bound J from the model's secants
        gain, dev = st.secants.transformed_bounds(coef, transform_kink(p.transform, dim), h, scale)
    elif st.secants is not None and p.transform.kind == "none":
        gain, dev = st.secants.rule_gain(coef, scale), st.secants.rule_dev(coef, h, scale)
        if p.stop == "x0":
            dev = st.secants.first_direction(dev, gain, moves[0], res.f, coef[..., 0], h, first)
    if st.secants is not None:
        gain, dev = st.secants.before_any_measurement(gain, dev, st.rounds == 0)
    floor = None
    if rounding:
        # a half-precision model's residuals stop at its rounding (under guidance, both outputs'),
        # which two sequential runs differ by too: charged, it spends the whole budget
        # (bench/solver_studies.py half-precision, guided-half)
        floor = rounding_floor(e_norm, coef, live & (res.nonfinite == 0), model_eps, gain)
    with annotate("status"):
        # the stopping test, the rows to freeze, the logs and SolveState.worst/done_round/bad_t/spent
        mult = x0_multipliers(p, coef, pos, res, st.xw[:, 0])
        if p.x0_extra is not None and st.secants is not None and p.stop == "x0":
            # a secant measures the step through its own row only: keep what a second-order step adds
            dev = dev + (mult.to(torch.float64).abs() - coef[..., 0].to(torch.float64).abs()) / SECANT_SAFETY
            dev = multistep_dev(p, st, n, mult, gain, dev, h)
        # the chain past a sliding window, charged where the latent shrinks past x0's estimate; a window of
        # every row never slides, and its rounds skip the ops
        past = None
        if p.stop == "x0" and width < s:
            past = past_window_factor(latent_sq, st.xw, e, coef, n_ok, s - st.k0)
        delta = round_status(res.f_sq, latent_sq, res.nonfinite, t, n_ok, st.k0, st.rounds, p.noise_var, st.worst,
                             st.res_log, st.done_round, st.bad_t, mult, st.spent, gain, dev, stop=p.stop,
                             tol=p.tol, dim=dim, floor=floor, past=past)
    picard = getattr(solver, "picard", False)
    # the round's window residual, as round_status logged it (NaN when inactive)
    resid = None if picard else st.res_log.index_select(0, st.rounds.clamp(max=p.max_iters).view(1))[0]
    n_commit = st.guard.check(n, n_ok, delta, resid)
    if st.secant is not None:
        secant_update(st.secant, *moves)
    if st.prev_u is not None:  # before the commit slides xw: the new first row reads the last frozen one
        carry_converted(st.prev_u, st.xw, e, coef, ms, delta, p.transform)
    with annotate("solve+mix"):
        if picard:  # the fallback's steps already
            x_new = solver.update(st.xw[:, 1:], res.g, res.f, res.f_sq, res.gram, live)
        else:  # the solver steps the samples that have not diverged; the others take Picard steps
            fell = st.guard.fallback.view(-1, 1)
            x_new = solver.update(st.xw[:, 1:], res.g, res.f, res.f_sq, res.gram, live & ~fell)
            x_new = torch.where(fell.unsqueeze(-1), res.g, x_new)
    if st.traj is not None:
        # frozen rows land at their position; the others at the scratch row (no duplicate writes)
        frozen = j.unsqueeze(0) < delta.unsqueeze(1)
        dest = torch.where(frozen, st.k0.unsqueeze(1) + 1 + j, s + 1)
        st.traj[dest, b_idx.unsqueeze(1)] = res.g
    # freeze the accepted rows at G, slide every window, write the next model input: one pass
    ahead = None
    if p.entering == "held":
        ahead = (e if ms is None else held_converted(st.xw, e, ms, n_commit), p.held_coef, p.noise)
    with annotate("commit"):
        commit_window(st.xw, x_new, res.g, delta, n_commit, st.k0, p.init, st.model_in, p.entering == "linear",
                      p.coords, ahead)
    solver.shift(delta)
    if st.secants is not None:
        slide = RowSlide(delta, width)
        st.secants.slide(slide)
        if st.secant is not None:
            slide.apply(st.secant, 1.0)
    st.k0.add_(delta)
    st.rounds.add_(active.any())


#: The model slopes (its own input's units) the multistep excess assumes before one is measured.
UNMEASURED_SLOPES = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)


def multistep_dev(p: Problem, st: SolveState, n: torch.Tensor, mult: torch.Tensor, gain: torch.Tensor,
                  dev: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``dev`` ``[B, W]`` times what a multistep chain's second-order recurrence adds to each
    frozen row's error on its way to x0 (:func:`multistep_excess`; a row without ``dev`` takes the
    rule's latent-gain bound, ops.reference.latent_gain_bound with ``h`` the latents' gains, as its
    own first). The x0 rule otherwise
    lets an error follow its latent past the window and its own path through it: DPM-Solver's noise
    algorithm with sample prediction, window 5, ended 78x outside its bound
    (tests/test_x0_bound_harsh.py: test_dpm_noise_algorithm_in_a_window).

    The scalar model takes each live row's position at the slope its row measured
    (:attr:`StepSecants.slope`) and every other position (frozen, past the window, not measured)
    at the lent least, middle and largest slope (:attr:`StepSecants.lend`), the largest of the
    three; before any measurement at :data:`UNMEASURED_SLOPES`. Row ``j``'s error lands in ``x[k0
    + j + 2]``, and it also passes the window's end ``x[k0 + n]``: the larger of the two."""
    lo, hi = st.secants.lend[:, 0], st.secants.lend[:, 1]
    lent = torch.stack([lo, (lo + hi) / 2, hi], dim=1)
    # with no slope measured (or only loose secants: float32 moves near rounding), a range: a
    # float32 window of 3 froze with none and x0 ended 42x outside
    lent = torch.where(torch.isfinite(lent), lent, UNMEASURED_SLOPES.to(lent.device))
    # one slope everywhere, the largest a UNet shows near x0 (22 on the digits model), made
    # DPM-Solver++ S = 100's full window 41 rounds instead of 15: rows keep their own
    steps, width = p.steps, dev.shape[1]
    lam = lent.unsqueeze(2).repeat(1, 1, steps + 1)  # column S: where dead rows write
    live = p.row_index < n.unsqueeze(1)
    pos = torch.where(live, st.k0.unsqueeze(1) + p.row_index, steps).unsqueeze(1).expand(-1, 3, -1)
    own = st.secants.slope.unsqueeze(1).expand_as(pos)
    lam.scatter_(2, pos, torch.where(torch.isfinite(own), own, lam.gather(2, pos)))
    r = multistep_excess(p.ms_linear, lam[..., :steps], p.input_scale)
    lands = (st.k0.unsqueeze(1) + p.row_index + 2).clamp(max=steps)
    at = torch.cat([lands, (st.k0 + n).clamp(max=steps).unsqueeze(1)], dim=1).unsqueeze(1).expand(-1, 3, -1)
    r = r.gather(2, at).amax(dim=1)
    excess = torch.maximum(r[:, :width], r[:, width:])
    dev_or_bound = torch.where(torch.isfinite(dev), dev, latent_gain_bound(gain, h, mult) / SECANT_SAFETY)
    return torch.where(excess > 1, dev_or_bound * excess, dev)


def held_converted(xw: torch.Tensor, e: torch.Tensor, ms: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``[B, W, D]`` (a broadcast view of ``[B, D]``): a multistep chain's converted output of each
    sample's last live row ``n - 1``, ``u = ux x + uo e`` (affine chains: the x0 transform is the
    identity), the output its entering rows hold (Schedule.packed_held): the commit reads row
    ``n - 1`` of the model outputs it is given. ``xw``: the window before the commit; ``e``: the
    round's outputs; ``ms``: ``[B, W, 4]`` this round's multistep coefficients."""
    b = torch.arange(e.shape[0], device=e.device)
    last = (n - 1).clamp(min=0)
    m = ms[b, last].to(e.dtype)
    u = m[:, 1:2] * xw[b, last] + m[:, 2:3] * e[b, last]
    return u.unsqueeze(1).expand_as(e)


#: A solve whose worst live row is within this factor of its stopping test (``SolveState.worst``,
#: ``err / tol`` in the rule's own units) runs the rest of its rounds one per chunk. Each chunk
#: ends at a host sync, so a K-round chunk can run up to K-1 rounds past convergence, each a full
#: B*W-row model batch; one-round chunks cost a sync per round instead.
#: Chosen by bench/solver_studies.py tail-chunks.
TAIL_FACTOR = 100.0


@dataclass
class StaticRunners:
    """The chunks of fixed-shape rounds over one workspace: ``bulk`` runs ``rounds`` rounds and
    ``tail`` one (``None`` when ``rounds`` is 1)."""

    bulk: ChunkRunner
    tail: ChunkRunner | None
    rounds: int

    def summary(self) -> dict[str, Any]:
        """Execution info of both: graphed only if both were captured; the audit's calls of both,
        its ops (and kernel ops) per chunk of the bulk and (``ops_per_round``,
        ``kernel_ops_per_round``) of the tail."""
        out = self.bulk.summary()
        if self.tail is not None:
            tail = self.tail.summary()
            out["graph"] = out["graph"] and tail["graph"]
            if "graph_fallback" in tail:
                out.setdefault("graph_fallback", tail["graph_fallback"])
            if self.tail.audit is not None:
                out["audited_calls"] += tail["audited_calls"]
                out["ops_per_round"] = tail["ops_per_chunk"]
                out["kernel_ops_per_round"] = tail["kernel_ops_per_chunk"]
        return out


def static_runners(
    p: Problem, st: SolveState, solver: Solver, ev: ModelEvaluator, rounds_per_graph: int, mode: str
) -> StaticRunners:
    """Chunks of ``rounds_per_graph`` fixed-shape rounds and of one round over ``st`` and
    ``solver``'s buffers (each captured as its own CUDA graph in ``mode="graph"``)."""

    def chunk(rounds: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(rounds):
                run_round(p, st, solver, ev, static=True)

        return run

    state = state_tensors(st, solver)
    bulk = ChunkRunner(chunk(rounds_per_graph), state, "fixed-shape rounds", mode)
    tail = ChunkRunner(chunk(1), state, "fixed-shape rounds", mode) if rounds_per_graph > 1 else None
    return StaticRunners(bulk, tail, rounds_per_graph)


def run_static(p: Problem, st: SolveState, ev: ModelEvaluator, runners: StaticRunners) -> dict[str, Any]:
    """Run chunks until every sample converged or ``max_iters`` rounds ran, one host sync per
    chunk: ``rounds``-round chunks while some live row is more than ``TAIL_FACTOR`` times away
    from its stopping test, one-round chunks after. Returns execution info for the result."""
    executed = tail_chunks = 0
    near = False
    while True:
        if near and runners.tail is not None:
            runners.tail()
            executed += 1
            tail_chunks += 1
        else:
            runners.bulk()
            executed += runners.rounds
        bad = st.bad_t[: p.max_iters]
        status = torch.stack([
            (bad >= 0).any().to(torch.float64), st.rounds.to(torch.float64),
            (st.k0 >= p.steps).all().to(torch.float64), st.worst.max(),
        ])
        any_bad, rounds, done, worst = status.tolist()  # the chunk's one host sync, one copy
        if any_bad:
            r = int(torch.nonzero(bad >= 0)[0, 0])
            raise NonFiniteModelOutput(f"model output is not finite in round {r} at timestep(s) [{int(bad[r])}]")
        if rounds >= p.max_iters or done:
            break
        near = rounds > 0 and worst <= TAIL_FACTOR
    # every executed round evaluates all B*W rows, including rounds after convergence in the
    # last chunk: that is what the device actually computed
    ev.evaluations = executed * p.batch * p.width * ev.rows_per_latent
    info = {"rounds_per_graph": runners.rounds, "rounds_executed": executed, "tail_chunks": tail_chunks}
    return {**info, **runners.summary()}


@dataclass
class Solved:
    """What :func:`solve` leaves: the host-side summary (the device state stays in the workspace)."""

    converged: torch.Tensor  #: [B] bool, on the CPU
    rounds: int
    residuals: list[list[float]]  #: per round, per sample (see :attr:`SampleResult.residuals`)
    rounds_per_sample: list[int]
    wall_time: float
    info: dict[str, Any]  #: execution details, the solver's fallback count


class Workspace:
    """Every buffer of a parallel solve of one shape, kept for the next solve of that shape.

    Holds the problem (with its per-solve inputs, the step noise and the warm start, as
    buffers), the solve state, the solver's state and, for fixed-shape execution, the chunk
    runners. :meth:`load` starts a new solve *in place*: every address stays the same, so a CUDA
    graph captured by the first solve is replayed by every later one without capturing again.
    """

    def __init__(
        self, p: Problem, x_T: torch.Tensor, ev: ModelEvaluator, solver: str, solver_options: Any = None, *,
        execution: Literal["eager", "static", "graph", "audit"] = "eager", rounds_per_graph: int = 4,
        model_dtype: torch.dtype | None = None, return_trajectory: bool = False,
    ) -> None:
        self.config, factory = get_solver(solver, solver_options)
        self.p, self.ev, self.execution, self.rounds_per_graph = p, ev, execution, rounds_per_graph
        self.st = SolveState.start(p, x_T, return_trajectory)
        self.solver = factory(self.config, p.batch, p.width, p.dim, x_T.device, x_T.dtype)
        if execution != "eager":
            self.st.model_in = self.st.xw[:, : p.width].to(model_dtype or x_T.dtype).clone()
        # the solver as constructed, put back by every later load
        self._fresh_solver = snapshot(state_tensors(self.solver))
        self.runners = None  # made by the first fixed-shape solve, after its load (capture needs the data)
        self.solves = 0

    def load(self, x_T: torch.Tensor, noise: torch.Tensor | None = None, init: torch.Tensor | None = None) -> None:
        """Start a new solve from ``x_T`` (and its ``noise`` and warm start ``init``, shaped as
        for the first), in place. The first solve's inputs are loaded by the constructor."""
        p, st = self.p, self.st
        flat = x_T.reshape(p.batch, p.dim)
        if p.noise is not None:
            p.noise.copy_(noise.reshape(p.noise.shape))
        if p.init is not None:
            p.init[0].copy_(flat)
            p.init[1:].copy_(init.reshape(p.steps, p.batch, p.dim))
        fresh = SolveState.start(p, x_T, st.traj is not None)
        if st.model_in is not None:
            fresh.model_in = fresh.xw[:, : p.width]  # copied into the model-dtype buffer below
        for old, new in zip(state_tensors(st), state_tensors(fresh), strict=True):
            old.copy_(new)
        self._fresh_solver()


def solve(
    ws: Workspace, progress: Progress = False, on_round: Callable[[torch.Tensor], None] | None = None
) -> Solved:
    """Run rounds of ``ws.p`` from the loaded state until every sample converged or ``max_iters``
    rounds ran.

    The fixed point is given by the problem alone (coefficients per position, stopping rule,
    window), and the evaluator is the only thing evaluated per row, so any chain with this
    triangular structure solves here: :func:`deqkern.sample` builds the problem from a
    :class:`Schedule`, the inversion's adjoint from the chain's Jacobians
    (:func:`deqkern.inversion.solve_adjoint`). ``progress`` (True or tqdm's options): a bar of the steps
    every sample has frozen, per round under eager execution; ``on_round`` needs eager execution.

    Runs without autograd whatever the caller's grad mode: backpropagating through the solver's
    rounds would record every round (memory growing with the rounds, and no CUDA graph) for a
    gradient that is not the chain's. Gradients through the fixed point come from the implicit
    function theorem: :func:`deqkern.inversion.sample_with_implicit_grad`.
    """
    with torch.no_grad():  # see below: a solve is never differentiated through its rounds
        return _solve(ws, progress, on_round)


def _solve(ws: Workspace, progress: Progress, on_round: Callable[[torch.Tensor], None] | None) -> Solved:
    p, st, solver, ev = ws.p, ws.st, ws.solver, ws.ev
    dev = st.xw.device
    ev.evaluations = 0
    info: dict[str, Any] = {}
    sync_device(dev)
    start = time.perf_counter()
    if ws.execution == "eager":
        bar = _progress_bar(progress, p.steps)
        while (r := int(st.rounds)) < p.max_iters and bool((st.k0 < p.steps).any()):
            k_before = st.k0.clone()
            run_round(p, st, solver, ev, static=False)
            if (bad_t := int(st.bad_t[r])) >= 0:
                raise NonFiniteModelOutput(f"model output is not finite in round {r} at timestep(s) [{bad_t}]")
            if on_round is not None:
                on_round(_x0_estimate(p, st, k_before))
            _progress_update(bar, st)
    else:
        if ws.runners is None:
            ws.runners = static_runners(p, st, solver, ev, ws.rounds_per_graph, ws.execution)
        bar = _progress_bar(progress, p.steps)
        info.update(run_static(p, st, ev, ws.runners))
        _progress_update(bar, st)
    if bar is not None:
        bar.close()
    sync_device(dev)
    wall = time.perf_counter() - start
    ws.solves += 1

    rounds = int(st.rounds)
    done = st.done_round.cpu().tolist()
    return Solved(
        converged=(st.k0 == p.steps).cpu(), rounds=rounds, residuals=st.res_log[:rounds].cpu().tolist(),
        rounds_per_sample=[d if d > 0 else rounds for d in done], wall_time=wall,
        info={"fallbacks": int(getattr(solver, "fallbacks", 0)), "diverged": st.guard.diverged.cpu().tolist(),
              "execution": ws.execution,
              "reused_workspace": ws.solves > 1, **info},
    )


def x0_row(p: Problem, st: SolveState) -> torch.Tensor:
    """The window row at position S (row 0 once x0 is frozen); where the window does not reach
    S, its last row — the current estimate of x0."""
    row = (p.steps - st.k0).clamp(min=0, max=p.width)
    return st.xw[torch.arange(p.batch, device=st.xw.device), row].reshape(p.shape)


def current_trajectory(p: Problem, st: SolveState) -> torch.Tensor:
    """``[S+1, B, D]`` latents by position as the solve left them: the frozen prefix ``x[0..k0]``,
    then the window's current iterates, then (past the window) its last row — so that position S
    is always the x0 :func:`x0_row` returns, converged or not (a fresh tensor)."""
    s = p.steps
    pos = torch.arange(s + 1, device=st.xw.device).unsqueeze(1)
    ahead = pos - st.k0.unsqueeze(0)  # [S+1, B]: window row of each position, <= 0 where frozen
    last = (s - st.k0).clamp(min=0, max=p.width).unsqueeze(0)
    rows = st.xw[p.sample_index.unsqueeze(0), ahead.clamp(min=0).minimum(last)]
    return torch.where((ahead > 0).unsqueeze(-1), rows, st.traj[: s + 1])


def _x0_estimate(p: Problem, st: SolveState, k_before: torch.Tensor) -> torch.Tensor:
    """x0 as a round left it: where that round computed the x0 row (or x0 is frozen); NaN where
    the window has not reached x0."""
    reached = k_before + (p.steps - k_before).clamp(max=p.width) == p.steps
    return torch.where(reached.view(-1, *[1] * (len(p.shape) - 1)), x0_row(p, st), float("nan"))


def _progress_bar(progress: Progress, steps: int):
    """A tqdm bar over the chain's ``steps`` (``progress``: True, or tqdm's options, e.g. a
    pipeline's ``set_progress_bar_config``), or None when ``progress`` is False."""
    if not isinstance(progress, Mapping) and not progress:
        return None
    from tqdm.auto import tqdm

    options = progress if isinstance(progress, Mapping) else {}
    return tqdm(**{"total": steps, "desc": "deqkern", "unit": "step", **options})


def _progress_update(bar, st: SolveState) -> None:
    """The bar at the steps every sample has frozen, with the rounds so far."""
    if bar is not None:
        bar.update(int(st.k0.min()) - bar.n)
        bar.set_postfix(rounds=int(st.rounds), refresh=False)
