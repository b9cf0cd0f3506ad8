"""``window="auto"``: the window that a solve on this device is predicted to finish fastest with.

A round of a parallel solve with window ``W`` (rows per sample) makes one model call on
``B W r`` rows (``r`` model rows per latent: 2 under classifier-free guidance), so its wall time is

    T(W) = rounds(W) * (t(W) + o),   t(W) = seconds of one model call on B W r rows,

with ``o`` the solver's own work per round (scan, stopping test, mixing), and the sequential
sampler's is ``T_seq = S t(1)``. ``o`` starts at 0 and is then the median over this sampler's
solves of ``seconds / rounds run - t(W)`` (timed with the same clock; never below 0).

**Cost curve.** ``t(W)`` is measured on the caller's device, input shape and conditioning, at
``W = 1, 2, 4, ..., S`` (:func:`candidate_windows`): on CUDA each call is captured as a CUDA graph
and its replays timed with CUDA events (eager with events if capture fails), elsewhere a clock
times the calls after a warm-up call; the median of ``repeats`` calls. Measuring stops when the
time budget is spent or once two doublings in a row cost at least ``LINEAR`` times the rows'
ratio (the device is full: beyond that ``t`` grows in proportion to rows); unmeasured windows are
extrapolated linearly in rows from the largest measured one, the costliest a full device can be.

**Rounds model.** ``rounds(W) = clip(a S / W + c, ceil(S / W), min(S, max_iters))`` (a window
of W rows freezes at most W rows a round and at least one). ``(a, c)`` start at :data:`PRIOR`,
a least-squares fit to measured rounds of the library's default solve, and are refitted after
every solve of the sampler (:func:`fit_rounds`): a ridge fit of the observed ``(S / W, rounds)``
pulled towards the prior, ``min sum_i (R_i - a u_i - c)^2 + w ((a - a0)^2 + (c - c0)^2)``.

**Choice.** ``W* = argmin_{W >= 2} T(W)``; the solve runs at ``W*`` if ``T(W*) <= MARGIN T_seq``
and sequentially otherwise (exact by construction). When ``t`` is linear in rows, as on a CPU,
``rounds(W) W >= S`` makes every window lose, so sequential is chosen; where a small model's
calls cost about the same at every size but the solver's rounds do not, the measured ``o``
turns the next call sequential.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from deqkern._config import config_from
from deqkern._validate import POSITIVE_FLOAT, POSITIVE_INT, OptionError
from deqkern.engine import sync_device
from deqkern.graphs import capture

#: a doubling of rows that costs at least this fraction of 2x means the device is full
LINEAR = 0.95
#: a window must be predicted this much faster than sequential to be chosen: before the first
#: solve the solver's work per round is unknown (taken as 0)
MARGIN = 0.9
#: the prior's weight in the refit, in observed solves
PRIOR_WEIGHT = 1.0


@dataclass(frozen=True)
class RoundsModel:
    """``rounds(W) = a S / W + c``, clipped to what a window can take (module docstring)."""

    a: float
    c: float
    observations: int = 0

    def predict(self, steps: int, window: int, max_iters: int | None = None) -> float:
        """Predicted rounds of a solve of ``steps`` steps at ``window`` rows per sample."""
        top = steps if max_iters is None else min(steps, max_iters)
        return float(min(top, max(math.ceil(steps / window), self.a * steps / window + self.c)))


#: fitted by fit_rounds to bench/results/stopping_x0_cpu.json (2026-12-01, tenth session; anderson-tri, stop
#: x0, tol 1e-3: DDIM S=100 full and window 10, DDPM S=100, DDIM S=1000 window 10), the library default's rounds
PRIOR = RoundsModel(a=1.0, c=13.71)


def fit_rounds(
    points: Sequence[tuple[float, float]], prior: RoundsModel | None = None, prior_weight: float = PRIOR_WEIGHT
) -> RoundsModel:
    """Least-squares ``(a, c)`` of ``R = a u + c`` over ``points`` ``(u = S / W, R = rounds)``;
    with a ``prior``, ridge-pulled towards it with weight ``prior_weight`` (the prior alone when
    there are no points). The 2x2 normal equations are solved directly; a fit with ``a < 1`` is
    replaced by ``a = 1`` and the least-squares ``c`` for it."""
    lam = 0.0 if prior is None else prior_weight
    a0, c0 = (0.0, 0.0) if prior is None else (prior.a, prior.c)
    n = len(points)
    su, sr = sum(u for u, _ in points), sum(r for _, r in points)
    suu, sur = sum(u * u for u, _ in points), sum(u * r for u, r in points)
    m11, m12, m22 = suu + lam, su, n + lam
    det = m11 * m22 - m12 * m12
    if det <= 0:
        raise ValueError(f"points: expected at least two distinct S/W values without a prior, got {list(points)}")
    b1, b2 = sur + lam * a0, sr + lam * c0
    a = (m22 * b1 - m12 * b2) / det
    if a < 1.0:  # rounds >= S / W: a is held at >= 1 and c refitted (one S/W cannot tell a from c)
        return RoundsModel(a=1.0, c=(sr - su + lam * c0) / (n + lam), observations=n)
    return RoundsModel(a=a, c=(m11 * b2 - m12 * b1) / det, observations=n)


@dataclass(frozen=True)
class AutoWindowConfig:
    """How ``window="auto"`` measures and chooses.

    Fields:
        budget_s: most seconds the cost-curve measurement of one input signature may take (it
            stops after the window that crosses it; at least two windows are measured).
        repeats: timed model calls per window, after one warm-up call; the median counts.
        margin: a window is chosen only if predicted at most ``margin`` x sequential's time.
        prior: the rounds model before this sampler's first solve.
        clock: seconds now; None: CUDA events on CUDA, ``time.perf_counter`` elsewhere. A clock
            makes the measurement deterministic (tests pass one that their model advances).
    """

    budget_s: float = 2.0
    repeats: int = 3
    margin: float = MARGIN
    prior: RoundsModel = PRIOR
    clock: Callable[[], float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget_s", POSITIVE_FLOAT.check("window_auto.budget_s", self.budget_s))
        object.__setattr__(self, "repeats", POSITIVE_INT.check("window_auto.repeats", self.repeats))
        margin = POSITIVE_FLOAT.check("window_auto.margin", self.margin)
        if margin > 1:
            raise OptionError("window_auto.margin", f"expected a number in (0, 1], got {self.margin!r}")
        if not isinstance(self.prior, RoundsModel):
            raise OptionError("window_auto.prior", f"expected a RoundsModel, got {type(self.prior).__name__}")
        if self.clock is not None and not callable(self.clock):
            raise OptionError("window_auto.clock", f"expected a callable returning seconds, got {self.clock!r}")


def candidate_windows(steps: int) -> list[int]:
    """``1, 2, 4, ...`` below ``steps``, then ``steps``."""
    out = [1 << i for i in range(max(steps - 1, 0).bit_length()) if 1 << i < steps]
    return [*out, steps]


@dataclass
class CostCurve:
    """``t(W)`` in seconds per window; ``measured`` the windows timed, the others extrapolated."""

    seconds: dict[int, float]
    measured: list[int]
    timer: str
    spent_s: float

    def summary(self) -> dict[str, Any]:
        return {"seconds": dict(self.seconds), "measured": list(self.measured), "timer": self.timer,
                "spent_s": self.spent_s}


#: ``call(W)``: a thunk that runs one model call on the rows of window W
CallMaker = Callable[[int], Callable[[], Any]]


def measure_cost_curve(make_call: CallMaker, windows: Sequence[int], device: torch.device,
                       config: AutoWindowConfig) -> CostCurve:
    """Time ``make_call(W)()`` for the ``windows`` in increasing order, within the budget (module
    docstring); a window that runs out of memory costs infinity and ends the measurement."""
    clock = config.clock or time.perf_counter
    start, seconds, timer = clock(), {}, "clock"
    linear_steps = 0
    for w in windows:
        try:
            seconds[w], timer = time_call(make_call(w), device, config)
        except torch.OutOfMemoryError:
            seconds[w] = math.inf
            break
        prev = [v for v in seconds if v < w]
        if prev and seconds[w] >= LINEAR * seconds[prev[-1]] * w / prev[-1]:
            linear_steps += 1
        else:
            linear_steps = 0
        if len(seconds) >= 2 and (linear_steps >= 2 or clock() - start > config.budget_s):
            break
    measured = list(seconds)
    last = measured[-1]
    for w in windows:
        seconds.setdefault(w, seconds[last] * w / last)
    return CostCurve(seconds, measured, timer, clock() - start)


def time_call(fn: Callable[[], Any], device: torch.device, config: AutoWindowConfig) -> tuple[float, str]:
    """``(median seconds of one call, timer)``: the configured clock, else CUDA events around graph
    replays (eager calls if capture fails) on CUDA, else ``time.perf_counter``."""
    if config.clock is None and device.type == "cuda":
        return time_cuda(fn, config.repeats)
    clock = config.clock or time.perf_counter
    fn()  # warm-up: lazy initialisation and allocator growth are not the call's cost
    times = []
    for _ in range(config.repeats):
        sync_device(device)
        t0 = clock()
        fn()
        sync_device(device)
        times.append(clock() - t0)
    return statistics.median(times), "clock"


def time_cuda(fn: Callable[[], Any], repeats: int) -> tuple[float, str]:
    """Median seconds of ``fn`` replayed as a CUDA graph, timed by CUDA events per replay."""
    graph, _ = capture(fn, [])
    run, timer = (graph.replay, "cuda-graph-events") if graph is not None else (fn, "cuda-events")
    run()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        run()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    return statistics.median(times), timer


def choose_window(curve: CostCurve, steps: int, rounds: RoundsModel, max_iters: int | None,
                  margin: float, overhead_s: float = 0.0) -> tuple[int | None, dict[str, Any]]:
    """``(W*, report)``: the window of least predicted ``rounds(W) (t(W) + overhead_s)`` over
    ``W >= 2``, or None (sequential) when none is predicted at most ``margin`` x ``S t(1)``."""
    seq = steps * curve.seconds[1]
    candidates = [
        {"window": w, "rounds": rounds.predict(steps, w, max_iters),
         "time_s": rounds.predict(steps, w, max_iters) * (t + overhead_s)}
        for w, t in curve.seconds.items() if w >= 2
    ]
    best = min(candidates, key=lambda c: c["time_s"], default=None)
    if best is not None and best["time_s"] <= margin * seq:
        t_best = curve.seconds[best["window"]]
        choice = best["window"]
        why = (f"window {choice} predicted {seq / best['time_s']:.2f}x faster than sequential "
               f"({best['rounds']:.1f} rounds of {t_best:.3g} s + {overhead_s:.3g} s)")
    else:
        choice = None
        why = ("no window has a predicted time within "
               f"{margin:g} x sequential's {seq:.3g} s (best: "
               + ("none, S < 2" if best is None else f"window {best['window']}, {best['time_s']:.3g} s") + ")")
    report = {"cost_curve": curve.summary(), "rounds_model": {"a": rounds.a, "c": rounds.c,
              "observations": rounds.observations}, "overhead_s_per_round": overhead_s,
              "candidates": candidates, "sequential_s": seq,
              "choice": "sequential" if choice is None else choice, "reason": why}
    return choice, report


@dataclass
class AutoWindow:
    """A sampler's ``window="auto"`` state: one cost curve per input signature (measured on its
    first call), the ``(S / W, rounds)`` of every parallel solve so far and, per signature, the
    solver's measured seconds per round beyond the model call."""

    config: AutoWindowConfig = field(default_factory=AutoWindowConfig)
    curves: dict[tuple, CostCurve] = field(default_factory=dict)
    observed: list[tuple[float, float]] = field(default_factory=list)
    overheads: dict[tuple, list[float]] = field(default_factory=dict)

    def clock(self) -> float:
        """The clock the measurements and the solves' times are read with."""
        return (self.config.clock or time.perf_counter)()

    @property
    def rounds_model(self) -> RoundsModel:
        return fit_rounds(self.observed, self.config.prior)

    def choose(self, key: tuple, steps: int, max_iters: int | None, make_call: CallMaker,
               device: torch.device) -> tuple[int | None, dict[str, Any]]:
        """The window for a solve of input signature ``key`` (None: sequential) and the report;
        the cost curve is measured the first time ``key`` is seen."""
        measured_now = key not in self.curves
        if measured_now:
            self.curves[key] = measure_cost_curve(make_call, candidate_windows(steps), device, self.config)
        overhead = statistics.median(self.overheads[key]) if self.overheads.get(key) else 0.0
        window, report = choose_window(self.curves[key], steps, self.rounds_model, max_iters, self.config.margin,
                                       overhead)
        return window, {**report, "measured_now": measured_now}

    def observe(self, key: tuple, steps: int, window: int, rounds: int, rounds_run: int,
                seconds: float | None) -> None:
        """Record a parallel solve of signature ``key`` for the next choices: its ``rounds`` at
        ``window`` and, from the ``seconds`` its ``rounds_run`` rounds took (None: not a steady
        state time), the solver's own seconds per round (``t(window)`` taken off; 0 at least)."""
        self.observed.append((steps / window, float(rounds)))
        t = self.curves[key].seconds.get(window)
        if t is not None and seconds is not None and rounds_run > 0:
            self.overheads.setdefault(key, []).append(max(0.0, seconds / rounds_run - t))


