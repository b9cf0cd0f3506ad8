"""Outputs of a benchmark run: the stdout table, the JSON, the PNGs and the rounds tables.

matplotlib is imported inside the plotting functions (Agg backend, no display needed).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from deqkern.bench.runner import BEST, OURS, BenchResult, RunRecord

#: Column headers of the stdout table, explained in ``--help``.
COLUMNS = ("solver", "form", "win", "rounds", "evals", "wall s", "speedup", "r@tgt", "x0 relerr", "PSNR dB", "conv")


def _fmt(v: Any, spec: str = "", none: str = "-") -> str:
    if v is None:
        return none
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec)


def format_table(result: BenchResult) -> str:
    """One block per chain length; ``r@tgt`` is the rounds to reach the x0 target error."""
    cfg = result.config
    env = result.environment
    lines = [
        f"device: {env.get('gpu', env['device'])} | torch {env['torch']} | diffusers {env['diffusers']} | "
        f"threads {env['threads']} | model: {result.model['source']} ({result.model['parameters']:,} params)",
        f"batch {cfg.batch}, tol {cfg.tol:g} (deqkern: stop {cfg.stop}; torchdeq: relative), ParaDiGMS tol {cfg.paradigms_tol:g} (noise-scaled), "
        f"window {cfg.window}, Anderson m={cfg.history} ridge {cfg.ridge:g}, seed {cfg.seed}",
        f"r@tgt = rounds to x0 rel. err <= {cfg.target_err:g}; errors and PSNR: worst sample; * = our best ({BEST})",
        f"wall s: median (min-max) of {cfg.repeats} timed run(s) per method, interleaved across the methods"
        if cfg.warmup else "wall s: the one traced run of each method (no warm-up)",
    ]
    if "noise" in result.quality:
        lines.append(f"digits quality of pure noise: {_quality_str(result.quality['noise'])}")
    widths = (22, 6, 5, 7, 8, 21, 8, 6, 10, 8, 5)
    header = "  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths))
    for steps in cfg.steps:
        lines += ["", f"S={steps}: {result.schedules[steps]['description']}", header, "-" * len(header)]
        for r in (r for r in result.records if r.steps == steps):
            name = r.solver + (" *" if r.solver == BEST else "")
            if r.skipped:
                lines.append(f"{name.ljust(widths[0])}  skipped: {r.skipped}")
                continue
            cells = (
                name, _fmt(r.form), _fmt(r.window), _fmt(r.rounds), _fmt(r.model_evals), _wall(r),
                _fmt(r.speedup, ".2f") + "x", _fmt(r.rounds_to_target, none="-" if r.family == "oracle" else ">"),
                _fmt(r.x0_rel_err, ".2e"), _fmt(r.psnr_db, ".1f", none="inf"),
                {True: "yes", False: "NO", None: "-"}[r.converged],
            )
            lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
        q = result.quality.get(str(steps))
        if q:
            lines.append("digits quality: " + "; ".join(f"{k}: {_quality_str(v)}" for k, v in q.items()))
        notes: dict[str, list[str]] = {}  # note -> solvers, so a shared note prints once
        for r in (r for r in result.records if r.steps == steps):
            for n in r.notes:
                notes.setdefault(n, []).append(r.solver)
        lines += [f"  note [{', '.join(who)}]: {n}" for n, who in notes.items()]
        lines += _prediction_lines(result.gpu_prediction.get(steps))
    return "\n".join(lines)


def _prediction_lines(pred: dict[str, Any] | None) -> list[str]:
    """window="auto"'s predicted GPU speedup for the CIFAR10 UNet, labelled as the prediction it is."""
    if not pred:
        return []
    m, curve = pred["rounds_model"], pred["cost_curve"].removeprefix("stated: ")
    return [f"  {pred['label']}: CIFAR10 UNet, batch 1, cost t(rows) = t(1) x {curve}; rounds(W) = "
            f"{m['a']:.2f} S/W + {m['c']:.1f} (fitted to {m['observations']} solve(s) of this run + the prior): "
            f"auto window {pred['window']}, {_fmt(pred['rounds'], '.1f')} rounds, speedup over sequential "
            f"{pred['speedup']:.1f}x"]


