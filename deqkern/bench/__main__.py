"""``python -m deqkern.bench`` (or ``deqkern-bench``): every solver side by side.

Run with no arguments for the embedded digits model at S = 25 and 100 in a few CPU minutes.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from deqkern._validate import OptionError, device_or_auto, output_dir, output_file
from deqkern.bench.chains import SCHEDULERS
from deqkern.bench.pipeline import PIPELINES
from deqkern.bench.runner import ALL_SOLVERS, BEST, BOUNDS, DESCRIPTIONS, BenchConfig, run_benchmark
from deqkern.errors import UnsupportedSchedulerOption
from deqkern.models import CheckpointError
from deqkern.models.loading import resolve_layout

QUICK = {"steps": (6, 10), "batch": 2, "window": 4}

_EPILOG = "solvers:\n" + "\n".join(f"  {name:<21} {DESCRIPTIONS[name]}" for name in ALL_SOLVERS) + f"""

  Our best setting is {BEST} (marked * in the table). Every solver gets the same model, initial
  noise x_T, step noise, batch and chain; only the solver differs.

table columns:
  rounds     sequential model calls (one batched call over the window per round)
  evals      model evaluations = rows pushed through the UNet, all rounds together
  wall s     wall time of the solve, median of --repeats runs and (min-max) when more than one
             (device synchronised; a traced warm-up run is discarded; the timed runs are interleaved,
             repetition r of every method before repetition r+1 of any, so background load on a
             shared machine hits every method alike)
  speedup    sequential median wall time / this median. On a CPU a batched model call amortises
             only its fixed overhead: past a few hundred rows time grows with the rows, so the
             CPU speedup is small; the rounds are what a GPU turns into speed
  r@tgt      first round whose x0 is within --target-err (relative L2) of sequential, for every
             sample ('>' : never reached)
  x0 relerr  ||x0 - x0_sequential|| / ||x0_sequential||, worst sample
  PSNR dB    of x0 vs sequential as images in [-1, 1] (peak-to-peak 2), worst sample
  conv       whether the solver met its own stopping rule (deq-ddim stops after 15 evaluations)