def window_auto_config(value: AutoWindowConfig | Mapping[str, Any] | None) -> AutoWindowConfig:
    """``value`` (an :class:`AutoWindowConfig`, a mapping of its fields, or None) as a config."""
    return config_from(AutoWindowConfig, value, "window_auto")


#: A STATED (not measured) cost curve of the CIFAR10 DDPM UNet (35.7M parameters, 32x32, fp32) on
#: an H100/H200: flat until the GPU fills at this many rows, then linear, so that 100 rows cost
#: 5.6x one row, the middle of issue 14's 4-7x estimate. Replace it by a measured curve
#: (bench/e2e_graphs.py, "model batch cost") when a GPU has run the suite.
CIFAR10_KNEE_ROWS = 18


def stated_cifar10_curve(steps: int, batch: int = 1) -> CostCurve:
    """:data:`CIFAR10_KNEE_ROWS`'s curve at the candidate windows, in units of one call on ``batch`` rows."""
    seconds = {w: max(1.0, batch * w / CIFAR10_KNEE_ROWS) / max(1.0, batch / CIFAR10_KNEE_ROWS)
               for w in candidate_windows(steps)}
    return CostCurve(seconds, measured=[], timer=f"stated: max(1, rows / {CIFAR10_KNEE_ROWS})", spent_s=0.0)


def predicted_gpu_speedup(steps: int, rounds: RoundsModel, curve: CostCurve | None = None,
                          max_iters: int | None = None) -> dict[str, Any]:
    """PREDICTED speedup ``S t(1) / (rounds(W*) t(W*))`` of ``window="auto"`` over sequential on
    ``curve`` (default: the stated CIFAR10 curve at batch 1) with ``rounds``; a prediction, not a
    measurement, and labelled so."""
    curve = stated_cifar10_curve(steps) if curve is None else curve
    window, report = choose_window(curve, steps, rounds, max_iters, margin=1.0)
    best = next((c for c in report["candidates"] if c["window"] == window), None)
    return {"label": "PREDICTION (stated cost curve, not measured)", "steps": steps, "window": report["choice"],
            "rounds": None if best is None else best["rounds"], "cost_curve": curve.timer,
            "speedup": 1.0 if best is None else report["sequential_s"] / best["time_s"],
            "rounds_model": report["rounds_model"]}
