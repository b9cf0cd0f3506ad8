"""End-to-end timings: graph-captured parallel sampling vs graph-captured sequential sampling.

Issue 3's targets, measured side by side in ONE run on ONE device:

* wall time of sequential DDIM (S model calls, captured ``--per-graph`` steps per CUDA graph)
  vs the parallel solvers (captured ``--per-graph`` rounds per graph), same x_T, x0 error vs
  the sequential result;
* solver work per round (everything but the model: scan, stopping test, solve, mix, slide) as
  a fraction of the model-batch time — measured by running the same fixed-shape rounds with
  an identity "model" whose cost is one copy.

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
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="ddpm-cifar10", help="ddpm-cifar10 | ddpm-celeba | ... | digits | tiny")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--steps", type=int, nargs="+", default=[100])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tol", type=float, default=1e-4, help="relative stop (1e-4 keeps x0 within 1e-3)")
    ap.add_argument("--window", type=int, default=None, help="rows per round (default: S)")
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
        width = min(args.window or steps, steps)
        with torch.inference_mode():
            # x_T and the latents stay fp32; the model runs in --dtype
            run_seq = lambda ex: deqkern.sample_sequential(  # noqa: E731
                model, x, schedule, model_dtype=dtype, execution=ex, rounds_per_graph=args.per_graph)
            t_seq_eager, seq = timed(lambda: run_seq("eager"), device, args.repeats)
            t_seq_graph, seq_g = timed(lambda: run_seq(execution), device, args.repeats)
            rows = x.shape[0] * width
            xs = x.repeat_interleave(width, 0)
            ts = schedule.timesteps.to(device)[:width].repeat(x.shape[0])
            t_model, _ = timed(lambda: model(xs.to(dtype), ts), device, args.repeats)
            rec: dict[str, Any] = dict(
                steps=steps, batch=args.batch, window=width, sequential_eager_s=t_seq_eager,
                sequential_graph_s=t_seq_graph, sequential_graph=seq_g.info.get("graph", False),
                model_batch_s=t_model, model_batch_rows=rows, solvers={},
            )
            for name in args.solvers:
                kw = dict(SOLVERS[name], tol=args.tol, window=width, model_dtype=dtype, rounds_per_graph=args.per_graph)
                t_par, res = timed(lambda: deqkern.sample(model, x, schedule, execution=execution, **kw), device,
                                   args.repeats)
                # solver work per round: the same fixed-shape rounds with a one-copy "model"
                t_free, free = timed(
                    lambda: deqkern.sample(lambda a, b: a, x, schedule, execution=execution,
                                           **{**kw, "max_iters": res.rounds, "model_dtype": None}),
                    device, args.repeats)
                per_round = t_free / max(free.info.get("rounds_executed", free.rounds), 1)
                err = float((res.x0.double() - seq.x0.double()).norm() / seq.x0.double().norm())
                rec["solvers"][name] = dict(
                    wall_s=t_par, rounds=res.rounds, model_evals=res.model_evals, converged=res.all_converged,
                    x0_rel_err=err, speedup_vs_graphed_sequential=t_seq_graph / t_par,
                    speedup_vs_eager_sequential=t_seq_eager / t_par, graph=res.info.get("graph", False),
                    solver_s_per_round=per_round, solver_fraction_of_model=per_round / t_model,
                )
        records.append(rec)

    result = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__, triton=_version("triton"), git=_git_sha(), model=args.model, dtype=args.dtype,
        date=time.strftime("%Y-%m-%d"), records=records,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps(result, indent=2))
    print(f"device={result['device']} model={args.model} dtype={args.dtype}")
    print(f"{'S':>5} {'solver':>14} {'rounds':>6} {'wall ms':>9} {'seq-graph ms':>12} {'speedup':>7} {'x0 err':>8} {'solver/model':>12}")
    for rec in records:
        for name, r in rec["solvers"].items():
            print(f"{rec['steps']:>5} {name:>14} {r['rounds']:>6} {1e3 * r['wall_s']:>9.2f} "
                  f"{1e3 * rec['sequential_graph_s']:>12.2f} {r['speedup_vs_graphed_sequential']:>7.2f} "
                  f"{r['x0_rel_err']:>8.1e} {r['solver_fraction_of_model']:>12.3f}")
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
