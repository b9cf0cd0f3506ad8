"""CPU studies behind the solver numbers of bench/results/README.md; each writes a JSON report to bench/results/.

    python bench/solver_studies.py adjoint-vjp     # exact-gradient backward: time and peak memory per VJP mode
    python bench/solver_studies.py half-precision  # fp16/bf16 models: tolerance floor, rounds and x0 error vs fp32
    python bench/solver_studies.py guided-half     # fp16/bf16 models under guidance: floor per scale, rounds
    python bench/solver_studies.py ops-per-round   # ATen ops of one fixed-shape round outside the model
    python bench/solver_studies.py stopping-rule   # x0 error at the solver's own stop against tol, many batches
    python bench/solver_studies.py stopping-x0     # the x0 rule against the relative rule: x0 error and rounds
    python bench/solver_studies.py tail-chunks     # fixed-shape rounds: model batches run past convergence, syncs
    python bench/solver_studies.py divergence      # the divergence guard's growth window: false alarms, rounds
    python bench/solver_studies.py multistep-rounds  # DPM-Solver++(2M) against DDIM: rounds to x0 within tol
    python bench/solver_studies.py multistep-excess  # the second-order recurrence's excess: per config, cost
    python bench/solver_studies.py euler-coords    # Euler chains in VP against VE coordinates, against DDIM/DDPM
    python bench/solver_studies.py budget          # the x0 rule's measured secants: rounds vs ParaDiGMS, safety
    python bench/solver_studies.py lend            # what rows without a secant borrow: triangle vs measured lend
    python bench/solver_studies.py entering        # rows entering a window: copy, linear, model output held
    python bench/solver_studies.py floors          # how few rounds are possible: exact Newton, entering-row errors
    python bench/solver_studies.py direction       # the x0 rule's direction lean on rows back from a long move
    python bench/solver_studies.py past-charge     # the x0 rule's charge for the chain past a sliding window

All on the embedded digits model, one CPU thread. ``--quick`` shrinks each study to seconds (the
test suite runs it so the command lines stay true).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

import deqkern

RESULTS = Path(__file__).resolve().parent / "results"


def _digits(scheduler: str = "ddim", clip: bool = False):
    """The digits UNet and its scheduler (DDIM or DDPM) with x0 clipping on or off."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from deqkern.models import load_digits_model

    unet, sched = load_digits_model()
    cls = DDIMScheduler if scheduler == "ddim" else DDPMScheduler
    return unet, cls.from_config(sched.config, clip_sample=clip)


def _digits_chain(sched, scheduler: str, steps: int, clip: bool = False, options: dict[str, Any] | None = None):
    """``(schedule, x_T, noise)`` of the bench's chain ``scheduler`` (deqkern.bench.chains) on the
    digits model's config ``sched``, ``clip_sample`` and scheduler ``options`` applied: batch 8,
    seed 0, the step noise drawn after x_T (None on a deterministic chain)."""
    from deqkern.bench.chains import build_chain, scheduler_config

    conf = {**scheduler_config(scheduler, dict(sched.config), clip_sample=clip), **(options or {})}
    g = torch.Generator().manual_seed(0)
    schedule, x = build_chain(scheduler, conf, dict(sched.config), steps, 0.0, torch.randn(8, 1, 8, 8, generator=g))
    return schedule, x, torch.randn(steps, 8, 1, 8, 8, generator=g) if schedule.is_stochastic else None


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def adjoint_once(steps: int, vjp: str, window: int | None) -> dict[str, Any]:
    """One forward and one exact-gradient backward (batch 4, adjoint tol 1e-3) in this process."""
    from deqkern.inversion import ImplicitStats, sample_with_implicit_grad

    unet, sched = _digits()
    schedule = deqkern.Schedule.from_diffusers(sched, steps)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
    target = 0.5 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    stats = ImplicitStats()
    x0 = sample_with_implicit_grad(unet, x, schedule, grad_options={"vjp": vjp, "window": window, "tol": 1e-3},
                                   stats=stats)
    before = _peak_rss_mb()
    ((x0 - target) ** 2).sum().backward()
    return {
        "steps": steps, "vjp": vjp, "window": window, "backward_s": stats.backward_time,
        "adjoint_rounds": stats.backward_rounds, "vjp_rows": stats.backward_evals,
        "peak_rss_after_forward_mb": before, "peak_rss_mb": _peak_rss_mb(),
    }


def adjoint_vjp(quick: bool) -> dict[str, Any]:
    """Each VJP mode in its own process, so each peak memory is its own."""
    steps = 6 if quick else 100
    modes = [("stored", None), ("recompute", None), ("recompute", 25), ("recompute", 10)]
    rows = []
    # without the Triton interpreter (a test process turns it on for its kernel tests): on a CPU the
    # children time the reference ops, as a user's run does; a GPU never sets it
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for vjp, window in modes:
        cmd = [sys.executable, __file__, "_adjoint-once", str(steps), vjp, str(window or 0)]
        rows.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout))
    for r in rows:
        print(f"S={r['steps']} vjp={r['vjp']:<9} window={r['window'] or 'S':<4} backward {r['backward_s']:.2f} s  "
              f"rounds {r['adjoint_rounds']:>3}  VJP rows {r['vjp_rows']:>5}  "
              f"peak +{r['peak_rss_mb'] - r['peak_rss_after_forward_mb']:.0f} MB over the forward's")
    return {"what": "exact implicit gradient, one backward pass, digits model, batch 4", "rows": rows}


#: The solvers the studies run, by the label their reports use; each study's keywords override them.
SOLVERS: dict[str, deqkern.SolveConfig] = {
    "picard": deqkern.SolveConfig("picard"),
    "anderson-tri": deqkern.SolveConfig("anderson", {"mixing": "triangular"}),
    "picard-secant": deqkern.SolveConfig("picard", form="secant"),
    "anderson-tri-secant": deqkern.SolveConfig("anderson", {"mixing": "triangular"}, form="secant"),
}


class _CountedKernel:
    """A Triton kernel whose launches (``kernel[grid](...)``) are counted."""

    def __init__(self, kernel: Any, name: str, counts: dict[str, int]) -> None:
        self.kernel, self.name, self.counts = kernel, name, counts

    def __getitem__(self, grid: Any) -> Any:
        self.counts[self.name] = self.counts.get(self.name, 0) + 1
        return self.kernel[grid]


def ops_once(quick: bool) -> list[dict[str, Any]]:
    """This process's backend (Triton when TRITON_INTERPRET was set at import): per solver and
    window, one fixed-shape round with a free "model": its ATen ops and those that launch a kernel
    (the capture audit's counts) and its Triton launches (one static round, counted)."""
    from deqkern.ops import backend_for

    backend = backend_for(torch.empty(0))
    launches: dict[str, int] = {}
    if backend == "triton":
        from deqkern.kernels import KERNEL_MODULES

        for module in KERNEL_MODULES:
            mod, name = importlib.import_module(f"deqkern.kernels.{module}"), f"_{module}_kernel"
            setattr(mod, name, _CountedKernel(getattr(mod, name), name, launches))
    steps = 8 if quick else 100
    schedule = deqkern.Schedule.from_diffusers(_digits()[1], steps)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rows = []
    for window in sorted({steps, min(10, steps)}, reverse=True):
        for name, config in SOLVERS.items():
            audited = deqkern.ParallelSampler(lambda a, t: a, schedule, window=window, max_iters=2, execution="audit",
                                              rounds_per_graph=1, config=config)(x).info
            launches.clear()
            deqkern.ParallelSampler(lambda a, t: a, schedule, window=window, max_iters=1, execution="static",
                                    rounds_per_graph=1, config=config)(x)
            rows.append({"backend": backend, "solver": name, "window": window, "aten_ops": audited["ops_per_chunk"],
                         "kernel_ops": audited["kernel_ops_per_chunk"], "triton_launches": sum(launches.values())})
    return rows


