"""The orchestrator: sequential sampling (the oracle) and the parallel fixed-point solve.

Parallel solve, one round (math.md §2-§4), per sample ``b`` with frozen prefix ``x[0..k0_b]``:

1. evaluate the model on the live rows ``x[k0_b + j]``, ``j < n_b = min(W, S - k0_b)``, of all
   samples in one batch (chunked by ``max_batch``);
2. ``scan_residual``: new iterate ``G(X)``, residual, row norms (and the Anderson Gram row);
3. stopping rule per row; the leading rows that pass *plus one* are frozen at their ``G`` value
   (the first failing row's ``G`` is computed from accepted inputs, and row 0's ``G`` is always
   exact, so the window advances by at least one row per round: the solve ends in at most S
   rounds and Picard reproduces the sequential chain exactly);
4. the solver (Picard, Anderson, ...) proposes the next iterate of the other rows;
5. each sample's window slides by its own frozen count; new rows start from the last computed
   row (ParaDiGMS) or from ``init``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch

from deqkern.model import Guidance, ModelEvaluator, ModelFn
from deqkern.ops import row_mask, scan_residual, step_rows
from deqkern.schedule import Form, Schedule
from deqkern.solvers import get_solver

StopRule = Literal["relative", "noise"]


@dataclass
class SampleResult:
    """Outcome of a solve. ``converged[b]`` is False for every sample that hit ``max_iters``
    (its ``x0`` is then the solver's current estimate, not the sequential answer)."""

    x0: torch.Tensor
    converged: torch.Tensor
    rounds: int
    model_evals: int
    wall_time: float
    #: per round, per sample: ||F|| / ||G(X)|| over the sample's live rows (nan once frozen)
    residuals: list[list[float]] = field(default_factory=list)
    #: round at which each sample's last row froze (``rounds`` if it never did)
    rounds_per_sample: list[int] = field(default_factory=list)
    #: ``[S+1, *x_T.shape]`` latents at positions 0..S when asked for (x[0] = x_T)
    trajectory: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


def _check_inputs(x_T: torch.Tensor, schedule: Schedule, noise: torch.Tensor | None) -> None:
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a deqkern.Schedule, got {type(schedule).__name__}")
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
        raise TypeError(f"x_T: expected a floating-point tensor, got {getattr(x_T, 'dtype', type(x_T).__name__)}")
    if x_T.ndim < 2:
        raise ValueError(f"x_T: expected shape [batch, ...latent], got {tuple(x_T.shape)}")
    if not bool(torch.isfinite(x_T).all()):
        raise ValueError("x_T: contains NaN or inf")
    s = schedule.num_steps
    if schedule.is_stochastic:
        if noise is None:
            raise ValueError(f"noise: the schedule is stochastic; pass the step noise of shape {(s, *x_T.shape)}")
    if noise is not None:
        if noise.shape != (s, *x_T.shape):
            raise ValueError(f"noise: expected shape {(s, *x_T.shape)} ([S, *x_T.shape]), got {tuple(noise.shape)}")
        if noise.dtype != x_T.dtype or noise.device != x_T.device:
            raise ValueError(
                f"noise: expected dtype {x_T.dtype} on {x_T.device} like x_T, got {noise.dtype} on {noise.device}"
            )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_sequential(
    model: ModelFn,
    x_T: torch.Tensor,
    schedule: Schedule,
    noise: torch.Tensor | None = None,
    *,
    model_kwargs: Mapping[str, torch.Tensor] | None = None,
    guidance: Guidance | None = None,
    max_batch: int | None = None,
    model_dtype: torch.dtype | None = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """The oracle: S model calls one after another, ``x[k+1] = step_k(x[k], model(x[k], t_k))``.

    ``noise[k]`` is the ``variance_noise`` of step ``k`` in ``schedule.timesteps`` order.
    """
    _check_inputs(x_T, schedule, noise)
    ev = ModelEvaluator(model, model_kwargs or {}, guidance, max_batch, model_dtype)
    ev.check_conditioning(x_T.shape[0])
    batch, shape = x_T.shape[0], x_T.shape
    coef = schedule.packed(x_T.device, x_T.dtype)
    ts = schedule.timesteps.to(x_T.device)
    idx = torch.arange(batch, device=x_T.device)
    traj = [x_T] if return_trajectory else None
    _sync(x_T.device)
    start = time.perf_counter()
    x = x_T.reshape(batch, -1)
    for k in range(schedule.num_steps):
        e = ev(x.reshape(shape), ts[k].expand(batch), idx, round_index=k).reshape(batch, -1)
        z = None if noise is None else noise[k].reshape(batch, -1)
        x = step_rows(x, e, z, coef[k].expand(batch, -1), schedule.transform)
        if traj is not None:
            traj.append(x.reshape(shape))
    _sync(x_T.device)
    return SampleResult(
        x0=x.reshape(shape), converged=torch.ones(batch, dtype=torch.bool), rounds=schedule.num_steps,
        model_evals=ev.evaluations, wall_time=time.perf_counter() - start,
        rounds_per_sample=[schedule.num_steps] * batch,
        trajectory=torch.stack(traj) if traj is not None else None, info={"solver": "sequential"},
    )


def sample(
    model: ModelFn,
    x_T: torch.Tensor,
    schedule: Schedule,
    solver: str = "anderson",
    tol: float = 1e-3,
    max_iters: int | None = None,
    window: int | None = None,
    noise: torch.Tensor | None = None,
    *,
    stop: StopRule = "relative",
    form: Form | None = None,
    solver_options: Any = None,
    model_kwargs: Mapping[str, torch.Tensor] | None = None,
    guidance: Guidance | None = None,
    max_batch: int | None = None,
    model_dtype: torch.dtype | None = None,
    init: torch.Tensor | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
) -> SampleResult:
    """Sample by solving the whole chain as one fixed point, all timesteps of a window per model call.

    Args:
        model: ``model(x[N, ...], t[N], **kwargs)``; diffusers models are accepted directly.
        x_T: ``[B, ...]`` initial noise.
        schedule: the chain (:class:`Schedule`); ``form`` overrides its fixed-point form.
        solver: a registered solver name (``"anderson"``, ``"picard"``, ...).
        tol: stopping tolerance (> 0). ``stop="relative"``: a row passes when
            ``||G(x) - x|| <= tol ||G(x)||``; ``stop="noise"`` (ParaDiGMS): when
            ``||G(x) - x||^2 / (D var_k) <= tol^2`` with ``var_k`` the step's posterior variance.
        max_iters: most rounds (batched model calls); default S, enough for exactness.
        window: rows per sample per round (ParaDiGMS' ``parallel``); default S (no window).
        noise: ``[S, *x_T.shape]`` pre-drawn step noise, required for stochastic chains.
        solver_options: the solver's config dataclass or a mapping of its fields.
        max_batch: most model rows per call; a round is split into chunks above it.
        init: ``[S, *x_T.shape]`` warm start for positions 1..S (e.g. a previous trajectory).
        return_trajectory: also return all latents ``[S+1, *x_T.shape]``.
    """
    _check_inputs(x_T, schedule, noise)
    if form is not None:
        schedule = schedule.with_form(form)
    s = schedule.num_steps
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol: expected a finite value > 0, got {tol!r}")
    max_iters = s if max_iters is None else max_iters
    if not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters: expected an int >= 1, got {max_iters!r}")
    width = s if window is None else window
    if not isinstance(width, int) or not 1 <= width <= s:
        raise ValueError(f"window: expected an int in [1, S={s}], got {window!r}")
    if stop not in ("relative", "noise"):
        raise ValueError(f"stop: expected 'relative' or 'noise', got {stop!r}")
    if init is not None and (init.shape != (s, *x_T.shape) or init.dtype != x_T.dtype or init.device != x_T.device):
        raise ValueError(f"init: expected {x_T.dtype} of shape {(s, *x_T.shape)} on {x_T.device}, got "
                         f"{init.dtype} {tuple(init.shape)} on {init.device}")
    config, factory = get_solver(solver, solver_options)

    ev = ModelEvaluator(model, model_kwargs or {}, guidance, max_batch, model_dtype)
    batch, shape = x_T.shape[0], x_T.shape
    ev.check_conditioning(batch)
    dim = x_T[0].numel()
    dev, dt = x_T.device, x_T.dtype
    coef_all = schedule.packed(dev, dt)
    ts_all = schedule.timesteps.to(dev)
    var_all = schedule.noise_var.to(dev, torch.float64)
    noise_f = None if noise is None else noise.reshape(s, batch, dim)
    init_f = None if init is None else torch.cat([x_T.reshape(1, batch, dim), init.reshape(s, batch, dim)])
    solver_state = factory(config, batch, width, dim, dev, dt)

    b_idx = torch.arange(batch, device=dev)
    j_idx = torch.arange(width + 1, device=dev)
    k0 = torch.zeros(batch, dtype=torch.int64, device=dev)
    if init_f is None:
        xw = x_T.reshape(batch, 1, dim).repeat(1, width + 1, 1)
    else:
        xw = init_f[j_idx.clamp(max=s)].transpose(0, 1).clone()
    traj = None
    if return_trajectory:
        traj = torch.zeros(s + 1, batch, dim, device=dev, dtype=dt)
        traj[0] = x_T.reshape(batch, dim)
    residuals: list[list[float]] = []
    done_round = [max_iters] * batch
    bar = _progress_bar(progress, s * batch)

    _sync(dev)
    start = time.perf_counter()
    rounds = 0
    while rounds < max_iters and bool((k0 < s).any()):
        n = (s - k0).clamp(max=width)
        live = row_mask(n, width)
        pos = (k0.unsqueeze(1) + j_idx[:width]).clamp(max=s - 1)
        coef = coef_all[pos]
        # 1. one batched model call over every live row of every sample
        rows_b = b_idx.unsqueeze(1).expand(batch, width)[live]
        x_rows = xw[:, :width][live]
        out = ev(x_rows.reshape(-1, *shape[1:]), ts_all[pos][live], rows_b, round_index=rounds)
        e = torch.zeros(batch, width, dim, device=dev, dtype=dt)
        e[live] = out.reshape(-1, dim)
        z = None if noise_f is None else noise_f[pos, b_idx.unsqueeze(1)]
        # 2. fused scan + residual (+ Gram row for Anderson)
        res = scan_residual(xw, e, z, coef, n, schedule.transform, solver_state.hist_f)
        # 3. stopping rule per row, freeze the passing prefix plus one
        if stop == "relative":
            err = (res.f_sq / res.g_sq.clamp(min=torch.finfo(res.g_sq.dtype).tiny)).sqrt()
        else:
            err = (res.f_sq.to(torch.float64) / (dim * var_all[pos])).sqrt()
        passed = live & (err <= tol)
        lead = passed.to(torch.int64).cumprod(dim=1).sum(dim=1)
        delta = torch.minimum(lead + 1, n)
        sample_res = (res.f_sq * live).sum(1) / (res.g_sq * live).sum(1).clamp(min=1e-300)
        residuals.append([float(v) if nb > 0 else float("nan") for v, nb in zip(sample_res.sqrt().tolist(), n.tolist())])
        # 4. solver proposal for the rows that stay in the window
        x_new = solver_state.update(xw[:, 1:], res.g, res.f, res.f_sq, res.gram, live)
        frozen = j_idx[:width].unsqueeze(0) < delta.unsqueeze(1)
        x_new = torch.where(frozen.unsqueeze(-1), res.g, x_new)
        x_new = torch.where(live.unsqueeze(-1), x_new, xw[:, 1:])
        xw = torch.cat([xw[:, :1], x_new], dim=1)
        if traj is not None:
            fb = b_idx.unsqueeze(1).expand(batch, width)[frozen]
            traj[(k0.unsqueeze(1) + 1 + j_idx[:width])[frozen], fb] = res.g[frozen]
        # 5. slide every window by its frozen count
        xw = _slide(xw, delta, n, k0, init_f, s)
        solver_state.shift(delta)
        k0 = k0 + delta
        rounds += 1
        for b in torch.nonzero((k0 == s) & (delta > 0)).flatten().tolist():
            done_round[b] = rounds
        if bar is not None:
            bar.update(int(delta.sum()))
    _sync(dev)
    wall = time.perf_counter() - start
    if bar is not None:
        bar.close()
    converged = (k0 == s).cpu()
    # converged: row 0 is x[S]; otherwise the last live row is the current estimate of x0
    last = torch.where(k0 == s, torch.zeros_like(k0), (s - k0).clamp(max=width))
    x0 = xw[b_idx, last].reshape(shape)
    return SampleResult(
        x0=x0, converged=converged, rounds=rounds, model_evals=ev.evaluations, wall_time=wall,
        residuals=residuals, rounds_per_sample=[min(r, rounds) for r in done_round],
        trajectory=None if traj is None else traj.reshape(s + 1, *shape),
        info={
            "solver": solver, "config": config, "form": schedule.form, "stop": stop, "tol": tol,
            "window": width, "fallbacks": getattr(solver_state, "fallbacks", 0),
        },
    )


def _slide(
    xw: torch.Tensor, delta: torch.Tensor, n: torch.Tensor, k0: torch.Tensor, init_f: torch.Tensor | None, s: int
) -> torch.Tensor:
    """Shift sample ``b``'s window rows by ``delta[b]``; rows past the computed ones start from
    ``init`` at their position, or from the last computed row (ParaDiGMS' initialisation)."""
    batch, rows, _ = xw.shape
    j = torch.arange(rows, device=xw.device).unsqueeze(0)
    src = j + delta.unsqueeze(1)
    b = torch.arange(batch, device=xw.device).unsqueeze(1)
    shifted = xw[b, torch.minimum(src, n.unsqueeze(1))]
    if init_f is not None:
        fresh = init_f[(k0.unsqueeze(1) + src).clamp(max=s), b]
        shifted = torch.where((src > n.unsqueeze(1)).unsqueeze(-1), fresh, shifted)
    return shifted


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="deqkern", unit="step")
