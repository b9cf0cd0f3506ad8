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

    python bench/e2e_graphs.py --device cuda --model ddpm-cifar10 --steps 100 --out OUT

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
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:]), out


def model_cost_curve(
    model: torch.nn.Module, x: torch.Tensor, schedule: deqkern.Schedule, dtype: torch.dtype, device: torch.device,
    repeats: int, widths: list[int],
) -> dict[int, float]:
    """Median seconds of one eager model call on ``rows`` rows, for the batch alone, powers of two
    up to the largest window's rows, and every window's rows (``B W``)."""
    batch, top = x.shape[0], x.shape[0] * max(widths)
    sizes = sorted({batch, top, *(batch * w for w in widths), *(r for r in (2 ** i for i in range(20)) if batch < r < top)})
    ts = schedule.timesteps.to(device)
    curve = {}
    for rows in sizes:
        xs = x[torch.arange(rows, device=device) % batch].to(dtype)
        t_rows = ts[torch.arange(rows, device=device) % ts.numel()]
        curve[rows], _ = timed(lambda: model(xs, t_rows), device, repeats)
    return curve


def main(argv: list[str] | None = None) -> dict[str, Any]:
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
    ap.add_argument("--window", type=int, nargs="+", default=None,
                    help="windows (rows per round per sample) to compare; default: S (values above S mean S)")
    ap.add_argument("--per-graph", type=int, default=4, help="rounds (or sequential steps) per CUDA graph")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    ap.add_argument("--out", default="out/e2e")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model, shape = build_model(args.model, device, dtype)
    execution = "graph" if device.type == "cuda" else "static"
    from diffusers import DDIMScheduler

    sched_cfg = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    gen = torch.Generator().manual_seed(0)
    records: list[dict[str, Any]] = []
    for steps in args.steps:
        schedule = deqkern.Schedule.from_diffusers(sched_cfg, steps)
        x = torch.randn(args.batch, *shape, generator=gen).to(device)
        widths = sorted({min(w, steps) for w in (args.window or [steps])}, reverse=True)
        with torch.inference_mode():
            # x_T and the latents stay fp32; the model runs in --dtype. Samplers are made once and
            # called repeatedly, as a library would: the medians are steady state (graphs replayed)
            seq_eager = deqkern.SequentialSampler(model, schedule, model_dtype=dtype, execution="eager")
            seq_graph = deqkern.SequentialSampler(
                model, schedule, model_dtype=dtype, execution=execution, rounds_per_graph=args.per_graph)
            t_seq_eager, seq = timed(lambda: seq_eager(x), device, args.repeats)
            t_seq_first, t_seq_graph, seq_g = timed_first(lambda: seq_graph(x), device, args.repeats)
            curve = model_cost_curve(model, x, schedule, dtype, device, args.repeats, widths)
            rec: dict[str, Any] = dict(
                steps=steps, batch=args.batch, sequential_eager_s=t_seq_eager, sequential_graph_s=t_seq_graph,
                sequential_graph_first_call_s=t_seq_first,
                sequential_graph=seq_g.info.get("graph", False), model_batch_curve_s=curve, windows={},
            )
            for width in widths:
                rows = x.shape[0] * width
                win: dict[str, Any] = dict(model_batch_s=curve[rows], model_batch_rows=rows, solvers={})
                for name in args.solvers:
                    kw = dict(SOLVERS[name], tol=args.tol, stop=args.stop, window=width, rounds_per_graph=args.per_graph,
                              execution=execution)
                    par = deqkern.ParallelSampler(model, schedule, model_dtype=dtype, **kw)
                    t_first, t_par, res = timed_first(lambda: par(x), device, args.repeats)
                    # solver work per round: the same fixed-shape rounds with a one-copy "model"
                    free_sampler = deqkern.ParallelSampler(lambda a, b: a, schedule, max_iters=res.rounds, **kw)
                    t_free, free = timed(lambda: free_sampler(x), device, args.repeats)
                    per_round = t_free / max(free.info.get("rounds_executed", free.rounds), 1)
                    # the same round's ATen ops (the model's excluded) and those that launch a
                    # kernel (each a node of the round's graph, next to its Triton kernels),
                    # counted by the capture audit
                    audit = deqkern.ParallelSampler(
                        lambda a, b: a, schedule, max_iters=2, **{**kw, "rounds_per_graph": 1, "execution": "audit"})
                    audited = audit(x).info
                    err = float((res.x0.double() - seq.x0.double()).norm() / seq.x0.double().norm())
                    win["solvers"][name] = dict(
                        wall_s=t_par, first_call_s=t_first, rounds=res.rounds,
                        rounds_executed=res.info.get("rounds_executed", res.rounds), model_evals=res.model_evals, converged=res.all_converged,
                        x0_rel_err=err, speedup_vs_graphed_sequential=t_seq_graph / t_par,
                        speedup_vs_eager_sequential=t_seq_eager / t_par, graph=res.info.get("graph", False),
                        solver_s_per_round=per_round, solver_fraction_of_model=per_round / curve[rows],
                        aten_ops_per_round=audited["ops_per_chunk"],
                        kernel_ops_per_round=audited["kernel_ops_per_chunk"],
                    )
                rec["windows"][width] = win
        records.append(rec)

    result = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__, triton=_version("triton"), git=_git_sha(), model=args.model, dtype=args.dtype,
        stop=args.stop, tol=args.tol, date=time.strftime("%Y-%m-%d"), records=records,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps(result, indent=2))
    print(f"device={result['device']} model={args.model} dtype={args.dtype}")
    print(f"{'S':>5} {'W':>4} {'solver':>19} {'rounds':>6} {'wall ms':>9} {'seq-graph ms':>12} {'speedup':>7} "
          f"{'x0 err':>8} {'solver/model':>12}")
    for rec in records:
        for width, win in rec["windows"].items():
            for name, r in win["solvers"].items():
                print(f"{rec['steps']:>5} {width:>4} {name:>19} {r['rounds']:>6} {1e3 * r['wall_s']:>9.2f} "
                      f"{1e3 * rec['sequential_graph_s']:>12.2f} {r['speedup_vs_graphed_sequential']:>7.2f} "
                      f"{r['x0_rel_err']:>8.1e} {r['solver_fraction_of_model']:>12.3f}")
        t1 = rec["model_batch_curve_s"][rec["batch"]]
        print(f"  model batch cost, S={rec['steps']}: " + ", ".join(
            f"{rows} rows {t / t1:.2f}x" for rows, t in rec["model_batch_curve_s"].items()))
    return result


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
