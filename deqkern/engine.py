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
5. ``commit_window``: each sample's window slides by its own frozen count (new rows start from
   the last computed row, as ParaDiGMS does, or from ``init``) and, in fixed-shape rounds, the
   next model input is written in the model's dtype — one pass.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import torch

from deqkern._nvtx import annotate
from deqkern.interop import to_torch
from deqkern.model import Guidance, ModelEvaluator, ModelFn
from deqkern.ops import commit_window, row_mask, scan_residual, step_rows
from deqkern.schedule import Form, Schedule, X0Transform
from deqkern.solvers import Solver, get_solver

StopRule = Literal["relative", "noise"]
Execution = Literal["auto", "eager", "static", "graph", "audit"]


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


def check_chain_inputs(
    x: torch.Tensor, schedule: Schedule, noise: torch.Tensor | None, name: str = "x_T"
) -> None:
    """``x`` (named ``name`` in errors) is a finite ``[batch, ...latent]`` float tensor, and
    ``noise`` is there exactly when the schedule needs it, shaped ``[S, *x.shape]`` like ``x``."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a deqkern.Schedule, got {type(schedule).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim < 2:
        raise ValueError(f"{name}: expected shape [batch, ...latent], got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or inf")
    s = schedule.num_steps
    if schedule.is_stochastic and noise is None:
        raise ValueError(f"noise: the schedule is stochastic; pass the step noise of shape {(s, *x.shape)}")
    if noise is not None:
        if noise.shape != (s, *x.shape):
            raise ValueError(f"noise: expected shape {(s, *x.shape)} ([S, *{name}.shape]), got {tuple(noise.shape)}")
        if noise.dtype != x.dtype or noise.device != x.device:
            raise ValueError(
                f"noise: expected dtype {x.dtype} on {x.device} like {name}, got {noise.dtype} on {noise.device}"
            )


def _check_execution(execution: str) -> None:
    if execution not in ("auto", "eager", "static", "graph", "audit"):
        raise ValueError(f"execution: expected 'auto', 'eager', 'static', 'graph' or 'audit', got {execution!r}")


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
    execution: Execution = "auto",
    rounds_per_graph: int = 10,
) -> SampleResult:
    """The oracle: S model calls one after another, ``x[k+1] = step_k(x[k], model(x[k], t_k))``.

    ``noise[k]`` is the ``variance_noise`` of step ``k`` in ``schedule.timesteps`` order.
    ``execution="graph"`` (the default on CUDA) captures ``rounds_per_graph`` steps per CUDA
    graph — the fair baseline for graphed parallel sampling; ``"eager"`` checks every step's
    output and can return the trajectory; ``"static"`` and ``"audit"`` as in :func:`sample`. ``x_T``/``noise`` may be any DLPack array (cupy,
    numpy, ...); ``x0`` and the trajectory come back as the same kind, zero-copy.
    """
    x_T, back = to_torch(x_T, "x_T")
    noise, _ = to_torch(noise, "noise")
    check_chain_inputs(x_T, schedule, noise)
    _check_execution(execution)
    ev = ModelEvaluator(model, model_kwargs or {}, guidance, max_batch, model_dtype)
    ev.check_conditioning(x_T.shape[0])
    batch, shape = x_T.shape[0], x_T.shape
    if execution == "auto":
        execution = "graph" if x_T.is_cuda and not return_trajectory else "eager"
    if return_trajectory and execution != "eager":
        raise ValueError("return_trajectory: needs execution='eager'")
    info: dict[str, Any] = {"solver": "sequential", "execution": execution}
    _sync(x_T.device)
    start = time.perf_counter()
    traj = None
    if execution == "eager":
        coef = schedule.packed(x_T.device, x_T.dtype)
        ts = schedule.timesteps.to(x_T.device)
        idx = torch.arange(batch, device=x_T.device)
        traj = [x_T] if return_trajectory else None
        x = x_T.reshape(batch, -1)
        for k in range(schedule.num_steps):
            e = ev(x.reshape(shape), ts[k].expand(batch), idx, round_index=k).reshape(batch, -1)
            z = None if noise is None else noise[k].reshape(batch, -1)
            x = step_rows(x, e, z, coef[k].expand(batch, -1), schedule.transform)
            if traj is not None:
                traj.append(x.reshape(shape))
        x0 = x.reshape(shape)
    else:
        from deqkern.graphs import run_sequential_static

        x0, extra = run_sequential_static(schedule, x_T, noise, ev, rounds_per_graph, execution)
        info.update(extra)
    _sync(x_T.device)
    return SampleResult(
        x0=back(x0), converged=torch.ones(batch, dtype=torch.bool), rounds=schedule.num_steps,
        model_evals=ev.evaluations, wall_time=time.perf_counter() - start,
        rounds_per_sample=[schedule.num_steps] * batch,
        trajectory=back(torch.stack(traj)) if traj is not None else None, info=info,
    )


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
    drift: bool  #: the drift form (every L = 1)

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
    traj: torch.Tensor | None  #: [S+2, B, D] latents by position (last row: scratch)
    #: [B, W, D] the next model input in the model's dtype (fixed-shape rounds only): written by
    #: the round's commit, read by the next model call
    model_in: torch.Tensor | None = None

    @classmethod
    def start(cls, p: Problem, x_T: torch.Tensor, return_trajectory: bool) -> "SolveState":
        b, d, dev = p.batch, p.dim, x_T.device
        flat = x_T.reshape(b, d)
        if p.init is None:
            xw = flat.unsqueeze(1).repeat(1, p.width + 1, 1)
        else:
            xw = p.init[: p.width + 1].transpose(0, 1).clone()
        traj = None
        if return_trajectory:
            traj = torch.zeros(p.steps + 2, b, d, device=dev, dtype=x_T.dtype)
            traj[0] = flat
        return cls(
            xw=xw, k0=torch.zeros(b, dtype=torch.int64, device=dev),
            rounds=torch.zeros((), dtype=torch.int64, device=dev),
            done_round=torch.zeros(b, dtype=torch.int64, device=dev),
            res_log=torch.full((p.max_iters + 1, b), float("nan"), dtype=torch.float64, device=dev),
            bad_t=torch.full((p.max_iters + 1,), -1, dtype=torch.int64, device=dev), traj=traj,
        )


def relative_row_error(f_sq: torch.Tensor, g_sq: torch.Tensor) -> torch.Tensor:
    """``||G(x) - x|| / ||G(x)||`` per row from the squared norms (the ``relative`` stopping rule)."""
    return (f_sq / g_sq.clamp(min=torch.finfo(g_sq.dtype).tiny)).sqrt()


def accepted_rows(passed: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``[B]`` rows each sample freezes: its leading rows that pass the stopping test, plus one —
    the first failing row's G is computed from accepted inputs — and at most its ``n`` live rows."""
    return torch.minimum(passed.to(torch.int64).cumprod(dim=1).sum(dim=1) + 1, n)


