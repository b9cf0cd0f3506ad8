"""End-to-end timings: graph-captured parallel sampling vs graph-captured sequential sampling.

Issue 3's targets, measured side by side in ONE run on ONE device:

* wall time of sequential DDIM (S model calls, captured ``--per-graph`` steps per CUDA graph)
  vs the parallel solvers (captured ``--per-graph`` rounds per graph), same x_T, x0 error vs
  the sequential result: each sampler is made once and called ``--repeats + 1`` times, the
  median of the later calls (graphs replayed) is the steady state, the first call (capture
  included) is reported beside it;
* solver work per round (everything but the model: scan, stopping test, solve, mix, slide) as
  a fraction of the model-batch time — measured by running the same fixed-shape rounds with
  an identity "model" whose cost is one copy — and the ATen ops of that round and those that
  launch a kernel (the capture audit's counts; the Triton kernels come on top);
* for each window ``W`` of ``--window`` (rows per round per sample), and the model's batch cost
  curve ``t(rows)``: the speedup is ``S t(B) / (rounds(W) t(B W))`` up to solver overhead, so
  how far ``t`` stays flat as rows grow decides which window wins on a device.

* ``--window auto``: the sampler's own choice (:mod:`deqkern.autowindow`), its measured cost
  curve, predicted rounds and times per window, against what it then measured.

On CUDA the model's cost curve and one K-round chunk of every solve are CUDA-graph replays timed
by CUDA events; the table says whether each solve (and the sequential baseline) ran as CUDA
graphs. TF32 is off: every row is also an x0 error check. ``OUT/e2e.json`` is rewritten after
every measured row, so a run its timeout cuts short keeps what it measured (``--table`` prints it).

    python bench/e2e_graphs.py --device cuda --model ddpm-cifar10 --steps 100 --window 100 25 10 auto --out OUT

On CPU (``--device cpu --model tiny``) it runs in seconds and only proves the script works.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import torch

import deqkern
from deqkern.autowindow import AutoWindowConfig, time_call
from deqkern.engine import sync_device

SOLVERS: dict[str, dict[str, Any]] = {
    "picard": dict(solver="picard"),
    "anderson-row": dict(solver="anderson", solver_options={"mixing": "row", "history": 2}),
    "anderson-tri": dict(solver="anderson", solver_options={"mixing": "triangular", "history": 2}),
    "picard-secant": dict(solver="picard", form="secant"),
    "anderson-tri-secant": dict(solver="anderson", solver_options={"mixing": "triangular", "history": 2}, form="secant"),
}


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """A model and its latent shape: a paper UNet (random weights), the digits model, or a tiny UNet."""
    from deqkern.models import build_paper_unet, load_digits_model

    if name == "digits":
        unet, _ = load_digits_model(device=device, dtype=dtype)
    elif name == "tiny":
        from diffusers import UNet2DModel

        torch.manual_seed(0)
        unet = UNet2DModel(
            sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
        ).to(device).eval()
        if dtype != torch.float32:  # diffusers warns on any dtype cast, even a no-op one
            unet = unet.to(dtype=dtype)
    else:
        unet = build_paper_unet(name, device, dtype)
    cfg = unet.config
    return unet, (cfg.in_channels, cfg.sample_size, cfg.sample_size)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` runs after one discarded warm-up run (device synced)."""
    return timed_first(fn, device, repeats)[1:]


def timed_first(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, float, Any]:
    """``(first run's seconds, median of the next repeats, last output)``, device synced: the
    first call of a sampler captures its CUDA graphs, later ones replay them."""
    times = []
    for _ in range(repeats + 1):
        sync_device(device)
        t0 = time.perf_counter()
        out = fn()
        sync_device(device)
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:]), out


def model_cost_curve(
    model: torch.nn.Module, x: torch.Tensor, schedule: deqkern.Schedule, dtype: torch.dtype, device: torch.device,
    repeats: int, widths: list[int],
) -> tuple[dict[int, float], str]:
    """``(median seconds of one model call per rows, timer)`` for the batch alone, powers of two up
    to the largest window's rows, and every window's rows (``B W``): on CUDA graph replays timed
    by CUDA events (:func:`deqkern.autowindow.time_call`), elsewhere the wall clock."""
    batch, top = x.shape[0], x.shape[0] * max(widths)
    sizes = sorted({batch, top, *(batch * w for w in widths), *(r for r in (2 ** i for i in range(20)) if batch < r < top)})
    ts = schedule.timesteps.to(device)
    curve, timer, config = {}, "clock", AutoWindowConfig(repeats=repeats)
    for rows in sizes:
        xs = x[torch.arange(rows, device=device) % batch].to(dtype)
        t_rows = ts[torch.arange(rows, device=device) % ts.numel()]
        curve[rows], timer = time_call(lambda: model(xs, t_rows), device, config)
    return curve, timer


