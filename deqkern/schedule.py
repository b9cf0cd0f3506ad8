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
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Mapping

import torch

from deqkern._validate import POSITIVE_FLOAT, POSITIVE_INT, Bounded, OptionError
from deqkern.errors import UnsupportedSchedulerOption

PredictionType = Literal["epsilon", "sample", "v_prediction"]
Form = Literal["drift", "scan", "secant"]

#: Order of the per-step coefficients in the packed ``[S, 7]`` tensor the kernels read.
#: ``L`` is the scan multiplier of the fixed-point form (docs/math.md §3): ``A`` for the scan
#: form, ``1`` for the drift form and the secant form's start (the engine adapts that one per
#: row, :func:`deqkern.engine.secant_update`); it is filled in by :meth:`Schedule.packed`.
COEF_FIELDS = ("L", "cx", "co", "c0", "px", "po", "sigma")

_QUANTILE = Bounded(float, 0.0, 1.0)
_ALPHA = Bounded(float, 0.0, 1.0, lo_open=True)


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
        work = x0 if x0.dtype in (torch.float32, torch.float64) else x0.float()
        s = torch.quantile(work.abs(), self.ratio, dim=1).clamp(min=1.0, max=self.max_value)
        s = s.unsqueeze(1)
        return (torch.clamp(work, -s, s) / s).to(x0.dtype)


@dataclass(frozen=True)
class Schedule:
    """Coefficients of an S-step sampling chain, float64 on the CPU.

    Index ``k = 0 .. S-1`` is the k-th step in the scheduler's ``timesteps`` order (descending
    timesteps): it maps latent ``x[k]`` to ``x[k+1]``, with ``x[0] = x_T`` and ``x[S] = x_0``.
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

    def __post_init__(self) -> None:
        s = self.timesteps.numel()
        if s < 1:
            raise ValueError(f"timesteps: expected at least one step, got {s}")
        if self.timesteps.ndim != 1:
            raise ValueError(f"timesteps: expected a 1-D tensor, got shape {tuple(self.timesteps.shape)}")
        if s > 1 and not bool((self.timesteps[1:] < self.timesteps[:-1]).all()):
            raise ValueError(f"timesteps: expected strictly descending values, got {self.timesteps.tolist()}")
        for name in ("cx", "co", "c0", "px", "po", "sigma", "a_coef", "noise_var"):
            v = getattr(self, name)
            if v.shape != (s,) or v.dtype != torch.float64:
                raise ValueError(f"{name}: expected float64 of shape ({s},), got {v.dtype} {tuple(v.shape)}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(
                    f"{name}: non-finite coefficient; alpha_cumprod is 0 or 1 where this prediction type "
                    f"({self.prediction_type}) divides by it (zero-SNR schedules need v_prediction)"
                )
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

    def with_form(self, form: Form) -> "Schedule":
        """The same chain, solved in the other fixed-point form."""
        return replace(self, form=form)

    def packed(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[S, 7]`` coefficients in :data:`COEF_FIELDS` order, with ``L`` set by the form."""
        L = self.a_coef if self.form == "scan" else torch.ones_like(self.a_coef)
        cols = [L, self.cx, self.co, self.c0, self.px, self.po, self.sigma]
        return torch.stack(cols, dim=1).to(device=device, dtype=dtype)

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
    def from_diffusers(
        cls,
        scheduler: Any,
        num_inference_steps: int,
        eta: float | None = None,
        *,
        use_clipped_model_output: bool = False,
        form: Form = "drift",
    ) -> "Schedule":
        """The chain of a diffusers ``DDIMScheduler`` or ``DDPMScheduler`` (object or config dict).

        The scheduler is rebuilt from its config and ``set_timesteps(num_inference_steps)`` is
        called on the copy, so the caller's object is never mutated. ``eta`` is DDIM's; passing it
        for DDPM is an error (DDPM's noise is set by ``variance_type``). ``thresholding`` and
        ``clip_sample`` are reproduced (drift form only); anything else we cannot reproduce
        exactly raises :class:`UnsupportedSchedulerOption` naming the option.
        """
        from deqkern._diffusers import scheduler_from_any

        sched, kind = scheduler_from_any(scheduler)
        num_inference_steps = POSITIVE_INT.check("num_inference_steps", num_inference_steps)
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
        return replace(out, description=f"{type(sched).__name__}({out.description}, spacing={cfg.timestep_spacing})")


# ---------------------------------------------------------------------- helpers
def _x0_eps_coefs(a: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, ...]:
    """Coefficients of x0_hat = px x + po out and eps_hat = qx x + qo out (diffusers' formulas)."""
    sa, sb = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        return 1 / sa, -sb / sa, torch.zeros_like(a), torch.ones_like(a)
    if prediction_type == "sample":
        return torch.zeros_like(a), torch.ones_like(a), 1 / sb, -sa / sb
    if prediction_type == "v_prediction":
        return sa, -sb, sb, sa
    raise UnsupportedSchedulerOption(f"prediction_type={prediction_type!r} is not one of epsilon/sample/v_prediction")


def _build(cls, ts, cx, co, c0, px, po, sigma, var, transform, prediction_type, form, desc) -> Schedule:
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
        description=desc,
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
        "prediction_type": s.prediction_type,
    }
