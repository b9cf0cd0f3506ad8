"""One validated, frozen description of a parallel solve: :class:`SolveConfig`.

The sampler, the inversion's forward and adjoint solves and the benchmark's variants all take
their solve options from it, so each option is declared and checked once, here.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Literal, Mapping

from deqkern._config import config_from
from deqkern._validate import POSITIVE_FLOAT, POSITIVE_INT, OptionError
from deqkern.engine import Execution, StopRule
from deqkern.schedule import Form, Schedule
from deqkern.solvers import get_solver, solver_names

#: The ``tol`` of a solve that names none, with a float32 or float64 model (a half-precision
#: model's is its floor where higher: :func:`deqkern.sampling.default_tol`).
DEFAULT_TOL = 1e-3

STOP_RULES: tuple[str, ...] = ("relative", "noise", "x0")
FORMS: tuple[str, ...] = ("drift", "scan", "secant")
EXECUTIONS: tuple[str, ...] = ("auto", "eager", "static", "graph", "audit")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """:class:`OptionError` naming ``name`` unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        quoted = [repr(c) for c in choices]
        raise OptionError(name, f"expected {', '.join(quoted[:-1])} or {quoted[-1]}, got {value!r}")


@dataclass(frozen=True)
class SolveConfig:
    """How a chain's fixed point is solved: every option of a parallel solve, checked on construction
    (``dataclasses.replace`` checks again). Errors are :class:`~deqkern._validate.OptionError`
    naming the field.

    Fields:
        solver: a registered solver name (``deqkern.solver_names()``).
        solver_options: the solver's config dataclass or a mapping of its fields, stored as that
            dataclass (``AndersonConfig``, ``PicardConfig``, ...); None: the solver's defaults
            (kept None, so that ``replace(config, solver="picard")`` takes Picard's).
        tol: stopping tolerance, > 0, in the units of ``stop``; None: 1e-3, or the model dtype's
            tolerance floor where that is higher (:func:`deqkern.sampling.default_tol`).
        stop: ``"x0"``: x0's estimated relative error against the sequential chain
            ``<= tol`` (docs/math.md §4); ``"relative"``: every row's
            ``||G(x) - x|| <= tol ||G(x)||``; ``"noise"`` (ParaDiGMS):
            ``||G(x) - x||^2 / (D var_k) <= tol^2``.
        form: the fixed-point form (``"drift"``: ``L_k = 1``, ``"scan"``: ``L_k = A_k``,
            ``"secant"``: ``L_k`` fitted per row); None: the schedule's.
        window: rows per sample per round, in ``[1, S]``; None: S (no window); ``"auto"``: chosen
            per call from the model's measured batch cost (:mod:`deqkern.autowindow`), kept
            ``"auto"`` by :meth:`resolved`.
        max_iters: most rounds, >= 1; None: S (Picard is exact after S rounds).
        extrapolate: how rows entering a sliding window start: ``"model"``, the chain stepped
            from the last computed row with the last model output held (affine chains: DDIM,
            DDPM, Euler, Euler ancestral, flow, DPM-Solver++ holding its predicted x0, without x0
            clipping); True, the last step
            continued linearly; False, a copy of the last row (ParaDiGMS); None: the first that
            applies of ``"model"``, True (deterministic chains), False (stochastic).
        execution: ``"eager"``, ``"static"``, ``"graph"``, ``"audit"`` or ``"auto"`` (graph on
            CUDA, eager elsewhere); see :class:`deqkern.ParallelSampler`.
        rounds_per_graph: fixed-shape rounds between convergence checks (one CUDA graph), >= 1.

    The model's ``max_batch`` and ``model_dtype`` are not here: they say how the model is called
    (the sequential sampler has them too), not which fixed point is solved or how.
    """

    solver: str = "anderson"
    solver_options: Any = None
    tol: float | None = None
    stop: StopRule = "x0"
    form: Form | None = None
    window: int | Literal["auto"] | None = None
    max_iters: int | None = None
    extrapolate: bool | Literal["model"] | None = None
    execution: Execution = "auto"
    rounds_per_graph: int = 4

    def __post_init__(self) -> None:
        # frozen: normalised values are written through object.__setattr__, once, here
        set_ = object.__setattr__
        if not isinstance(self.solver, str) or self.solver not in solver_names():
            raise OptionError("solver", f"unknown solver {self.solver!r}; registered: {solver_names()}")
        options = _solver_options(self.solver, self.solver_options)
        if self.solver_options is not None:
            set_(self, "solver_options", options)
        if self.tol is not None:
            set_(self, "tol", POSITIVE_FLOAT.check("tol", self.tol))
        check_choice("stop", self.stop, STOP_RULES)
        if self.form is not None:
            check_choice("form", self.form, FORMS)
        if self.max_iters is not None:
            set_(self, "max_iters", POSITIVE_INT.check("max_iters", self.max_iters))
        if self.window is not None and not (isinstance(self.window, str) and self.window == "auto"):
            if isinstance(self.window, str):
                raise OptionError("window", f"expected an integer >= 1, 'auto' or None, got {self.window!r}")
            try:
                set_(self, "window", POSITIVE_INT.check("window", self.window))
            except OptionError as exc:
                raise OptionError("window", f"{exc.message} (or 'auto', or None for S)") from None
        if not (self.extrapolate in (None, True, False) or (isinstance(self.extrapolate, str)
                                                            and self.extrapolate == "model")):
            raise OptionError("extrapolate", f"expected True, False, 'model' or None (auto), got {self.extrapolate!r}")
        check_choice("execution", self.execution, EXECUTIONS)
        set_(self, "rounds_per_graph", POSITIVE_INT.check("rounds_per_graph", self.rounds_per_graph))

    def resolved(self, schedule: Schedule) -> "SolveConfig":
        """This config for ``schedule`` (S steps), every schedule-dependent default filled in:
        ``form`` the schedule's, ``window`` and ``max_iters`` S, ``extrapolate`` (not stochastic).
        Raises :class:`OptionError` for a window above S, and the schedule's error for a form it
        cannot take (the scan form of a clipped chain)."""
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule: expected a deqkern.Schedule, got {type(schedule).__name__}")
        s = schedule.num_steps
        if self.window not in (None, "auto") and self.window > s:
            raise OptionError("window", f"expected an int in [1, S={s}], got {self.window!r}")
        form = schedule.form if self.form is None else self.form
        if form != schedule.form:
            schedule.with_form(form)  # the schedule checks that its steps admit the form
        held = schedule.can_hold_output
        if self.extrapolate == "model" and not held:
            raise OptionError("extrapolate", "'model' steps entering rows with the model output held, which needs "
                                             "affine steps (no x0 clip/threshold); this chain "
                                             f"is {schedule.description or 'not'} (use True or False)")
        if self.extrapolate is None:
            # chosen by bench/solver_studies.py entering: fewer rounds than the linear step or the copy
            extrapolate = "model" if held else not schedule.is_stochastic
        else:
            extrapolate = self.extrapolate
        return replace(
            self, form=form, window=s if self.window is None else self.window,
            max_iters=s if self.max_iters is None else self.max_iters, extrapolate=extrapolate,
        )