def chunk_seconds(
    sampler: deqkern.ParallelSampler, x: torch.Tensor, device: torch.device, repeats: int
) -> float | None:
    """Median seconds of one K-round chunk of ``sampler``'s last solve (a graph replay on CUDA,
    timed by CUDA events; the wall clock elsewhere), each from the state ``x`` loads: from a
    converged state further rounds would run past ``max_iters``. None for eager execution."""
    ws = next(reversed(sampler._cache.values()))  # the workspace of the last call (bench-only peek)
    if ws.runners is None:
        return None
    times = []
    for _ in range(repeats):
        ws.load(x)
        sync_device(device)
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            ws.runners.bulk()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            ws.runners.bulk()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Results:
    """The run's JSON, rewritten (atomically) after every measured row: a run cut short by its
    timeout keeps every row it measured, in a well-formed file."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path, self.data = path, {**header, "records": []}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


def solver_row(args: argparse.Namespace, model: torch.nn.Module, schedule: deqkern.Schedule, x: torch.Tensor,
               seq: Any, t_seq_graph: float, t_seq_eager: float, width: int | str, name: str,
               execution: str, model_batch_s: float | None) -> dict[str, Any]:
    """One solver at one window (``"auto"``: the sampler's choice): wall times (first call and
    steady state), rounds, x0 error against the sequential x0, the K-round chunk's replay time
    and the solver's own work per round (a one-copy "model"), ATen ops per round."""
    device, dtype = x.device, getattr(torch, args.dtype)
    kw = dict(SOLVERS[name], tol=args.tol, stop=args.stop, window=width, rounds_per_graph=args.per_graph,
              execution=execution)
    par = deqkern.ParallelSampler(model, schedule, model_dtype=dtype, **kw)
    t_first, t_par, res = timed_first(lambda: par(x), device, args.repeats)
    err = float((res.x0.double() - seq.x0.double()).norm() / seq.x0.double().norm())
    row = dict(
        wall_s=t_par, first_call_s=t_first, rounds=res.rounds, window=res.info["window"],
        rounds_executed=res.info.get("rounds_executed", res.rounds), model_evals=res.model_evals,
        converged=res.all_converged, x0_rel_err=err, speedup_vs_graphed_sequential=t_seq_graph / t_par,
        speedup_vs_eager_sequential=t_seq_eager / t_par, graph=res.info.get("graph", False),
        graph_fallback=res.info.get("graph_fallback"),
    )
    if width == "auto":
        return {**row, "window_auto": res.info["window_auto"]}
    row["chunk_s"] = chunk_seconds(par, x, device, args.repeats)
    # solver work per round: the same fixed-shape rounds with a one-copy "model"
    free_sampler = deqkern.ParallelSampler(lambda a, b: a, schedule, max_iters=res.rounds, **kw)
    t_free, free = timed(lambda: free_sampler(x), device, args.repeats)
    per_round = t_free / max(free.info.get("rounds_executed", free.rounds), 1)
    # the same round's ATen ops (the model's excluded) and those that launch a kernel (each a
    # node of the round's graph, next to its Triton kernels), counted by the capture audit
    audit = deqkern.ParallelSampler(
        lambda a, b: a, schedule, max_iters=2, **{**kw, "rounds_per_graph": 1, "execution": "audit"})
    audited = audit(x).info
    return {**row, "solver_s_per_round": per_round, "solver_fraction_of_model": per_round / model_batch_s,
            "aten_ops_per_round": audited["ops_per_chunk"], "kernel_ops_per_round": audited["kernel_ops_per_chunk"]}


