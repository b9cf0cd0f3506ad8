"""The public samplers: the sequential oracle and the parallel fixed-point solve.

:func:`sample` and :func:`sample_sequential` solve once. :class:`ParallelSampler` and
:class:`SequentialSampler` are the same for repeated use: they keep every buffer of an input
shape, so a CUDA graph captured by the first call is replayed by every later call — the way a
library embedding deqkern, or a benchmark of steady-state speed, should call it.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, Mapping

import torch

from deqkern._config import config_from
from deqkern._validate import POSITIVE_INT
from deqkern.autowindow import AutoWindow, AutoWindowConfig, window_auto_config
from deqkern.config import DEFAULT_TOL, EXECUTIONS, SolveConfig, check_choice
from deqkern.engine import (
    Execution, Problem, Progress, Solved, StopRule, Workspace, sync_device, x0_row, current_trajectory, solve,
)
from deqkern.interop import to_torch
from deqkern.model import Guidance, ModelEvaluator, ModelFn
from deqkern.schedule import Form, Schedule
from deqkern.sequential import ChainStep, SequentialWorkspace


@dataclass
class SampleResult:
    """Outcome of a solve. ``converged[b]`` is False for every sample that hit ``max_iters``
    (its ``x0`` is then the solver's current estimate, not the sequential answer)."""

    x0: torch.Tensor
    converged: torch.Tensor
    rounds: int
    model_evals: int
    wall_time: float
    #: per round, per sample: ||F|| / ||G(X)|| over the sample's live rows (nan once frozen); under
    #: ``stop="x0"`` the last live row's ||G|| is the smaller of it and its step's own output's
    #: (engine.run_round)
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
    if x.ndim < 2 or x.numel() == 0:
        raise ValueError(f"{name}: expected shape [batch, ...latent], batch and latent size >= 1, got {tuple(x.shape)}")
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
        if not bool(torch.isfinite(noise).all()):
            raise ValueError("noise: contains NaN or inf")


def wants_grad(x_T: torch.Tensor, noise: torch.Tensor | None) -> bool:
    """Whether the caller differentiates x0: grad mode is on and ``x_T`` or ``noise`` requires grad."""
    inputs = [x_T] if noise is None else [x_T, noise]
    return torch.is_grad_enabled() and any(v.requires_grad for v in inputs)


#: Model dtypes whose solve keeps its state in float32: latents, step coefficients, residuals,
#: solver history and trajectory would otherwise round at the model's precision.
HALF_DTYPES = (torch.float16, torch.bfloat16)

#: Per model dtype, the least ``tol`` a solve can be held to, in 9 of 10 samples: two sequential
#: runs of the same samples that agree to float32 (another batch composition, x_T moved by 4
#: float32 ulps: the model rounds its input) or x0's cast to that dtype differ at x0 by about half
#: of it, and a parallel solve, which batches its rows differently again and leaves the residual of
#: the model's rounding uncharged (ops.reference.rounding_floor), by up to it (chains that amplify
#: rounding differ more). The default ``tol`` of a half model (:func:`default_tol`); under
#: classifier-free guidance it scales with the guidance (:func:`tol_floor`).
#: chosen by bench/solver_studies.py half-precision
HALF_TOL_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def tol_floor(model_dtype: torch.dtype | None, guidance: Guidance | None = None) -> float:
    """The least ``tol`` a model fed ``model_dtype`` can be held to (0: no floor): the dtype's
    :data:`HALF_TOL_FLOOR`, under classifier-free guidance times :attr:`Guidance.rounding_gain`,
    since the guided output carries the rounding of both outputs, each weighed by its guidance
    weight (two sequential float16 runs of the guided digits chain at scale 7.5 differ 10x more
    than at scale 1: bench/solver_studies.py guided-half)."""
    floor = HALF_TOL_FLOOR.get(model_dtype, 0.0)
    return floor if guidance is None else floor * guidance.rounding_gain


def default_tol(model_dtype: torch.dtype | None, guidance: Guidance | None = None) -> float:
    """The ``tol`` of a solve that names none (``SolveConfig.tol`` None): :data:`DEFAULT_TOL`, or
    the floor (:func:`tol_floor`) where that is higher, since a half-precision model cannot be held
    to less."""
    return max(DEFAULT_TOL, tol_floor(model_dtype, guidance))


def solve_precision(x_dtype: torch.dtype, ev: ModelEvaluator) -> tuple[torch.dtype, ModelEvaluator]:
    """``(state dtype, evaluator)`` of a chain from an ``x_T`` of ``x_dtype``.

    The state is float32 when ``x_T`` is half precision (``HALF_DTYPES``), else ``x_T``'s dtype.
    The model sees its own dtype at its input only: ``model_dtype`` when given, else ``x_T``'s
    dtype (so a half ``x_T`` is what a half model is fed, with the state kept in float32).
    """
    if x_dtype not in HALF_DTYPES:
        return x_dtype, ev
    if ev.model_dtype is not None:
        return torch.float32, ev
    return torch.float32, dataclasses.replace(ev, model_dtype=x_dtype)


def _warn_below_floor(tol: float, model_dtype: torch.dtype | None, guidance: Guidance | None) -> None:
    """A ``UserWarning`` naming ``tol``, the dtype and its floor when ``tol`` is below what a model
    in that dtype can be held to (:func:`tol_floor`), pointing at the caller of
    ``ParallelSampler.__call__`` (which calls ``_solve``, which calls this)."""
    floor = tol_floor(model_dtype, guidance)
    if tol < floor:
        what = f"a {model_dtype} model" + ("" if guidance is None else f" at guidance scale {guidance.scale:g}")
        warnings.warn(
            f"tol={tol:g} is below the tolerance floor {floor:g} of {what} (the model's rounding "
            f"alone moves x0 by up to that much, one sample in ten further): converged=True cannot mean x0 within "
            f"tol; use tol >= {floor:g} (the default) or a float32 model", UserWarning, stacklevel=4,
        )


def _check_cache_size(cache_size: int) -> None:
    if not isinstance(cache_size, int) or cache_size < 1:
        raise ValueError(f"cache_size: expected an int >= 1, got {cache_size!r}")


class _Cache(OrderedDict):
    """Workspaces by input signature, least recently used dropped beyond ``size`` (each holds
    every buffer of a solve and maybe a CUDA graph)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_or_make(self, key: tuple, make: Callable[[], Any]) -> tuple[Any, bool]:
        """``(workspace, made now)``."""
        if key in self:
            self.move_to_end(key)
            return self[key], False
        self[key] = make()
        while len(self) > self.size:
            self.popitem(last=False)
        return self[key], True


class SequentialSampler:
    """The oracle for repeated use: S model calls one after another,
    ``x[k+1] = step_k(x[k], model(x[k], t_k))``.

    ``noise[k]`` is the ``variance_noise`` of step ``k`` in ``schedule.timesteps`` order.
    ``execution="graph"`` (the default on CUDA) captures ``rounds_per_graph`` steps per CUDA
    graph — the fair baseline for graphed parallel sampling — once per input shape, and later
    calls replay it; ``"eager"`` checks every step's output, can return the trajectory and is
    differentiable by autograd (the inversion tests' oracle; ``"auto"`` picks it when grad mode
    is on and ``x_T`` or ``noise`` requires grad, which the others refuse); ``"static"`` and
    ``"audit"`` as in :class:`ParallelSampler` (without autograd).

    A half-precision model (``x_T`` in float16/bfloat16, or ``model_dtype``) sees its dtype at its
    input only: the latents and the steps stay float32, as in :class:`ParallelSampler`, so the two
    compare like with like (:func:`solve_precision`); ``x0`` comes back in ``x_T``'s dtype.
    """

    def __init__(
        self, model: ModelFn, schedule: Schedule, *, model_kwargs: Mapping[str, torch.Tensor] | None = None,
        guidance: Guidance | None = None, max_batch: int | None = None, model_dtype: torch.dtype | None = None,
        execution: Execution = "auto", rounds_per_graph: int = 10, cache_size: int = 4,
    ) -> None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule: expected a deqkern.Schedule, got {type(schedule).__name__}")
        check_choice("execution", execution, EXECUTIONS)
        rounds_per_graph = POSITIVE_INT.check("rounds_per_graph", rounds_per_graph)
        _check_cache_size(cache_size)
        self.schedule, self.execution, self.rounds_per_graph = schedule, execution, rounds_per_graph
        self.ev = ModelEvaluator(model, model_kwargs or {}, guidance, max_batch, model_dtype,
                                 inputs=schedule.step_inputs)
        self._cache = _Cache(cache_size)

    def __call__(
        self, x_T: torch.Tensor, noise: torch.Tensor | None = None, *, return_trajectory: bool = False
    ) -> SampleResult:
        """x0 of the chain from ``x_T`` (``[B, ...]``; with ``noise`` ``[S, *x_T.shape]`` for a
        stochastic chain). ``x_T``/``noise`` may be any DLPack array (cupy, numpy, ...); ``x0``
        and the trajectory come back as the same kind, zero-copy."""
        x_T, back = to_torch(x_T, "x_T")
        noise, _ = to_torch(noise, "noise")
        schedule, ev = self.schedule, self.ev
        check_chain_inputs(x_T, schedule, noise)
        ev.check_conditioning(x_T.shape[0])
        execution = self.execution
        differentiable = wants_grad(x_T, noise)
        if execution == "auto":
            execution = "graph" if x_T.is_cuda and not (return_trajectory or differentiable) else "eager"
        if return_trajectory and execution != "eager":
            raise ValueError("return_trajectory: needs execution='eager'")
        if differentiable and execution != "eager":
            raise ValueError(f"execution: x_T or noise requires grad, and only execution='eager' is differentiable "
                             f"(got {execution!r}); or detach them")
        batch, shape = x_T.shape[0], x_T.shape
        info: dict[str, Any] = {"solver": "sequential", "execution": execution}
        state_dtype, ev = solve_precision(x_T.dtype, ev)
        x_s = x_T.to(state_dtype)
        noise = None if noise is None else noise.to(state_dtype)
        sync_device(x_T.device)
        start = time.perf_counter()
        traj = None
        if execution == "eager":
            ev.evaluations = 0
            step = ChainStep(ev, schedule, x_s)
            traj = [x_s] if return_trajectory else None
            x0 = x_s
            for k in range(schedule.num_steps):
                x0 = step(x0, k, None if noise is None else noise[k])
                if traj is not None:
                    traj.append(x0)
        else:
            key = (tuple(shape), x_T.dtype, x_T.device, noise is not None, execution, torch.is_inference_mode_enabled())
            ws, made = self._cache.get_or_make(
                key, lambda: SequentialWorkspace(
                    schedule, x_s.detach(), noise is not None, ev, self.rounds_per_graph, execution
                )
            )
            with torch.no_grad():  # in-place steps on fixed buffers: not differentiable (eager is)
                x0, extra = ws.run(x_s, noise)
            ev = ws.ev
            info.update(extra, reused_workspace=not made)
        sync_device(x_T.device)
        return SampleResult(
            x0=back(x0.to(x_T.dtype)), converged=torch.ones(batch, dtype=torch.bool), rounds=schedule.num_steps,
            model_evals=ev.evaluations, wall_time=time.perf_counter() - start,
            rounds_per_sample=[schedule.num_steps] * batch,
            trajectory=back(torch.stack(traj).to(x_T.dtype)) if traj is not None else None, info=info,
        )


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
    """The oracle, once: :class:`SequentialSampler` with these arguments, called on ``x_T``."""
    sampler = SequentialSampler(
        model, schedule, model_kwargs=model_kwargs, guidance=guidance, max_batch=max_batch, model_dtype=model_dtype,
        execution=execution, rounds_per_graph=rounds_per_graph, cache_size=1,
    )
    return sampler(x_T, noise, return_trajectory=return_trajectory)


class ParallelSampler:
    """Sample by solving the whole chain as one fixed point, all timesteps of a window per model
    call — for repeated use: every buffer of an input shape is kept (up to ``cache_size``
    shapes), so the CUDA graph the first call captures is replayed by every later call.

    Args:
        model: ``model(x[N, ...], t[N], **kwargs)``; diffusers models are accepted directly.
        schedule: the chain (:class:`Schedule`); ``form`` overrides its fixed-point form.
        config: the solve's options as a :class:`~deqkern.config.SolveConfig` (or a mapping of
            its fields). The keywords ``solver``, ``tol``, ``max_iters``, ``window``, ``stop``,
            ``form``, ``solver_options``, ``execution``, ``rounds_per_graph`` and ``extrapolate``
            are its fields too: each one given (not None) overrides ``config``'s value, each one
            left None keeps it (or the field's default). ``sampler.config`` is the result,
            resolved for the schedule (window, max_iters, form and extrapolate filled in).
        solver: a registered solver name (``"anderson"``, the default; ``"picard"``, ...).
        tol: stopping tolerance (> 0; default 1e-3, and with a half-precision model its floor,
            ``HALF_TOL_FLOOR``: float16 2e-3, bfloat16 1e-2). ``stop="x0"`` (default): x0's relative
            error against the sequential sampler, ``||x0 - x0_seq|| <= tol max(||x0_seq||, 1e-3 ||x_T||)`` (the
            floor: below a thousandth of x_T, both chains' rounding is a sizeable part of x0) — to first order in
            the residuals, with each step's gain measured by secants between rounds (docs/math.md
            §4.3): an estimate, not a proof (:func:`deqkern.ops.reference.x0_accepted_rows`; checked
            by ``tests/test_x0_bound.py`` and bench/solver_studies.py stopping-x0, budget).
            ``stop="relative"``: a row passes when ``||G(x) - x|| <= tol ||G(x)||``;
            ``stop="noise"`` (ParaDiGMS): when ``||G(x) - x||^2 / (D var_k) <= tol^2`` with
            ``var_k`` the step's posterior variance. These two bound residuals, not x0's error:
            frozen rows pass their errors on, and x0 can end several ``tol`` away
            (bench/solver_studies.py stopping-rule).
        max_iters: most rounds (batched model calls); default S, enough for exactness.
        window: rows per sample per round (ParaDiGMS' ``parallel``); default S (no window);
            ``"auto"``: on the first call per input signature the model's batch cost is measured
            and the window of least predicted ``rounds(W) t(W)`` runs, or the sequential sampler
            when no window is predicted to beat it (exact; ``info["exact"]``); the measurements,
            predictions and choice are in ``info["window_auto"]`` (:mod:`deqkern.autowindow`;
            ``window_auto``: its :class:`~deqkern.autowindow.AutoWindowConfig`). Halved while
            the solve raises ``torch.OutOfMemoryError`` (down to 1, then it propagates):
            ``info["window"]`` is the window that ran, ``info["window_oom"]`` the ones that ran
            out of memory.
        solver_options: the solver's config dataclass or a mapping of its fields.
        model_kwargs, guidance: conditioning (per sample or shared). The sampler keeps a copy (a
            captured graph reads it); pass ``model_kwargs=``/``guidance=`` to a call to change
            it without rebuilding the sampler.
        max_batch: most model rows per call; a round is split into chunks above it.
        model_dtype: the dtype the model is fed (its weights'); default ``x_T``'s. Only the
            model's input is cast: the latents and all solver state (window, residuals, solver
            history, trajectory) are in ``x_T``'s dtype, float32 when that is float16/bfloat16
            (:func:`solve_precision`); ``x0`` comes back in ``x_T``'s dtype (from a half
            ``x_T``: the float32 result rounded once). With a half model a ``tol`` below its
            floor (``HALF_TOL_FLOOR``) warns.
        extrapolate: how rows entering a sliding window (``window < S``) start: ``"model"``
            steps the chain from the last computed row with the last model output held (and the
            pre-drawn step noise; affine chains, a multistep one holding its converted output),
            True continues the last step
            linearly, False copies the last computed row as ParaDiGMS does; default (None):
            ``"model"`` where it applies, else True for deterministic chains, False for
            stochastic ones (``bench/results/README.md``, "Entering rows"). ``init`` overrides it.
        execution: ``"eager"`` evaluates only live rows and checks convergence every round;
            ``"static"`` runs fixed-shape, sync-free rounds (all B*W rows) and checks once per
            ``rounds_per_graph`` rounds; ``"graph"`` captures those rounds as one CUDA graph
            (falls back to ``"static"`` with the reason logged when capture is impossible);
            ``"audit"`` runs the static rounds as a graph would, on any device (a CPU too), and
            raises :class:`~deqkern.errors.CaptureHazard` if a chunk syncs with the host or
            differs from the captured one (:mod:`deqkern.graph_audit`); ``"auto"``: graph on
            CUDA, eager elsewhere.
        process_group: solve across the ranks of a ``torch.distributed`` group: ``"world"`` (the
            default group of ``init_process_group``, e.g. under ``torchrun``) or a
            ``ProcessGroup``; every rank holds the model, the schedule and the same inputs, makes
            the same call and gets the same result (:mod:`deqkern.distributed`). None: this process.
        strategy: with ``process_group``: ``"rows"`` splits each round's model rows (guidance's
            doubled rows too) into balanced contiguous slices, one per rank, all-gathered every
            round (``max_batch`` is per rank); ``"samples"`` solves a contiguous slice of the
            batch per rank and gathers the results once. None: ``"samples"`` when the batch is a
            multiple of the world size (and no ``on_round``), else ``"rows"``. ``info`` gets
            ``strategy``, ``world_size``, ``rank_rows`` (model rows per rank) and, for rows,
            ``bytes_per_round`` (bytes each rank received per round).

    The solve's rounds run without autograd (see :func:`deqkern.engine.solve`). When grad mode is
    on and ``x_T`` or ``noise`` requires grad, ``x0`` is differentiable w.r.t. them with the
    sequential chain's gradient: backward solves the chain's adjoint at the solved trajectory
    (:func:`deqkern.inversion.function.differentiable_solve`) with this sampler's solver,
    ``solver_options``, ``tol`` and window, to about ``tol`` (exact as ``tol -> 0``); it raises if
    the forward did not converge (``max_iters``). Model parameters and conditioning get no
    gradient, nor does ``init`` (a warm start does not move the fixed point); the trajectory
    carries no graph. Otherwise ``x0`` carries no graph. For the phantom gradient or other
    adjoint options use :func:`deqkern.inversion.sample_with_implicit_grad`.
    """

    def __init__(
        self,
        model: ModelFn,
        schedule: Schedule,
        solver: str | None = None,
        tol: float | None = None,
        max_iters: int | None = None,
        window: int | Literal["auto"] | None = None,
        *,
        stop: StopRule | None = None,
        form: Form | None = None,
        solver_options: Any = None,
        model_kwargs: Mapping[str, torch.Tensor] | None = None,
        guidance: Guidance | None = None,
        max_batch: int | None = None,
        model_dtype: torch.dtype | None = None,
        execution: Execution | None = None,
        rounds_per_graph: int | None = None,
        extrapolate: bool | Literal["model"] | None = None,
        cache_size: int = 4,
        config: SolveConfig | Mapping[str, Any] | None = None,
        window_auto: AutoWindowConfig | Mapping[str, Any] | None = None,
        process_group: Any = None,
        strategy: str | None = None,
    ) -> None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule: expected a deqkern.Schedule, got {type(schedule).__name__}")
        given = dict(solver=solver, tol=tol, max_iters=max_iters, window=window, stop=stop, form=form,
                     solver_options=solver_options, execution=execution, rounds_per_graph=rounds_per_graph,
                     extrapolate=extrapolate)
        base = config_from(SolveConfig, config, "config")
        # a keyword left at None is not given: the config's value (or the default) stands
        self.config = replace(base, **{k: v for k, v in given.items() if v is not None}).resolved(schedule)
        _check_cache_size(cache_size)
        self.schedule = schedule if schedule.form == self.config.form else schedule.with_form(self.config.form)
        self.ev = ModelEvaluator(model, model_kwargs or {}, guidance, max_batch, model_dtype,
                                 inputs=schedule.step_inputs)
        # the sampler's own copy: a later call's conditioning is copied into it (captured graphs read it)
        self.ev = replace(self.ev, model_kwargs=_owned(self.ev.model_kwargs), guidance=_owned(self.ev.guidance))
        self.model_dtype = self.ev.model_dtype
        self._dist = None
        if process_group is not None and self.config.window == "auto":
            # each rank would time its own cost curve and could choose another window: a hang
            raise ValueError("window: 'auto' is not supported with process_group; give every rank the same int window")
        if process_group is not None:
            from deqkern.distributed import Distributed  # torch.distributed only when asked for

            self._dist = Distributed.make(process_group, strategy, self.ev)
        elif strategy is not None:
            raise ValueError(f"strategy: says how to split a solve across ranks and needs process_group, "
                             f"got {strategy!r}")
        self._cache = _Cache(cache_size)
        #: per input signature, the windows whose solve ran out of memory (see _solve_fitting)
        self._window_oom: dict[tuple, list[int]] = {}
        self._auto = AutoWindow(window_auto_config(window_auto)) if self.config.window == "auto" else None
        self._sequential: SequentialSampler | None = None  # window="auto" that chose sequential

    def __call__(
        self,
        x_T: torch.Tensor,
        noise: torch.Tensor | None = None,
        *,
        init: torch.Tensor | None = None,
        return_trajectory: bool = False,
        progress: Progress = False,
        on_round: Callable[[torch.Tensor], None] | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        guidance: Guidance | None = None,
    ) -> SampleResult:
        """Solve from ``x_T``.

        Args:
            x_T: ``[B, ...]`` initial noise.
            noise: ``[S, *x_T.shape]`` pre-drawn step noise, required for stochastic chains.
            init: ``[S, *x_T.shape]`` warm start for positions 1..S (e.g. a previous trajectory).
            return_trajectory: also return all latents ``[S+1, *x_T.shape]``.
            progress: a tqdm bar of the steps every sample has frozen, with the rounds so far
                (True, or tqdm's options: a mapping), updated every round under eager execution.
            on_round: called after every round (eager execution only) with the current x0
                estimate ``[B, *x_T.shape[1:]]``: the x0 row computed in that round, or the frozen
                x0 of a finished sample; NaN for samples whose window has not reached x0 yet.
            model_kwargs, guidance: this call's conditioning and from now on the sampler's (None:
                keep the sampler's). Of the same layout as the sampler's (keys, tensor shapes,
                dtypes and devices, other values, guidance scales) it is copied into the
                sampler's own tensors, so kept workspaces and captured graphs are reused; of
                another layout the workspaces are rebuilt (and graphs captured again).

        ``x_T``, ``noise`` and ``init`` may be any DLPack array (cupy, numpy, ...): ``x0`` and
        the trajectory then come back as the same kind, zero-copy.
        """
        x_T, back = to_torch(x_T, "x_T")
        noise, _ = to_torch(noise, "noise")
        init, _ = to_torch(init, "init")
        schedule, s = self.schedule, self.schedule.num_steps
        check_chain_inputs(x_T, schedule, noise)
        if init is not None and (init.shape != (s, *x_T.shape) or init.dtype != x_T.dtype or init.device != x_T.device):
            raise ValueError(f"init: expected {x_T.dtype} of shape {(s, *x_T.shape)} on {x_T.device}, got "
                             f"{init.dtype} {tuple(init.shape)} on {init.device}")
        if init is not None and not bool(torch.isfinite(init).all()):
            raise ValueError("init: contains NaN or inf")
        if model_kwargs is not None or guidance is not None:
            self._condition(model_kwargs, guidance, x_T.shape[0])
        self.ev.check_conditioning(x_T.shape[0])
        execution = self.config.execution
        if execution == "auto":
            execution = "graph" if x_T.is_cuda and on_round is None else "eager"
        if on_round is not None and execution != "eager":
            raise ValueError(f"on_round: needs execution='eager' (Python runs between rounds), got {execution!r}")
        if self._dist is not None:
            return self._distributed(x_T, noise, init, return_trajectory, progress, on_round, execution, back)
        if wants_grad(x_T, noise):
            return self._differentiable(x_T, noise, init, return_trajectory, progress, on_round, execution)
        # the workspace keeps its buffers for the next call: no autograd graph may reach them
        x_T, noise = x_T.detach(), None if noise is None else noise.detach()
        init = None if init is None else init.detach()
        return self._solve(x_T, noise, init, return_trajectory, progress, on_round, execution, back)

    def _condition(self, model_kwargs: Mapping[str, Any] | None, guidance: Guidance | None, batch: int) -> None:
        """Make ``model_kwargs``/``guidance`` (None: unchanged) the sampler's conditioning: copied
        in place when their layout is the current one, else a new evaluator and no kept workspace."""
        ev = self.ev
        new = replace(ev, model_kwargs=ev.model_kwargs if model_kwargs is None else model_kwargs,
                      guidance=ev.guidance if guidance is None else guidance)  # checks their types
        new.check_conditioning(batch)
        if _layout(new.model_kwargs) == _layout(ev.model_kwargs) and _layout(new.guidance) == _layout(ev.guidance):
            _copy_into(ev.model_kwargs, new.model_kwargs)
            _copy_into(ev.guidance, new.guidance)
            return
        self.ev = replace(new, model_kwargs=_owned(new.model_kwargs), guidance=_owned(new.guidance))
        self._cache.clear()
        self._sequential = None  # window="auto"'s sequential sampler holds the old conditioning too
        if self._dist is not None:  # its split evaluators hold the old conditioning
            self._dist = self._dist.remade(self.ev)

    def _solve(
        self, x_T: torch.Tensor, noise: torch.Tensor | None, init: torch.Tensor | None, return_trajectory: bool,
        progress: Progress, on_round: Callable[[torch.Tensor], None] | None, execution: str, back: Callable,
        ev: ModelEvaluator | None = None,
    ) -> SampleResult:
        """The solve of validated, detached inputs (x0 carries no autograd graph); ``ev``: the
        evaluator of a distributed solve (:mod:`deqkern.distributed`), else the sampler's."""
        schedule, s = self.schedule, self.schedule.num_steps
        shape = x_T.shape
        # buffers made under inference mode cannot be updated outside it, and the reverse
        key = (tuple(shape), x_T.dtype, x_T.device, noise is not None, init is not None, return_trajectory, execution,
               torch.is_inference_mode_enabled(), None if ev is None else id(ev))
        state_dtype, ev = solve_precision(x_T.dtype, self.ev if ev is None else ev)
        _warn_below_floor(self._tol(ev.model_dtype or x_T.dtype), ev.model_dtype or x_T.dtype, ev.guidance)
        width, auto, auto_key = self.config.window, {}, (tuple(shape), state_dtype, x_T.device)
        if self._auto is not None:
            width, auto = self._auto_window(auto_key, x_T.to(state_dtype), ev)
            if width is None:
                return self._run_sequential(x_T, noise, return_trajectory, on_round, execution, back, auto)
            started = self._auto.clock()
        x_s, noise, init = (None if a is None else a.to(state_dtype) for a in (x_T, noise, init))
        ws, out, window_oom = self._solve_fitting(
            key, width, x_s, noise, init, return_trajectory, execution, progress, on_round, ev
        )
        st, p = ws.st, ws.p
        if self._auto is not None:
            # a first fixed-shape solve captures its graphs: its time is not a round's
            steady = execution == "eager" or out.info.get("reused_workspace", False)
            self._auto.observe(auto_key, s, p.width, out.rounds, out.info.get("rounds_executed", out.rounds),
                               self._auto.clock() - started if steady else None)
            auto = {"window_auto": auto}
        return SampleResult(
            x0=back(x0_row(p, st).to(x_T.dtype)), converged=out.converged, rounds=out.rounds,
            model_evals=ws.ev.evaluations, wall_time=out.wall_time, residuals=out.residuals,
            rounds_per_sample=out.rounds_per_sample,
            # a copy: the workspace's buffer is the next call's
            trajectory=None if st.traj is None else back(
                current_trajectory(p, st).reshape(s + 1, *shape).to(x_T.dtype)),
            info={"solver": self.config.solver, "config": ws.config, "form": schedule.form, "stop": self.config.stop,
                  "tol": ws.p.tol, "window": ws.p.width, "window_oom": window_oom,
                  "extrapolate": self.config.extrapolate if init is None else False, **auto, **out.info},
        )

    def _tol(self, model_dtype: torch.dtype) -> float:
        """This sampler's ``tol``, or the default for a model fed ``model_dtype`` under this
        sampler's guidance (:func:`default_tol`)."""
        return default_tol(model_dtype, self.ev.guidance) if self.config.tol is None else self.config.tol

    def _auto_window(self, key: tuple, x: torch.Tensor, ev: ModelEvaluator) -> tuple[int | None, dict[str, Any]]:
        """``window="auto"``'s window for ``x`` of signature ``key`` (None: sequential) and its
        report: the model timed through ``ev`` (a copy: the measurement is no model evaluation
        of the solve) on the rows a round of each window would give it, the first time this
        input signature is seen."""
        s, batch, dev = self.schedule.num_steps, x.shape[0], x.device
        timer_ev = replace(ev, evaluations=0)
        labels = self.schedule.timesteps.to(dev)

        def make_call(width: int) -> Callable[[], torch.Tensor]:
            rows = torch.arange(batch * width, device=dev)
            xs, ts, idx = x[rows % batch].contiguous(), labels[rows // batch % s], rows % batch
            return lambda: timer_ev.raw(xs, ts, idx)

        with torch.no_grad():
            return self._auto.choose(key, s, self.config.max_iters, make_call, dev)

    def _run_sequential(
        self, x_T: torch.Tensor, noise: torch.Tensor | None, return_trajectory: bool,
        on_round: Callable[[torch.Tensor], None] | None, execution: str, back: Callable, auto: dict[str, Any],
    ) -> SampleResult:
        """The sequential sampler's solve, which ``window="auto"`` predicted to be the fastest:
        exact, so every sample converged; ``on_round`` sees x0 once, at the end."""
        if self._sequential is None:
            ev = self.ev
            self._sequential = SequentialSampler(
                ev.model, self.schedule, model_kwargs=ev.model_kwargs, guidance=ev.guidance, max_batch=ev.max_batch,
                model_dtype=ev.model_dtype, rounds_per_graph=self.config.rounds_per_graph,
            )
        self._sequential.execution = "eager" if return_trajectory else execution
        res = self._sequential(x_T, noise, return_trajectory=return_trajectory)
        if on_round is not None:
            on_round(res.x0)
        return replace(
            res, x0=back(res.x0), trajectory=None if res.trajectory is None else back(res.trajectory),
            info={**res.info, "config": self.config, "form": None, "stop": self.config.stop,
                  "tol": self._tol(self.ev.model_dtype or x_T.dtype),
                  "window": None, "exact": True, "window_auto": auto},
        )

    def _distributed(
        self, x_T: torch.Tensor, noise: torch.Tensor | None, init: torch.Tensor | None, return_trajectory: bool,
        progress: Progress, on_round: Callable[[torch.Tensor], None] | None, execution: str, back: Callable,
    ) -> SampleResult:
        """The solve across the ranks of ``process_group`` (:class:`deqkern.distributed.Distributed`)."""
        if wants_grad(x_T, noise):
            raise ValueError("process_group: x0 is not differentiable across ranks; detach x_T and noise")
        x_T, noise, init = (None if a is None else a.detach() for a in (x_T, noise, init))  # see __call__

        def solve(x: torch.Tensor, z: torch.Tensor | None, i: torch.Tensor | None, ev: ModelEvaluator) -> SampleResult:
            return self._solve(x, z, i, return_trajectory, progress, on_round, execution, lambda v: v, ev)

        res = self._dist.run(self, x_T, noise, init, solve, on_round)
        return replace(res, x0=back(res.x0), trajectory=None if res.trajectory is None else back(res.trajectory))

    def _differentiable(
        self, x_T: torch.Tensor, noise: torch.Tensor | None, init: torch.Tensor | None, return_trajectory: bool,
        progress: Progress, on_round: Callable[[torch.Tensor], None] | None, execution: str,
    ) -> SampleResult:
        """The solve with ``x0`` differentiable w.r.t. ``x_T`` and ``noise`` by the implicit adjoint
        (:func:`deqkern.inversion.function.differentiable_solve`), solved by this sampler's solver,
        options, ``tol`` and window. The trajectory, if asked for, carries no graph."""
        # deqkern.inversion imports this module (its optimiser samples), so it is imported on the
        # first differentiable call rather than at the top: no import cycle
        from deqkern.inversion.function import differentiable_solve

        def solve(x: torch.Tensor, z: torch.Tensor | None) -> SampleResult:
            detached_init = None if init is None else init.detach()
            return self._solve(x, z, detached_init, True, progress, on_round, execution, lambda v: v)

        c = self.config
        # window="auto" chooses the forward's window per call; the adjoint's is S
        window = None if c.window == "auto" else c.window
        options = {"solver": c.solver, "solver_options": c.solver_options,
                   "tol": self._tol(self.ev.model_dtype or x_T.dtype), "window": window}
        res = differentiable_solve(solve, x_T, noise, replace(self.ev, evaluations=0), self.schedule, options)
        return res if return_trajectory else replace(res, trajectory=None)

    def _solve_fitting(
        self, key: tuple, window: int, x_T: torch.Tensor, noise: torch.Tensor | None, init: torch.Tensor | None,
        return_trajectory: bool, execution: str, progress: Progress, on_round: Callable[[torch.Tensor], None] | None,
        ev: ModelEvaluator,
    ) -> tuple[Workspace, Solved, list[int]]:
        """``(workspace, solved, windows that ran out of memory)``: the solve at ``window``,
        halved after every ``torch.OutOfMemoryError`` (a round's model batch is B x W rows) and
        started over; at window 1 the error propagates. The windows that ran out are
        kept per input signature: later calls start at the last one that fit."""
        failed = self._window_oom.setdefault(key, [])
        while True:
            width = failed[-1] // 2 if failed else window
            try:
                ws, made = self._cache.get_or_make(
                    (*key, width), lambda: self._workspace(x_T, noise, init, return_trajectory, execution, width, ev)
                )
                if not made:
                    ws.load(x_T, noise, init)
                return ws, solve(ws, progress=progress, on_round=on_round), list(failed)
            except torch.OutOfMemoryError:
                if width == 1:
                    raise
                self._cache.pop((*key, width), None)  # its buffers, and the solve's, are freed
                failed.append(width)

    def _workspace(
        self, x_T: torch.Tensor, noise: torch.Tensor | None, init: torch.Tensor | None, return_trajectory: bool,
        execution: str, width: int, ev: ModelEvaluator,
    ) -> Workspace:
        """The buffers of a solve from ``x_T``, ``noise`` and ``init`` in the state dtype, with
        the model called through ``ev`` (:func:`solve_precision`)."""
        schedule, s, c = self.schedule, self.schedule.num_steps, self.config
        batch, dim = x_T.shape[0], x_T[0].numel()
        dev, dt = x_T.device, x_T.dtype
        # at the full window no row ever enters: the held chain would be computed for nothing
        held = c.extrapolate == "model" and width < s
        p = Problem(
            coef=schedule.packed(dev, dt), timesteps=schedule.timesteps.to(dev),
            noise_var=schedule.noise_var.to(dev, torch.float64),
            noise=None if noise is None else noise.reshape(s, batch, dim).clone(),
            init=None if init is None else torch.cat([x_T.reshape(1, batch, dim), init.reshape(s, batch, dim)]),
            transform=schedule.transform, shape=x_T.shape, width=width, tol=self._tol(ev.model_dtype or dt),
            stop=c.stop,
            max_iters=c.max_iters, form=c.form,
            entering="held" if held else "copy" if c.extrapolate in ("model", False) else "linear",
            held_coef=schedule.packed_held(dev, dt) if held else None,
            ms_coef=schedule.packed_multistep(dev, dt),
            x0_extra=None if schedule.multistep is None else schedule.multistep.packed_x0(dev),
            ms_linear=schedule.multistep_linear(dev),
            coords=None if schedule.coords is None else schedule.coords.to(dev, dt),
            input_scale=(None if schedule.step_inputs is None or schedule.step_inputs.scale is None
                         else schedule.step_inputs.scale.to(dev, torch.float64)),
        )
        return Workspace(
            p, x_T, ev, c.solver, c.solver_options, execution=execution, rounds_per_graph=c.rounds_per_graph,
            model_dtype=ev.model_dtype, return_trajectory=return_trajectory,
        )


def _owned(value: Any) -> Any:
    """A copy of conditioning that a sampler may overwrite: tensors cloned (detached), mappings and
    :class:`Guidance` rebuilt around them, other values shared."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Guidance):
        return replace(value, cond=_owned(value.cond), uncond=_owned(value.uncond))
    if isinstance(value, Mapping):
        return {k: _owned(v) for k, v in value.items()}
    return value


def _layout(value: Any) -> Any:
    """What a captured solve depends on besides tensor values: tensors' shape, dtype and device,
    the keys, the other values (a guidance scale is a constant of the captured graph)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, Guidance):
        return ("guidance", value.scale, value.rescale, _layout(value.cond), _layout(value.uncond))
    if isinstance(value, Mapping):
        return ("map", sorted(((k, _layout(v)) for k, v in value.items()), key=lambda kv: kv[0]))
    return ("value", value)


def _copy_into(dst: Any, src: Any) -> None:
    """``src``'s tensor values into ``dst``'s tensors, of the same :func:`_layout`."""
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, Guidance):
        _copy_into(dst.cond, src.cond)
        _copy_into(dst.uncond, src.uncond)
    elif isinstance(dst, Mapping):
        for key, value in dst.items():
            _copy_into(value, src[key])


def sample(
    model: ModelFn,
    x_T: torch.Tensor,
    schedule: Schedule,
    solver: str | None = None,
    tol: float | None = None,
    max_iters: int | None = None,
    window: int | Literal["auto"] | None = None,
    noise: torch.Tensor | None = None,
    *,
    init: torch.Tensor | None = None,
    return_trajectory: bool = False,
    progress: Progress = False,
    on_round: Callable[[torch.Tensor], None] | None = None,
    **options: Any,
) -> SampleResult:
    """Sample once: ``ParallelSampler(model, schedule, solver, tol, max_iters, window, **options)``
    called on ``x_T`` (and ``noise``, ``init``, ...). ``options`` are the sampler's keywords:
    ``stop``, ``form``, ``solver_options``, ``model_kwargs``, ``guidance``, ``max_batch``,
    ``model_dtype``, ``execution``, ``rounds_per_graph``, ``extrapolate``, ``config``,
    ``window_auto``, ``process_group``, ``strategy`` (see :class:`ParallelSampler` and its
    ``__call__``). A graph captured here is not kept, nor is ``window="auto"``'s measured cost
    curve; to reuse them, keep the sampler."""
    sampler = ParallelSampler(model, schedule, solver, tol, max_iters, window, **options, cache_size=1)
    return sampler(x_T, noise, init=init, return_trajectory=return_trajectory, progress=progress, on_round=on_round)
