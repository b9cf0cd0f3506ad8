"""Run every solver on the same model, noise, batch and tolerance and record comparable numbers.

For each chain length S: the sequential oracle's warm-up run (the reference), then every selected
solver's *traced* warm-up run (per-round x0 error against the oracle, discarded for timing), then
``repeats`` clean timed sweeps over the oracle and every solver, round-robin (repetition r of every
method before repetition r + 1 of any), so that background load on a shared machine hits every
method alike; the median and the min-max are reported. Host timers are wrapped in device
synchronisation. Our solvers and the oracle run through kept samplers, so on a GPU the timed
runs replay the CUDA graph an untimed run captured (steady state).
"""
from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Literal

import torch

import deqkern
from deqkern._validate import NONNEGATIVE_FLOAT, POSITIVE_FLOAT, POSITIVE_INT, Bounded, OptionError
from deqkern.bench.chains import SCHEDULERS, SchedulerName, build_chain, chain_model, scheduler_config
from deqkern.bench.peers import (
    ChainMap, DeqDdimConfig, Outcome, SolverUnsupported, run_deq_ddim, run_paradigms, run_torchdeq,
)
from deqkern.bench.trace import ErrorTrace
from deqkern.config import SolveConfig
from deqkern.engine import sync_device
from deqkern.schedule import Form, Schedule, schedule_summary

Family = Literal["oracle", "peer", "ours"]


@dataclass(frozen=True)
class OursSpec:
    """A deqkern configuration: registered solver, Anderson mixing, fixed-point form, windowed."""

    solver: str
    mixing: Literal["row", "sample", "triangular"] | None
    form: Form
    windowed: bool = False

    def solve_config(self, cfg: BenchConfig, steps: int) -> SolveConfig:
        """This variant's solve of a chain of ``steps`` under the run's ``tol``, ``stop``,
        ``max_iters``, ``window`` (when windowed) and Anderson ``history`` and ``ridge``."""
        options = None if self.mixing is None else {"history": cfg.history, "ridge": cfg.ridge, "mixing": self.mixing}
        return SolveConfig(
            self.solver, options, tol=cfg.tol, stop=cfg.stop, form=self.form, max_iters=cfg.max_iters,
            window=(cfg.window if cfg.window == "auto" else min(cfg.window, steps)) if self.windowed else None,
        )


#: Our variants. ``-scan`` solves the seed's scan form, ``-secant`` the secant form (multipliers
#: fitted per row as the solve moves), the others the drift form; ``-win`` uses the benchmark's
#: ``window`` (ParaDiGMS' ``parallel``) instead of all S steps.
OURS: dict[str, OursSpec] = {
    "picard": OursSpec("picard", None, "drift"),
    "anderson-row": OursSpec("anderson", "row", "drift"),
    "anderson-sample": OursSpec("anderson", "sample", "drift"),
    "anderson-tri": OursSpec("anderson", "triangular", "drift"),
    "picard-scan": OursSpec("picard", None, "scan"),
    "anderson-row-scan": OursSpec("anderson", "row", "scan"),
    "anderson-sample-scan": OursSpec("anderson", "sample", "scan"),
    "picard-win": OursSpec("picard", None, "drift", windowed=True),
    "anderson-row-win": OursSpec("anderson", "row", "drift", windowed=True),
    "anderson-tri-win": OursSpec("anderson", "triangular", "drift", windowed=True),
    "picard-secant": OursSpec("picard", None, "secant"),
    "anderson-tri-secant": OursSpec("anderson", "triangular", "secant"),
    "picard-secant-win": OursSpec("picard", None, "secant", windowed=True),
}
#: Our best setting: the fewest rounds for a batch's worst sample to reach x0 error 1e-3 at large S
#: (ties go to the library default); chosen by ``python -m deqkern.bench --steps 25 100 1000``.
BEST = "anderson-tri"

PEERS = ("paradigms", "paradigms-full", "deq-ddim", "torchdeq")
ALL_SOLVERS: tuple[str, ...] = ("sequential", *PEERS, *OURS)

