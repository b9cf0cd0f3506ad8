"""``python -m deqkern.invert``: invert images through the embedded digits model, every method side by side.

With no arguments: four held-out digits (the first four of the test split) at S = 25 and S = 100
DDIM steps (eta = 0, the model's ``clip_sample`` scheduler config, drift form), each of
``implicit``, ``phantom``, ``sequential_backprop`` and ``ddim_encode`` with the same wall-clock
budget per run, starting from the same DDIM encoding. Writes the record ``inversion.json`` and the
figure ``inversion.png`` (loss vs wall time and vs model evaluations, target/reconstruction pairs)
to ``--out-dir`` (default ``./deqkern_invert_out/``, under the current directory), and prints a table.

Losses are the *exact* ones: every recorded ``x_T`` is re-evaluated with the sequential chain
after the run (outside the timings). A model evaluation is one model row (one latent at one
timestep); a vector-Jacobian product row counts as one evaluation.

    python -m deqkern.invert --image my_digit.png --steps 50 --budget 20 --out-dir /tmp/inv
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from deqkern._validate import POSITIVE_FLOAT, POSITIVE_INT, Bounded, device, output_dir
from deqkern.inversion import METHODS, InversionResult, invert

DEFAULT_OUT = Path("deqkern_invert_out")
DEFAULT_NUM_IMAGES = 4


def image_file(text: str) -> Path:
    """argparse type: a file PIL can read as an image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: no such file")
    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:  # PIL reports a corrupt file as any of these
        raise argparse.ArgumentTypeError(f"{text!r}: not a readable image ({exc})") from None
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deqkern.invert", description=__doc__.split("\n\n")[0])
    p.add_argument("--image", nargs="+", type=image_file, help="image file(s) to invert instead of held-out digits")
    p.add_argument("--negate", action="store_true",
                   help="invert the grey levels of --image (the digits are bright strokes on black)")
    p.add_argument("--num-images", type=POSITIVE_INT, default=None,
                   help=f"held-out digits to invert, at most the test split's size (default {DEFAULT_NUM_IMAGES})")
    p.add_argument("--steps", type=POSITIVE_INT, nargs="+", default=[25, 100],
                   help="DDIM steps S, at most the model's training timesteps (default 25 100)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--budget", type=POSITIVE_FLOAT, default=60.0,
                   help="wall-clock seconds per (method, S) run (default 60)")
    p.add_argument("--max-steps", type=Bounded(int, 0), default=100000, help="most optimisation steps per run")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=None,
                   help="learning rate for every method (default: per method)")
    p.add_argument("--thresholds", type=POSITIVE_FLOAT, nargs="+", default=[1e-3, 1e-4],
                   help="reconstruction MSE levels to time (default 1e-3 1e-4)")
    p.add_argument("--adjoint-window", type=POSITIVE_INT, default=None,
                   help="exact implicit gradient: recompute each adjoint round's live rows in a window of this "
                        "many steps (memory O(window), grad_options vjp='recompute'); default: one stored graph")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--threads", type=POSITIVE_INT, default=1, help="torch CPU threads (default 1: a shared machine)")
    p.add_argument("--out-dir", type=output_dir, default=DEFAULT_OUT,
                   help="folder for inversion.json and inversion.png (default: ./%(default)s/ in the current "
                        "directory)")
    return p


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags, with the checks that involve two of them."""
    args = parser.parse_args(argv)
    if args.image and args.num_images is not None:
        parser.error("argument --num-images: not allowed with --image (every --image is inverted)")
    if args.negate and not args.image:
        parser.error("argument --negate: applies to --image only")
    return args


def load_image(path: Path, channels: int, size: int, negate: bool = False) -> torch.Tensor:
    """``[channels, size, size]`` in [-1, 1] from an image file (greyscale for 1 channel)."""
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"--image: {path} does not exist")
    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BOX)
        t = torch.tensor(list(img.getdata()), dtype=torch.float32).reshape(size, size, -1).permute(2, 0, 1) / 255.0
    if negate:
        t = 1.0 - t
    return t * 2.0 - 1.0


def _targets(args: argparse.Namespace, unet: torch.nn.Module, parser: argparse.ArgumentParser
             ) -> tuple[torch.Tensor, dict[str, Any]]:
    from deqkern.models import digits_dataset

    if args.image:
        size, channels = unet.config.sample_size, unet.config.in_channels
        imgs = torch.stack([load_image(p, channels, size, args.negate) for p in args.image])
        return imgs, {"source": [str(p) for p in args.image], "negate": args.negate}
    test = digits_dataset("test")
    n = DEFAULT_NUM_IMAGES if args.num_images is None else args.num_images
    if n > test.shape[0]:
        parser.error(f"argument --num-images: the test split holds {test.shape[0]} digits, got {n}")
    return test[:n], {"source": "deqkern.models.digits_dataset('test')", "indices": list(range(n))}


def _run_summary(res: InversionResult, budget: float, thresholds: Sequence[float]) -> dict[str, Any]:
    curve = res.curve
    within = [p for p in curve if p.wall_time <= budget] or curve[:1]
    updates = max(1, res.steps)
    reach = {}
    for thr in thresholds:
        hit = res.first_reaching(thr)
        reach[f"{thr:g}"] = None if hit is None else {"wall_time": hit.wall_time, "model_evals": hit.model_evals,
                                                      "step": hit.step}
    fwd_rounds = [p.forward_rounds for p in curve]
    bwd_rounds = [p.backward_rounds for p in curve[:-1]]
    record = res.summary()
    record.pop("method")
    return {
        "lr": res.info.get("lr"),
        "loss_start": curve[0].exact_loss,
        "loss_at_budget": min(p.exact_loss for p in within),
        "sec_per_step": (curve[-1].wall_time - curve[0].wall_time) / updates if res.steps else None,
        "evals_per_step": (curve[-1].model_evals - curve[0].model_evals) / updates if res.steps else None,
        "forward_rounds_mean": sum(fwd_rounds) / len(fwd_rounds),
        "backward_rounds_mean": sum(bwd_rounds) / len(bwd_rounds) if bwd_rounds else 0.0,
        "reach": reach,
        **record,
    }


def _table(runs: list[dict[str, Any]], thresholds: Sequence[float]) -> str:
    head = f"{'S':>4} {'method':<20} {'start':>9} {'@budget':>9} {'steps':>6} {'s/step':>7} {'evals/step':>10} " \
           f"{'rounds f/b':>10}"
    head += "".join(f" {'to ' + format(t, 'g') + ' (s, evals)':>22}" for t in thresholds)
    lines = [head, "-" * len(head)]
    for r in runs:
        sps = "-" if r["sec_per_step"] is None else f"{r['sec_per_step']:.2f}"
        eps = "-" if r["evals_per_step"] is None else f"{r['evals_per_step']:.0f}"
        row = (f"{r['S']:>4} {r['method']:<20} {r['loss_start']:>9.2e} {r['loss_at_budget']:>9.2e} {r['steps']:>6} "
               f"{sps:>7} {eps:>10} {r['forward_rounds_mean']:>4.1f}/{r['backward_rounds_mean']:<5.1f}")
        for t in thresholds:
            hit = r["reach"][f"{t:g}"]
            row += f" {'not reached':>22}" if hit is None else f" {hit['wall_time']:>10.1f} {hit['model_evals']:>11d}"
        lines.append(row)
    return "\n".join(lines)


def _plot(path: Path, runs: list[dict[str, Any]], targets: torch.Tensor, recons: dict[tuple[int, str], torch.Tensor],
          budget: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({r["S"] for r in runs})
    colors = dict(zip(METHODS, ["tab:blue", "tab:orange", "tab:green", "tab:gray"]))
    rows = len(steps)
    fig = plt.figure(figsize=(12, 3.2 * rows + 2.6 + 0.35 * len(recons)))
    grid = fig.add_gridspec(rows + 1, 2, height_ratios=[3.2] * rows + [1.2 + 0.35 * len(recons)])
    for i, s in enumerate(steps):
        for j, (key, label) in enumerate([("wall_time", "wall time (s)"), ("model_evals", "model evaluations")]):
            ax = fig.add_subplot(grid[i, j])
            for r in (r for r in runs if r["S"] == s):
                xs = [p[key] for p in r["curve"]]
                ys = [p["exact_loss"] for p in r["curve"]]
                style = dict(color=colors[r["method"]], label=f"{r['method']} (lr {r['lr']})" if r["lr"] else r["method"])
                if len(xs) == 1:
                    ax.axhline(ys[0], ls="--", **style)
                else:
                    ax.plot(xs, ys, **style)
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("reconstruction MSE")
            ax.set_title(f"S = {s}: loss vs {label}")
            ax.grid(alpha=0.3, which="both")
            if key == "wall_time":
                ax.set_xlim(0, budget * 1.05)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[rows, :])
    labels = ["target"] + [f"{m} S={s}" for (s, m) in recons]
    tiles = [targets] + list(recons.values())
    ax.imshow(_mosaic(tiles).numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_yticks([(i + 0.5) * (targets.shape[-2] + 1) for i in range(len(labels))], labels, fontsize=8)
    ax.set_xticks([])
    ax.set_title("targets and reconstructions (sequential chain at the best x_T)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mosaic(rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows of ``[N, C, H, W]`` images as one greyscale array with 1-pixel gaps."""
    n, _, h, w = rows[0].shape
    out = torch.full((len(rows) * (h + 1), n * (w + 1)), -1.0)
    for i, imgs in enumerate(rows):
        for j in range(n):
            out[i * (h + 1):i * (h + 1) + h, j * (w + 1):j * (w + 1) + w] = imgs[j].detach().float().mean(0).clamp(-1, 1)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    torch.set_num_threads(args.threads)
    from diffusers import DDIMScheduler

    from deqkern.models import load_digits_model
    from deqkern.schedule import Schedule, schedule_summary

    unet, scheduler = load_digits_model(device=args.device)
    unet.requires_grad_(False)  # only x_T is optimised
    limit = scheduler.config.num_train_timesteps
    if max(args.steps) > limit:
        parser.error(f"argument --steps: expected values <= the model's num_train_timesteps={limit}, got {args.steps}")
    targets, image_info = _targets(args, unet, parser)
    targets = targets.to(args.device)
    json_path = args.out_dir / "inversion.json"
    png_path = args.out_dir / "inversion.png"

    runs: list[dict[str, Any]] = []
    recons: dict[tuple[int, str], torch.Tensor] = {}
    schedules = {}
    for s in args.steps:
        sched = Schedule.from_diffusers(DDIMScheduler.from_config(scheduler.config), s)
        schedules[s] = schedule_summary(sched)
        for method in args.methods:
            print(f"S={s} {method}: up to {args.budget:g} s ...", flush=True)
            grad_options = None
            if args.adjoint_window is not None and method == "implicit":
                grad_options = {"vjp": "recompute", "window": args.adjoint_window}
            res = invert(unet, targets, sched, method, time_budget=args.budget, max_steps=args.max_steps, lr=args.lr,
                         exact_curve=True, grad_options=grad_options)
            runs.append({"S": s, "method": method, **_run_summary(res, args.budget, args.thresholds)})
            recons[(s, method)] = res.reconstruction.cpu()

    table = _table(runs, args.thresholds)
    print(table)
    record = {
        "description": "Inversion of held-out digits through the embedded digits UNet: loss after a fixed wall-clock "
                       "budget and cost to reach fixed reconstruction MSEs, every method from the same DDIM encoding. "
                       "Losses are exact (sequential chain re-evaluated at each recorded x_T, outside the timings). "
                       "One model evaluation = one model row; one VJP row counts as one evaluation.",
        "command": "python -m deqkern.invert " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": args.device,
                    "torch": torch.__version__, "loadavg_end": list(os.getloadavg())},
        "model": "deqkern.models.load_digits_model() (UNet2DModel, 1x8x8, clip_sample=True)",
        "images": image_info,
        "schedules": {str(k): v for k, v in schedules.items()},
        "budget_s": args.budget,
        "thresholds": args.thresholds,
        "loss": "mean squared error per pixel, images in [-1, 1], averaged over the batch",
        "runs": runs,
        "table": table.splitlines(),
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=1))
    title = (f"Inversion of {targets.shape[0]} image(s), digits UNet, DDIM eta=0, budget {args.budget:g} s per run, "
             f"{args.device}, {torch.get_num_threads()} thread(s)")
    _plot(png_path, runs, targets.cpu(), recons, args.budget, title)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