outputs: the table on stdout, <out>/bench.json (--json), <out>/convergence.png (residual and x0
error per round, log scale) and <out>/samples.png (sequential vs ours, same noise).
"""


def model_dir(text: str) -> str:
    """argparse type: a local diffusers checkpoint folder in a layout the loader accepts."""
    try:
        resolve_layout(text)
    except CheckpointError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    p = argparse.ArgumentParser(
        prog="python -m deqkern.bench",
        description="Benchmark parallel diffusion samplers: the whole DDIM/DDPM chain solved as one fixed point "
                    "(deqkern, DEQ-DDIM, torchdeq) or by sliding-window Picard (ParaDiGMS), against sequential "
                    "sampling on the same noise.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=model_dir, metavar="PATH", help="local diffusers dir (unet/ + scheduler/ or a "
                   "UNet2DModel dir); default: the embedded 8x8 digits model")
    p.add_argument("--steps", type=BOUNDS["steps"], nargs="+", default=list(d.steps), metavar="S",
                   help=f"chain lengths (default: {' '.join(map(str, d.steps))}; try 25 100 1000)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=d.scheduler, help="diffusers scheduler built from "
                   "the model's scheduler config (flow: the epsilon model converted to a velocity model, "
                   "deqkern.models.flow; dpm++2m: DPM-Solver++(2M)) (default: %(default)s)")
    p.add_argument("--eta", type=BOUNDS["eta"], default=d.eta, help="DDIM eta; > 0 makes the chain stochastic with "
                   "step noise drawn once up front (default: %(default)s)")
    p.add_argument("--clip-sample", action="store_true", help="keep the model config's x0 clipping/thresholding "
                   "(default: off, so the scan-form solvers deq-ddim and *-scan can run)")
    p.add_argument("--solvers", nargs="+", default=list(d.solvers), choices=ALL_SOLVERS, metavar="NAME",
                   help="solvers to run (default: all; see the list below)")
    p.add_argument("--tol", type=BOUNDS["tol"], default=d.tol, help="relative stopping tolerance ||G(X)-X|| <= "
                   "tol ||G(X)|| for deqkern and torchdeq (default: %(default)s)")
    p.add_argument("--stop", default=d.stop, choices=("relative", "x0"),
                   help="deqkern's stopping rule: per-row relative residual, or x0, which bounds x0's error "
                   "by --tol (default: %(default)s)")
    p.add_argument("--paradigms-tol", type=BOUNDS["paradigms_tol"], default=d.paradigms_tol,
                   help="ParaDiGMS tolerance on its noise-scaled rule (default: %(default)s, the pipeline's)")
    p.add_argument("--target-err", type=BOUNDS["target_err"], default=d.target_err,
                   help="x0 relative error for the r@tgt column (default: %(default)s)")
    p.add_argument("--window", type=BOUNDS["window"], default=d.window,
                   help="window of paradigms and the *-win solvers (default: %(default)s, ParaDiGMS' parallel); "
                   "'auto': the *-win solvers take window='auto' (chosen per call from the measured model cost) and "
                   "paradigms 10")
    p.add_argument("--history", type=BOUNDS["history"], default=d.history,
                   help="history m of the deqkern Anderson variants (default: %(default)s, the library's)")
    p.add_argument("--ridge", type=BOUNDS["ridge"], default=d.ridge, help="their ridge, relative to the mean Gram "
                   "diagonal (default: %(default)s, the library's)")
    p.add_argument("--max-iters", type=BOUNDS["max_iters"], default=None,
                   help="most rounds for deqkern solvers (default: S)")
    p.add_argument("--batch", type=BOUNDS["batch"], default=d.batch, help="samples per solve (default: %(default)s)")
    p.add_argument("--max-batch", type=BOUNDS["max_batch"], default=None,
                   help="most model rows per call (default: unlimited)")
    p.add_argument("--device", type=device_or_auto, default=d.device,
                   help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "float64", "float16", "bfloat16"),
                   help="model and latent dtype (default: %(default)s)")
    p.add_argument("--seed", type=BOUNDS["seed"], default=d.seed,
                   help="seed of x_T and the step noise (default: %(default)s)")
    p.add_argument("--threads", type=BOUNDS["threads"], default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=BOUNDS["repeats"], default=d.repeats, help="timed runs per solver, interleaved "
                   "across the solvers; the median and min-max are reported (default: %(default)s)")
    p.add_argument("--no-warmup", action="store_true", help="time the traced run instead of separate clean runs "
                   "(halves the run time; timings then include tracing; needs --repeats 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", type=output_dir, default=Path("bench_out"), help="output folder (default: %(default)s)")
    p.add_argument("--json", type=output_file, default=None, help="JSON path (default: <out>/bench.json)")
    p.add_argument("--rounds-md", type=output_file, default=None, help="also write the rounds tables (markdown) here")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument("--pipeline", choices=PIPELINES, default=None, help="instead: a tiny offline diffusers pipeline end "
                   "to end, deqkern.sample_pipeline vs pipe(...) (uses --steps --batch --window --tol --seed)")
    p.add_argument("--distributed", action="store_true", help="under torchrun: split our solvers' model rows "
                   "across the ranks (gloo on CPU, nccl on CUDA); rank 0 prints and writes")
    p.add_argument("--quick", action="store_true", help=f"tiny run for tests: steps {QUICK['steps']}, batch "
                   f"{QUICK['batch']}, window {QUICK['window']} unless those flags are given")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    values = {
        "model": args.model, "steps": tuple(args.steps), "scheduler": args.scheduler, "eta": args.eta,
        "clip_sample": args.clip_sample, "solvers": tuple(dict.fromkeys(args.solvers)), "tol": args.tol, "stop": args.stop,
        "window": args.window, "history": args.history, "ridge": args.ridge, "max_iters": args.max_iters,
        "paradigms_tol": args.paradigms_tol, "target_err": args.target_err, "batch": args.batch,
        "device": args.device, "dtype": args.dtype, "seed": args.seed, "threads": args.threads,
        "warmup": not args.no_warmup, "repeats": args.repeats, "progress": not args.no_progress,
        "max_batch": args.max_batch, "distributed": args.distributed,
    }
    # every config field has its flag: a field added to BenchConfig without one fails here
    assert set(values) == {f.name for f in fields(BenchConfig)}, "BenchConfig and the CLI flags disagree"
    return BenchConfig(**values)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The flags; ``--quick`` changes the defaults of the flags it sizes, so explicit ones win."""
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**{k: list(v) if isinstance(v, tuple) else v for k, v in QUICK.items()})
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; a bad flag (also one found when the model is loaded) exits 2 with an
    ``error:`` line naming it, as argparse does."""
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.pipeline is not None:
        from deqkern.bench import pipeline

        if args.distributed:  # the pipeline run is one process: torchrun would run it P times over
            parser.error("argument --distributed: not with --pipeline (the pipeline run uses one process)")

        return pipeline.main(args, argv)
    if not args.distributed:
        return _run(args, parser, rank=0)
    from deqkern.distributed import world_from_env

    with world_from_env(args.device, parser.error) as rank:
        args.no_progress |= rank > 0
        return _run(args, parser, rank)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser, rank: int) -> int:
    """The benchmark itself; under ``--distributed`` every rank solves and rank 0 reports."""
    from deqkern.bench import report

    try:
        result = run_benchmark(config_from_args(args), log=print if rank == 0 else lambda _: None)
    except OptionError as exc:
        parser.error(f"argument --{exc.name.replace('_', '-')}: {exc.message}")
    except CheckpointError as exc:
        parser.error(f"argument --model: {exc}")
    except UnsupportedSchedulerOption as exc:
        parser.error(f"argument --scheduler: {exc}")
    if rank > 0:  # rank 0 prints and writes
        return 0
    print(report.format_table(result))
    json_path = report.write_json(result, args.json or args.out / "bench.json")
    written = [json_path]
    if not args.no_plots:
        written += [report.plot_convergence(result, args.out / "convergence.png"),
                    report.plot_samples(result, args.out / "samples.png")]
    if args.rounds_md is not None:
        args.rounds_md.parent.mkdir(parents=True, exist_ok=True)
        args.rounds_md.write_text(report.rounds_markdown(result))
        written.append(args.rounds_md)
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