def _solver_options(solver: str, options: Any) -> Any:
    """``options`` as ``solver``'s config dataclass, its errors raised as one about ``solver_options``."""
    try:
        config, _ = get_solver(solver, options)
    except (TypeError, ValueError) as exc:
        raise OptionError("solver_options", str(exc).removeprefix("solver_options: ")) from None
    return config


SOLVE_FIELDS: frozenset[str] = frozenset(f.name for f in fields(SolveConfig))


def solve_config(options: Any, argname: str, base: SolveConfig | None = None) -> SolveConfig:
    """``options`` (a :class:`SolveConfig`, a mapping of its fields overriding ``base``, or None
    for ``base``) as a SolveConfig. Nested under ``argname`` (``"grad_options.solve"``), a bad
    field's error is named ``argname.field`` with the same message."""
    try:
        return config_from(SolveConfig, options, argname, base)
    except OptionError as exc:
        raise OptionError(f"{argname}.{exc.name}", exc.message) from None


def split_solve_options(options: Mapping[str, Any], own: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(solve options, the rest)`` of keyword ``options``: the keys that are :class:`SolveConfig`
    fields and not in ``own`` (the caller's fields, which win a name both have), and the others."""
    solve = {k: v for k, v in options.items() if k in SOLVE_FIELDS and k not in own}
    return solve, {k: v for k, v in options.items() if k not in solve}