def ops_per_round(quick: bool) -> dict[str, Any]:
    """The work of one fixed-shape round outside the model, on both backends (each in a child
    process: the backend is chosen when deqkern is imported): ATen ops, the ATen ops that launch
    a kernel (on a GPU, each a node of the round's graph) and the Triton launches. The Triton
    backend runs under the CPU interpreter here; its counts are those of a GPU round."""
    rows = []
    for backend in ("reference", "triton"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if backend == "triton":
            env["TRITON_INTERPRET"] = "1"
        proc = subprocess.run([sys.executable, __file__, "_ops-once", str(int(quick))], capture_output=True, text=True,
                              env=env, check=True)
        rows.extend(json.loads(proc.stdout.strip().splitlines()[-1]))
    for r in rows:
        print(f"S={8 if quick else 100} W={r['window']:<4} {r['backend']:<9} {r['solver']:<20} {r['aten_ops']:>4} ATen "
              f"ops, {r['kernel_ops']:>4} launch a kernel, + {r['triton_launches']} Triton launches per round")
    return {"what": "one fixed-shape round outside the model, batch 1, 3x32x32 latents", "steps": 8 if quick else 100,
            "rows": rows}


def stopping_rule(quick: bool) -> dict[str, Any]:
    """How far the worst sample's x0 is from the sequential x0 when the solver stops, in units of
    ``tol`` (the per-row relative stopping test bounds residuals, not this error)."""
    steps, seeds, tol = (6, 2, 1e-4) if quick else (25, 20, 1e-4)
    rows = []
    for clip in (False, True):
        unet, sched = _digits(clip=clip)
        schedule = deqkern.Schedule.from_diffusers(sched, steps)
        for form in ("drift", "secant"):
            ratios = []
            for seed in range(seeds):
                x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
                with torch.no_grad():
                    ref = deqkern.sample_sequential(unet, x, schedule, execution="eager").x0.flatten(1)
                    x0 = deqkern.sample(unet, x, schedule, "picard", tol=tol, form=form, execution="eager").x0.flatten(1)
                ratios.append(float(((x0 - ref).norm(dim=1) / ref.norm(dim=1)).max()) / tol)
            rows.append({"clip": clip, "form": form, "worst_error_over_tol": ratios})
            over = sum(r > 1 for r in ratios)
            print(f"clip={clip!s:<5} {form:<6} batches with a sample above tol: {over}/{seeds}, "
                  f"worst {max(ratios):.2f} x tol, median {sorted(ratios)[len(ratios) // 2]:.2f} x tol")
    return {"what": "Picard, DDIM, batch 8, one batch per seed: worst sample's x0 error at stop / tol",
            "steps": steps, "tol": tol, "rows": rows}


def stopping_x0(quick: bool) -> dict[str, Any]:
    """The ``x0`` stopping rule against ``relative`` at the same ``tol``, on issue 14's chains
    (DDIM S = 100 full window and window 10, DDPM S = 100, DDIM S = 1000 window 10) with the
    default solver: the worst sample's x0 error at the stop in units of ``tol``, the rounds, and
    the model evaluations of eager execution (live rows only)."""
    chains = [("ddim", 6, None, "picard", 1)] if quick else [
        ("ddim", 100, None, "anderson-tri", 2), ("ddim", 100, 10, "anderson-tri", 2),
        ("ddpm", 100, None, "anderson-tri", 2), ("ddim", 1000, 10, "anderson-tri", 1),
    ]
    rules = [("relative", 1e-3), ("x0", 1e-3)]
    rows = []
    for scheduler, steps, window, solver, seeds in chains:
        unet, sched = _digits(scheduler)
        schedule = deqkern.Schedule.from_diffusers(sched, steps)
        runs = {rule: [] for rule in rules}
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(8, 1, 8, 8, generator=g)
            noise = torch.randn(steps, 8, 1, 8, 8, generator=g) if scheduler == "ddpm" else None
            with torch.no_grad():
                ref = deqkern.sample_sequential(unet, x, schedule, noise, execution="eager").x0.flatten(1)
                for stop, tol in rules:
                    r = deqkern.sample(unet, x, schedule, tol=tol, stop=stop, window=window, noise=noise,
                                       execution="eager", config=SOLVERS[solver])
                    err = float(((r.x0.flatten(1) - ref).norm(dim=1) / ref.norm(dim=1)).max())
                    runs[(stop, tol)].append((err / tol, r.rounds, r.model_evals))
        for (stop, tol), got in runs.items():
            ratios, rounds, evals = zip(*got)
            rows.append({"scheduler": scheduler, "steps": steps, "window": window, "solver": solver, "stop": stop,
                         "tol": tol, "worst_error_over_tol": list(ratios),
                         "rounds": list(rounds), "eager_model_evals": list(evals)})
            print(f"{scheduler} S={steps:<4} W={window or 'S':<3} {rows[-1]['solver']:<12} {stop:<8} tol {tol:g}: "
                  f"worst x0 error {max(ratios):5.2f} x tol (above tol in {sum(r > 1 for r in ratios)}/{seeds}), "
                  f"rounds mean {sum(rounds) / seeds:5.1f} max {max(rounds):>3}, eager evals {sum(evals) / seeds:.0f}")
    return {"what": "batch 8, one batch per seed: worst sample's x0 error at the stop / tol, rounds, eager model "
                    "evaluations", "rows": rows}


def _secant_check(unet, schedule, x: torch.Tensor, window: int | None, rounds: int, lent: bool = False,
                  first: int = 0) -> list[float]:
    """For every row the x0 rule freezes (but the last) in rounds ``first .. rounds - 1``, the true
    ``||(J - L) F|| / ||F||`` of the step after it (central differences of the step, float64 model)
    over the ``dev`` the rule used: rows with a secant of their own, or with ``lent`` the rows that
    borrowed it (:meth:`deqkern.engine.StepSecants.rule_dev`)."""
    import copy

    import deqkern.engine as engine
    from deqkern.ops.window import step_rows

    unet64 = copy.deepcopy(unet).double()
    seen: dict[str, Any] = {}
    ratios: list[float] = []
    run_round, measure, status = engine.run_round, engine.StepSecants.measure, engine.round_status

    def step(pos: int, v: torch.Tensor) -> torch.Tensor:
        out = unet64(v.view(1, *x.shape[1:]), schedule.timesteps[pos:pos + 1]).sample.reshape(1, -1)
        return step_rows(v.view(1, -1), out, None, seen["p"].coef[pos].view(1, 7).double(), schedule.transform)[0]

    def spy_round(p, st, *a, **k):
        seen["p"] = p
        return run_round(p, st, *a, **k)

    def spy_measure(self, xw, g, coef, live, *rest):
        seen.update(xw=xw.clone(), g=g.clone(), mult=coef[..., 0].clone())
        moves = measure(self, xw, g, coef, live, *rest)
        seen["own"] = torch.isfinite(self.dev)
        return moves

    def spy_status(*args, **kw):
        k0, rnd, dev = args[5], int(args[6]), args[15].clone()
        delta = status(*args, **kw)
        for b in range(k0.shape[0] if first <= rnd < rounds else 0):
            for j in range(int(delta[b]) - 1):
                if not math.isfinite(float(dev[b, j + 1])) or bool(seen["own"][b, j + 1]) == lent:
                    continue
                xin, pos = seen["xw"][b, j + 1].double(), int(k0[b]) + j + 1
                f = seen["g"][b, j].double() - xin
                h = 1e-5 * float(xin.norm()) / float(f.norm())
                jf = (step(pos, xin + h * f) - step(pos, xin - h * f)) / (2 * h)
                true = float((jf - float(seen["mult"][b, j + 1]) * f).norm() / f.norm())
                ratios.append(true / float(dev[b, j + 1]))
        return delta

    engine.run_round, engine.StepSecants.measure, engine.round_status = spy_round, spy_measure, spy_status
    try:
        with torch.no_grad():
            deqkern.sample(unet, x, schedule, window=window, execution="eager")
    finally:
        engine.run_round, engine.StepSecants.measure, engine.round_status = run_round, measure, status
    return ratios


def _ratio_summary(chain: str, ratios: list[float]) -> dict[str, Any]:
    """What the secant checks report: the chain, how many rows, the median and largest ratio."""
    ratios = sorted(ratios)
    return {"chain": chain, "rows": len(ratios), "max": ratios[-1] if ratios else None,
            "median": ratios[len(ratios) // 2] if ratios else None}


def budget(quick: bool) -> dict[str, Any]:
    """The x0 rule with measured step secants (issue 14): on issue 14's chains with the library's
    defaults (stop="x0", tol 1e-3), the rounds and the worst sample's x0 error over tol, against
    ParaDiGMS at its published tolerance (0.1) on the same noise; and the secant check behind
    ``SECANT_SAFETY``: the true ``||(J - L) F|| / ||F||`` of the frozen rows over their secant."""
    from deqkern.bench.peers import run_paradigms

    chains = [("ddim", 6, None)] if quick else [
        ("ddim", 100, None), ("ddim", 100, 10), ("ddim", 100, 25), ("ddpm", 100, None), ("ddim", 1000, 10),
        ("ddim", 1000, None)]
    rows = []
    for scheduler, steps, window in chains:
        unet, sched = _digits(scheduler)
        schedule = deqkern.Schedule.from_diffusers(sched, steps)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 1, 8, 8, generator=g)
        noise = torch.randn(steps, 8, 1, 8, 8, generator=g) if scheduler == "ddpm" else None
        with torch.no_grad():
            ref = deqkern.sample_sequential(unet, x, schedule, noise, execution="eager").x0.flatten(1)
            ours = deqkern.sample(unet, x, schedule, window=window, noise=noise, execution="eager")
            peer = run_paradigms(unet, dict(sched.config), scheduler, schedule, x, noise, parallel=window or steps)
        err = lambda x0: float(((x0.flatten(1) - ref).norm(dim=1) / ref.norm(dim=1)).max())  # noqa: E731
        rows.append({"scheduler": scheduler, "steps": steps, "window": window, "rounds": ours.rounds,
                     "worst_error_over_tol": err(ours.x0) / 1e-3, "paradigms_rounds": peer.rounds,
                     "paradigms_worst_error": err(peer.x0)})
        print(f"{scheduler} S={steps:<4} W={window or 'S':<3}: rounds {ours.rounds:>3} (x0 error "
              f"{rows[-1]['worst_error_over_tol']:.2f} tol), ParaDiGMS 0.1 {peer.rounds:>3} (error "
              f"{rows[-1]['paradigms_worst_error']:.1e})")
    unet, sched = _digits()
    steps, window = (8, None) if quick else (100, 10)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ratios = _secant_check(unet, deqkern.Schedule.from_diffusers(sched, steps), x, window, 8 if quick else 40)
    check = _ratio_summary(f"ddim S={steps} W={window or steps}, batch 2, first 40 rounds", ratios)
    print(f"secant check: true ||(J - L)F||/||F|| over dev: median {check['median']}, max {check['max']} "
          f"({len(ratios)} frozen rows)")
    return {"what": "library defaults, batch 8, seed 0: rounds and worst x0 error / tol; ParaDiGMS (tol 0.1, "
                    "window = ours or S) rounds and worst x0 error", "command": "python bench/solver_studies.py budget",
            "rows": rows, "secant_check": check}


def tail_chunks(quick: bool) -> dict[str, Any]:
    """Fixed-shape rounds in chunks of K end at one host sync each, so the last chunk can run up
    to K-1 full model batches past convergence; ``deqkern.engine.run_static`` switches to
    one-round chunks once the worst live row is within ``TAIL_FACTOR`` of its stopping test.
    Per chain, solver and stopping rule: rounds, model batches executed and host syncs for whole
    chunks (factor 0), factors 10, 100 (the default) and 1000, and one-round chunks (K = 1)."""
    import deqkern.engine as engine

    chains = [("ddim", 6)] if quick else [("ddim", 25), ("ddim", 100), ("ddpm", 25), ("ddpm", 100)]
    solvers = ["picard"] if quick else ["picard", "anderson-tri"]
    rules = [("x0", 1e-4), ("relative", 1e-4), ("noise", 0.1)]
    settings = [(4, 0.0), (4, 10.0), (4, 100.0), (4, 1000.0), (1, 100.0)]
    default = engine.TAIL_FACTOR
    rows = []
    try:
        for scheduler, steps in chains:
            unet, sched = _digits(scheduler)
            schedule = deqkern.Schedule.from_diffusers(sched, steps)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(8, 1, 8, 8, generator=g)
            noise = torch.randn(steps, 8, 1, 8, 8, generator=g) if scheduler == "ddpm" else None
            for solver in solvers:
                for stop, tol in rules:
                    cells = []
                    for k, factor in settings:
                        engine.TAIL_FACTOR = factor
                        with torch.no_grad():
                            r = deqkern.sample(unet, x, schedule, noise=noise, tol=tol, stop=stop, execution="static",
                                               rounds_per_graph=k, config=SOLVERS[solver])
                        executed, tail = r.info["rounds_executed"], r.info["tail_chunks"]
                        cells.append({"rounds_per_graph": k, "tail_factor": factor, "rounds": r.rounds,
                                      "executed": executed, "syncs": (executed - tail) // k + tail})
                    rows.append({"scheduler": scheduler, "steps": steps, "solver": solver, "stop": stop, "tol": tol,
                                 "settings": cells})
                    print(f"{scheduler} S={steps:<4} {solver:<12} {stop:<8} rounds {cells[0]['rounds']:>3}: " + "  ".join(
                        f"K={c['rounds_per_graph']} x{c['tail_factor']:g} {c['executed']} exec/{c['syncs']} syncs"
                        for c in cells))
    finally:
        engine.TAIL_FACTOR = default
    return {"what": "static (CUDA-graph) rounds, batch 8, window S: model batches executed and host syncs per chunk "
                    "setting", "rows": rows}


def _x0_errs(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per sample, the relative x0 error ``||a - b|| / ||b||``, in float64."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return ((a - b).norm(dim=1) / b.norm(dim=1)).tolist()


def _x0_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """The worst sample's relative x0 error."""
    return max(_x0_errs(a, b))


def _round_up_125(v: float) -> float:
    """The least of 1, 2, 5 x 10^k at or above ``v``."""
    k = math.floor(math.log10(v))
    return next(m * 10.0**k for m in (1, 2, 5, 10) if m * 10.0**k >= v * (1 - 1e-9))


def _half_floor(unet: torch.nn.Module, dtype: torch.dtype, steps: int, batch: int, seed: int) -> dict[str, Any]:
    """Per sample, what separates two sequential runs of the same samples with the model in
    ``dtype`` (the latents fp32): batched together vs one sample per call (the GEMMs round
    differently), x_T moved by 4 float32 ulps (the model rounds its input to ``dtype``: rows equal
    to float32 are not equal to it), and rounding the float32 x0 to ``dtype`` (what a half ``x_T``
    gets back)."""
    schedule = deqkern.Schedule.from_diffusers(_digits()[1], steps)
    x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(1000 * steps + seed))
    seq = deqkern.SequentialSampler(unet, schedule, model_dtype=dtype, execution="eager")
    with torch.no_grad():
        ref = seq(x).x0
        alone = torch.cat([seq(x[i : i + 1]).x0 for i in range(batch)])
        moved = seq(x * (1 + 4 * torch.finfo(torch.float32).eps)).x0
    return {"batch_composition": _x0_errs(alone, ref), "input_ulps": _x0_errs(moved, ref),
            "output_cast": _x0_errs(ref.to(dtype), ref)}


#: The share of samples whose two runs must agree within the floor: the rest are chains that
#: amplify the model's rounding far beyond it (the study reports their max), which no tolerance of
#: a half model can hold.
FLOOR_QUANTILE = 0.9

#: ``deqkern.ops.reference.MODEL_ROUNDING`` values the study compares (0: every residual charged)
ROUNDING_SWEEP = (0.0, 0.25, 0.5, 1.0)


def _model_rounding(unet: torch.nn.Module, dtype: torch.dtype, steps: int, seed: int) -> list[float]:
    """Per (sample, step): what the model in ``dtype`` answers to a move of 1e-3 of its input
    beyond what float32 answers, ``||de_half - de_fp32|| / (eps ||e_fp32||)``: its rounding in
    units of the dtype's eps times its output, what ``MODEL_ROUNDING`` stands for."""
    fp32, sched = _digits()
    schedule = deqkern.Schedule.from_diffusers(sched, steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 1, 8, 8, generator=g)
    eps, out = torch.finfo(dtype).eps, []
    with torch.no_grad():
        for t in schedule.timesteps[:: max(1, steps // 5)].tolist():
            tt = torch.full((x.shape[0],), t)
            d = torch.randn(x.shape, generator=g)
            d *= 1e-3 * x.flatten(1).norm(dim=1).view(-1, 1, 1, 1) / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            e32 = fp32(x, tt).sample.double()
            de32 = fp32(x + d, tt).sample.double() - e32
            de = unet((x + d).to(dtype), tt).sample.double() - unet(x.to(dtype), tt).sample.double()
            out += ((de - de32).flatten(1).norm(dim=1) / (eps * e32.flatten(1).norm(dim=1))).tolist()
    return out


def _parallel_errs(unet: torch.nn.Module, dtype: torch.dtype, steps: int, batch: int, seed: int, tol: float,
                   solver: str) -> tuple[int, list[float]]:
    """``(rounds, per-sample x0 error / tol)`` of a parallel solve at ``tol`` against the
    same-dtype sequential sampler (the model in ``dtype``, x_T float32)."""
    schedule = deqkern.Schedule.from_diffusers(_digits()[1], steps)
    x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(2000 * steps + seed))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tol below the floor warns: this study measures it
        seq = deqkern.sample_sequential(unet, x, schedule, model_dtype=dtype, execution="eager").x0
        r = deqkern.sample(unet, x, schedule, tol=tol, model_dtype=dtype, execution="eager", config=SOLVERS[solver])
    return r.rounds, [e / tol for e in _x0_errs(r.x0, seq)]


def _quantile(v: list[float], q: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))]


def half_precision(quick: bool) -> dict[str, Any]:
    """Half-precision models (latents and solver state float32, model in fp16/bf16).

    1. The model's rounding (:func:`_model_rounding`; ``deqkern.ops.reference.MODEL_ROUNDING``).
    2. The tolerance floor per dtype (``deqkern.sampling.HALF_TOL_FLOOR``): per sample the worst
       of :func:`_half_floor`'s sequential-vs-sequential differences, their ``FLOOR_QUANTILE``
       over samples, rounded up to 1, 2 or 5 x 10^k; then raised to the next such value until a
       parallel solve at it (Picard and triangular Anderson, the floor's chains) lands within it
       in that share of the samples (the x0 rule leaves the residual of the model's rounding
       uncharged, which adds about one more such difference).
    3. ``MODEL_ROUNDING`` swept (``ROUNDING_SWEEP``): rounds and x0 error / tol at the floor and
       at ten times it, DDIM S = 100.
    4. Rounds and the worst x0 error against the same-dtype and the float32 sequential x0, per
       chain length and solver, at tol 1e-3 (the default), at the floor and at ten times it.

    x_T is float32 (``model_dtype``): errors are the solve's, not x0's cast."""
    from deqkern.ops import reference

    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    chains = [(4, 2)] if quick else [(25, 2), (100, 1)]
    solvers = ["picard"] if quick else ["picard", "anderson-tri"]
    floor_chains, floor_seeds, floor_batch = ([4], 1, 2) if quick else ([25, 50], 5, 4)
    floors, floor_of, rows, rounding, sweep, checks = [], {}, [], {}, [], []
    models = {dt: _digits()[0].to(dt) for dt in dtypes}
    for dt in dtypes[1:]:
        units = _model_rounding(models[dt], dt, 4 if quick else 100, 0)
        rounding[str(dt)] = {"median": _quantile(units, 0.5), "max": max(units)}
        print(f"{dt} rounding: median {rounding[str(dt)]['median']:.2f} eps ||e||, max {max(units):.2f} "
              f"(MODEL_ROUNDING {reference.MODEL_ROUNDING:g})", flush=True)
    for dt in dtypes[1:]:
        per_sample = []
        for steps in floor_chains:
            for seed in range(floor_seeds):
                f = _half_floor(models[dt], dt, steps, floor_batch, seed)
                floors.append({"dtype": str(dt), "steps": steps, "seed": seed, **f})
                per_sample += [max(v) for v in zip(*f.values())]
                print(f"floor {dt} S={steps} seed {seed}: worst sample: batch composition "
                      f"{max(f['batch_composition']):.2e}, 4 fp32 ulps of x_T {max(f['input_ulps']):.2e}, x0 cast "
                      f"{max(f['output_cast']):.2e}", flush=True)
        q = _quantile(per_sample, FLOOR_QUANTILE)
        floor = _round_up_125(q)
        print(f"{dt}: {len(per_sample)} samples, median {_quantile(per_sample, 0.5):.2e}, "
              f"quantile {FLOOR_QUANTILE} {q:.2e}, max {max(per_sample):.2e}: sequential floor {floor:g}", flush=True)
        while True:
            ratios = []
            for steps in floor_chains:
                for solver in solvers:
                    for seed in range(max(1, floor_seeds // 2)):
                        ratios += _parallel_errs(models[dt], dt, steps, 2 * floor_batch, seed, floor, solver)[1]
            checks.append({"dtype": str(dt), "tol": floor, "quantile": _quantile(ratios, FLOOR_QUANTILE),
                           "max": max(ratios), "samples": len(ratios)})
            print(f"{dt} parallel at tol {floor:g}: {len(ratios)} samples, x0 error / tol quantile "
                  f"{FLOOR_QUANTILE} {checks[-1]['quantile']:.2f}, max {max(ratios):.2f}", flush=True)
            if checks[-1]["quantile"] <= 1:
                break
            floor = _round_up_125(floor * 1.01)
        floor_of[str(dt)] = floor
    default_rounding = reference.MODEL_ROUNDING
    try:
        for kappa in ROUNDING_SWEEP:
            reference.MODEL_ROUNDING = kappa
            for dt in dtypes[1:]:
                for tol in (floor_of[str(dt)], 10 * floor_of[str(dt)]):
                    steps = 4 if quick else 100
                    n, ratios = _parallel_errs(models[dt], dt, steps, 2 if quick else 4, 0, tol, "anderson-tri")
                    sweep.append({"model_rounding": kappa, "dtype": str(dt), "steps": steps, "tol": tol, "rounds": n,
                                  "max_err_over_tol": max(ratios)})
                    print(f"MODEL_ROUNDING {kappa:g} {dt} S={steps} tol {tol:g}: rounds {n}, worst x0 error "
                          f"{max(ratios):.2f} tol", flush=True)
    finally:
        reference.MODEL_ROUNDING = default_rounding
    for steps, batch in chains:
        schedule = deqkern.Schedule.from_diffusers(_digits()[1], steps)
        x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            seq = {dt: deqkern.sample_sequential(models[dt], x, schedule, model_dtype=dt, execution="eager").x0
                   for dt in dtypes}
        for dt in dtypes:
            # the default, the floor and ten times it (at the floor the rule cannot tell the model's
            # rounding from error: docs/math.md §4.3, half-precision models)
            floor = floor_of.get(str(dt))
            tols = sorted({1e-3} if floor is None else {1e-3, floor, 10 * floor})
            for solver in solvers:
                for tol in tols:
                    with torch.no_grad(), warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # the below-floor warning: this study measures it
                        r = deqkern.sample(models[dt], x, schedule, tol=tol, model_dtype=dt, execution="eager",
                                           config=SOLVERS[solver])
                    rows.append({"dtype": str(dt), "steps": steps, "batch": batch, "solver": solver, "tol": tol,
                                 "rounds": r.rounds, "converged": r.all_converged,
                                 "x0_err_vs_same_dtype_seq": _x0_err(r.x0, seq[dt]),
                                 "x0_err_vs_fp32_seq": _x0_err(r.x0, seq[torch.float32])})
                    w = rows[-1]
                    print(f"S={steps:<4} {str(dt):<15} {solver:<12} tol {tol:g}: rounds {r.rounds:>3} converged "
                          f"{r.all_converged!s:<5} x0 err vs same-dtype seq {w['x0_err_vs_same_dtype_seq']:.2e}, vs "
                          f"fp32 seq {w['x0_err_vs_fp32_seq']:.2e}", flush=True)
    return {"what": "digits model, DDIM, eager, x_T float32 with model_dtype; floor: sequential vs sequential, per "
                    "sample, raised until parallel solves hold it; model rounding in eps ||e||; rounds and worst x0 "
                    "error of one batch per chain", "floor_quantile": FLOOR_QUANTILE,
            "model_rounding": rounding, "floors": floors, "floor_checks": checks, "floor_per_dtype": floor_of,
            "rounding_sweep": sweep, "rows": rows}


class _DigitsCond(torch.nn.Module):
    """The digits UNet fed ``k * x``, ``k`` the per-sample conditioning (cond 1, uncond 0.97): the
    two halves of a guided call run different arithmetic and round independently, as two prompts
    through a text-conditioned UNet do."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.unet(x * k.to(x.dtype).view(-1, 1, 1, 1), t).sample


def _cfg(scale: float, batch: int) -> deqkern.Guidance:
    return deqkern.Guidance(scale=scale, cond={"k": torch.ones(batch)}, uncond={"k": torch.full((1,), 0.97)})


#: guidance scales the guided-half study compares (7.5: Stable Diffusion's default)
GUIDANCE_SCALES = (1.0, 3.0, 7.5)


def guided_half(quick: bool) -> dict[str, Any]:
    """Half-precision models under classifier-free guidance (``Guidance.rounding_scale`` and
    ``rounding_gain``; ``deqkern.sampling.tol_floor``).

    1. The floor: per guidance scale and dtype, per sample the larger of two sequential-vs-
       sequential differences of the guided chain (batched vs one sample per call; x_T moved by 4
       float32 ulps), their ``FLOOR_QUANTILE`` and max, and its ratio to scale 1's against
       ``rounding_gain``.
    2. Rounds and x0 error / tol (against the same-dtype guided sequential sampler) at the default
       tol, against the rule before guidance was accounted for: ``||e||`` of the guided output as
       the rounding scale and the unguided floor as tol (``before``), and each half alone.
    """
    from deqkern import model as model_module
    from deqkern.sampling import HALF_TOL_FLOOR, tol_floor

    dtypes = [torch.float16, torch.bfloat16]
    floor_steps, floor_seeds, floor_batch = (4, 1, 2) if quick else (25, 3, 4)
    chains = [(4, None, 2)] if quick else [(25, None, 4), (100, None, 2), (100, 10, 2)]
    unet32 = _digits()[0]
    floors, rows = [], []
    for dt in dtypes:
        model = _DigitsCond(_digits()[0].to(dt)).eval()
        schedule = deqkern.Schedule.from_diffusers(_digits()[1], floor_steps)
        for scale in GUIDANCE_SCALES:
            worst = []
            for seed in range(floor_seeds):
                x = torch.randn(floor_batch, 1, 8, 8, generator=torch.Generator().manual_seed(1000 * floor_steps + seed))
                run = lambda xx: deqkern.sample_sequential(  # noqa: E731
                    model, xx, schedule, model_dtype=dt, guidance=_cfg(scale, xx.shape[0]), execution="eager").x0
                with torch.no_grad():
                    ref = run(x)
                    alone = torch.cat([run(x[i : i + 1]) for i in range(floor_batch)])
                    moved = run(x * (1 + 4 * torch.finfo(torch.float32).eps))
                worst += [max(a, m) for a, m in zip(_x0_errs(alone, ref), _x0_errs(moved, ref))]
            floors.append({"dtype": str(dt), "scale": scale, "steps": floor_steps, "samples": len(worst),
                           "quantile": _quantile(worst, FLOOR_QUANTILE), "max": max(worst),
                           "rounding_gain": _cfg(scale, 1).rounding_gain, "tol_floor": tol_floor(dt, _cfg(scale, 1))})
            f = floors[-1]
            print(f"floor {dt} scale {scale:g}: quantile {FLOOR_QUANTILE} {f['quantile']:.2e}, max {f['max']:.2e}, "
                  f"rounding gain {f['rounding_gain']:.2f}, tol floor {f['tol_floor']:.2e}", flush=True)
    for f in floors:
        one = next(g for g in floors if g["dtype"] == f["dtype"] and g["scale"] == 1.0)
        f["quantile_over_scale_1"] = f["quantile"] / one["quantile"]
    norm_scale = lambda self, u, c: model_module.row_norms(self.combine(u, c))  # noqa: E731
    variants = {"now": (None, None), "before": (norm_scale, "unguided"), "only_scale": (None, "unguided"),
                "only_tol": (norm_scale, None)}
    for steps, window, batch in chains:
        schedule = deqkern.Schedule.from_diffusers(_digits()[1], steps)
        x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(120))
        for dt in [torch.float32, *dtypes]:
            model = _DigitsCond(unet32 if dt == torch.float32 else _digits()[0].to(dt)).eval()
            for scale in GUIDANCE_SCALES if steps <= 25 else (7.5,):
                g = _cfg(scale, batch)
                mdt = None if dt == torch.float32 else dt
                with torch.no_grad():
                    seq = deqkern.sample_sequential(model, x, schedule, model_dtype=mdt, guidance=g,
                                                    execution="eager").x0
                for name, (rounding_scale, tol_rule) in variants.items():
                    if dt == torch.float32 and name != "now":
                        continue  # a float32 model has no rounding floor
                    if (quick or steps > 25) and name in ("only_scale", "only_tol"):
                        continue  # each half alone: on the short chain
                    tol = HALF_TOL_FLOOR[dt] if tol_rule == "unguided" else None
                    saved = model_module.Guidance.rounding_scale
                    try:
                        if rounding_scale is not None:
                            model_module.Guidance.rounding_scale = rounding_scale
                        with torch.no_grad(), warnings.catch_warnings():
                            warnings.simplefilter("ignore")  # "before" runs below the floor: what it measures
                            r = deqkern.sample(model, x, schedule, window=window, tol=tol, model_dtype=mdt,
                                               guidance=g, execution="eager")
                    finally:
                        model_module.Guidance.rounding_scale = saved
                    ratios = [e / r.info["tol"] for e in _x0_errs(r.x0, seq)]
                    rows.append({"dtype": str(dt), "steps": steps, "window": window or steps, "batch": batch,
                                 "scale": scale, "variant": name, "tol": r.info["tol"], "rounds": r.rounds,
                                 "rounds_per_sample": list(r.rounds_per_sample), "converged": r.all_converged,
                                 "x0_err_over_tol": ratios})
                    print(f"S={steps:<4} W={window or steps:<4} {str(dt):<15} scale {scale:<4g} {name:<10} tol "
                          f"{r.info['tol']:.2e}: rounds {r.rounds:>3} {list(r.rounds_per_sample)}, x0 err / tol "
                          f"{', '.join(f'{v:.2f}' for v in ratios)}", flush=True)
    return {"what": "digits UNet fed k x (cond k = 1, uncond 0.97) under classifier-free guidance, DDIM, eager, x_T "
                    "float32 with model_dtype; floors: sequential vs sequential per sample; rows: one batch per "
                    "chain, x0 error / tol against the same-dtype guided sequential sampler",
            "floor_quantile": FLOOR_QUANTILE, "floors": floors, "rows": rows}


def _longest_growth(residuals: list[list[float]], b: int) -> int:
    """The longest run of rounds in which sample ``b``'s window residual grew."""
    best = run = 0
    for prev, cur in zip(residuals, residuals[1:]):
        run = run + 1 if cur[b] > prev[b] else 0  # NaN (inactive) compares False
        best = max(best, run)
    return best


def divergence(quick: bool) -> dict[str, Any]:
    """``deqkern.engine.DIVERGE_ROUNDS``: a sample whose window residual grows that many rounds in
    a row falls back to Picard steps from its frozen prefix (Picard solvers are not judged). On
    solves that converge, a fallback is a false alarm (it costs rounds). Per chain, solver and
    setting (2, 3 rounds; off): the samples that fell back, rounds, the worst x0 error against
    the sequential chain / tol, and (off) each sample's longest run of growing residuals."""
    import deqkern.engine as engine

    chains = [("ddim", 6)] if quick else [("ddim", 25), ("ddim", 100), ("ddpm", 25)]
    solvers = ["anderson-tri"] if quick else ["anderson-tri", "anderson-tri-secant"]
    settings = [3] if quick else [2, 3, None]
    seeds, tol = (1, 1e-3) if quick else (2, 1e-4)
    default = engine.DIVERGE_ROUNDS
    rows = []
    try:
        for scheduler, steps in chains:
            unet, sched = _digits(scheduler)
            schedule = deqkern.Schedule.from_diffusers(sched, steps)
            inputs = []
            for seed in range(seeds):
                g = torch.Generator().manual_seed(seed)
                x = torch.randn(8, 1, 8, 8, generator=g)
                noise = torch.randn(steps, 8, 1, 8, 8, generator=g) if scheduler == "ddpm" else None
                with torch.no_grad():
                    ref = deqkern.sample_sequential(unet, x, schedule, noise, execution="eager").x0.flatten(1)
                inputs.append((x, noise, ref))
            for solver in solvers:
                for setting in settings:
                    engine.DIVERGE_ROUNDS = setting if setting is not None else 2**62
                    fell, rounds, errs, streaks = [], [], [], []
                    for x, noise, ref in inputs:
                        with torch.no_grad():
                            r = deqkern.sample(unet, x, schedule, noise=noise, tol=tol, execution="eager",
                                               config=SOLVERS[solver])
                        fell.append(sum(d > 0 for d in r.info["diverged"]))
                        rounds.append(r.rounds)
                        errs.append(float(((r.x0.flatten(1) - ref).norm(dim=1) / ref.norm(dim=1)).max()) / tol)
                        streaks.append(max(_longest_growth(r.residuals, b) for b in range(x.shape[0])))
                    rows.append({"scheduler": scheduler, "steps": steps, "solver": solver, "diverge_rounds": setting,
                                 "samples_fallen_back": fell, "rounds": rounds, "worst_error_over_tol": errs,
                                 "longest_growth": streaks if setting is None else None})
                    print(f"{scheduler} S={steps:<4} {solver:<20} guard {setting or 'off'!s:<4}: fell back "
                          f"{sum(fell)}/{8 * seeds}, rounds {rounds}, worst x0 error {max(errs):.2f} x tol"
                          + (f", longest growth {max(streaks)} rounds" if setting is None else ""))
    finally:
        engine.DIVERGE_ROUNDS = default
    return {"what": f"eager, batch 8, window S, stop x0, tol {tol}, {seeds} seeds: samples that fell back (false "
                    "alarms: every solve converges), rounds, worst x0 error / tol, longest growth run (guard off)",
            "rows": rows}


def multistep_rounds(quick: bool) -> dict[str, Any]:
    """Rounds of the default solver (x0 rule, tol 1e-3) on DPM-Solver++(2M) against DDIM, the same
    digits model and config otherwise, at S = 25 and 100, full window and window 10: the worst
    sample's x0 error at the stop in units of ``tol`` and the rounds, batch 8, seed 0."""
    from diffusers import DPMSolverMultistepScheduler

    unet, ddim = _digits("ddim")
    chains = {"ddim": ddim, "dpm++2m": DPMSolverMultistepScheduler.from_config(ddim.config)}
    sizes = [(6, None)] if quick else [(25, None), (25, 10), (100, None), (100, 10)]
    tol, rows = 1e-3, []
    for steps, window in sizes:
        x = torch.randn(2 if quick else 8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        for name, sched in chains.items():
            schedule = deqkern.Schedule.from_diffusers(sched, steps)
            with torch.no_grad():
                ref = deqkern.sample_sequential(unet, x, schedule, execution="eager").x0
                r = deqkern.sample(unet, x, schedule, tol=tol, window=window, execution="eager")
            ratio = _x0_err(r.x0, ref) / tol
            rows.append({"scheduler": name, "steps": steps, "window": window, "tol": tol, "rounds": r.rounds,
                         "worst_error_over_tol": ratio, "converged": r.all_converged})
            print(f"{name:<8} S={steps:<4} W={window or 'S':<3} rounds {r.rounds:>3}, "
                  f"worst x0 error {ratio:5.2f} x tol")
    return {"what": "default solver and stopping rule (x0, tol 1e-3), batch 8, seed 0: rounds and the worst "
                    "sample's x0 error at the stop / tol, DDIM vs DPM-Solver++(2M) from the digits scheduler's "
                    "config",
            "rows": rows}


def euler_coords(quick: bool) -> dict[str, Any]:
    """Euler and Euler ancestral solved in VP coordinates (``Schedule.coords``: the drift form's
    ``L_k = c_{k+1} / c_k``, rows started and entering at x_T's VP latent) against the same chains
    with ``coords=None`` (the former ``L = 1`` in VE coordinates, every row at x_T), and DDIM / DDPM
    from the same config: Picard and the default solver, the default stopping rule (x0, tol 1e-3),
    S = 25 and 100, full window and window 10, batch 8, seed 0 (x_T times ``init_noise_sigma``
    for the Euler chains, the step noise drawn up front, seed 1)."""
    from dataclasses import replace

    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    unet, ddim = _digits("ddim")
    _, ddpm = _digits("ddpm")
    chains = {"ddim": ddim, "ddpm": ddpm, "euler": EulerDiscreteScheduler.from_config(ddim.config),
              "euler-a": EulerAncestralDiscreteScheduler.from_config(ddim.config)}
    sizes = [(6, None)] if quick else [(25, None), (25, 10), (100, None), (100, 10)]
    tol, batch, rows = 1e-3, 2 if quick else 8, []
    for steps, window in sizes:
        for name, sched in chains.items():
            schedule = deqkern.Schedule.from_diffusers(sched, steps)
            twin = type(sched).from_config(sched.config)
            twin.set_timesteps(steps)
            x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * float(twin.init_noise_sigma)
            noise = None
            if schedule.is_stochastic:
                noise = torch.randn(steps, *x.shape, generator=torch.Generator().manual_seed(1))
            variants = {"vp": schedule} if schedule.coords is None else {"vp": schedule,
                                                                          "ve": replace(schedule, coords=None)}
            with torch.no_grad():
                ref = deqkern.sample_sequential(unet, x, schedule, noise=noise, execution="eager").x0
                for coords, chain in variants.items():
                    for solver in ("picard", "anderson"):
                        r = deqkern.sample(unet, x, chain, solver=solver, tol=tol, window=window, noise=noise,
                                           execution="eager")
                        ratio = _x0_err(r.x0, ref) / tol
                        rows.append({"scheduler": name, "coords": coords, "solver": solver, "steps": steps,
                                     "window": window, "tol": tol, "rounds": r.rounds,
                                     "worst_error_over_tol": ratio, "converged": r.all_converged})
                        print(f"{name:<8} {coords} {solver:<8} S={steps:<4} W={window or 'S':<3} rounds "
                              f"{r.rounds:>3}, worst x0 error {ratio:5.2f} x tol")
    return {"command": "python bench/solver_studies.py euler-coords",
            "what": "rounds and the worst sample's x0 error at the stop / tol (x0 rule, tol 1e-3), batch 8, seed 0: "
                    "Euler / Euler ancestral in VP coordinates (coords 'vp', this solve) and in VE coordinates "
                    "(coords 've': L = 1, rows at x_T, the former solve), DDIM / DDPM from the digits config",
            "rows": rows}


def _triangle_rule_dev(self, coef: torch.Tensor, h: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The lend before the study below: unmeasured rows took ``|cx - L| + |co| max ||E dx|| / ||dx||``
    (``h``, the latents' gains, and ``scale``, the model-input scales, unread: the study's DDIM chains
    have neither far rows nor an input scale)."""
    c = coef.to(torch.float64)
    bound = (c[..., 1] - c[..., 0]).abs() + c[..., 2].abs() * self.model_gain.unsqueeze(1)
    return torch.where(torch.isfinite(self.dev), self.dev, bound)


def _box_lent(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The lend before 2026-12-01 (tenth session): ``a^2 + 2ab <u, Eu> + b^2 ||Eu||^2`` with the cross
    term at an extreme slope and the largest gain, which can pair one row's slope with another's gain."""
    return self._lent_squares(a, b)[1].clamp(min=0.0).sqrt()


def lend(quick: bool) -> dict[str, Any]:
    """Rows entering a window have no secant of their own: what the x0 rule lends them
    (``StepSecants.rule_dev``). First: the triangle bound ``|cx - L| + |co| ||E||`` with the model's
    largest measured gain; then ``||(cx - L) u + co E u||`` from the model's measured ``E u``, which
    keeps the cancellation between the two terms, with each part at its extreme over the measured
    rows (``box``, :func:`_box_lent`); now the same split along ``u`` and off it, so a row's slope
    is not charged with another row's gain (``StepSecants._lent``). Issue 14's chains with the
    library's defaults (batch 8, seed 0): rounds and the worst x0 error over tol under each; and the
    check of the box and current lends, the true ``||(J - L) F|| / ||F||`` of frozen rows that
    borrowed over what they borrowed."""
    import deqkern.engine as engine

    chains = [("ddim", 12, 4)] if quick else [
        ("ddim", 100, 10), ("ddim", 100, 25), ("ddim", 100, 5), ("ddim", 1000, 10), ("ddim", 1000, 25)]
    rows = []
    new_rule, new_lent = engine.StepSecants.rule_dev, engine.StepSecants._lent
    for scheduler, steps, window in chains:
        unet, sched = _digits(scheduler)
        schedule = deqkern.Schedule.from_diffusers(sched, steps)
        x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        row: dict[str, Any] = {"scheduler": scheduler, "steps": steps, "window": window}
        with torch.no_grad():
            ref = deqkern.sample_sequential(unet, x, schedule, execution="eager").x0
            for name in ("triangle", "box", "measured"):
                engine.StepSecants.rule_dev = _triangle_rule_dev if name == "triangle" else new_rule
                engine.StepSecants._lent = _box_lent if name == "box" else new_lent
                try:
                    r = deqkern.sample(unet, x, schedule, window=window, execution="eager")
                finally:
                    engine.StepSecants.rule_dev, engine.StepSecants._lent = new_rule, new_lent
                row[name] = {"rounds": r.rounds, "converged": r.all_converged,
                             "worst_error_over_tol": _x0_err(r.x0, ref) / 1e-3}
        rows.append(row)
        print(f"{scheduler} S={steps:<4} W={window:<3}: rounds " + ", ".join(
            f"{k} {row[k]['rounds']:>3} (x0 error {row[k]['worst_error_over_tol']:.2f} tol)"
            for k in ("triangle", "box", "measured")))
    unet, sched = _digits()
    checks = []
    for steps, window, first, rounds in ([(12, 4, 0, 12)] if quick else [(100, 10, 0, 40), (1000, 10, 85, 200)]):
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        for name in ("box", "measured"):
            engine.StepSecants._lent = _box_lent if name == "box" else new_lent
            try:
                ratios = _secant_check(unet, deqkern.Schedule.from_diffusers(sched, steps), x, window, rounds,
                                       lent=True, first=first)
            finally:
                engine.StepSecants._lent = new_lent
            checks.append({"lend": name, **_ratio_summary(
                f"ddim S={steps} W={window}, batch 2, rounds {first}-{rounds - 1}", ratios)})
            print(f"lend check ({name}) {checks[-1]['chain']}: true ||(J - L)F||/||F|| over the lent dev: median "
                  f"{checks[-1]['median']}, max {checks[-1]['max']} ({len(ratios)} frozen rows)")
    return {"what": "library defaults (x0 rule, tol 1e-3), batch 8, seed 0: rounds and worst x0 error / tol with "
                    "the triangle lend (first), the box lend (until 2026-12-01) and the measured split lend (now); "
                    "check: true / lent ||J - L|| at frozen rows (SECANT_SAFETY multiplies the lent value)",
            "command": "python bench/solver_studies.py lend", "rows": rows, "lend_check": checks}


def entering(quick: bool) -> dict[str, Any]:
    """How rows entering a sliding window start (``extrapolate``): a copy of the last computed row
    (False, ParaDiGMS), the last step continued linearly (True) or the chain stepped with the last
    model output held (``"model"``, with the pre-drawn step noise on stochastic chains; DPM-Solver++
    holds its predicted x0); the library's defaults otherwise (x0 rule, tol 1e-3), batch 8, seed 0:
    rounds and the worst x0 error over tol, DDIM, Euler (VP coordinates), DDPM, Euler ancestral and
    DPM-Solver++(2M), deterministic and SDE."""
    chains = [("ddim", 12, 4), ("ddpm", 12, 4), ("sde-dpm++2m", 12, 4)] if quick else [
        ("ddim", 100, 5), ("ddim", 100, 10), ("ddim", 100, 25), ("ddim", 1000, 10), ("euler", 100, 10),
        ("ddpm", 100, 10), ("ddpm", 100, 25), ("euler-a", 100, 10), ("ddpm", 1000, 10), ("dpm++2m", 50, 10),
        ("dpm++2m", 100, 10), ("dpm++2m", 100, 25), ("sde-dpm++2m", 100, 10)]
    # chains the bench does not name: (its chain, scheduler options)
    variants = {"sde-dpm++2m": ("dpm++2m", {"algorithm_type": "sde-dpmsolver++"})}
    rows = []
    unet, sched = _digits()
    for scheduler, steps, window in chains:
        chain, options = variants.get(scheduler, (scheduler, {}))
        schedule, x, z = _digits_chain(sched, chain, steps, options=options)
        row: dict[str, Any] = {"scheduler": scheduler, "steps": steps, "window": window}
        with torch.no_grad():
            ref = deqkern.sample_sequential(unet, x, schedule, z, execution="eager").x0
            for name, value in (("copy", False), ("linear", True), ("model", "model")):
                r = deqkern.sample(unet, x, schedule, noise=z, window=window, execution="eager", extrapolate=value)
                row[name] = {"rounds": r.rounds, "converged": r.all_converged,
                             "worst_error_over_tol": _x0_err(r.x0, ref) / 1e-3}
        rows.append(row)
        print(f"{scheduler} S={steps:<4} W={window:<3}: rounds " + ", ".join(
            f"{k} {row[k]['rounds']} ({row[k]['worst_error_over_tol']:.2f} tol)" for k in ("copy", "linear", "model")))
    return {"what": "library defaults (x0 rule, tol 1e-3) but extrapolate, batch 8, seed 0: rounds and worst x0 "
                    "error / tol", "command": "python bench/solver_studies.py entering", "rows": rows}


def _newton_errors(unet64, schedule, x: torch.Tensor, noise: torch.Tensor | None, rounds: int) -> list[float]:
    """Newton's method on the joint system (★) from every row at x_T: per round one batched model
    call at all rows, then the exact linear solve of the lower-triangular system by forward
    substitution, ``d_{k+1} = J_k d_k + r_k`` (``r_k = step_k(x_k) - x_{k+1}``), with ``J_k d`` by a
    central difference of the model (float64; ``S`` sequential model calls per round, so this is a
    floor for methods with one call per round, not one of them). The worst sample's relative x0
    error after each round."""
    b, d = x.shape[0], x[0].numel()
    s, cx, co = schedule.num_steps, schedule.cx, schedule.co
    sigma = schedule.sigma
    shape = (-1, *x.shape[1:])
    z = torch.zeros(s, b, d, dtype=torch.float64) if noise is None else noise.reshape(s, b, d).double()

    def eps(v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return unet64(v.reshape(shape), schedule.timesteps[k]).sample.reshape(v.shape)

    with torch.no_grad():
        seq = [x.reshape(b, d).double()]
        for k in range(s):
            seq.append(cx[k] * seq[-1] + co[k] * eps(seq[-1], torch.full((b,), k)) + sigma[k] * z[k])
        x0 = seq[-1]
        X = seq[0].unsqueeze(0).repeat(s + 1, 1, 1)
        errs = []
        for _ in range(rounds):
            out = eps(X[:-1].reshape(s * b, d), torch.arange(s).repeat_interleave(b)).reshape(s, b, d)
            step = cx.view(-1, 1, 1) * X[:-1] + co.view(-1, 1, 1) * out + sigma.view(-1, 1, 1) * z
            dx = torch.zeros(b, d, dtype=torch.float64)
            new = X.clone()
            for k in range(s):
                h = (1e-6 * X[k].norm(dim=1, keepdim=True) / dx.norm(dim=1, keepdim=True).clamp(min=1e-300))
                kk = torch.full((b,), k)
                jd = (eps(X[k] + h * dx, kk) - eps(X[k] - h * dx, kk)) / (2 * h)
                dx = cx[k] * dx + co[k] * jd + (step[k] - X[k + 1])
                new[k + 1] = X[k + 1] + dx
            X = new
            errs.append(float(((X[-1] - x0).norm(dim=1) / x0.norm(dim=1)).max()))
    return errs


def floors(quick: bool) -> dict[str, Any]:
    """How few rounds issue 14's targets can take on the digits model. (1) Newton's method with
    exact Jacobians (:func:`_newton_errors`): rounds until the worst sample's x0 is within 1e-3, to
    set beside the targets for the full window (DDIM S = 100 <= 6, DDPM <= 12) and the default
    solver. (2) Rows entering a window: the relative error of their first guess ``m`` rows past the
    last exact one, from the exact trajectory, for the held model output and for a linear
    extrapolation of it; the x0 rule freezes a row in its first evaluation only when this is below
    about ``tol / (S SECANT_SAFETY kappa)`` (4e-4 for DDIM S = 100, tol 1e-3), else each row takes
    two evaluations and a window of W frees at most W/2 rows a round."""
    import copy

    steps, batch, rounds = (8, 2, 4) if quick else (100, 8, 8)
    newton = []
    for scheduler in ("ddim", "ddpm"):
        unet, sched = _digits(scheduler)
        unet64 = copy.deepcopy(unet).double()
        schedule = deqkern.Schedule.from_diffusers(sched, steps)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 1, 8, 8, generator=g)
        noise = torch.randn(steps, batch, 1, 8, 8, generator=g) if scheduler == "ddpm" else None
        errs = _newton_errors(unet64, schedule, x, noise, rounds)
        with torch.no_grad():
            ref = deqkern.sample_sequential(unet, x, schedule, noise, execution="eager").x0
            ours = deqkern.sample(unet, x, schedule, noise=noise, execution="eager")
        reach = next((i + 1 for i, e in enumerate(errs) if e <= 1e-3), None)
        newton.append({"scheduler": scheduler, "steps": steps, "newton_worst_x0_error": errs,
                       "newton_rounds_to_1e-3": reach, "default_rounds": ours.rounds,
                       "default_worst_error_over_tol": _x0_err(ours.x0, ref) / 1e-3})
        print(f"{scheduler} S={steps}: exact Newton reaches 1e-3 in {reach} rounds "
              f"({', '.join(f'{e:.0e}' for e in errs)}); the default solver stops after {ours.rounds}")
    unet, sched = _digits()
    schedule = deqkern.Schedule.from_diffusers(sched, steps)
    x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        traj = deqkern.sample_sequential(unet, x, schedule, execution="eager", return_trajectory=True).trajectory
        traj = traj.flatten(2).double()
        cx, co = schedule.cx, schedule.co
        e = [(traj[k + 1] - cx[k] * traj[k]) / co[k] for k in range(steps)]  # the model outputs, exactly
    guesses = []
    for frac in ((0.5,) if quick else (0.1, 0.4, 0.7, 0.9)):
        n0 = max(2, int(frac * steps))
        row = {"position": n0}
        for name in ("held", "linear"):
            v, errs = traj[n0].clone(), []
            for m in range(1, min(10, steps - n0) + 1):
                k = n0 + m - 1
                out = e[n0 - 1] if name == "held" else e[n0 - 1] + m * (e[n0 - 1] - e[n0 - 2])
                v = cx[k] * v + co[k] * out
                errs.append(float(((v - traj[k + 1]).norm(dim=1) / traj[k + 1].norm(dim=1)).max()))
            row[name] = errs
        guesses.append(row)
        print(f"entering rows after position {n0}: held {' '.join(f'{v:.0e}' for v in row['held'])}; "
              f"linear {' '.join(f'{v:.0e}' for v in row['linear'])}")
    return {"what": "(1) exact Newton (S sequential model calls per round) on the full window, batch 8, seed 0: "
                    "worst x0 error per round; (2) DDIM S=100: relative error of an entering row's first guess m "
                    "rows past the last exact row (worst sample)", "command": "python bench/solver_studies.py floors",
            "rows": newton, "entering_guess_errors": guesses}


def _by_position(coarse: torch.Tensor, steps: int) -> torch.Tensor:
    """``[steps, ...]`` positions 1..steps of a fine chain read off a coarse trajectory ``[K+1, ...]``
    (positions 0..K), linearly between its two nearest states by the fraction of the chain run."""
    k = coarse.shape[0] - 1
    rows = []
    for i in range(1, steps + 1):
        f = i * k / steps
        lo = min(int(f), k - 1)
        w = f - lo
        rows.append((1 - w) * coarse[lo] + w * coarse[lo + 1])
    return torch.stack(rows)


def starts(quick: bool) -> dict[str, Any]:
    """Does a better first guess of the whole chain (``init``) cut rounds? DDIM, batch 8, seed 0,
    library defaults (x0 rule, tol 1e-3), full window and a window of 10. Starts: the default (every
    row at x_T; a window's entering rows stepped with the last output held); x_T stepped with its
    own model output held to every row (a DDIM jump: one sequential model call first); a coarse
    K-step DDIM trajectory read off by position (ParaSolver's hierarchical start: K sequential calls
    first); and, as no method but a measure of how close a start must be, the exact trajectory with
    every row moved by Gaussian noise of relative size eps. ``init`` replaces the held entering rows
    of a window (its rows come from ``init``)."""
    steps, windows, coarse_steps, eps = (12, (None, 4), (3,), (1e-2,)) if quick else (
        100, (None, 10), (5, 20), (1e-2, 1e-3, 1e-4))
    unet, sched = _digits()
    schedule = deqkern.Schedule.from_diffusers(sched, steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 8, 8, generator=g)
    with torch.no_grad():
        seq = deqkern.sample_sequential(unet, x, schedule, execution="eager", return_trajectory=True)
        ref, exact = seq.x0, seq.trajectory[1:]
        e_T = unet(x, schedule.timesteps[0].repeat(x.shape[0])).sample
        jump, v = [], x
        for k in range(steps):
            v = schedule.cx[k] * v + schedule.co[k] * e_T
            jump.append(v)
        inits: list[tuple[str, int, torch.Tensor | None]] = [("default", 0, None), ("DDIM jump", 1, torch.stack(jump))]
        for k in coarse_steps:
            coarse = deqkern.sample_sequential(unet, x, deqkern.Schedule.from_diffusers(sched, k), execution="eager",
                                               return_trajectory=True).trajectory
            inits.append((f"coarse K={k}", k, _by_position(coarse, steps)))
        row_norm = exact.flatten(2).norm(dim=2).view(steps, -1, 1, 1, 1) / math.sqrt(exact[0, 0].numel())
        for e in eps:
            noise = torch.randn(exact.shape, generator=torch.Generator().manual_seed(1))
            inits.append((f"exact + {e:g} noise", 0, exact + e * row_norm * noise))
        rows = []
        for name, calls, init in inits:
            row: dict[str, Any] = {"start": name, "sequential_calls_first": calls,
                                   "start_x0_error_over_tol": None if init is None else _x0_err(init[-1], ref) / 1e-3}
            for w in windows:
                r = deqkern.sample(unet, x, schedule, window=w, execution="eager", init=init)
                row[f"window_{w or steps}"] = {"rounds": r.rounds, "converged": r.all_converged,
                                               "worst_error_over_tol": _x0_err(r.x0, ref) / 1e-3}
            rows.append(row)
            print(f"{name:<20} + {calls:>2} calls: " + ", ".join(
                f"W={w or steps} {row[f'window_{w or steps}']['rounds']} rounds" for w in windows))
    return {"what": f"DDIM S={steps}, batch 8, seed 0, library defaults but init: rounds and worst x0 error / tol "
                    "per start", "command": "python bench/solver_studies.py starts", "rows": rows}


def _constant_sweep(name: str, values: tuple[float, ...], chains: list[tuple[str, int, int | None, bool]],
                    ) -> list[dict[str, Any]]:
    """Library defaults (x0 rule, tol 1e-3), batch 8, seed 0, but the x0 rule's constant ``name``
    at each of ``values`` (patched in deqkern.ops.reference and deqkern.engine, then restored; the
    reference ops run, the Triton kernel takes its constants at compile time): per chain
    ``(scheduler, steps, window, clip_sample)``, the rounds and the worst x0 error over tol."""
    import deqkern.engine as engine
    import deqkern.ops.reference as reference

    unet, sched = _digits()
    kept = getattr(reference, name)
    rows = []
    try:
        for scheduler, steps, window, clip in chains:
            schedule, x, z = _digits_chain(sched, scheduler, steps, clip)
            row: dict[str, Any] = {"scheduler": scheduler, "steps": steps, "window": window, "clip_sample": clip,
                                   "values": {}}
            with torch.no_grad():
                ref = deqkern.sample_sequential(unet, x, schedule, z, execution="eager").x0
                for v in values:
                    setattr(reference, name, v)
                    setattr(engine, name, v)
                    out = deqkern.sample(unet, x, schedule, noise=z, window=window, execution="eager")
                    row["values"][str(v)] = {"rounds": out.rounds, "converged": out.all_converged,
                                             "worst_error_over_tol": _x0_err(out.x0, ref) / 1e-3}
            rows.append(row)
            print(f"{scheduler} S={steps:<4} W={window or 'S':<3}{' clip' if clip else ''}: " + ", ".join(
                f"{name} {v:g} {r['rounds']} rounds ({r['worst_error_over_tol']:.2f} tol)"
                for v, r in zip(values, row["values"].values())))
    finally:
        setattr(reference, name, kept)
        setattr(engine, name, kept)
    return rows


def safety(quick: bool) -> dict[str, Any]:
    """What ``SECANT_SAFETY`` costs: the factor at 8 (the library's), 4, 2 and 1. Where the rounds
    do not move with the factor, the certificate costs no rounds and the solver's own convergence
    sets them."""
    chains = [("ddim", 12, None, False)] if quick else [
        ("ddim", 100, None, False), ("ddim", 100, 10, False), ("ddpm", 100, None, False), ("ddpm", 100, 10, False)]
    rows = _constant_sweep("SECANT_SAFETY", (8.0, 4.0, 2.0, 1.0), chains)
    return {"what": "library defaults but SECANT_SAFETY, batch 8, seed 0: rounds and worst x0 error / tol",
            "command": "python bench/solver_studies.py safety", "rows": rows}


def reach(quick: bool) -> dict[str, Any]:
    """What ``LINEAR_REACH`` costs: the x0 rule drops a step secant measured along a move longer
    than this share of the row's latent (falling back to the latent's gain), and freezes no row
    (but a freeze's last) whose residual exceeds it. The reach at inf (the rule before
    2026-11-30), 0.25, 0.1 (the library's), 0.05, 0.02 and 0.01."""
    reaches = (math.inf, 0.1) if quick else (math.inf, 0.25, 0.1, 0.05, 0.02, 0.01)
    chains = [("ddim", 12, None, False)] if quick else [
        ("ddim", 100, None, False), ("ddim", 100, 10, False), ("ddim", 100, 25, False), ("ddpm", 100, None, False),
        ("ddpm", 100, 10, False), ("ddpm", 100, None, True), ("ddim", 1000, 10, False)]
    rows = _constant_sweep("LINEAR_REACH", reaches, chains)
    return {"what": "library defaults but LINEAR_REACH, batch 8, seed 0: rounds and worst x0 error / tol",
            "command": "python bench/solver_studies.py reach", "rows": rows}


def direction(quick: bool) -> dict[str, Any]:
    """What the x0 rule's lean on rows back from a long move costs (docs/math.md §4.3, a secant's
    direction; ``StepSecants.first_direction``): a secant measures ``J - L`` along its move, and a
    row's move is tilted toward the unmeasured bound by its angle to the residual it will carry in
    a sample's first measuring round (``first``, the rule until 2026-12-01) and now also on a row's
    first measurement since a move past LINEAR_REACH (``returned``). Library defaults (x0 rule, tol
    1e-3; the last chain in the secant form), batch 8, seed 0: rounds and the worst x0 error over
    tol under each."""
    import deqkern.engine as engine

    kept = engine.StepSecants.measure

    def first_only(self, *args: Any, **kwargs: Any) -> Any:
        out = kept(self, *args, **kwargs)
        self.returned.zero_()  # no row counts as back from a long move: the lean's first rounds only
        return out

    def patched(name: str) -> None:
        engine.StepSecants.measure = first_only if name == "first" else kept

    def restore() -> None:
        engine.StepSecants.measure = kept

    rows = _rule_variants(quick, ("first", "returned"), patched, restore)
    return {"what": "library defaults (x0 rule, tol 1e-3), batch 8, seed 0: rounds and worst x0 error / tol with "
                    "the direction lean on a sample's first measuring round only (first) and also on rows back "
                    "from a move past LINEAR_REACH (returned, now)",
            "command": "python bench/solver_studies.py direction", "rows": rows}


def past_charge(quick: bool) -> dict[str, Any]:
    """What the x0 rule's charge for the chain past a sliding window costs (docs/math.md §4.3;
    ``deqkern.ops.reference.past_window_factor``): the direction study's chains without it (the
    rule until 2026-12-01, ``none``) and with it (``charged``, now)."""
    import deqkern.engine as engine

    kept = engine.past_window_factor

    def none(latent_sq: torch.Tensor, *args: Any) -> torch.Tensor:
        return torch.ones(latent_sq.shape[0], dtype=torch.float64, device=latent_sq.device)

    def patched(name: str) -> None:
        engine.past_window_factor = none if name == "none" else kept

    def restore() -> None:
        engine.past_window_factor = kept

    rows = _rule_variants(quick, ("none", "charged"), patched, restore)
    return {"what": "library defaults (x0 rule, tol 1e-3), batch 8, seed 0: rounds and worst x0 error / tol "
                    "without (none) and with (charged, now) the charge for the chain past a sliding window",
            "command": "python bench/solver_studies.py past-charge", "rows": rows}


def _rule_variants(quick: bool, names: tuple[str, str], patch: Callable[[str], None],
                   restore: Callable[[], None]) -> list[dict[str, Any]]:
    """The x0 rule's variants ``names`` (``patch(name)`` sets one up, ``restore()`` undoes it) on
    the digits chains of the rule's studies (the last in the secant form): per chain, rounds,
    convergence and the worst x0 error over tol under each."""
    chains = [("ddim", 12, None, None)] if quick else [
        ("ddim", 100, None, None), ("ddim", 100, 10, None), ("ddim", 100, 25, None), ("ddim", 100, 5, None),
        ("ddpm", 100, None, None), ("ddpm", 100, 10, None), ("ddim", 1000, 10, None), ("ddim", 1000, None, None),
        ("euler", 100, None, None), ("euler", 100, 10, None), ("flow", 100, 10, None), ("dpm++2m", 100, None, None),
        ("dpm++2m", 100, 10, None), ("ddim", 1000, None, "secant")]
    unet, sched = _digits()
    rows = []
    for scheduler, steps, window, form in chains:
        schedule, x, z = _digits_chain(sched, scheduler, steps)
        row: dict[str, Any] = {"scheduler": scheduler, "steps": steps, "window": window, "form": form or "default"}
        with torch.no_grad():
            ref = deqkern.sample_sequential(unet, x, schedule, z, execution="eager").x0
            for name in names:
                patch(name)
                try:
                    r = deqkern.sample(unet, x, schedule, noise=z, window=window, execution="eager",
                                       **({} if form is None else {"form": form}))
                finally:
                    restore()
                row[name] = {"rounds": r.rounds, "converged": r.all_converged,
                             "worst_error_over_tol": _x0_err(r.x0, ref) / 1e-3}
        rows.append(row)
        print(f"{scheduler} S={steps:<4} W={window or 'S':<3} {row['form']}: rounds " + ", ".join(
            f"{k} {row[k]['rounds']} ({row[k]['worst_error_over_tol']:.2f} tol)" for k in names))
    return rows


def clipped(quick: bool) -> dict[str, Any]:
    """The x0 rule on chains with diffusers' ``clip_sample`` (docs/math.md §4.3, chains with an x0
    transform: the model's own secants and the clip's Jacobian at the row): library defaults,
    batch 8, seed 0, rounds and the worst x0 error over tol."""
    chains = [("ddim", 12, None)] if quick else [("ddim", 100, None), ("ddpm", 100, None), ("ddim", 100, 10),
                                                ("ddpm", 25, None)]
    rows = []
    for scheduler, steps, window in chains:
        unet, sched = _digits(scheduler, clip=True)
        schedule = deqkern.Schedule.from_diffusers(sched, steps)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 1, 8, 8, generator=g)
        z = torch.randn(steps, 8, 1, 8, 8, generator=g) if scheduler == "ddpm" else None
        with torch.no_grad():
            ref = deqkern.sample_sequential(unet, x, schedule, z, execution="eager").x0
            r = deqkern.sample(unet, x, schedule, noise=z, window=window, execution="eager")
        rows.append({"scheduler": scheduler, "steps": steps, "window": window, "rounds": r.rounds,
                     "converged": r.all_converged, "worst_error_over_tol": _x0_err(r.x0, ref) / 1e-3})
        print(f"{scheduler} S={steps:<4} W={window or 'S':<3} clip_sample: {r.rounds} rounds "
              f"({rows[-1]['worst_error_over_tol']:.3f} tol)")
    return {"what": "library defaults, clip_sample=True, batch 8, seed 0: rounds and worst x0 error / tol",
            "command": "python bench/solver_studies.py clipped", "rows": rows}


def multistep_excess(quick: bool) -> dict[str, Any]:
    """What the x0 rule charges a multistep chain's second-order recurrence (docs/math.md §4.3,
    ``engine.multistep_excess``). (1) The largest excess ``R_m`` over positions, per algorithm and
    prediction type of diffusers' DPMSolverMultistepScheduler (order 2, Karras sigmas, scaled-linear
    and cosine betas, S = 10 / 25 / 100), at the slopes a sample assumes before it measures one
    (``UNMEASURED_SLOPES``, -1, 0, 1). (2) Its cost: DPM-Solver++(2M) on the digits model, library
    defaults (tol 1e-3, batch 8, seed 0), with the excess and without it (``multistep_dev`` the
    identity; the multistep lend from the model outputs kept). (3) What it buys: the saved
    noise-algorithm case of tests/test_x0_bound_harsh.py (window 5, Picard), bound ratio with and
    without."""
    import warnings

    from diffusers import DPMSolverMultistepScheduler

    from deqkern import engine

    warnings.filterwarnings("ignore", category=FutureWarning)  # the noise algorithm is deprecated
    excess_rows = []
    for betas in (["scaled_linear"] if quick else ["scaled_linear", "squaredcos_cap_v2"]):
        for steps in ([10] if quick else [10, 25, 100]):
            for alg in ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"):
                for prediction in ("epsilon", "v_prediction", "sample"):
                    cfg = dict(num_train_timesteps=1000, beta_schedule=betas, prediction_type=prediction,
                               algorithm_type=alg, solver_order=2, use_karras_sigmas=True,
                               final_sigmas_type="sigma_min")
                    sched = deqkern.Schedule.from_diffusers(DPMSolverMultistepScheduler(**cfg), steps)
                    lam = engine.UNMEASURED_SLOPES.view(-1, 1).expand(-1, steps)
                    r = engine.multistep_excess(sched.multistep_linear(), lam, None)
                    excess_rows.append({"betas": betas, "steps": steps, "algorithm": alg, "prediction": prediction,
                                        "max_excess": {f"{float(v):g}": float(r[i].max())
                                                       for i, v in enumerate(engine.UNMEASURED_SLOPES)}})
                    print(f"{betas:<18} S={steps:<4} {alg:<16} {prediction:<13} max R at -1/0/1: "
                          + " / ".join(f"{float(r[i].max()):.3g}" for i in range(3)))
    unet, ddim = _digits("ddim")
    cost_rows = []
    sizes = [(6, None)] if quick else [(25, None), (25, 10), (100, None), (100, 10), (100, 25)]
    charge = engine.multistep_dev
    for steps, window in sizes:
        x = torch.randn(2 if quick else 8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        schedule = deqkern.Schedule.from_diffusers(DPMSolverMultistepScheduler.from_config(ddim.config), steps)
        with torch.no_grad():
            ref = deqkern.sample_sequential(unet, x, schedule, execution="eager").x0
        row = {"steps": steps, "window": window}
        for label, fn in (("with", charge), ("without", lambda *a: a[5])):
            engine.multistep_dev = fn
            try:
                with torch.no_grad():
                    r = deqkern.sample(unet, x, schedule, tol=1e-3, window=window, execution="eager")
            finally:
                engine.multistep_dev = charge
            row[label] = {"rounds": r.rounds, "worst_error_over_tol": _x0_err(r.x0, ref) / 1e-3}
        cost_rows.append(row)
        print(f"dpm++2m S={steps:<4} W={window or 'S':<3} rounds with {row['with']['rounds']}, "
              f"without {row['without']['rounds']}")
    case = torch.load(Path(__file__).resolve().parents[1] / "tests/data/x0_rule_dpm_window_case.pt", weights_only=False)
    a = math.atanh(0.019132882858697013)
    model = lambda v, t: torch.tanh(a * v)  # noqa: E731
    ref = deqkern.sample_sequential(model, case["x"], case["schedule"]).x0
    scale = torch.maximum(ref.norm(dim=1), 1e-3 * case["x"].norm(dim=1))
    gap = {}
    for label, fn in (("with", charge), ("without", lambda *a: a[5])):
        engine.multistep_dev = fn
        try:
            r = deqkern.sample(model, case["x"], case["schedule"], "picard", tol=case["tol"], window=5)
        finally:
            engine.multistep_dev = charge
        gap[label] = {"rounds": r.rounds, "converged": r.all_converged,
                      "bound_ratio": float(((r.x0 - ref).norm(dim=1) / (case["tol"] * scale)).max())}
    print(f"noise algorithm, sample prediction, S = 10, window 5: bound ratio with {gap['with']['bound_ratio']:.3g}, "
          f"without {gap['without']['bound_ratio']:.3g}")
    return {"what": "max excess R over positions per DPM-Solver config at the unmeasured slopes; DPM-Solver++(2M) "
                    "digits rounds with and without the excess; the saved noise-algorithm case's bound ratio",
            "command": "python bench/solver_studies.py multistep-excess", "excess": excess_rows, "rows": cost_rows,
            "noise_algorithm_case": gap}


STUDIES = {"adjoint-vjp": adjoint_vjp, "ops-per-round": ops_per_round, "stopping-rule": stopping_rule,
           "stopping-x0": stopping_x0, "tail-chunks": tail_chunks, "half-precision": half_precision,
           "guided-half": guided_half,
           "divergence": divergence, "multistep-rounds": multistep_rounds, "euler-coords": euler_coords,
           "budget": budget, "lend": lend, "entering": entering, "floors": floors, "starts": starts,
           "safety": safety, "clipped": clipped, "reach": reach, "multistep-excess": multistep_excess,
           "direction": direction, "past-charge": past_charge}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)
    if argv and argv[0] == "_ops-once":  # a child of ops-per-round
        print(json.dumps(ops_once(bool(int(argv[1])))))
        return {}
    if argv and argv[0] == "_adjoint-once":  # a child of adjoint-vjp
        steps, vjp, window = int(argv[1]), argv[2], int(argv[3]) or None
        print(json.dumps(adjoint_once(steps, vjp, window)))
        return {}
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=list(STUDIES))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: seconds, to check the command runs")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<study>_cpu.json)")
    args = ap.parse_args(argv)
    report = {"study": args.study, "device": "cpu (1 thread)", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), **STUDIES[args.study](args.quick)}
    out = args.out or RESULTS / f"{args.study.replace('-', '_')}_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