#: One line per solver for ``--help`` and the JSON.
DESCRIPTIONS: dict[str, str] = {
    "sequential": "the oracle: S model calls one after another (deqkern.sample_sequential)",
    "paradigms": "ParaDiGMS (diffusers' pipeline loop): Picard on a sliding window of --window steps, "
                 "noise-scaled tolerance --paradigms-tol",
    "paradigms-full": "ParaDiGMS with its window = S",
    "deq-ddim": "DEQ-DDIM's Anderson (m=5, absolute ridge 1e-3, <=15 evaluations, per-(sample,timestep) "
                "weights, scan form, latents start at x_T, global relative stop 1e-3)",
    "torchdeq": "torchdeq.solver.anderson_solver with its defaults (m=6, lam=1e-4, <=50 evaluations) "
                "on our drift-form map, relative stop --tol",
    "picard": "deqkern Picard, drift form, window S",
    "anderson-row": "deqkern Anderson, one weight vector per (sample, timestep) row, drift form, window S",
    "anderson-sample": "deqkern Anderson, one weight vector per sample, drift form, window S",
    "anderson-tri": "deqkern triangular Anderson (ParaTAA-style prefix Gram: row i mixes with rows 0..i), "
                    "drift form, window S",
    "picard-scan": "deqkern Picard, scan form (the seed's), window S",
    "anderson-row-scan": "deqkern Anderson per row, scan form, window S",
    "anderson-sample-scan": "deqkern Anderson per sample, scan form, window S",
    "picard-win": "deqkern Picard, drift form, window --window (ParaDiGMS' algorithm on our stopping rule)",
    "anderson-row-win": "deqkern Anderson per row, drift form, window --window",
    "anderson-tri-win": "deqkern triangular Anderson, drift form, window --window",
    "picard-secant": "deqkern Picard, secant form (scan multipliers fitted per row by a secant), window S",
    "anderson-tri-secant": "deqkern triangular Anderson, secant form, window S",
    "picard-secant-win": "deqkern Picard, secant form, window --window",
}


class _WindowBound(Bounded):
    """An integer >= 1 or ``"auto"`` (flag text or value)."""

    def __init__(self) -> None:
        super().__init__(int, 1)

    def describe(self) -> str:
        return super().describe() + " or 'auto'"

    def __call__(self, text: str) -> int | str:
        return text if text == "auto" else super().__call__(text)

    def check(self, name: str, value: Any) -> int | str:
        return value if isinstance(value, str) and value == "auto" else super().check(name, value)


WINDOW = _WindowBound()

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: The numeric fields' bounds, declared once: :class:`BenchConfig` checks them and the CLI flags
#: parse with them (``steps``: every chain length).
BOUNDS: dict[str, Bounded] = {
    "steps": Bounded(int, 2), "eta": NONNEGATIVE_FLOAT, "tol": POSITIVE_FLOAT, "window": WINDOW,
    "history": Bounded(int, 1, 8), "ridge": NONNEGATIVE_FLOAT, "max_iters": POSITIVE_INT,
    "paradigms_tol": POSITIVE_FLOAT, "target_err": POSITIVE_FLOAT, "batch": POSITIVE_INT,
    "seed": Bounded(int, 0, 2**63 - 1), "threads": POSITIVE_INT, "repeats": POSITIVE_INT, "max_batch": POSITIVE_INT,
}
#: ParaDiGMS' window (its pipeline's default ``parallel``) when ``--window auto`` leaves it none
PARADIGMS_PARALLEL = 10

#: fields whose None means "the default" (no bound applies)
_OPTIONAL = ("max_iters", "threads", "max_batch")