def window_arg(text: str) -> int | str:
    """argparse type: a window (an integer >= 1) or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto', got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="ddpm-cifar10", help="ddpm-cifar10 | ddpm-celeba | ... | digits | tiny")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--steps", type=int, nargs="+", default=[100])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--stop", default="x0", choices=["relative", "x0"],
                    help="stopping rule: x0 bounds x0's error by --tol (bench/results/stopping_x0_cpu.json); relative "
                         "bounds per-row residuals (tol 1e-4 ended with x0 errors up to about 1e-3 on the digits "
                         "model: bench/results/stopping_rule_cpu.json)")
    ap.add_argument("--tol", type=float, default=5e-4,
                    help="stopping tolerance (default: half the 1e-3 x0 target, a margin for a model the x0 rule "
                         "was not measured on)")
    ap.add_argument("--window", type=window_arg, nargs="+", default=None,
                    help="windows (rows per round per sample) to compare, 'auto' for window='auto' with the first "
                         "solver; default: S (values above S mean S)")
    ap.add_argument("--per-graph", type=int, default=4, help="rounds (or sequential steps) per CUDA graph")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    ap.add_argument("--out", default="out/e2e")
    ap.add_argument("--table", metavar="JSON", default=None,
                    help="only print the table of an e2e.json (also one a timeout cut short) and exit")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.table is not None:
        result = json.loads(Path(args.table).read_text())
        print_table(result)
        return result
    # every number here is also an error check against the sequential x0: no TF32 (10-bit
    # mantissa matmuls and convolutions would differ from the sequential run by ~1e-3)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model, shape = build_model(args.model, device, dtype)
    execution = "graph" if device.type == "cuda" else "static"
    from diffusers import DDIMScheduler

    sched_cfg = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    gen = torch.Generator().manual_seed(0)
    results = Results(Path(args.out) / "e2e.json", dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__, triton=_version("triton"), git=_git_sha(), model=args.model, dtype=args.dtype,
        stop=args.stop, tol=args.tol, tf32=False, date=time.strftime("%Y-%m-%d"),
    ))
    for steps in args.steps:
        schedule = deqkern.Schedule.from_diffusers(sched_cfg, steps)
        x = torch.randn(args.batch, *shape, generator=gen).to(device)
        windows = list(dict.fromkeys(w if w == "auto" else min(w, steps) for w in (args.window or [steps])))
        widths = sorted((w for w in windows if w != "auto"), reverse=True) or [steps]
        with torch.inference_mode():
            # x_T and the latents stay fp32; the model runs in --dtype. Samplers are made once and
            # called repeatedly, as a library would: the medians are steady state (graphs replayed)
            seq_eager = deqkern.SequentialSampler(model, schedule, model_dtype=dtype, execution="eager")
            seq_graph = deqkern.SequentialSampler(
                model, schedule, model_dtype=dtype, execution=execution, rounds_per_graph=args.per_graph)
            t_seq_eager, seq = timed(lambda: seq_eager(x), device, args.repeats)
            t_seq_first, t_seq_graph, seq_g = timed_first(lambda: seq_graph(x), device, args.repeats)
            rec: dict[str, Any] = dict(
                steps=steps, batch=args.batch, sequential_eager_s=t_seq_eager, sequential_graph_s=t_seq_graph,
                sequential_graph_first_call_s=t_seq_first, sequential_graph=seq_g.info.get("graph", False),
                windows={},
            )
            results.data["records"].append(rec)
            results.save()
            rec["model_batch_curve_s"], rec["model_timer"] = model_cost_curve(
                model, x, schedule, dtype, device, args.repeats, widths)
            results.save()
            for width in windows:
                rows = None if width == "auto" else x.shape[0] * width
                win: dict[str, Any] = dict(model_batch_s=rec["model_batch_curve_s"].get(rows), model_batch_rows=rows,
                                           solvers={})
                rec["windows"][width] = win
                for name in args.solvers[:1] if width == "auto" else args.solvers:
                    win["solvers"][name] = solver_row(args, model, schedule, x, seq, t_seq_graph, t_seq_eager, width,
                                                      name, execution, win["model_batch_s"])
                    results.save()
    print_table(results.data)
    return results.data


def print_table(result: dict[str, Any]) -> None:
    """The run's table: per S, window and solver the rounds, wall time, speedup over graphed
    sequential, x0 error, whether the solve (and the sequential baseline) ran as CUDA graphs."""
    print(f"device={result['device']} model={result['model']} dtype={result['dtype']} tf32={result.get('tf32')}")
    print(f"{'S':>5} {'W':>4} {'solver':>19} {'rounds':>6} {'wall ms':>9} {'seq-graph ms':>12} {'speedup':>7} "
          f"{'x0 err':>8} {'graph':>5} {'seq graph':>9} {'chunk ms':>8} {'solver/model':>12}")
    for rec in result["records"]:
        for width, win in rec.get("windows", {}).items():
            for name, r in win["solvers"].items():
                w = width if width != "auto" else f"a{r['window']}" if r["window"] else "aseq"
                chunk = "-" if r.get("chunk_s") is None else f"{1e3 * r['chunk_s']:.2f}"
                frac = "-" if r.get("solver_fraction_of_model") is None else f"{r['solver_fraction_of_model']:.3f}"
                print(f"{rec['steps']:>5} {w!s:>4} {name:>19} {r['rounds']:>6} {1e3 * r['wall_s']:>9.2f} "
                      f"{1e3 * rec['sequential_graph_s']:>12.2f} {r['speedup_vs_graphed_sequential']:>7.2f} "
                      f"{r['x0_rel_err']:>8.1e} {'yes' if r['graph'] else 'no':>5} "
                      f"{'yes' if rec['sequential_graph'] else 'no':>9} {chunk:>8} {frac:>12}")
        curve = rec.get("model_batch_curve_s")
        if curve:
            t1 = curve[str(rec["batch"])] if str(rec["batch"]) in curve else curve[rec["batch"]]
            print(f"  model batch cost ({rec['model_timer']}), S={rec['steps']}: " + ", ".join(
                f"{rows} rows {t / t1:.2f}x" for rows, t in curve.items()))


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except ImportError:
        return None


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    main()
