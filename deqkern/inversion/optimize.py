"""Model inversion: find ``x_T`` whose chain reproduces a target ``x0``.

``invert`` minimises ``loss_fn(chain(x_T), target)`` over ``x_T`` (Adam by default), starting from
the DDIM encoding of the target or from noise, with one of four methods:

* ``"implicit"`` — forward by the parallel fixed-point solve, warm-started from the previous
  step's fixed point; backward by the exact implicit gradient (the adjoint solved in parallel);
* ``"phantom"`` — same forward, DEQ-DDIM's phantom gradient (cheap, approximate);
* ``"sequential_backprop"`` — autograd through the sequential chain, each step checkpointed;
* ``"ddim_encode"`` — DDIM inversion alone, no optimisation.

Costs are reported per optimisation step as wall time and *model evaluations*: model rows (one
latent at one timestep), with one vector-Jacobian-product row through the model counted as one
evaluation. Every method's first curve point includes the initialisation.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Literal, Mapping

import torch

from deqkern._config import config_from
from deqkern.config import SolveConfig, solve_config, split_solve_options
from deqkern.sampling import check_chain_inputs, sample_sequential
from deqkern.inversion.adjoint import GradConfig
from deqkern.inversion.baselines import ddim_encode, sequential_chain
from deqkern.inversion.function import IMPLICIT_FORWARD, ImplicitStats, grad_config, sample_with_implicit_grad
from deqkern.model import Guidance, ModelEvaluator, ModelFn, gather_rows
from deqkern.schedule import Schedule

Method = Literal["implicit", "phantom", "sequential_backprop", "ddim_encode"]
METHODS: tuple[str, ...] = ("implicit", "phantom", "sequential_backprop", "ddim_encode")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: Adam learning rates per method: learning-rate sweeps on the digits model, measured once, no study yet.
DEFAULT_LR: dict[str, float] = {"implicit": 0.01, "sequential_backprop": 0.01, "phantom": 0.05}


@dataclass(frozen=True)
class InvertConfig:
    """Options of :func:`invert` (pass them as keyword arguments or as ``config``).

    Optimisation: ``optimizer`` (``"adam"``/``"sgd"``) with learning rate ``lr`` (default
    :data:`DEFAULT_LR` of the method); ``init`` is
    ``"ddim_encode"`` or ``"noise"`` (``seed``'s standard normal); stop at the first of
    ``loss <= loss_threshold``, ``max_steps`` updates, ``time_budget`` seconds, ``eval_budget``
    model evaluations (the loss threshold is tested on the recorded loss, see ``exact_curve``).
    ``optimize_noise`` also optimises the step noise of a stochastic chain.

    Forward solve (implicit, phantom): ``solve``, a :class:`SolveConfig` (default
    :data:`IMPLICIT_FORWARD`, tol 1e-4; :func:`invert` also takes its fields as keywords:
    ``tol=...``, ``solver=...``), warm-started from the previous step's trajectory if
    ``warm_start``; ``grad_options`` configures the backward (:class:`GradConfig`).
    ``max_batch`` caps model rows per call (all methods).

    ``exact_curve``: after the run, re-evaluate every curve point's ``x_T`` with the sequential
    chain (all points in one batch; not counted in the costs) and store it as
    ``InversionStep.exact_loss``. The recorded loss of the fixed-point methods is the loss at
    the forward solve's approximate ``x0`` (relative error ~ ``tol``), which can be biased by
    more than the differences being measured; benchmarks should compare exact losses.

    ``target_limit``: targets must lie in ``[-target_limit, target_limit]``. Diffusion models are
    trained on data scaled to [-1, 1] (and a ``clip_sample`` chain cannot leave
    ``[-clip_range, clip_range]``); a target beyond 1.5 is almost surely an image that was not
    rescaled (0..255, or a wrong normalisation), which no ``x_T`` can reproduce. ``None`` disables it.
    """

    init: Literal["ddim_encode", "noise"] = "ddim_encode"
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float | None = None
    max_steps: int = 200
    loss_threshold: float | None = None
    time_budget: float | None = None
    eval_budget: int | None = None
    optimize_noise: bool = False
    seed: int = 0
    solve: SolveConfig = IMPLICIT_FORWARD
    warm_start: bool = True
    grad_options: GradConfig = field(default_factory=GradConfig)
    max_batch: int | None = None
    target_limit: float | None = 1.5
    exact_curve: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "solve", solve_config(self.solve, "solve", base=IMPLICIT_FORWARD))
        if self.init not in ("ddim_encode", "noise"):
            raise ValueError(f"init: expected 'ddim_encode' or 'noise', got {self.init!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer: expected 'adam' or 'sgd', got {self.optimizer!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr: expected a finite value > 0, got {self.lr!r}")
        if not isinstance(self.max_steps, int) or self.max_steps < 0:
            raise ValueError(f"max_steps: expected an int >= 0, got {self.max_steps!r}")
        for name in ("loss_threshold", "time_budget", "eval_budget", "target_limit"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: expected a finite value > 0 or None, got {v!r}")


@dataclass
class InversionStep:
    """One point of the loss curve: the loss at the step's ``x_T`` and the cumulative cost
    (initialisation included) spent to know it."""

    step: int
    loss: float
    wall_time: float
    model_evals: int
    #: rounds of the forward solve (S sequential model calls for sequential_backprop)
    forward_rounds: int = 0
    backward_rounds: int = 0
    #: loss of the sequential chain at this step's x_T (``exact_curve``), else None
    exact_loss: float | None = None


@dataclass
class InversionResult:
    """``x_T``: the best iterate (lowest recorded loss, or exact loss with ``exact_curve``);
    ``reconstruction``: the *sequential* chain at ``x_T`` and ``loss`` its loss (a check, not
    counted in the costs); ``curve``: per step."""

    method: str
    x_T: torch.Tensor
    reconstruction: torch.Tensor
    loss: float
    curve: list[InversionStep]
    steps: int
    stop_reason: str
    wall_time: float
    model_evals: int
    forward_evals: int
    backward_evals: int
    init_time: float
    init_evals: int
    noise: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def first_reaching(self, loss: float) -> InversionStep | None:
        """The first curve point whose loss (exact when known) is <= ``loss``; None if never."""
        return next((p for p in self.curve if (p.loss if p.exact_loss is None else p.exact_loss) <= loss), None)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly record without tensors."""
        return {
            "method": self.method, "loss": self.loss, "steps": self.steps, "stop_reason": self.stop_reason,
            "wall_time": self.wall_time, "model_evals": self.model_evals, "forward_evals": self.forward_evals,
            "backward_evals": self.backward_evals, "init_time": self.init_time, "init_evals": self.init_evals,
            "curve": [asdict(p) for p in self.curve], "info": self.info,
        }


def mse(x0: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Default loss: mean squared error per element, averaged over the batch."""
    return (x0 - target).square().mean()


def invert(
    model: ModelFn,
    target_x0: torch.Tensor,
    schedule: Schedule,
    method: Method = "implicit",
    *,
    noise: torch.Tensor | None = None,
    x_T_init: torch.Tensor | None = None,
    loss_fn: LossFn = mse,
    model_kwargs: Mapping[str, torch.Tensor] | None = None,
    guidance: Guidance | None = None,
    config: InvertConfig | None = None,
    **options: Any,
) -> InversionResult:
    """Optimise ``x_T`` (and optionally the step noise) so the chain maps it to ``target_x0``.

    Args:
        model, schedule: as for :func:`deqkern.sample`.
        target_x0: ``[B, ...]`` images in the model's data range (see ``InvertConfig.target_limit``).
        method: ``"implicit"``, ``"phantom"``, ``"sequential_backprop"`` or ``"ddim_encode"``.
        noise: ``[S, B, ...]`` step noise; required when the schedule is stochastic.
        x_T_init: start here instead of ``config.init``.
        loss_fn: ``loss_fn(x0, target) -> scalar`` (default per-element MSE).
        config / options: an :class:`InvertConfig`, and/or its fields as keywords (which win).

    Raises ValueError naming the argument for a target of the wrong shape, out of range or not
    finite, a stochastic schedule without ``noise``, an unknown method or option; and
    FloatingPointError if ``loss_fn`` returns a non-finite loss.
    """
    cfg = _config(config, options)
    if method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    _check_inputs(model, target_x0, schedule, noise, x_T_init, cfg)
    if method == "implicit" and cfg.grad_options.form == "scan" and not schedule.is_affine:
        raise ValueError(f"grad_options.form: 'scan' needs affine steps; this schedule's x0 transform is "
                         f"{schedule.transform.kind!r} (use 'drift')")
    target = target_x0.detach()
    s, batch = schedule.num_steps, target.shape[0]
    ev = ModelEvaluator(model, model_kwargs or {}, guidance, cfg.max_batch, inputs=schedule.step_inputs)
    ev.check_conditioning(batch)

    start = time.perf_counter()
    if method == "ddim_encode" or (x_T_init is None and cfg.init == "ddim_encode"):
        x_init = ddim_encode(ev, target, schedule, noise)
    elif x_T_init is not None:
        x_init = x_T_init.detach().clone()
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        x_init = torch.randn(target.shape, generator=g, dtype=target.dtype).to(target.device)
    init_evals = ev.evaluations
    init_time = time.perf_counter() - start

    if method == "ddim_encode":
        with torch.no_grad():
            rec = sample_sequential(model, x_init, schedule, noise, model_kwargs=model_kwargs, guidance=guidance,
                                    max_batch=cfg.max_batch).x0
        loss = _finite(loss_fn(rec, target), 0)
        wall = time.perf_counter() - start
        evals = init_evals + s * batch * ev.rows_per_latent
        curve = [InversionStep(0, loss, wall, evals, exact_loss=loss)]
        return InversionResult(
            method=method, x_T=x_init, reconstruction=rec, loss=loss, curve=curve, steps=0,
            stop_reason="no_optimisation", wall_time=wall, model_evals=evals,
            forward_evals=s * batch * ev.rows_per_latent,
            backward_evals=0, init_time=init_time, init_evals=init_evals, noise=noise, info={"config": asdict(cfg)},
        )

    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[method]
    x = x_init.requires_grad_()
    z = None if noise is None else noise.detach().clone().requires_grad_(cfg.optimize_noise)
    params = [x] + ([z] if z is not None and cfg.optimize_noise else [])
    opt = torch.optim.Adam(params, lr=lr) if cfg.optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    iterates: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    curve: list[InversionStep] = []
    fwd_total = bwd_total = 0
    best = (math.inf, x_init.detach().clone(), None if z is None else z.detach().clone())
    prev_traj: torch.Tensor | None = None
    step = 0
    while True:
        stats = ImplicitStats()
        if method == "sequential_backprop":
            before = ev.evaluations
            x0 = sequential_chain(ev, x, schedule, z)
            fwd = ev.evaluations - before
            rounds = s
        else:
            x0 = sample_with_implicit_grad(
                model, x, schedule, z, grad="exact" if method == "implicit" else "phantom", config=cfg.solve,
                max_batch=cfg.max_batch,
                model_kwargs=model_kwargs, guidance=guidance, init=prev_traj if cfg.warm_start else None,
                grad_options=cfg.grad_options, stats=stats,
            )
            fwd, rounds = stats.forward_evals, stats.forward_rounds
        loss = loss_fn(x0, target)
        loss_value = _finite(loss, step)
        fwd_total += fwd
        if loss_value < best[0]:
            best = (loss_value, x.detach().clone(), None if z is None else z.detach().clone())
        point = InversionStep(step, loss_value, time.perf_counter() - start, init_evals + fwd_total + bwd_total, rounds)
        curve.append(point)
        if cfg.exact_curve:
            iterates.append((x.detach().clone(), None if z is None else z.detach().clone()))
        reason = _stop_reason(cfg, point, step)
        if reason is not None:
            break
        before = ev.evaluations
        # autograd.grad, not backward(): the model's parameters get (and cost) no gradient
        grads = torch.autograd.grad(loss, params)
        if method == "sequential_backprop":
            # recomputed forwards (checkpointing) + one VJP row per model row
            bwd = ev.evaluations - before + s * batch * ev.rows_per_latent
        else:
            bwd = stats.backward_evals
            point.backward_rounds = stats.backward_rounds
            prev_traj = stats.trajectory[1:]
        bwd_total += bwd
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            raise FloatingPointError(f"loss_fn: the gradient is not finite at step {step}")
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        step += 1

    wall = time.perf_counter() - start
    x_best, z_best = best[1], best[2]
    if cfg.exact_curve:
        for point, loss_value in zip(curve, _exact_losses(model, iterates, target, schedule, loss_fn, model_kwargs,
                                                           guidance, cfg.max_batch)):
            point.exact_loss = loss_value
        # with exact losses known, "best" means best by the exact loss
        x_best, z_best = iterates[min(range(len(curve)), key=lambda i: curve[i].exact_loss)]
    with torch.no_grad():
        rec = sample_sequential(model, x_best, schedule, z_best, model_kwargs=model_kwargs, guidance=guidance,
                                max_batch=cfg.max_batch).x0
    return InversionResult(
        method=method, x_T=x_best, reconstruction=rec, loss=_finite(loss_fn(rec, target), step), curve=curve,
        steps=step, stop_reason=reason, wall_time=wall, model_evals=curve[-1].model_evals,
        forward_evals=fwd_total, backward_evals=bwd_total, init_time=init_time, init_evals=init_evals, noise=z_best,
        info={"config": asdict(cfg), "lr": lr, "best_recorded_loss": best[0], "S": s, "batch": batch},
    )


@torch.no_grad()
def _exact_losses(model, iterates, target, schedule, loss_fn, model_kwargs, guidance, max_batch) -> list[float]:
    """Loss of the sequential chain at every recorded iterate, many iterates per batch."""
    batch, per_call = target.shape[0], 64
    out: list[float] = []
    for lo in range(0, len(iterates), per_call):
        chunk = iterates[lo:lo + per_call]
        n = len(chunk)
        x = torch.cat([it[0] for it in chunk])
        z = None if chunk[0][1] is None else torch.cat([it[1] for it in chunk], dim=1)
        # the conditioning of n stacked copies of the batch: row i is sample i mod batch
        rows = torch.arange(batch, device=target.device).repeat(n)
        g = None if guidance is None else Guidance(
            guidance.scale, gather_rows(guidance.cond, rows), gather_rows(guidance.uncond, rows))
        x0 = sample_sequential(model, x, schedule, z, model_kwargs=gather_rows(model_kwargs or {}, rows), guidance=g,
                               max_batch=max_batch).x0
        out += [_finite(loss_fn(x0[i * batch:(i + 1) * batch], target), lo + i) for i in range(n)]
    return out


def _stop_reason(cfg: InvertConfig, point: InversionStep, step: int) -> str | None:
    if cfg.loss_threshold is not None and point.loss <= cfg.loss_threshold:
        return "loss_threshold"
    if step >= cfg.max_steps:
        return "max_steps"
    if cfg.time_budget is not None and point.wall_time >= cfg.time_budget:
        return "time_budget"
    if cfg.eval_budget is not None and point.model_evals >= cfg.eval_budget:
        return "eval_budget"
    return None


def _finite(loss: torch.Tensor, step: int) -> float:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn: expected a scalar tensor, got {getattr(loss, 'shape', type(loss).__name__)}")
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"loss_fn: the loss is not finite ({value}) at step {step}")
    return value


def _config(config: InvertConfig | None, options: Mapping[str, Any]) -> InvertConfig:
    """``config`` with the keyword ``options`` over it; those that are :class:`SolveConfig` fields
    (``tol``, ``solver``, ...) override its forward ``solve``."""
    base = config_from(InvertConfig, config, "config")
    flat, changes = split_solve_options(options, _INVERT_FIELDS)
    if flat:
        changes["solve"] = replace(solve_config(changes.get("solve"), "solve", base=base.solve), **flat)
    if "grad_options" in changes:
        changes["grad_options"] = grad_config(changes["grad_options"])
    return config_from(InvertConfig, changes, "invert() options", base=base)


_INVERT_FIELDS = {f.name for f in fields(InvertConfig)}


def _model_shape(model: ModelFn) -> tuple[int, ...] | None:
    """``(C, H, W)`` of a diffusers-style model with ``config.in_channels``/``sample_size``."""
    cfg = getattr(model, "config", None)
    channels, size = getattr(cfg, "in_channels", None), getattr(cfg, "sample_size", None)
    if not isinstance(channels, int) or size is None:
        return None
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return (channels, *hw)


def _check_inputs(model, target, schedule, noise, x_T_init, cfg: InvertConfig) -> None:
    check_chain_inputs(target, schedule, noise, name="target_x0")
    schedule.refuse_multistep("invert")
    expected = _model_shape(model)
    if expected is not None and tuple(target.shape[1:]) != expected:
        raise ValueError(f"target_x0: expected shape [B, {', '.join(map(str, expected))}] for this model, "
                         f"got {tuple(target.shape)}")
    if cfg.target_limit is not None:
        peak = float(target.abs().max())
        if peak > cfg.target_limit:
            raise ValueError(
                f"target_x0: values reach {peak:.3g}, outside [-{cfg.target_limit}, {cfg.target_limit}]; scale "
                "images to the model's data range [-1, 1] (or pass target_limit=None)"
            )
    if cfg.optimize_noise and noise is None:
        raise ValueError("optimize_noise: the chain has no noise to optimise (deterministic schedule)")
    if x_T_init is not None and (x_T_init.shape != target.shape or x_T_init.dtype != target.dtype):
        raise ValueError(f"x_T_init: expected {target.dtype} of shape {tuple(target.shape)}, got "
                         f"{x_T_init.dtype} {tuple(x_T_init.shape)}")