@dataclass(frozen=True)
class BenchConfig:
    """Everything that defines a benchmark run (the CLI flags, one to one)."""

    model: str | None = None
    steps: tuple[int, ...] = (25, 100)
    scheduler: SchedulerName = "ddim"
    eta: float = 0.0
    clip_sample: bool = False
    solvers: tuple[str, ...] = ALL_SOLVERS
    #: 1e-4 brings x0 within the 1e-3 target (tol 1e-3 leaves ~1.5e-3 on the digits model)
    tol: float = 1e-4
    #: the deqkern solvers' stopping rule: "relative" per row, or "x0", which bounds x0's error
    #: by tol (deqkern.ops.reference.x0_accepted_rows)
    stop: Literal["relative", "x0"] = "relative"
    #: or "auto": the *-win solvers run window="auto" and ParaDiGMS PARADIGMS_PARALLEL
    window: int | Literal["auto"] = 10
    #: Anderson history and relative ridge of every deqkern Anderson variant (the library
    #: defaults, deqkern.AndersonConfig: m=2, ridge 1e-3, restart safeguard on)
    history: int = 2
    ridge: float = 1e-3
    max_iters: int | None = None
    paradigms_tol: float = 0.1
    target_err: float = 1e-3
    batch: int = 8
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    threads: int | None = None
    warmup: bool = True
    #: timed runs per solver after the warm-up; the median is reported
    repeats: int = 1
    progress: bool = True
    max_batch: int | None = None
    #: our solvers split each round's model rows across the torch.distributed WORLD group (torchrun)
    distributed: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.solvers) - set(ALL_SOLVERS))
        if unknown:
            raise OptionError("solvers", f"unknown {unknown}; choose from {list(ALL_SOLVERS)}")
        if not self.steps:
            raise OptionError("steps", "expected at least one chain length")
        for name, bound in BOUNDS.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            for v in value if name == "steps" else (value,):
                bound.check(name, v)
        if self.stop not in ("relative", "x0"):
            raise OptionError("stop", f"expected 'relative' or 'x0', got {self.stop!r}")
        if self.scheduler not in SCHEDULERS:
            raise OptionError("scheduler", f"expected one of {list(SCHEDULERS)}, got {self.scheduler!r}")
        if self.scheduler != "ddim" and self.eta != 0.0:
            raise OptionError("eta", f"applies to --scheduler ddim only ({self.scheduler}'s noise is fixed by "
                                     "the scheduler)")
        if self.scheduler not in ("ddim", "ddpm") and self.clip_sample:
            raise OptionError("clip_sample", f"applies to --scheduler ddim and ddpm only, not {self.scheduler}")
        if self.dtype not in _DTYPES:
            raise OptionError("dtype", f"expected one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if not self.warmup and self.repeats != 1:
            raise OptionError("repeats", f"without a warm-up the one traced run is timed; got {self.repeats} repeats")


@dataclass
class RunRecord:
    """One solver at one chain length. Errors are against the oracle, worst sample of the batch."""

    solver: str
    family: Family
    steps: int
    description: str
    form: str | None = None
    window: int | str | None = None
    stop: str | None = None
    rounds: int | None = None
    model_evals: int | None = None
    #: median of the timed runs; with min and max, the spread that background load left
    wall_s: float | None = None
    wall_s_min: float | None = None
    wall_s_max: float | None = None
    #: every timed run, in the order they ran
    wall_s_runs: list[float] = field(default_factory=list)
    speedup: float | None = None
    x0_rel_err: float | None = None
    psnr_db: float | None = None
    converged: bool | None = None
    rounds_to_target: int | None = None
    rounds_to_target_per_sample: list[int | None] = field(default_factory=list)
    residual_per_round: list[float] = field(default_factory=list)
    x0_err_per_round: list[float] = field(default_factory=list)
    timing: str = ""
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None


@dataclass
class BenchResult:
    config: BenchConfig
    environment: dict[str, Any]
    model: dict[str, Any]
    schedules: dict[int, dict[str, Any]]
    quality: dict[str, Any]
    records: list[RunRecord]
    #: per S: ``x_T``, ``sequential`` and ``best`` samples (CPU) for the sample grid
    samples: dict[int, dict[str, torch.Tensor]]
    #: per S: window="auto"'s PREDICTED GPU speedup on the stated CIFAR10 cost curve, rounds
    #: calibrated on this run (:func:`gpu_prediction`)
    gpu_prediction: dict[int, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "config": {**asdict(self.config), "best": BEST},
            "environment": self.environment,
            "model": self.model,
            "schedules": {str(k): v for k, v in self.schedules.items()},
            "quality": self.quality,
            "solvers": {k: DESCRIPTIONS[k] for k in self.config.solvers},
            "runs": [asdict(r) for r in self.records],
            "gpu_prediction": {str(k): v for k, v in self.gpu_prediction.items()},
        }


# ------------------------------------------------------------------------------ setup
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def timed(device: torch.device, fn: Callable[[], Any],
          clock: Callable[[], float] = time.perf_counter) -> tuple[Any, float]:
    """``(fn(), seconds)`` with the device synchronised around the host timer."""
    sync_device(device)
    start = clock()
    out = fn()
    sync_device(device)
    return out, clock() - start


def interleaved(
    runs: dict[str, Callable[[], Any]], repeats: int, device: torch.device,
    clock: Callable[[], float] = time.perf_counter, tolerate: tuple[type[BaseException], ...] = (),
    after_sweep: Callable[[], None] = lambda: None,
) -> dict[str, tuple[Any, list[float]]]:
    """Time every run ``repeats`` times round-robin: sweep r runs each method once, in order, before
    sweep r + 1 starts, so load that comes and goes on a shared machine hits every method alike
    instead of whichever ran during it.

    Returns per name ``(output of its last run, seconds of every run)``. A run that raises one of
    ``tolerate`` returns the exception as its output and is not run again.
    """
    results: dict[str, tuple[Any, list[float]]] = {name: (None, []) for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            out, walls = results[name]
            if isinstance(out, BaseException):
                continue
            try:
                out, wall = timed(device, fn, clock)
            except tolerate as exc:
                results[name] = (exc, walls)
                continue
            results[name] = (out, [*walls, wall])
        after_sweep()
    return results


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    import diffusers

    env: dict[str, Any] = {
        "device": str(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "deqkern": deqkern.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    try:
        import torchdeq

        env["torchdeq"] = getattr(torchdeq, "__version__", "installed")
    except ImportError:
        env["torchdeq"] = None
    return env


def load_model(cfg: BenchConfig, device: torch.device) -> tuple[Any, Any, dict[str, Any]]:
    """``(unet, scheduler, info)``: the embedded digits model or the local diffusers dir ``cfg.model``."""
    from deqkern.models import load_digits_model, load_pretrained

    dtype = _DTYPES[cfg.dtype]
    if cfg.model is None:
        unet, scheduler = load_digits_model(device=device, dtype=dtype)
        source = "embedded digits model (deqkern/assets/digits)"
    else:
        unet, scheduler = load_pretrained(cfg.model, device=device, dtype=dtype)
        source = cfg.model
    if type(unet).__name__ != "UNet2DModel":
        raise OptionError(
            "model", f"the benchmark samples unconditionally and needs a UNet2DModel, got {type(unet).__name__}"
        )
    limit = scheduler.config.num_train_timesteps
    if max(cfg.steps) > limit:
        raise OptionError(
            "steps", f"expected chain lengths <= the model's num_train_timesteps={limit}, got {list(cfg.steps)}"
        )
    c = unet.config
    size = c.sample_size if isinstance(c.sample_size, (tuple, list)) else (c.sample_size, c.sample_size)
    info = {
        "source": source, "class": type(unet).__name__, "parameters": sum(p.numel() for p in unet.parameters()),
        "sample_shape": [c.in_channels, *size], "dtype": cfg.dtype, "digits": cfg.model is None,
    }
    return unet, scheduler, info


@dataclass
class Case:
    """One chain length: the problem every solver gets, and the oracle's answer."""

    steps: int
    schedule: Schedule
    x_T: torch.Tensor
    noise: torch.Tensor | None
    reference: torch.Tensor
    #: one run of the oracle, through a kept sampler (on a GPU its timed runs replay its graph)
    oracle: Callable[[], Any]


# ------------------------------------------------------------------------------ metrics
def x0_metrics(x0: torch.Tensor, ref: torch.Tensor) -> tuple[float, float | None]:
    """Worst-sample relative L2 error and worst-sample PSNR (dB) of images in [-1, 1]
    (peak-to-peak 2); PSNR is None when the images are identical."""
    a, b = x0.detach().double().cpu().flatten(1), ref.detach().double().cpu().flatten(1)
    rel = float(((a - b).norm(dim=1) / b.norm(dim=1).clamp(min=1e-300)).max())
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).square().mean(dim=1).max()
    psnr = None if float(mse) == 0.0 else float(10 * torch.log10(4.0 / mse))
    return rel, psnr


def _worst(rows: list[list[float]]) -> list[float]:
    """Per round, the largest finite value over samples (NaN when none is finite)."""
    out = []
    for r in rows:
        vals = [v for v in r if v is not None and math.isfinite(v)]
        out.append(max(vals) if vals else float("nan"))
    return out


# ------------------------------------------------------------------------------ solver runs
class _Runner:
    """Runs the solvers of one :class:`Case`."""

    def __init__(self, cfg: BenchConfig, model: Any, sched_conf: dict[str, Any], case: Case) -> None:
        self.cfg, self.model, self.sched_conf, self.case = cfg, model, sched_conf, case
        self.device = case.x_T.device
        # our solvers' samplers, kept across the timed runs: on a GPU the first run captures the
        # CUDA graph and the timed runs replay it, as a library calling deqkern repeatedly would
        self._samplers: dict[OursSpec, deqkern.ParallelSampler] = {}

    def solve(self, name: str, trace: ErrorTrace | None) -> Outcome:
        """One run of solver ``name``; ``trace`` (if given) receives every round's x0 estimate."""
        c, cfg = self.case, self.cfg
        if name in OURS:
            return self._ours(OURS[name], trace)
        if name in ("paradigms", "paradigms-full"):
            parallel = c.steps if name == "paradigms-full" else _paradigms_window(cfg)
            return run_paradigms(
                self.model, self.sched_conf, cfg.scheduler, c.schedule, c.x_T, c.noise, parallel=parallel,
                tolerance=cfg.paradigms_tol, eta=cfg.eta, max_batch=cfg.max_batch, on_round=trace,
            )
        if name == "deq-ddim":
            self._need_one_step(name)
            self._need_affine("deq-ddim solves the scan form")
            gmap = ChainMap(self.model, c.schedule.with_form("scan"), c.x_T, c.noise, cfg.max_batch)
            return run_deq_ddim(gmap, DeqDdimConfig(), on_round=trace)
        if name == "torchdeq":
            self._need_one_step(name)
            gmap = ChainMap(self.model, c.schedule, c.x_T, c.noise, cfg.max_batch)
            return run_torchdeq(gmap, cfg.tol, on_round=trace)
        raise ValueError(f"unknown solver {name!r}")

    def _auto(self, name: str) -> bool:
        """Whether solver ``name`` runs window="auto"."""
        return name in OURS and OURS[name].windowed and self.cfg.window == "auto"

    def _need_one_step(self, peer: str) -> None:
        """The full-window peers' map (:class:`ChainMap`) steps each row from its own row only."""
        if self.case.schedule.is_multistep:
            raise SolverUnsupported(
                f"n/a for {self.cfg.scheduler}: {peer}'s map steps each latent from its own row only, and a "
                "multistep chain's step also reads the previous step's model output (picard-win runs any chain)"
            )

    def _need_affine(self, why: str) -> None:
        if not self.case.schedule.is_affine:
            raise SolverUnsupported(
                f"{why}, which needs affine steps; this chain clips x0 (run without --clip-sample)"
            )

    def _ours(self, spec: OursSpec, trace: ErrorTrace | None) -> Outcome:
        c, cfg = self.case, self.cfg
        if spec.form == "scan":
            self._need_affine("the scan form")
        config = spec.solve_config(cfg, c.steps)
        split = {"process_group": "world", "strategy": "rows"} if cfg.distributed else {}
        if trace is not None:
            # eager rounds: the trace hook runs Python between rounds (no CUDA-graph capture)
            res = deqkern.sample(self.model, c.x_T, c.schedule, noise=c.noise, on_round=trace, max_batch=cfg.max_batch,
                                 config=replace(config, execution="eager"), **split)
        else:
            if spec not in self._samplers:
                self._samplers[spec] = deqkern.ParallelSampler(self.model, c.schedule, max_batch=cfg.max_batch,
                                                               config=config, **split)
            res = self._samplers[spec](c.x_T, c.noise)
        notes = []
        if "window_auto" in res.info:
            notes.append(f"window auto chose {res.info['window_auto']['choice']}: {res.info['window_auto']['reason']}")
        fallbacks = int(res.info.get("fallbacks", 0))
        if fallbacks:
            notes.append(f"{fallbacks} singular Anderson systems fell back to Picard")
        if "rank_rows" in res.info:
            notes.append(f"{res.info['world_size']} ranks: model rows per rank {res.info['rank_rows']}, "
                         f"{res.info['bytes_per_round']:.0f} bytes gathered per round and rank, {res.rounds} rounds")
        return Outcome(
            x0=res.x0, rounds=res.rounds, model_evals=res.model_evals, converged=res.all_converged,
            residuals=res.residuals, notes=notes,
        )

    def traced(self, name: str) -> tuple[RunRecord, Outcome | None, float]:
        """Solver ``name``'s traced warm-up run: its record with the per-round x0 errors (or why it
        was skipped), its outcome and its wall time."""
        c, cfg = self.case, self.cfg
        rec = RunRecord(solver=name, family="ours" if name in OURS else "peer", steps=c.steps,
                        description=DESCRIPTIONS[name])
        rec.form, rec.window, rec.stop = self._settings(name)
        trace = ErrorTrace(c.reference)
        try:
            out, wall = timed(self.device, lambda: self.solve(name, trace))
            if cfg.warmup and name in OURS and (self.device.type == "cuda" or self._auto(name)):
                # captures the sampler's CUDA graph (window="auto": measures its model cost): the
                # timed runs replay it
                self.solve(name, None)
        except SolverUnsupported as exc:
            rec.skipped = str(exc)
            return rec, None, 0.0
        except _SOLVER_FAILURES as exc:  # a solver failing is a result
            rec.skipped = _failure(exc)
            return rec, None, 0.0
        rec.x0_err_per_round = trace.worst_per_round()
        rec.rounds_to_target_per_sample = trace.rounds_to(cfg.target_err)
        hits = rec.rounds_to_target_per_sample
        rec.rounds_to_target = None if any(h is None for h in hits) else max(hits)
        return rec, out, wall

    def finish(self, rec: RunRecord, first: Outcome, out: Outcome, walls: list[float]) -> None:
        """Fill ``rec`` from the last timed run ``out`` (``first``: the traced run) and all timings."""
        rec.rounds, rec.model_evals, rec.converged = out.rounds, out.model_evals, out.converged
        _set_walls(rec, walls)
        rec.x0_rel_err, rec.psnr_db = x0_metrics(out.x0, self.case.reference)
        rec.residual_per_round = _worst(out.residuals)
        if out.rounds != first.rounds:
            rec.notes.append(f"traced run took {first.rounds} rounds, timed run {out.rounds}")
        rec.notes.extend(out.notes)

    def _settings(self, name: str) -> tuple[str, int, str]:
        c, cfg = self.case, self.cfg
        if name in OURS:
            solve = OURS[name].solve_config(cfg, c.steps)
            return solve.form, solve.window or c.steps, f"{solve.stop} {solve.tol:g}"
        if name == "paradigms":
            return "drift", min(_paradigms_window(cfg), c.steps), f"noise-scaled {cfg.paradigms_tol:g}"
        if name == "paradigms-full":
            return "drift", c.steps, f"noise-scaled {cfg.paradigms_tol:g}"
        if name == "deq-ddim":
            d = DeqDdimConfig()
            return "scan", c.steps, f"global relative {d.tol:g}"
        return "drift", c.steps, f"relative {cfg.tol:g} (max over batch)"


# ------------------------------------------------------------------------------ driver
#: what a solver run may raise and still be a result (recorded as skipped) rather than a bench bug
_SOLVER_FAILURES = (RuntimeError, ValueError, FloatingPointError)


def _failure(exc: BaseException) -> str:
    return f"failed: {type(exc).__name__}: {exc}"


def _set_walls(rec: RunRecord, walls: list[float]) -> None:
    rec.wall_s_runs = walls
    rec.wall_s, rec.wall_s_min, rec.wall_s_max = statistics.median(walls), min(walls), max(walls)


def make_case(cfg: BenchConfig, model: Any, sched_conf: dict[str, Any], steps: int,
              x_T: torch.Tensor, model_conf: dict[str, Any]) -> tuple[Case, float]:
    """The chain of length ``steps`` (its ``x_T`` times the scheduler's ``init_noise_sigma``), its
    noise (drawn once, CPU generator) and the oracle's answer, with the wall time of that first oracle run."""
    schedule, x_T = build_chain(cfg.scheduler, sched_conf, model_conf, steps, cfg.eta, x_T)
    noise = None
    if schedule.is_stochastic:
        gen = torch.Generator().manual_seed(cfg.seed + 1000 + steps)
        noise = torch.randn((steps, *x_T.shape), generator=gen).to(x_T.device, x_T.dtype)

    sequential = deqkern.SequentialSampler(model, schedule, max_batch=cfg.max_batch)  # its graph is kept

    def oracle():
        return sequential(x_T, noise)

    first, wall = timed(x_T.device, oracle)
    return Case(steps, schedule, x_T, noise, first.x0, oracle), wall


def run_chain(cfg: BenchConfig, runner: _Runner, solvers: list[str], first_oracle_wall: float,
              bar: Any = None) -> tuple[list[RunRecord], dict[str, Outcome]]:
    """Every solver at one chain length: the traced runs, then the timed runs interleaved across
    the oracle and the solvers. Returns the records (oracle first) and each finished solver's outcome."""
    case = runner.case
    oracle = RunRecord(
        solver="sequential", family="oracle", steps=case.steps, description=DESCRIPTIONS["sequential"],
        rounds=case.steps, model_evals=case.steps * cfg.batch, speedup=1.0, x0_rel_err=0.0, converged=True,
    )
    _advance(bar)
    traced: dict[str, tuple[RunRecord, Outcome | None, float]] = {}
    for name in solvers:
        _postfix(bar, f"S={case.steps} {name}")
        traced[name] = runner.traced(name)
        _advance(bar)
    ran = [name for name in solvers if traced[name][1] is not None]
    if cfg.warmup:
        runs = {"sequential": case.oracle, **{name: (lambda n=name: runner.solve(n, None)) for name in ran}}
        _postfix(bar, f"S={case.steps} timed runs")
        timings = interleaved(runs, cfg.repeats, runner.device, tolerate=_SOLVER_FAILURES,
                              after_sweep=lambda: _advance(bar))
        timing = f"median of {cfg.repeats} timed run(s) after a traced warm-up, interleaved across the methods"
    else:
        timings = {"sequential": (None, [first_oracle_wall])}
        timings.update({name: (traced[name][1], [traced[name][2]]) for name in ran})
        timing = "single traced run (no warm-up)"
    _set_walls(oracle, timings["sequential"][1])
    oracle.timing = timing
    records, outcomes = [oracle], {}
    for name in solvers:
        rec, first, _ = traced[name]
        records.append(rec)
        if rec.skipped is not None:
            continue
        out, walls = timings[name]
        if isinstance(out, BaseException):
            rec.skipped = _failure(out)
            continue
        runner.finish(rec, first, out, walls)
        rec.timing = timing
        rec.speedup = oracle.wall_s / rec.wall_s if rec.wall_s > 0 else None
        outcomes[name] = out
    return records, outcomes


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = print) -> BenchResult:
    """Run every selected solver at every chain length; see :class:`BenchConfig`."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    # every run's x0 is checked against the sequential x0: no TF32 (cuDNN convolutions default to it)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model, scheduler, model_info = load_model(cfg, device)
    model_conf = dict(scheduler.config)
    sched_conf = scheduler_config(cfg.scheduler, model_conf, cfg.clip_sample)
    model = chain_model(cfg.scheduler, model, model_conf)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_T = torch.randn((cfg.batch, *model_info["sample_shape"]), generator=gen).to(device, _DTYPES[cfg.dtype])
    env = environment(device)
    log(f"deqkern bench on {env.get('gpu', env['device'])} ({env['threads']} threads), model: {model_info['source']}")

    quality_fn = _quality_fn(model_info, device)
    quality: dict[str, Any] = {}
    if quality_fn is not None:
        quality["noise"] = quality_fn(x_T)
    records: list[RunRecord] = []
    schedules: dict[int, dict[str, Any]] = {}
    samples: dict[int, dict[str, torch.Tensor]] = {}
    solvers = [s for s in cfg.solvers if s != "sequential"]
    sweeps = cfg.repeats if cfg.warmup else 0
    bar = _bar(cfg.progress, len(cfg.steps) * (1 + len(solvers) + sweeps))
    with torch.no_grad():
        for steps in cfg.steps:
            _postfix(bar, f"S={steps} sequential")
            case, first_oracle_wall = make_case(cfg, model, sched_conf, steps, x_T, model_conf)
            schedules[steps] = dict(schedule_summary(case.schedule))
            chain_records, outcomes = run_chain(cfg, _Runner(cfg, model, sched_conf, case), solvers,
                                                first_oracle_wall, bar)
            records += chain_records
            samples[steps] = {"x_T": case.x_T.cpu(), "sequential": case.reference.cpu()}
            if quality_fn is not None:
                quality[str(steps)] = {"sequential": quality_fn(case.reference)}
            if BEST in outcomes:
                samples[steps]["best"] = outcomes[BEST].x0.cpu()
                if quality_fn is not None:
                    quality[str(steps)][BEST] = quality_fn(outcomes[BEST].x0)
    if bar is not None:
        bar.close()
    return BenchResult(cfg, env, model_info, schedules, quality, records, samples, gpu_prediction(cfg, records))


def gpu_prediction(cfg: BenchConfig, records: list[RunRecord]) -> dict[int, dict[str, Any]]:
    """Per S, :func:`deqkern.autowindow.predicted_gpu_speedup` at batch 1 with the rounds model
    refitted on this run's parallel solves of the best setting (full window and ``-win``)."""
    from deqkern.autowindow import PRIOR, fit_rounds, predicted_gpu_speedup

    points = [(r.steps / r.window, r.rounds) for r in records
              if r.solver in (BEST, f"{BEST}-win") and r.rounds is not None and isinstance(r.window, int)]
    rounds = fit_rounds(points, PRIOR)
    return {s: predicted_gpu_speedup(s, rounds, max_iters=cfg.max_iters) for s in cfg.steps}


def _paradigms_window(cfg: BenchConfig) -> int:
    return PARADIGMS_PARALLEL if cfg.window == "auto" else cfg.window


def _quality_fn(model_info: dict[str, Any], device: torch.device) -> Callable[[torch.Tensor], dict] | None:
    """``digits_quality`` with the shipped classifier, for the embedded digits model only."""
    if not model_info["digits"]:
        return None
    from deqkern.models import digits_quality, load_digits_classifier

    classifier = load_digits_classifier(device)
    return lambda images: digits_quality(images.float(), classifier=classifier)


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="bench", unit="run")


def _postfix(bar, text: str) -> None:
    if bar is not None:
        bar.set_postfix_str(text)


def _advance(bar) -> None:
    if bar is not None:
        bar.update(1)