def window_residual(f_sq: torch.Tensor, g_sq: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``[B]`` ``||F|| / ||G(X)||`` over each sample's live rows: the residual history we report."""
    return ((f_sq * live).sum(1) / (g_sq * live).sum(1).clamp(min=1e-300)).sqrt()


def run_round(p: Problem, st: SolveState, solver: Solver, ev: ModelEvaluator, static: bool) -> None:
    """One round of the parallel solve (see the module docstring), in place on ``st``.

    ``static=False`` evaluates the model on the live rows only (dynamic shapes, host syncs).
    ``static=True`` evaluates all B*W rows and records non-finite outputs on the device instead
    of raising, so the round has fixed shapes and no host sync (CUDA-graph capturable).
    """
    s, width, batch, dim = p.steps, p.width, p.batch, p.dim
    dev = st.xw.device
    j = torch.arange(width, device=dev)
    b_idx = torch.arange(batch, device=dev)
    active = (st.k0 < s) & (st.rounds < p.max_iters)
    n = torch.where(active, (s - st.k0).clamp(max=width), torch.zeros_like(st.k0))
    live = row_mask(n, width)
    pos = (st.k0.unsqueeze(1) + j).clamp(max=s - 1)
    coef = p.coef[pos]
    t = p.timesteps[pos]
    log_at = st.rounds.clamp(max=p.max_iters).view(1)
    with annotate("model"):
        if static:
            rows_b = b_idx.unsqueeze(1).expand(batch, width).reshape(-1)
            x_in = st.xw[:, :width] if st.model_in is None else st.model_in
            out = ev.raw(x_in.reshape(-1, *p.shape[1:]), t.reshape(-1), rows_b).to(st.xw.dtype)
            e = torch.where(live.unsqueeze(-1), out.reshape(batch, width, dim), 0.0)
            bad = live & ~torch.isfinite(e).all(-1)
            bad_t = torch.where(bad, t, torch.full_like(t, -1)).amax().view(1)
            st.bad_t.index_copy_(0, log_at, torch.maximum(st.bad_t.index_select(0, log_at), bad_t))
        else:
            rows_b = b_idx.unsqueeze(1).expand(batch, width)[live]
            out = ev(st.xw[:, :width][live].reshape(-1, *p.shape[1:]), t[live], rows_b, int(st.rounds))
            e = torch.zeros(batch, width, dim, device=dev, dtype=st.xw.dtype)
            e[live] = out.reshape(-1, dim)
    z = None if p.noise is None else p.noise[pos, b_idx.unsqueeze(1)]
    with annotate("scan"):
        res = scan_residual(st.xw, e, z, coef, n, p.transform, solver.hist_f, drift=p.drift)
    if p.stop == "relative":
        err = relative_row_error(res.f_sq, res.g_sq)
    else:
        err = (res.f_sq.to(torch.float64) / (dim * p.noise_var[pos])).sqrt()
    delta = accepted_rows(live & (err <= p.tol), n)
    ratio = window_residual(res.f_sq, res.g_sq, live).to(torch.float64)
    st.res_log.index_copy_(0, log_at, torch.where(active, ratio, float("nan")).unsqueeze(0))
    with annotate("solve+mix"):
        x_new = solver.update(st.xw[:, 1:], res.g, res.f, res.f_sq, res.gram, live)
    if st.traj is not None:
        # frozen rows land at their position; the others at the scratch row (no duplicate writes)
        frozen = j.unsqueeze(0) < delta.unsqueeze(1)
        dest = torch.where(frozen, st.k0.unsqueeze(1) + 1 + j, s + 1)
        st.traj[dest, b_idx.unsqueeze(1)] = res.g
    # freeze the accepted rows at G, slide every window, write the next model input: one pass
    with annotate("commit"):
        commit_window(st.xw, x_new, res.g, delta, n, st.k0, p.init, st.model_in)
    solver.shift(delta)
    st.done_round.copy_(torch.where((st.k0 + delta == s) & (delta > 0), st.rounds + 1, st.done_round))
    st.k0.add_(delta)
    st.rounds.add_(active.any().to(torch.int64))


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
    execution: Execution = "auto",
    rounds_per_graph: int = 4,
    progress: bool = False,
    on_round: Callable[[torch.Tensor], None] | None = None,
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
            ``x_T``, ``noise`` and ``init`` may be any DLPack array (cupy, numpy, ...): ``x0``
            and the trajectory then come back as the same kind, zero-copy.
        execution: ``"eager"`` evaluates only live rows and checks convergence every round;
            ``"static"`` runs fixed-shape, sync-free rounds (all B*W rows) and checks once per
            ``rounds_per_graph`` rounds; ``"graph"`` captures those rounds as one CUDA graph
            (falls back to ``"static"`` with the reason logged when capture is impossible);
            ``"audit"`` runs the static rounds as a graph would, on any device (a CPU too), and
            raises :class:`~deqkern.errors.CaptureHazard` if a chunk syncs with the host or
            differs from the captured one (:mod:`deqkern.graph_audit`); ``"auto"``: graph on
            CUDA, eager elsewhere.
        on_round: called after every round (eager execution only) with the current x0 estimate
            ``[B, *x_T.shape[1:]]``: the x0 row computed in that round, or the frozen x0 of a
            finished sample; NaN for samples whose window has not reached x0 yet.
    """
    x_T, back = to_torch(x_T, "x_T")
    noise, _ = to_torch(noise, "noise")
    init, _ = to_torch(init, "init")
    check_chain_inputs(x_T, schedule, noise)
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
    _check_execution(execution)
    if not isinstance(rounds_per_graph, int) or rounds_per_graph < 1:
        raise ValueError(f"rounds_per_graph: expected an int >= 1, got {rounds_per_graph!r}")
    if init is not None and (init.shape != (s, *x_T.shape) or init.dtype != x_T.dtype or init.device != x_T.device):
        raise ValueError(f"init: expected {x_T.dtype} of shape {(s, *x_T.shape)} on {x_T.device}, got "
                         f"{init.dtype} {tuple(init.shape)} on {init.device}")
    get_solver(solver, solver_options)  # a bad name or option fails before any work
    ev = ModelEvaluator(model, model_kwargs or {}, guidance, max_batch, model_dtype)
    batch, shape = x_T.shape[0], x_T.shape
    ev.check_conditioning(batch)
    dev, dt = x_T.device, x_T.dtype
    dim = x_T[0].numel()
    p = Problem(
        coef=schedule.packed(dev, dt), timesteps=schedule.timesteps.to(dev),
        noise_var=schedule.noise_var.to(dev, torch.float64),
        noise=None if noise is None else noise.reshape(s, batch, dim),
        init=None if init is None else torch.cat([x_T.reshape(1, batch, dim), init.reshape(s, batch, dim)]),
        transform=schedule.transform, shape=shape, width=width, tol=float(tol), stop=stop, max_iters=max_iters,
        drift=schedule.form == "drift",
    )
    if execution == "auto":
        execution = "graph" if dev.type == "cuda" and on_round is None else "eager"
    if on_round is not None and execution != "eager":
        raise ValueError(f"on_round: needs execution='eager' (Python runs between rounds), got {execution!r}")
    out = solve(
        p, x_T, ev, solver, solver_options, execution=execution, rounds_per_graph=rounds_per_graph,
        model_dtype=model_dtype, return_trajectory=return_trajectory, progress=progress, on_round=on_round,
    )
    st = out.state
    return SampleResult(
        x0=back(_x0_row(p, st)), converged=out.converged, rounds=out.rounds, model_evals=ev.evaluations,
        wall_time=out.wall_time, residuals=out.residuals, rounds_per_sample=out.rounds_per_sample,
        trajectory=None if st.traj is None else back(st.traj[: s + 1].reshape(s + 1, *shape)),
        info={"solver": solver, "config": out.config, "form": schedule.form, "stop": stop, "tol": tol, "window": width,
              **out.info},
    )


@dataclass
class Solved:
    """What :func:`solve` leaves: the final device state and the host-side summary."""

    state: SolveState
    config: Any  #: the solver's config dataclass
    converged: torch.Tensor  #: [B] bool, on the CPU
    rounds: int
    residuals: list[list[float]]  #: per round, per sample (see :attr:`SampleResult.residuals`)
    rounds_per_sample: list[int]
    wall_time: float
    info: dict[str, Any]  #: execution details, the solver's fallback count


def solve(
    p: Problem,
    x_T: torch.Tensor,
    ev: ModelEvaluator,
    solver: str,
    solver_options: Any = None,
    *,
    execution: Literal["eager", "static", "graph", "audit"] = "eager",
    rounds_per_graph: int = 4,
    model_dtype: torch.dtype | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    on_round: Callable[[torch.Tensor], None] | None = None,
) -> Solved:
    """Run rounds of ``p`` from ``x_T`` until every sample converged or ``max_iters`` rounds ran.

    The fixed point is given by ``p`` alone (coefficients per position, stopping rule, window),
    and ``ev`` is the only thing evaluated per row, so any chain with this triangular structure
    solves here: :func:`sample` builds ``p`` from a :class:`Schedule`, the inversion's adjoint
    from the chain's Jacobians (:func:`deqkern.inversion.solve_adjoint`). Arguments are those of
    :func:`sample`, already validated.
    """
    config, factory = get_solver(solver, solver_options)
    dev, dt = x_T.device, x_T.dtype
    st = SolveState.start(p, x_T, return_trajectory)
    solver_state = factory(config, p.batch, p.width, p.dim, dev, dt)
    if execution != "eager":
        st.model_in = st.xw[:, : p.width].to(model_dtype or dt).clone()
    info: dict[str, Any] = {}

    _sync(dev)
    start = time.perf_counter()
    if execution == "eager":
        bar = _progress_bar(progress, p.steps * p.batch)
        while int(st.rounds) < p.max_iters and bool((st.k0 < p.steps).any()):
            k_before = st.k0.clone()
            run_round(p, st, solver_state, ev, static=False)
            if on_round is not None:
                on_round(_x0_estimate(p, st, k_before))
            if bar is not None:
                bar.update(int((st.k0 - k_before).sum()))
        if bar is not None:
            bar.close()
    else:
        from deqkern.graphs import run_static

        info.update(run_static(p, st, solver_state, ev, rounds_per_graph, execution))
    _sync(dev)
    wall = time.perf_counter() - start

    rounds = int(st.rounds)
    done = st.done_round.cpu().tolist()
    return Solved(
        state=st, config=config, converged=(st.k0 == p.steps).cpu(), rounds=rounds,
        residuals=st.res_log[:rounds].cpu().tolist(), rounds_per_sample=[d if d > 0 else rounds for d in done],
        wall_time=wall,
        info={"fallbacks": int(getattr(solver_state, "fallbacks", 0)), "execution": execution, **info},
    )


def _x0_row(p: Problem, st: SolveState) -> torch.Tensor:
    """The window row at position S (row 0 once x0 is frozen); where the window does not reach
    S, its last row — the current estimate of x0."""
    row = (p.steps - st.k0).clamp(min=0, max=p.width)
    return st.xw[torch.arange(p.batch, device=st.xw.device), row].reshape(p.shape)


def _x0_estimate(p: Problem, st: SolveState, k_before: torch.Tensor) -> torch.Tensor:
    """x0 as a round left it: where that round computed the x0 row (or x0 is frozen); NaN where
    the window has not reached x0."""
    reached = k_before + (p.steps - k_before).clamp(max=p.width) == p.steps
    return torch.where(reached.view(-1, *[1] * (len(p.shape) - 1)), _x0_row(p, st), float("nan"))


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="deqkern", unit="step")
