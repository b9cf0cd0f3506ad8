"""Sampling schedules as data: the per-step coefficients of a DDIM/DDPM chain in float64.

Every step of a DDIM (any eta) or DDPM chain, in every prediction type, is written as

    x0_hat  = px * x + po * out                      (predicted clean sample, linear in x, out)
    x_next  = cx * x + co * out + c0 * f(x0_hat) + sigma * z

where ``out`` is the raw model output, ``z`` the pre-drawn step noise and ``f`` the x0 transform
of the scheduler config (identity, ``clip_sample`` clamp, or dynamic ``thresholding``). With ``f``
the identity the step is affine, ``x_next = A x + B out + sigma z`` (docs/math.md §1) and we fold
``c0`` into ``cx``/``co`` so that ``c0 == 0``. The coefficients are computed in float64 from the
scheduler's own float32 ``alphas_cumprod`` with the scheduler's own rule for the previous alpha, so
the chain reproduces ``scheduler.step()`` to float32 rounding.

The first-order sigma-space schedulers (Euler, Euler ancestral, flow-matching Euler) are affine in
``(x, out)`` plus the step noise too (:meth:`Schedule.euler`, :meth:`Schedule.flow_match`), so they
share this representation; they also scale the model's input and pass it float timesteps
(:class:`deqkern.model.StepInputs`, carried as :attr:`Schedule.step_inputs`).

Multistep schedulers (DPM-Solver(++) multistep, :meth:`Schedule.dpm_solver`) also read the previous
step's *converted* model output ``u_{k-1}`` (the x0 or noise prediction the solver integrates)::

    u_k     = ux * x + uo * out + uf * f(x0_hat)
    x_next  = cx * x + co * out + c0 * f(x0_hat) + c1 * u_{k-1} + sigma * z

(:class:`Multistep`); the system stays lower triangular, row k+1 reading rows k and k-1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Mapping

import torch

from deqkern._validate import POSITIVE_FLOAT, POSITIVE_INT, Bounded, OptionError
from deqkern.errors import UnsupportedSchedulerOption
from deqkern.model import StepInputs

PredictionType = Literal["epsilon", "sample", "v_prediction"]
AlgorithmType = Literal["dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver"]
_DPM_ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
Form = Literal["drift", "scan", "secant"]

#: Order of the per-step coefficients in the packed ``[S, 7]`` tensor the kernels read.
#: ``L`` is the scan multiplier of the fixed-point form (docs/math.md §3): ``A`` for the scan
#: form, ``1`` for the drift form and the secant form's start (the engine adapts that one per
#: row, :func:`deqkern.engine.secant_update`); it is filled in by :meth:`Schedule.packed`.
COEF_FIELDS = ("L", "cx", "co", "c0", "px", "po", "sigma")
#: Order of the multistep coefficients in the packed ``[S, 4]`` tensor (:class:`Multistep`).
MULTISTEP_FIELDS = ("c1", "ux", "uo", "uf")
#: The multistep terms of the x0 stopping rule, packed ``[S, 3]`` (:class:`Multistep`).
X0_FIELDS = ("kappa", "rho", "abs_a")

_QUANTILE = Bounded(float, 0.0, 1.0)
_ALPHA = Bounded(float, 0.0, 1.0, lo_open=True)


def _quantile_dtype(x0: torch.Tensor) -> torch.Tensor:
    """``x0`` in a dtype ``torch.quantile`` takes (float32/float64), as diffusers upcasts it."""
    return x0 if x0.dtype in (torch.float32, torch.float64) else x0.float()


@dataclass(frozen=True)
class X0Transform:
    """What the scheduler does to the predicted x0 before the update.

    ``kind="clip"`` clamps to ``[-clip_range, clip_range]`` (diffusers ``clip_sample``);
    ``kind="threshold"`` is diffusers' dynamic thresholding (per sample: ``s = clamp(quantile(|x0|,
    ratio), 1, max_value)``, ``x0 = clamp(x0, -s, s) / s``).
    """

    kind: Literal["none", "clip", "threshold"] = "none"
    clip_range: float = 1.0
    ratio: float = 0.995
    max_value: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("none", "clip", "threshold"):
            raise OptionError("kind", f"expected 'none', 'clip' or 'threshold', got {self.kind!r}")
        POSITIVE_FLOAT.check("clip_range", self.clip_range)
        _QUANTILE.check("ratio", self.ratio)  # torch.quantile's domain
        POSITIVE_FLOAT.check("max_value", self.max_value)  # the threshold divides by it

    def apply(self, x0: torch.Tensor) -> torch.Tensor:
        """Apply the transform to ``x0`` of shape ``[R, D]`` (one latent per row)."""
        if self.kind == "none":
            return x0
        if self.kind == "clip":
            return x0.clamp(-self.clip_range, self.clip_range)
        # Dynamic thresholding works per latent (diffusers flattens all but the batch dim);
        # quantile needs fp32/fp64, exactly as diffusers upcasts.
        work = _quantile_dtype(x0)
        s = torch.quantile(work.abs(), self.ratio, dim=1).clamp(min=1.0, max=self.max_value)
        s = s.unsqueeze(1)
        return (torch.clamp(work, -s, s) / s).to(x0.dtype)

    def jacobian_gap(
        self, x0: torch.Tensor, v: torch.Tensor, reach: torch.Tensor | None = None,
        slopes: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gap, rest)``: ``(I - J_f) v = gap + r`` with ``||r|| <= rest``, ``J_f`` the transform's
        Jacobian at ``x0`` ``[R, D]`` *or at any point within* ``max(|v|, reach)`` *of it
        elementwise*, ``v`` ``[R, D]`` (the x0 rule's bound must hold where the frozen error takes
        the row, and a clip's kink there flips ``J_f``; ``reach`` ``[R, D]``, default 0); ``rest``
        ``[R]`` float64. A clip passes the elements inside its range and stops the others: ``gap =
        v`` on the clipped elements, 0 elsewhere; an element within that distance of the edge may
        be either: ``rest = ||v on those||``. The threshold ``clamp(x0, -s, s) / s`` also rescales
        by ``s``, which moves with the one or two elements its quantile interpolates (unless ``s``
        sits at 1 or ``max_value``, beyond that distance): ``gap = v - [|x0| < s] v / s``, ``rest =
        ||v near the edge|| / s + ||clamp(x0, -s, s)|| / s^2 max|v|``. The x0 rule's bound on
        transformed steps (deqkern.engine.StepSecants). ``slopes``: :meth:`slopes` at ``x0`` for
        that distance, if the caller has them (the threshold's quantile is a sort)."""
        if self.kind == "none":
            return torch.zeros_like(v), torch.zeros(v.shape[0], dtype=torch.float64, device=v.device)
        if slopes is None:
            slopes = self.slopes(x0, v.abs() if reach is None else torch.maximum(v.abs(), reach.to(v.dtype)))
        slope, near, scale, moving = slopes
        gap = v - (slope * v.to(torch.float64)).to(v.dtype)
        rest = (v.to(torch.float64) * near).norm(dim=1) / scale
        if self.kind == "threshold":
            work = _quantile_dtype(x0)
            s = scale.unsqueeze(1).to(work.dtype)
            rest = rest + torch.where(moving, torch.clamp(work, -s, s).norm(dim=1).to(torch.float64)
                                      / scale.square() * v.abs().amax(dim=1).to(torch.float64), 0.0)
        return gap, rest

    def slopes(
        self, x0: torch.Tensor, size: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(slope, near, scale, moving)``: the diagonal of the transform's Jacobian at ``x0`` ``[R,
        D]`` elementwise, ``slope`` ``[R, D]`` float64 (a clip: 1 inside its range, 0 outside; the
        threshold: ``1 / s`` inside ``(-s, s)``, 0 outside), ``near`` ``[R, D]`` float64 1 on the
        elements within ``size`` ``[R, D]`` of the edge (either slope may hold there), ``scale``
        ``[R]`` float64 (1, or ``s``) and ``moving`` ``[R]`` bool (the threshold's ``s`` may move
        within ``size``: its quantile is not pinned at 1 or ``max_value``). A kind ``"none"``
        transform has slope 1 everywhere and nothing near."""
        one = torch.ones(x0.shape[0], dtype=torch.float64, device=x0.device)
        if self.kind == "none":
            return (torch.ones_like(x0, dtype=torch.float64), torch.zeros_like(x0, dtype=torch.float64), one,
                    torch.zeros_like(one, dtype=torch.bool))
        if self.kind == "clip":
            near = ((x0.abs() - self.clip_range).abs() <= size).to(torch.float64)
            return (x0.abs() <= self.clip_range).to(torch.float64), near, one, torch.zeros_like(one, dtype=torch.bool)
        work = _quantile_dtype(x0)
        q = torch.quantile(work.abs(), self.ratio, dim=1)
        s = q.clamp(min=1.0, max=self.max_value).unsqueeze(1)
        far = size.amax(dim=1)
        moving = (q > 1.0 - far) & (q < self.max_value + far) & (self.max_value >= 1.0)
        near = ((work.abs() - s).abs() <= size).to(torch.float64)
        scale = s[:, 0].to(torch.float64)
        return (work.abs() < s).to(torch.float64) / scale.unsqueeze(1), near, scale, moving


@dataclass(frozen=True)
class Multistep:
    """The previous-output term of a multistep chain (docs/math.md §1.1), float64 ``[S]`` each.

    Step ``k`` adds ``c1[k] * u_{k-1}``, where ``u_k = ux[k] x[k] + uo[k] out_k + uf[k] f(x0_hat_k)``
    is step k's converted model output (DPM-Solver++: the predicted x0; DPM-Solver: the predicted
    noise). ``c1[0] = 0``: the first step has no previous output. With ``f`` the identity ``uf`` is
    folded into ``ux``/``uo`` (``uf == 0``), as ``c0`` is.

    For the ``x0`` stopping rule (docs/math.md §1.1), with ``A_k`` and ``base_k`` the coefficients of
    ``x[k]`` and ``u_k`` in step k's first-order update and ``B0_k`` that of ``u_k`` in its own:
    ``kappa = B0_k / base_k`` (1 for a first-order step) and ``rho = |c1_{k+1} / base_k|`` (0 when the
    next step is first order); ``abs_a = |A_k|``.
    """

    c1: torch.Tensor
    ux: torch.Tensor
    uo: torch.Tensor
    uf: torch.Tensor
    kappa: torch.Tensor
    rho: torch.Tensor
    abs_a: torch.Tensor

    def check(self, steps: int) -> None:
        """Shapes, dtype and finiteness (an error names the step), and ``c1[0] == 0``."""
        for name in (*MULTISTEP_FIELDS, *X0_FIELDS):
            v = getattr(self, name)
            if v.shape != (steps,) or v.dtype != torch.float64:
                raise ValueError(f"multistep.{name}: expected float64 of shape ({steps},), got {v.dtype} "
                                 f"{tuple(v.shape)}")
            if not bool(torch.isfinite(v).all()):
                k = int(torch.nonzero(~torch.isfinite(v))[0, 0])
                raise ValueError(f"multistep.{name}: non-finite coefficient at step {k}")
        if float(self.c1[0]) != 0.0:
            raise ValueError(f"multistep.c1: step 0 has no previous output, expected 0, got {float(self.c1[0])}")

    def packed(self, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """``[S, 4]`` in :data:`MULTISTEP_FIELDS` order."""
        return torch.stack([getattr(self, n) for n in MULTISTEP_FIELDS], dim=1).to(device=device, dtype=dtype)

    def packed_x0(self, device: torch.device | str) -> torch.Tensor:
        """``[S, 3]`` float64 in :data:`X0_FIELDS` order (the x0 stopping rule's)."""
        return torch.stack([getattr(self, n) for n in X0_FIELDS], dim=1).to(device=device)


@dataclass(frozen=True)
class Schedule:
    """Coefficients of an S-step sampling chain, float64 on the CPU.

    Index ``k = 0 .. S-1`` is the k-th step in the scheduler's ``timesteps`` order (descending
    timesteps): it maps latent ``x[k]`` to ``x[k+1]``, with ``x[0] = x_T`` and ``x[S] = x_0``.

    ``timesteps`` are int64 labels of the steps, what the kernels and the solver's bookkeeping
    carry (and errors name): the integer training timesteps of a DDIM/DDPM chain, fed to the model
    as they are; with ``step_inputs`` (Euler, flow matching: float timesteps and a model-input
    scale) the step positions ``0 .. S-1``, which the model evaluator maps to what the model gets.
    """

    timesteps: torch.Tensor
    cx: torch.Tensor
    co: torch.Tensor
    c0: torch.Tensor
    px: torch.Tensor
    po: torch.Tensor
    sigma: torch.Tensor
    #: The scan-form multiplier A_k (d x_next / d x at fixed model output); only meaningful
    #: for affine steps.
    a_coef: torch.Tensor
    #: Per-step posterior variance, floored to stay positive: the scale of the noise-scaled
    #: stopping rule (ParaDiGMS, docs/math.md §4.3).
    noise_var: torch.Tensor
    transform: X0Transform = field(default_factory=X0Transform)
    prediction_type: PredictionType = "epsilon"
    form: Form = "drift"
    description: str = ""
    #: the model's input scale and timestep per step (None: ``x[k]`` and ``timesteps[k]``)
    step_inputs: StepInputs | None = None
    #: the previous-output term of a multistep chain (None: every step reads its own row only)
    multistep: Multistep | None = None
    #: ``[S+1]`` float64 the latents' scale against variance-preserving coordinates, ``x[k] =
    #: coords[k] x_vp[k]`` (Euler: ``sqrt(sigma_k^2 + 1)``; None: VP already). The drift form
    #: drifts in VP coordinates and the solve's first guess is x_T's VP latent (docs/math.md §3).
    coords: torch.Tensor | None = None

    def __post_init__(self) -> None:
        s = self.timesteps.numel()
        if s < 1:
            raise ValueError(f"timesteps: expected at least one step, got {s}")
        if self.timesteps.ndim != 1:
            raise ValueError(f"timesteps: expected a 1-D tensor, got shape {tuple(self.timesteps.shape)}")
        if self.step_inputs is None:
            if s > 1 and not bool((self.timesteps[1:] < self.timesteps[:-1]).all()):
                raise ValueError(f"timesteps: expected strictly descending values, got {self.timesteps.tolist()}")
        else:
            if not torch.equal(self.timesteps, torch.arange(s)):
                raise ValueError("timesteps: with step_inputs the labels are the step positions arange(S), "
                                 f"got {self.timesteps.tolist()}")
            if self.step_inputs.timesteps.shape != (s,):
                raise ValueError(f"step_inputs: expected {s} steps, got {tuple(self.step_inputs.timesteps.shape)}")
        for name in ("cx", "co", "c0", "px", "po", "sigma", "a_coef", "noise_var"):
            v = getattr(self, name)
            if v.shape != (s,) or v.dtype != torch.float64:
                raise ValueError(f"{name}: expected float64 of shape ({s},), got {v.dtype} {tuple(v.shape)}")
            if not bool(torch.isfinite(v).all()):
                k = int(torch.nonzero(~torch.isfinite(v))[0, 0])
                raise ValueError(
                    f"{name}: non-finite coefficient at step {k}; alpha_cumprod is 0 or 1 where this prediction type "
                    f"({self.prediction_type}) divides by it (zero-SNR schedules need v_prediction)"
                )
        if self.multistep is not None:
            self.multistep.check(s)
        if self.coords is not None:
            c = self.coords
            if c.shape != (s + 1,) or c.dtype != torch.float64:
                raise ValueError(f"coords: expected float64 of shape ({s + 1},), got {c.dtype} {tuple(c.shape)}")
            if not bool((torch.isfinite(c) & (c > 0)).all()):
                k = int(torch.nonzero(~(torch.isfinite(c) & (c > 0)))[0, 0])
                raise ValueError(f"coords: expected finite positive scales, got {c[k].item()!r} at position {k}")
        if self.form not in ("drift", "scan", "secant"):
            raise ValueError(f"form: expected 'drift', 'scan' or 'secant', got {self.form!r}")
        if self.form == "scan" and not self.is_affine:
            raise ValueError(
                "form='scan' needs affine steps; this schedule has a nonlinear x0 transform "
                f"({self.transform.kind!r}), which only the drift form covers (docs/math.md §3)"
            )

    # ------------------------------------------------------------------ properties
    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    @property
    def is_affine(self) -> bool:
        return self.transform.kind == "none"

    @property
    def is_stochastic(self) -> bool:
        return bool((self.sigma != 0).any())

    @property
    def is_multistep(self) -> bool:
        return self.multistep is not None

    def refuse_multistep(self, what: str) -> None:
        """Raise :class:`UnsupportedSchedulerOption` naming ``what`` for a multistep chain: the
        gradient, inversion and peer code paths are derived for steps that read their own row only."""
        if self.multistep is not None:
            raise UnsupportedSchedulerOption(
                f"{what}: multistep chains ({self.description or 'DPM-Solver'}) are sampled (sequential and "
                "parallel) but not differentiated, inverted or run by the peer baselines; use a one-step scheduler"
            )

    def packed_multistep(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                         ) -> torch.Tensor | None:
        """``[S, 4]`` multistep coefficients (:data:`MULTISTEP_FIELDS`), None for a one-step chain."""
        return None if self.multistep is None else self.multistep.packed(device, dtype)

    def multistep_linear(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """``[S, 5]`` float64 a multistep chain's steps for a model of scalar slope ``lam`` in the
        latent's units (``out = lam x``; an x0 transform taken as the identity), packed ``(J0, Jl,
        c1, U0, Ul)``: ``x[k+1] = (J0 + Jl lam) x[k] + c1 u_{k-1}``, ``u_k = (U0 + Ul lam) x[k]``
        (docs/math.md §1.1); None for a one-step chain. The x0 rule's multistep excess reads it
        (:func:`deqkern.engine.multistep_excess`)."""
        m = self.multistep
        if m is None:
            return None
        cols = [self.cx + self.c0 * self.px, self.co + self.c0 * self.po, m.c1, m.ux + m.uf * self.px,
                m.uo + m.uf * self.po]
        return torch.stack(cols, dim=1).to(device=device, dtype=torch.float64)

    def with_form(self, form: Form) -> "Schedule":
        """The same chain, solved in the other fixed-point form."""
        return replace(self, form=form)

    def drift_multipliers(self) -> torch.Tensor:
        """``[S]`` the drift form's ``L_k``: 1 in VP coordinates, so ``coords[k+1] / coords[k]`` in
        the latents' own (docs/math.md §3, "Drift in VP coordinates")."""
        if self.coords is None:
            return torch.ones_like(self.a_coef)
        return self.coords[1:] / self.coords[:-1]

    def packed(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[S, 7]`` coefficients in :data:`COEF_FIELDS` order, with ``L`` set by the form (the
        secant form's start is 1: the engine adapts it per row)."""
        if self.form == "scan":
            L = self.a_coef
        elif self.form == "drift":
            L = self.drift_multipliers()
        else:
            L = torch.ones_like(self.a_coef)
        cols = [L, self.cx, self.co, self.c0, self.px, self.po, self.sigma]
        return torch.stack(cols, dim=1).to(device=device, dtype=dtype)

    @property
    def can_hold_output(self) -> bool:
        """Whether rows entering a window can be stepped with a model output held
        (:meth:`packed_held`): affine steps, and in a multistep chain every ``uo != 0``."""
        return self.is_affine and (self.multistep is None or bool((self.multistep.uo != 0).all()))

    def packed_held(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[S, 7]`` like :meth:`packed`: the steps with a model output held, read by the commit's
        ``ahead`` (fields ``cx``, ``co``, ``sigma``; docs/math.md §2). A one-step chain holds its
        raw output ``e``: its own steps. A multistep chain holds the converted output ``u`` (the
        predicted x0 of DPM-Solver++): the raw output of row ``q`` is then ``e = (u - ux_q x) / uo_q``
        and the previous output ``u`` too, so step ``q`` is ``(cx_q - co_q ux_q / uo_q) x + (co_q /
        uo_q + c1_q) u + sigma_q z_q``. Needs :attr:`can_hold_output`."""
        if not self.can_hold_output:
            raise ValueError("packed_held: needs affine steps and, in a multistep chain, uo != 0 at every step")
        held = self.packed(device, torch.float64)
        if self.multistep is not None:
            m = self.multistep
            held[:, COEF_FIELDS.index("cx")] = self.cx - self.co * m.ux / m.uo
            held[:, COEF_FIELDS.index("co")] = self.co / m.uo + m.c1
        return held.to(device=device, dtype=dtype)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def ddim(
        cls,
        alphas_cumprod: torch.Tensor,
        timesteps: torch.Tensor | list[int],
        eta: float = 0.0,
        *,
        prev_timesteps: torch.Tensor | list[int] | None = None,
        final_alpha_cumprod: float = 1.0,
        prediction_type: PredictionType = "epsilon",
        transform: X0Transform | None = None,
        use_clipped_model_output: bool = False,
        form: Form = "drift",
    ) -> "Schedule":
        """A DDIM chain from raw ``alphas_cumprod`` (indexed by training timestep).

        ``prev_timesteps[k]`` is the timestep whose alpha step ``k`` moves to; by default the
        next entry of ``timesteps`` and, after the last, ``final_alpha_cumprod``. A negative
        previous timestep also means ``final_alpha_cumprod`` (diffusers' rule).
        """
        ac = _as_f64(alphas_cumprod, "alphas_cumprod")
        ts = _as_timesteps(timesteps, ac.numel())
        if eta < 0 or not math.isfinite(eta):
            raise ValueError(f"eta: expected a finite value >= 0, got {eta}")
        # the last step moves to this alpha; 0 would divide by zero in the posterior variance
        _ALPHA.check("final_alpha_cumprod", final_alpha_cumprod)
        if prev_timesteps is None:
            prev = torch.cat([ts[1:], torch.tensor([-1])])
        else:
            prev = torch.as_tensor(prev_timesteps, dtype=torch.int64)
            if prev.shape != ts.shape:
                raise ValueError(f"prev_timesteps: expected shape {tuple(ts.shape)}, got {tuple(prev.shape)}")
        a = ac[ts]
        a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.tensor(final_alpha_cumprod, dtype=torch.float64))
        var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        sigma = eta * var.sqrt()
        rest = 1 - a_prev - sigma**2
        if bool((rest < 0).any()):
            raise ValueError(f"eta: {eta} makes the DDIM direction coefficient sqrt(1 - a_prev - sigma^2) imaginary")
        direction = rest.sqrt()
        px, po, qx, qo = _x0_eps_coefs(a, prediction_type)
        transform = transform or X0Transform()
        if use_clipped_model_output and transform.kind != "none":
            # eps is recomputed from the transformed x0: eps = (x - sqrt(a) x0c) / sqrt(1-a)
            cx = direction / (1 - a).sqrt()
            co = torch.zeros_like(a)
            c0 = a_prev.sqrt() - direction * a.sqrt() / (1 - a).sqrt()
        else:
            cx, co, c0 = direction * qx, direction * qo, a_prev.sqrt()
        desc = f"DDIM S={ts.numel()} eta={eta} prediction={prediction_type} transform={transform.kind}"
        return _build(cls, ts, cx, co, c0, px, po, sigma, var, transform, prediction_type, form, desc)

    @classmethod
    def ddpm(
        cls,
        alphas_cumprod: torch.Tensor,
        timesteps: torch.Tensor | list[int],
        *,
        variance_type: str = "fixed_small",
        prediction_type: PredictionType = "epsilon",
        transform: X0Transform | None = None,
        form: Form = "drift",
    ) -> "Schedule":
        """A DDPM (ancestral) chain; step k moves to the next timestep in the list (alpha 1 after the last)."""
        ac = _as_f64(alphas_cumprod, "alphas_cumprod")
        ts = _as_timesteps(timesteps, ac.numel())
        prev = torch.cat([ts[1:], torch.tensor([-1])])
        a = ac[ts]
        a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.ones((), dtype=torch.float64))
        cur_alpha = a / a_prev
        cur_beta = 1 - cur_alpha
        var = ((1 - a_prev) / (1 - a) * cur_beta).clamp(min=1e-20)
        if variance_type in ("fixed_small", "fixed_small_log"):
            sigma = var.sqrt()
        elif variance_type == "fixed_large":
            sigma = cur_beta.sqrt()
        else:
            raise UnsupportedSchedulerOption(
                f"variance_type={variance_type!r}: deqkern reproduces 'fixed_small', 'fixed_small_log' and "
                "'fixed_large'; learned variances need a second model output channel block and "
                "'fixed_large_log' takes the square root of a log in diffusers (NaN)"
            )
        # diffusers adds no noise at training timestep 0
        sigma = torch.where(ts > 0, sigma, torch.zeros_like(sigma))
        px, po, _, _ = _x0_eps_coefs(a, prediction_type)
        c_x0 = a_prev.sqrt() * cur_beta / (1 - a)
        c_x = cur_alpha.sqrt() * (1 - a_prev) / (1 - a)
        transform = transform or X0Transform()
        desc = f"DDPM S={ts.numel()} variance={variance_type} prediction={prediction_type} transform={transform.kind}"
        zeros = torch.zeros_like(a)
        return _build(cls, ts, c_x, zeros, c_x0, px, po, sigma, var, transform, prediction_type, form, desc)

    @classmethod
    def euler(
        cls,
        sigmas: torch.Tensor,
        model_timesteps: torch.Tensor,
        *,
        prediction_type: PredictionType = "epsilon",
        ancestral: bool = False,
        form: Form = "drift",
    ) -> "Schedule":
        """An Euler chain in sigma space: diffusers' ``EulerDiscreteScheduler`` (``s_churn = 0``) or,
        with ``ancestral``, ``EulerAncestralDiscreteScheduler``.

        The latents are variance exploding, ``x = x0 + sigma eps``; the model sees ``x / sqrt(sigma_k^2
        + 1)`` at timestep ``model_timesteps[k]`` (:class:`deqkern.model.StepInputs`). ``sigmas``:
        ``[S+1]``, ``sigma_k > 0`` strictly descending over the S steps, ``0 <= sigma_S <= sigma_{S-1}``
        (the final step may be a no-op, as Karras sigmas with ``final_sigmas_type="sigma_min"`` make it).
        Step k, with ``s = sigma_k``, ``s' = sigma_{k+1}``::

            x0_hat = px x + po out:  epsilon (1, -s);  v_prediction (1/(s^2+1), -s/sqrt(s^2+1));  sample (0, 1)
            x_next = x + (x - x0_hat) (s_to - s) / s + s_up z

        plain Euler: ``s_to = s'``, ``s_up = 0``; ancestral: ``s_up = sqrt(s'^2 (s^2 - s'^2) / s^2)``,
        ``s_to = sqrt(s'^2 - s_up^2)``. So with ``r = (s_to - s) / s``: ``cx = 1 + r``, ``co = 0``,
        ``c0 = -r``, ``sigma = s_up``: affine, and folded into ``cx``/``co``. The noise rule's scale is
        the step's posterior variance ``s'^2 (s^2 - s'^2) / s^2`` (ancestral: the noise it adds).
        """
        sig, ts = _sigma_chain(sigmas, model_timesteps)
        s, nxt = sig[:-1], sig[1:]
        px, po = _ve_x0_coefs(s, prediction_type)
        up_sq = nxt**2 * (s**2 - nxt**2) / s**2
        if ancestral:
            up, to = up_sq.sqrt(), (nxt**2 - up_sq).clamp(min=0).sqrt()
        else:
            up, to = torch.zeros_like(s), nxt
        r = (to - s) / s
        kind = "EulerAncestral" if ancestral else "Euler"
        desc = f"{kind} S={s.numel()} prediction={prediction_type}"
        out = _build(cls, torch.arange(s.numel()), 1 + r, torch.zeros_like(s), -r, px, po, up, up_sq,
                     X0Transform(), prediction_type, form, desc, StepInputs(ts, 1 / (s**2 + 1).sqrt()))
        # x / sqrt(sigma^2 + 1) is the VP latent the model sees: DDIM's chain, in its coordinates
        return replace(out, coords=(sig**2 + 1).sqrt())

    @classmethod
    def flow_match(
        cls, sigmas: torch.Tensor, model_timesteps: torch.Tensor, *, stochastic: bool = False, form: Form = "drift"
    ) -> "Schedule":
        """A flow-matching Euler chain: diffusers' ``FlowMatchEulerDiscreteScheduler``.

        The latents interpolate, ``x = (1 - sigma) x0 + sigma eps``, and the model predicts the
        velocity ``out = eps - x0``, so ``x0_hat = x - s out`` (``px = 1``, ``po = -s``); it sees ``x``
        unscaled at timestep ``model_timesteps[k]`` (``1000 sigma_k`` unless given). ``sigmas`` as in
        :meth:`euler`. Step k, ``s = sigma_k``, ``s' = sigma_{k+1}``::

            deterministic:                   x_next = x + (s' - s) out        (cx = 1, co = s' - s)
            stochastic_sampling (re-noise):  x_next = (1 - s') x0_hat + s' z  (c0 = 1 - s', sigma = s')

        The noise rule's scale: the posterior variance of ``x_{k+1}`` given ``x_k`` and ``x0``
        (deterministic; :func:`_bridge_var`) or the variance the step adds, ``s'^2`` (stochastic).
        """
        sig, ts = _sigma_chain(sigmas, model_timesteps)
        s, nxt = sig[:-1], sig[1:]
        zeros, ones = torch.zeros_like(s), torch.ones_like(s)
        if stochastic:
            cx, co, c0, noise, var = zeros, zeros, 1 - nxt, nxt, nxt**2
        else:
            cx, co, c0, noise, var = ones, nxt - s, zeros, zeros, _bridge_var(1 - s, s, 1 - nxt, nxt)
        desc = f"FlowMatchEuler S={s.numel()} stochastic={stochastic}"
        return _build(cls, torch.arange(s.numel()), cx, co, c0, ones, -s, noise, var, X0Transform(), "v_prediction",
                      form, desc, StepInputs(ts, None))

    @classmethod
    def dpm_solver(
        cls,
        sigmas: torch.Tensor,
        model_timesteps: torch.Tensor,
        *,
        algorithm_type: AlgorithmType = "dpmsolver++",
        solver_order: int = 2,
        solver_type: Literal["midpoint", "heun"] = "midpoint",
        first_order_final: bool = True,
        prediction_type: PredictionType = "epsilon",
        transform: X0Transform | None = None,
        form: Form = "drift",
    ) -> "Schedule":
        """A multistep DPM-Solver chain: diffusers' ``DPMSolverMultistepScheduler``, orders 1 and 2.

        Variance preserving latents ``x = a x0 + b eps`` with, from diffusers' sigma ``s``, ``a = 1 /
        sqrt(s^2 + 1)``, ``b = s a`` and ``lambda = log(a / b) = -log s``. Step ``k`` goes from ``s =
        sigmas[k]`` to ``t = sigmas[k+1]``; ``h = lambda_t - lambda_s = log(s / t)`` (``e^-h = t / s``),
        ``h0 = log(sigmas[k-1] / s)``, ``1/r0 = h / h0``. The converted output ``u_k`` is the predicted
        x0 (``"dpmsolver++"``: ``f(x0_hat)``) or noise (``"dpmsolver"``: ``eps_hat``; with thresholding
        ``(x - a f(x0_hat)) / b``); every step is then (``c = 2`` for the SDE variants, else 1)::

            x_t = A x + B0 u_k + B1 u_{k-1} + sigma z,   D1 = (u_k - u_{k-1}) / r0
            ++:   A = (b_t / b_s) e^{-(c-1) h},  base = a_t (1 - e^{-c h}),  heun d1 = a_t (1 - (1 - e^{-c h}) / (c h))
            eps:  A = a_t / a_s,                 base = -c b_t (e^h - 1),  heun d1 = -c b_t ((e^h - 1) / h - 1)
            midpoint d1 = base / 2;   order 1: x_t = A x + base u_k;   order 2: x_t = A x + base u_k + d1 D1

        so ``B0 = base + d1 / r0``, ``B1 = -d1 / r0`` (0 for a first-order step), and the noise
        ``sigma = b_t sqrt(1 - e^{-2h})`` (sde ++) or ``b_t sqrt(e^{2h} - 1)`` (sde eps). Step 0 is first
        order (no previous output), as is the last with ``first_order_final`` or a final sigma 0
        (``h`` infinite). A repeated final sigma (``h = 0``) is the identity step (diffusers' Heun
        coefficient is 0/0 there). In the fields of :class:`Schedule` and :class:`Multistep`, with
        ``u = ux x + uo out + uf f(px x + po out)``: ``cx = A + B0 ux``, ``co = B0 uo``, ``c0 = B0 uf``,
        ``c1 = B1``. Derivation: docs/math.md §1.1.
        """
        if algorithm_type not in _DPM_ALGORITHMS:
            raise UnsupportedSchedulerOption(f"algorithm_type={algorithm_type!r}: deqkern reproduces {_DPM_ALGORITHMS}")
        if solver_order not in (1, 2):
            raise UnsupportedSchedulerOption(f"solver_order={solver_order!r}: deqkern reproduces orders 1 and 2 "
                                             "(order 3 reads two previous outputs)")
        if solver_type not in ("midpoint", "heun"):
            raise UnsupportedSchedulerOption(f"solver_type={solver_type!r}: expected 'midpoint' or 'heun'")
        sig, ts = _sigma_chain(sigmas, model_timesteps)
        s, nxt = sig[:-1], sig[1:]
        a_s, a_t = 1 / (s**2 + 1).sqrt(), 1 / (nxt**2 + 1).sqrt()
        b_s, b_t = s * a_s, nxt * a_t
        h = torch.log(s / nxt)  # inf at a final sigma 0, 0 at a repeated final sigma
        c = 2.0 if algorithm_type.startswith("sde") else 1.0
        moving = h > 0
        safe_h = torch.where(moving, h, 1.0)  # the h = 0 rows' values are replaced below
        if algorithm_type.endswith("++"):
            one = -torch.expm1(-c * h)  # 1 - e^{-c h}
            A = b_t / b_s * (torch.exp(-h) if c == 2 else 1.0)
            base = a_t * one
            heun = a_t * (1 - one / (c * safe_h))
            noise_sd = b_t * one.sqrt()
        else:
            grow = torch.expm1(h)  # e^h - 1
            A = a_t / a_s
            base = -c * b_t * grow
            heun = -c * b_t * (grow / safe_h - 1)
            noise_sd = b_t * torch.expm1(2 * h).sqrt()
        d1 = torch.where(moving, 0.5 * base if solver_type == "midpoint" else heun, 0.0)
        second = torch.zeros_like(s, dtype=torch.bool)
        if solver_order == 2:
            second[1:] = True
            second[-1] = not first_order_final and bool(nxt[-1] > 0)
        inv_r0 = torch.zeros_like(s)
        inv_r0[1:] = h[1:] / torch.log(sig[:-2] / s[1:])
        inv_r0 = torch.where(second & moving, inv_r0, 0.0)
        b0, b1 = base + d1 * inv_r0, -d1 * inv_r0
        px, po, qx, qo = _vp_coefs(a_s, b_s, prediction_type)
        transform = transform or X0Transform()
        zeros, ones = torch.zeros_like(s), torch.ones_like(s)
        if algorithm_type.endswith("++"):
            ux, uo, uf = zeros, zeros, ones  # u = f(x0_hat)
        elif transform.kind != "none":
            # diffusers thresholds x0 = (x - b eps) / a and recomputes eps = (x - a f(x0)) / b
            px, po = (1 - b_s * qx) / a_s, -b_s * qo / a_s
            ux, uo, uf = 1 / b_s, zeros, -a_s / b_s
        else:
            ux, uo, uf = qx, qo, zeros
        if transform.kind == "none":  # fold the identity transform, as _build folds c0
            ux, uo, uf = ux + uf * px, uo + uf * po, zeros
        sde = c == 2
        sigma = noise_sd if sde else zeros
        var = noise_sd**2 if sde else _bridge_var(a_s, b_s, a_t, b_t)
        desc = (f"DPMSolver S={s.numel()} {algorithm_type} order={solver_order} {solver_type} "
                f"prediction={prediction_type} transform={transform.kind}")
        out = _build(cls, torch.arange(s.numel()), A + b0 * ux, b0 * uo, b0 * uf, px, po, sigma, var, transform,
                     prediction_type, form, desc, StepInputs(ts, None))
        # the x0 rule's terms (docs/math.md §1.1); base = 0 only on an identity step, where B0 = B1 = 0
        first = torch.where(base != 0, base, 1.0)
        rho = torch.cat([b1[1:], b1.new_zeros(1)]).abs() / first.abs()
        return replace(out, multistep=Multistep(b1, ux, uo, uf, b0 / first, rho, A.abs()))

    @classmethod
    def from_diffusers(
        cls,
        scheduler: Any,
        num_inference_steps: int,
        eta: float | None = None,
        *,
        use_clipped_model_output: bool = False,
        form: Form = "drift",
        **set_timesteps_kwargs: Any,
    ) -> "Schedule":
        """The chain of a diffusers scheduler (object or config dict), reproducing its ``step()``.

        Supported (:data:`deqkern._diffusers.SUPPORTED`): ``DDIMScheduler``, ``DDPMScheduler`` and
        their ``Parallel`` twins (same maths), ``EulerDiscreteScheduler`` (``s_churn = 0``),
        ``EulerAncestralDiscreteScheduler``, ``FlowMatchEulerDiscreteScheduler`` and
        ``DPMSolverMultistepScheduler`` (orders 1 and 2, every algorithm type: :meth:`dpm_solver`;
        the SDE variants draw ``noise[k]`` at every step, in float32); anything else,
        and any option we cannot reproduce exactly, raises :class:`UnsupportedSchedulerOption`
        naming it. The scheduler is rebuilt from its config and ``set_timesteps`` is called on the
        copy, so the caller's object is never mutated.

        Conventions: ``x_T`` is the latents the diffusers loop starts from, already multiplied by
        ``init_noise_sigma`` (as a pipeline's ``prepare_latents`` leaves them); ``noise[k]`` is
        the noise step k draws from its generator, in the loop's order (Euler ancestral: every
        step; flow matching with ``stochastic_sampling``: every step, drawn in float32). Extra
        keyword arguments go to ``set_timesteps`` (``mu``, ``sigmas``, ``timesteps``), except
        Euler's step options ``s_churn`` (0 only), ``s_tmin``, ``s_tmax``, ``s_noise`` (no effect
        without churn). ``eta`` and ``use_clipped_model_output`` are DDIM's; ``thresholding`` and
        ``clip_sample`` are reproduced (drift form only).
        """
        from deqkern._diffusers import scheduler_from_any

        sched, kind = scheduler_from_any(scheduler)
        num_inference_steps = POSITIVE_INT.check("num_inference_steps", num_inference_steps)
        if kind in ("ddim", "ddpm"):
            if set_timesteps_kwargs:
                raise UnsupportedSchedulerOption(
                    f"{sorted(set_timesteps_kwargs)}: {type(sched).__name__}.set_timesteps options are not "
                    "reproduced; pass num_inference_steps only"
                )
            out = _ddim_ddpm(cls, sched, kind, num_inference_steps, eta, use_clipped_model_output, form)
        else:
            if eta is not None:
                raise ValueError(f"eta: applies to DDIMScheduler only, not {type(sched).__name__}")
            if use_clipped_model_output:
                raise ValueError(f"use_clipped_model_output: {type(sched).__name__}.step has no such option")
            if kind == "dpm":
                out = _dpm(cls, sched, num_inference_steps, form, set_timesteps_kwargs)
            else:
                out = _sigma_space(cls, sched, kind, num_inference_steps, form, set_timesteps_kwargs)
        return replace(out, description=f"{type(sched).__name__}({out.description})")


# ---------------------------------------------------------------------- diffusers adapters
def _ddim_ddpm(cls, sched, kind, num_inference_steps, eta, use_clipped_model_output, form) -> Schedule:
    """A DDIM/DDPM chain (and their Parallel twins) from a fresh scheduler."""
    cfg = sched.config
    if num_inference_steps > cfg.num_train_timesteps:
        raise ValueError(
            f"num_inference_steps: {num_inference_steps} exceeds num_train_timesteps={cfg.num_train_timesteps}"
        )
    sched.set_timesteps(num_inference_steps)
    ts = sched.timesteps.to(torch.int64).cpu()
    ac = sched.alphas_cumprod.cpu()
    prediction_type = cfg.prediction_type
    if prediction_type not in ("epsilon", "sample", "v_prediction"):
        raise UnsupportedSchedulerOption(
            f"prediction_type={prediction_type!r} is not one of epsilon/sample/v_prediction"
        )
    if cfg.thresholding:
        transform = X0Transform(
            "threshold", ratio=float(cfg.dynamic_thresholding_ratio), max_value=float(cfg.sample_max_value)
        )
    elif cfg.clip_sample:
        transform = X0Transform("clip", clip_range=float(cfg.clip_sample_range))
    else:
        transform = X0Transform()
    if kind == "ddim":
        eta = 0.0 if eta is None else float(eta)
        step = cfg.num_train_timesteps // num_inference_steps
        final = float(sched.final_alpha_cumprod)
        out = cls.ddim(
            ac, ts, eta, prev_timesteps=ts - step, final_alpha_cumprod=final,
            prediction_type=prediction_type, transform=transform,
            use_clipped_model_output=use_clipped_model_output, form=form,
        )
    else:
        if eta is not None:
            raise ValueError("eta: applies to DDIMScheduler only; DDPMScheduler's noise is set by variance_type")
        if use_clipped_model_output:
            raise ValueError("use_clipped_model_output: DDPMScheduler.step has no such option")
        if not ts.eq(sched.timesteps).all():  # pragma: no cover - defensive
            raise UnsupportedSchedulerOption("custom timesteps")
        out = cls.ddpm(
            ac, ts, variance_type=cfg.variance_type, prediction_type=prediction_type,
            transform=transform, form=form,
        )
    return replace(out, description=f"{out.description}, spacing={cfg.timestep_spacing}")


#: EulerDiscreteScheduler.step's options: churn re-noises the sample before the step (not
#: reproduced); the other three only act with churn.
_EULER_STEP_OPTIONS = ("s_churn", "s_tmin", "s_tmax", "s_noise")


def _sigma_space(cls, sched, kind, num_inference_steps, form, kwargs) -> Schedule:
    """An Euler / Euler ancestral / flow-matching chain: ``set_timesteps(S, **kwargs)`` on the fresh
    scheduler, then its ``sigmas`` and ``timesteps``."""
    name, cfg = type(sched).__name__, sched.config
    kwargs = dict(kwargs)
    step_options = {k: kwargs.pop(k) for k in _EULER_STEP_OPTIONS if k in kwargs}
    if step_options and kind != "euler":
        raise UnsupportedSchedulerOption(f"{sorted(step_options)}: step options of EulerDiscreteScheduler, not {name}")
    if step_options.get("s_churn", 0.0) != 0:
        raise UnsupportedSchedulerOption(
            f"s_churn={step_options['s_churn']!r}: deqkern reproduces {name}.step with s_churn = 0 only"
        )
    if kind == "flow" and cfg.invert_sigmas:
        raise UnsupportedSchedulerOption(f"invert_sigmas=True: {name} with ascending sigmas is not reproduced")
    if kind == "euler" and ("sigmas" in kwargs or "timesteps" in kwargs):
        sched.set_timesteps(**kwargs)  # Euler refuses a step count next to custom sigmas/timesteps
    else:
        sched.set_timesteps(num_inference_steps, **kwargs)
    # step k reads sigmas[k] and sigmas[k + 1]: Euler's log_linear interpolation leaves one unused sigma more
    ts, sigmas = sched.timesteps.detach().cpu(), sched.sigmas.detach().cpu()[: num_inference_steps + 1]
    if ts.numel() != num_inference_steps:
        raise ValueError(f"num_inference_steps: {num_inference_steps}, but {name}.set_timesteps({kwargs}) made "
                         f"{ts.numel()} steps")
    if kind == "flow":
        return cls.flow_match(sigmas, ts, stochastic=bool(cfg.stochastic_sampling), form=form)
    prediction_type = "sample" if cfg.prediction_type == "original_sample" else cfg.prediction_type
    allowed = ("epsilon", "v_prediction") if kind == "euler_a" else ("epsilon", "v_prediction", "sample")
    if prediction_type not in allowed:
        raise UnsupportedSchedulerOption(f"prediction_type={cfg.prediction_type!r}: {name} reproduces {allowed}")
    return cls.euler(sigmas, ts, prediction_type=prediction_type, ancestral=kind == "euler_a", form=form)


#: DPMSolverMultistepScheduler options reproduced only at their defaults: (name, default, why).
_DPM_FIXED = (("use_flow_sigmas", False, "flow-matching sigmas are not reproduced"),)


def _dpm(cls, sched, num_inference_steps, form, kwargs) -> Schedule:
    """A DPM-Solver multistep chain: ``set_timesteps`` on the fresh scheduler (``timesteps=`` in
    place of the step count), then its ``sigmas``, ``timesteps`` and step-order rule."""
    name, cfg = type(sched).__name__, sched.config
    for option, default, why in _DPM_FIXED:
        if cfg.get(option, default) != default:
            raise UnsupportedSchedulerOption(f"{option}={cfg[option]!r}: {why}; {name} is reproduced with "
                                             f"{option}={default!r}")
    # diffusers reads variance_type only for the learned kinds (a DDPM config's "fixed_small" is inert)
    if cfg.get("variance_type") in ("learned", "learned_range"):
        raise UnsupportedSchedulerOption(f"variance_type={cfg.variance_type!r}: learned variances need a second "
                                         f"model output channel block; {name} is reproduced without them")
    if cfg.prediction_type not in ("epsilon", "sample", "v_prediction"):
        raise UnsupportedSchedulerOption(f"prediction_type={cfg.prediction_type!r}: {name} is reproduced for "
                                         "epsilon/sample/v_prediction")
    if "mu" in kwargs:
        raise UnsupportedSchedulerOption(f"mu: {name} shifts flow-matching sigmas only, which are not reproduced")
    if "timesteps" in kwargs:
        sched.set_timesteps(**kwargs)  # diffusers refuses a step count next to custom timesteps
    else:
        sched.set_timesteps(num_inference_steps, **kwargs)
    ts, sigmas = sched.timesteps.detach().cpu(), sched.sigmas.detach().cpu()
    if ts.numel() != num_inference_steps:
        raise ValueError(f"num_inference_steps: {num_inference_steps}, but {name}.set_timesteps({kwargs}) made "
                         f"{ts.numel()} steps")
    # diffusers' step(): the last step is first order with euler_at_final, a final sigma 0, or
    # lower_order_final below 15 steps
    first_order_final = bool(cfg.euler_at_final or cfg.final_sigmas_type == "zero"
                             or (cfg.lower_order_final and num_inference_steps < 15))
    transform = X0Transform()
    if cfg.thresholding:
        transform = X0Transform("threshold", ratio=float(cfg.dynamic_thresholding_ratio),
                                max_value=float(cfg.sample_max_value))
    out = cls.dpm_solver(
        sigmas, ts, algorithm_type=cfg.algorithm_type, solver_order=int(cfg.solver_order),
        solver_type=cfg.solver_type, first_order_final=first_order_final, prediction_type=cfg.prediction_type,
        transform=transform, form=form,
    )
    return replace(out, description=f"{out.description}, final_sigmas={cfg.final_sigmas_type}")


# ---------------------------------------------------------------------- helpers
def _x0_eps_coefs(a: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, ...]:
    """Coefficients of x0_hat = px x + po out and eps_hat = qx x + qo out (diffusers' formulas)."""
    return _vp_coefs(a.sqrt(), (1 - a).sqrt(), prediction_type)


def _vp_coefs(sa: torch.Tensor, sb: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, ...]:
    """:func:`_x0_eps_coefs` for latents ``x = sa x0 + sb eps`` given ``sa``, ``sb`` directly."""
    if prediction_type == "epsilon":
        return 1 / sa, -sb / sa, torch.zeros_like(sa), torch.ones_like(sa)
    if prediction_type == "sample":
        return torch.zeros_like(sa), torch.ones_like(sa), 1 / sb, -sa / sb
    if prediction_type == "v_prediction":
        return sa, -sb, sb, sa
    raise UnsupportedSchedulerOption(f"prediction_type={prediction_type!r} is not one of epsilon/sample/v_prediction")


def _sigma_chain(sigmas: torch.Tensor, model_timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmas as float64, model timesteps)`` of an S-step sigma-space chain, checked: ``[S+1]``
    finite sigmas, positive and strictly descending over the steps, the last in ``[0, sigma_{S-1}]``."""
    ts = torch.as_tensor(model_timesteps).detach().cpu().clone()
    sig = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    s = ts.numel()
    if ts.ndim != 1 or s < 1 or sig.shape != (s + 1,):
        raise ValueError(f"sigmas, model_timesteps: expected shapes [S+1] and [S] (S >= 1), got "
                         f"{tuple(sig.shape)} and {tuple(ts.shape)}")
    bad = ~torch.isfinite(sig) | (sig < 0)
    bad[:-1] |= sig[:-1] <= 0
    bad[1:] |= sig[1:] > sig[:-1]
    bad[1:-1] |= sig[1:-1] == sig[:-2]  # a repeated step sigma (the final one may repeat: a no-op step)
    if bool(bad.any()):
        k = int(torch.nonzero(bad)[0, 0])
        near = sig[max(k - 2, 0): k + 3].tolist()  # the neighbourhood, not a list of S + 1 values
        raise ValueError(f"sigmas: step {k} has sigma {sig[k].item()!r} (steps {max(k - 2, 0)}.. of {s + 1}: {near}); "
                         "expected finite values, positive and strictly descending over the steps, the final one in "
                         "[0, the last]")
    return sig, ts


def _ve_x0_coefs(s: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients of x0_hat = px x + po out for variance-exploding latents x = x0 + s eps (diffusers' Euler)."""
    if prediction_type == "epsilon":
        return torch.ones_like(s), -s
    if prediction_type == "v_prediction":
        return 1 / (s**2 + 1), -s / (s**2 + 1).sqrt()
    if prediction_type == "sample":
        return torch.zeros_like(s), torch.ones_like(s)
    raise UnsupportedSchedulerOption(f"prediction_type={prediction_type!r} is not one of epsilon/sample/v_prediction")


def _bridge_var(a: torch.Tensor, b: torch.Tensor, a_next: torch.Tensor, b_next: torch.Tensor) -> torch.Tensor:
    """Posterior variance of ``x' = a' x0 + b' eps'`` given ``x = a x0 + b eps`` and ``x0`` (the
    forward process from x' to x adds variance ``tau^2 = b^2 - (a/a')^2 b'^2``)::

        var = tau^2 b'^2 / b^2

    (variance preserving: DDPM's posterior variance; exploding, ``a = 1``: ``b'^2 (b^2 - b'^2) / b^2``).
    Non-finite values (``a' = 0``) become 0, which :func:`_build` floors."""
    tau_sq = b**2 - (a / a_next) ** 2 * b_next**2
    return torch.nan_to_num(tau_sq * b_next**2 / b**2, nan=0.0, posinf=0.0, neginf=0.0)


def _build(
    cls, ts, cx, co, c0, px, po, sigma, var, transform, prediction_type, form, desc, step_inputs=None
) -> Schedule:
    if transform.kind == "none":
        # Affine step: fold the x0 term into the x and output coefficients.
        cx, co, c0 = cx + c0 * px, co + c0 * po, torch.zeros_like(c0)
    a_coef = cx + c0 * px
    positive = var[var > 0]
    floor = positive.min() if positive.numel() else torch.tensor(1.0, dtype=torch.float64)
    noise_var = torch.where(var > 0, var, floor)
    return cls(
        timesteps=ts, cx=cx, co=co, c0=c0, px=px, po=po, sigma=sigma, a_coef=a_coef,
        noise_var=noise_var, transform=transform, prediction_type=prediction_type, form=form,
        description=desc, step_inputs=step_inputs,
    )


def _as_f64(t: torch.Tensor | Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(t).detach().to("cpu", torch.float64)
    if t.ndim != 1 or t.numel() < 1:
        raise ValueError(f"{name}: expected a non-empty 1-D tensor, got shape {tuple(t.shape)}")
    if not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"{name}: expected values in [0, 1]")
    return t


def _as_timesteps(timesteps: torch.Tensor | list[int], num_train: int) -> torch.Tensor:
    ts = torch.as_tensor(timesteps).detach().cpu()
    # shape first: an empty list becomes a float tensor, and its dtype is not the problem
    if ts.ndim != 1 or ts.numel() < 1:
        raise ValueError(f"timesteps: expected a non-empty 1-D tensor (S >= 1), got shape {tuple(ts.shape)}")
    if ts.is_floating_point() or ts.is_complex() or ts.dtype == torch.bool:
        raise ValueError(f"timesteps: expected integer training timesteps, got dtype {ts.dtype}")
    ts = ts.to(torch.int64)
    if bool((ts < 0).any()) or bool((ts >= num_train).any()):
        raise ValueError(f"timesteps: values must lie in [0, {num_train}), got {ts.tolist()}")
    if ts.numel() > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"timesteps: expected strictly descending values, got {ts.tolist()}")
    return ts


def schedule_summary(s: Schedule) -> Mapping[str, Any]:
    """A JSON-friendly description (for benchmark records)."""
    return {
        "description": s.description, "num_steps": s.num_steps, "form": s.form,
        "stochastic": s.is_stochastic, "transform": s.transform.kind,
        "prediction_type": s.prediction_type, "multistep": s.is_multistep,
    }