def _wall(r: RunRecord) -> str:
    """The median wall time, with the min-max of the timed runs when there was more than one."""
    if r.wall_s is None or len(r.wall_s_runs) < 2:
        return _fmt(r.wall_s, ".3f")
    return f"{r.wall_s:.3f} ({r.wall_s_min:.3f}-{r.wall_s_max:.3f})"


def _quality_str(q: dict[str, Any]) -> str:
    return f"mean confidence {q['mean_confidence']:.3f}, confident {q['frac_confident']:.0%} (n={q['n']})"


def write_json(result: BenchResult, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # NaN/inf are not JSON: write them as null
    path.write_text(json.dumps(_finite(result.to_json()), indent=1) + "\n")
    return path


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def plot_convergence(result: BenchResult, path: Path) -> Path:
    """Per chain length: residual ||G(X)-X||/||G(X)|| and x0 error vs round, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result.config.steps
    fig, axes = plt.subplots(2, len(steps), figsize=(5.5 * len(steps), 8), squeeze=False)
    colors = plt.get_cmap("tab20").colors  # more solvers than the default 10-colour cycle
    for col, s in enumerate(steps):
        runs = [r for r in result.records if r.steps == s and r.family != "oracle" and not r.skipped]
        for i, r in enumerate(runs):
            style = "-" if r.family == "ours" else "--"
            width = 2.5 if r.solver == BEST else 1.2
            for row, series in enumerate((r.residual_per_round, r.x0_err_per_round)):
                ys = [v if v is not None and v > 0 else float("nan") for v in series]
                axes[row, col].plot(range(1, len(ys) + 1), ys, style, lw=width, label=r.solver,
                                    color=colors[i % len(colors)])
        axes[0, col].set_title(f"S = {s}")
        axes[0, col].set_ylabel("residual ||G(X) - X|| / ||G(X)|| (worst sample)")
        axes[1, col].set_ylabel("x0 relative error vs sequential (worst sample)")
        axes[1, col].axhline(result.config.target_err, color="grey", lw=0.8, ls=":")
        for ax in axes[:, col]:
            ax.set_yscale("log")
            ax.set_xlabel("round (one batched model call)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0, -1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Convergence per round — dashed: peers, solid: deqkern, thick: {BEST}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tile(images: torch.Tensor, cols: int = 8) -> torch.Tensor:
    """``[N, C, H, W]`` in [-1, 1] -> one ``[rows*H, cols*W, C]`` image in [0, 1]."""
    n, c, h, w = images.shape
    cols = min(cols, n)
    rows = -(-n // cols)
    canvas = torch.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 0.5)  # 1-pixel grey frame
    x = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    for i in range(n):
        r, k = divmod(i, cols)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + k * (w + 1) : 1 + k * (w + 1) + w] = x[i]
    return canvas


def plot_samples(result: BenchResult, path: Path) -> Path:
    """Per chain length: sequential samples, ours (best) on the same noise, and |difference|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s in result.config.steps if "best" in result.samples.get(s, {})]
    if not steps:
        steps = list(result.samples)
    first = _tile(result.samples[steps[0]]["sequential"])
    panel_h = 4.0 * first.shape[0] / first.shape[1] + 0.35  # 4-inch-wide panels plus a title line
    fig, axes = plt.subplots(len(steps), 3, figsize=(12, panel_h * len(steps)), squeeze=False)
    for row, s in enumerate(steps):
        smp = result.samples[s]
        seq = smp["sequential"]
        best = smp.get("best", torch.full_like(seq, float("nan")))
        diff = (best - seq).abs()
        scale = 1.0 / max(float(diff.nan_to_num().max()), 1e-12)
        panels = [
            (seq, f"sequential, S={s}"), (best, f"deqkern {BEST}, S={s}"),
            (diff * scale * 2 - 1, f"|difference| x {scale:.3g}"),
        ]
        for col, (imgs, title) in enumerate(panels):
            tile = _tile(imgs.nan_to_num())
            ax = axes[row, col]
            ax.imshow((tile.squeeze(-1) if tile.shape[-1] == 1 else tile).numpy(), cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rounds_markdown(result: BenchResult) -> str:
    """The rounds tables of GitHub issue 2: rounds to the x0 target per (form, solver), and the
    rounds ratio of our best against the peers."""
    cfg = result.config
    tgt = f"{cfg.target_err:g}"
    env = result.environment
    by = {(r.steps, r.solver): r for r in result.records}
    ours = [n for n in OURS if not OURS[n].windowed and n in cfg.solvers]
    lines = [
        f"Measured with `python -m deqkern.bench` on {env.get('gpu', env['device'])} ({env['threads']} threads), "
        f"{result.model['source']}, batch {cfg.batch}, seed {cfg.seed}, {cfg.scheduler.upper()} eta={cfg.eta:g}, "
        f"x0 clipping {'on' if cfg.clip_sample else 'off'}, Anderson m={cfg.history} ridge {cfg.ridge:g} (relative), "
        f"solver tol {cfg.tol:g}.",
        "",
        f"## Rounds to reach x0 relative error {tgt} against sequential",
        "",
        "Median [min-max] over the samples of the batch (each sample converges on its own in deqkern);",
        "`>N`: not reached in the N rounds the solve ran.",
        "",
        "| S | " + " | ".join(ours) + " |",
        "|---|" + "---|" * len(ours),
    ]
    for s in cfg.steps:
        lines.append(f"| {s} | " + " | ".join(_rounds_cell(by.get((s, n))) for n in ours) + " |")
    peers = [p for p in ("paradigms", "paradigms-full", "deq-ddim", "torchdeq") if p in cfg.solvers]
    if BEST in cfg.solvers and peers:
        lines += [
            "",
            f"## Rounds of our best ({BEST}) vs the peers' settings",
            "",
            f"Each cell: peer / ours = ratio. `to {tgt}`: rounds to reach x0 error {tgt} (worst sample); "
            "`to stop`: rounds until the solver's own stopping rule ended it.",
            "",
            "| S | solver | to " + tgt + " | to stop | peer converged | peer x0 rel. err |",
            "|---|---|---|---|---|---|",
        ]
        for s in cfg.steps:
            best = by.get((s, BEST))
            if best is None or best.skipped:
                continue
            for p in peers:
                r = by.get((s, p))
                if r is None:
                    continue
                if r.skipped:
                    lines.append(f"| {s} | {p} | skipped: {r.skipped} | | | |")
                    continue
                lines.append(
                    f"| {s} | {p} | {_ratio(r.rounds_to_target, best.rounds_to_target, r.rounds)} | "
                    f"{_ratio(r.rounds, best.rounds, None)} | {'yes' if r.converged else 'no'} | {r.x0_rel_err:.2e} |"
                )
    return "\n".join(lines) + "\n"


def _rounds_cell(r: RunRecord | None) -> str:
    if r is None:
        return "-"
    if r.skipped:
        return "skipped"
    hits = r.rounds_to_target_per_sample
    if any(h is None for h in hits):
        reached = [h for h in hits if h is not None]
        return f">{r.rounds}" + (f" ({len(reached)}/{len(hits)} reached)" if reached else "")
    if len(hits) == 1:
        return str(hits[0])
    return f"{statistics.median(hits):g} [{min(hits)}-{max(hits)}]"


def _ratio(peer: int | None, ours: int | None, peer_ran: int | None) -> str:
    if peer is None:
        return f">{peer_ran} / {ours}" if peer_ran is not None else "-"
    if not ours:
        return f"{peer} / -"
    return f"{peer} / {ours} = {peer / ours:.2f}x"
