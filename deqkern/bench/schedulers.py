"""``python -m deqkern.bench.schedulers``: rounds to x0 within ``--target-err`` of sequential on every
chain ``--scheduler`` offers, deqkern's default solver against the peers, full window and window
``--window``, with each scheduler's rounds over DDIM's at the same S (GitHub issue 11, item 4).

Every scheduler runs :func:`deqkern.bench.runner.run_benchmark` on the same model, x_T draw, batch
and settings. Writes ``<out>.json`` and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deqkern.bench.chains import SCHEDULERS
from deqkern.bench.report import _finite
from deqkern.bench.runner import BEST, BOUNDS, BenchConfig, run_benchmark

#: (full window, window --window) pairs: ours, then ParaDiGMS; then the full-window-only peers
PAIRS = ((BEST, f"{BEST}-win"), ("paradigms-full", "paradigms"))
SOLO = ("picard-win", "deq-ddim", "torchdeq")
SOLVERS = ("sequential", *(n for pair in PAIRS for n in pair), *SOLO)


def run_schedulers(base: BenchConfig, schedulers: tuple[str, ...]) -> dict[str, Any]:
    """Every scheduler's bench with ``base``'s settings: the config, environment and ``runs`` (name:
    the RunRecord dicts)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    env: dict[str, Any] = {}
    for name in schedulers:
        result = run_benchmark(BenchConfig(**{**asdict(base), "scheduler": name}))
        env = result.environment
        runs[name] = [asdict(r) for r in result.records]
    return {"config": asdict(base), "environment": env, "runs": runs}


def _rounds(run: dict[str, Any] | None) -> tuple[str, int | None]:
    """``(cell text, worst-sample rounds to the target or None)``; n/a and never-reached runs say so."""
    if run is None:
        return "-", None
    if run["skipped"]:
        return "n/a", None
    if run["rounds_to_target"] is None:
        return f">{run['rounds']}", None
    return str(run["rounds_to_target"]), run["rounds_to_target"]


def ratio_to_ddim(data: dict[str, Any], name: str, steps: int, solver: str) -> float | None:
    """Rounds to the target of ``solver`` on scheduler ``name`` over its rounds on DDIM at the same S."""
    def get(sched: str) -> int | None:
        by = {(r["steps"], r["solver"]): r for r in data["runs"].get(sched, [])}
        return _rounds(by.get((steps, solver)))[1]

    mine, ddim = get(name), get("ddim")
    return None if mine is None or not ddim else mine / ddim


def markdown(data: dict[str, Any], command: str) -> str:
    """The rounds table: one row per (scheduler, S), the ratio of ours to DDIM's, then the n/a reasons."""
    cfg = data["config"]
    env = data["environment"]
    lines = [
        f"# Rounds to x0 within {cfg['target_err']:g} of sequential, per scheduler (CPU)",
        "",
        f"Embedded digits model, batch {cfg['batch']} (seed {cfg['seed']}), {cfg['dtype']}, "
        f"{env.get('threads', '?')} thread(s), torch {env.get('torch', '?')}, diffusers {env.get('diffusers', '?')}; "
        f"deqkern solvers tol {cfg['tol']:g} (stop {cfg['stop']}), ParaDiGMS tol {cfg['paradigms_tol']:g}, "
        f"window {cfg['window']}. Cells: rounds (batched model calls) until every sample's x0 is within "
        f"{cfg['target_err']:g} (relative L2) of the sequential sampler's; `>N`: not reached in the N rounds "
        "the solver ran; n/a: the solver cannot run that chain (reasons below). "
        f"`{BEST}` is deqkern's default solver; `x DDIM`: its rounds over DDIM's at the same S and window.",
        "",
        "Reproduce:",
        "",
        f"    {command}",
        "",
    ]
    cols = [n for n in SOLVERS if n != "sequential"]
    lines += ["| scheduler | S | " + " | ".join(cols) + f" | {BEST} x DDIM (full / win) |",
              "|---|---|" + "---|" * (len(cols) + 1)]
    reasons: dict[str, set[str]] = {}
    for name in SCHEDULERS:
        for steps in cfg["steps"]:
            by = {r["solver"]: r for r in data["runs"].get(name, []) if r["steps"] == steps}
            cells = [_rounds(by.get(n))[0] for n in cols]
            ratios = [ratio_to_ddim(data, name, steps, n) for n in PAIRS[0]]
            ratio = " / ".join("-" if q is None else f"{q:.2f}" for q in ratios)
            lines.append(f"| {name} | {steps} | " + " | ".join(cells) + f" | {ratio} |")
            for n, r in by.items():
                if r["skipped"]:
                    reasons.setdefault(r["skipped"], set()).add(n)
    if reasons:
        lines += ["", "n/a:", ""] + [f"* {', '.join(sorted(who))}: {why}" for why, who in reasons.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deqkern.bench.schedulers", description=__doc__.split("\n\n")[0])
    d = BenchConfig()
    p.add_argument("--schedulers", nargs="+", choices=SCHEDULERS, default=list(SCHEDULERS), metavar="NAME",
                   help=f"chains to run (default: all: {' '.join(SCHEDULERS)})")
    p.add_argument("--steps", type=BOUNDS["steps"], nargs="+", default=[25, 100], metavar="S",
                   help="chain lengths (default: %(default)s)")
    p.add_argument("--window", type=BOUNDS["window"], default=d.window,
                   help="window of the *-win solvers and ParaDiGMS (default: %(default)s)")
    p.add_argument("--batch", type=BOUNDS["batch"], default=d.batch, help="samples per solve (default: %(default)s)")
    p.add_argument("--threads", type=BOUNDS["threads"], default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path("bench/results/schedulers_cpu"),
                   help="writes OUT.json and OUT.md (default: %(default)s)")
    args = p.parse_args(argv)
    base = BenchConfig(steps=tuple(args.steps), solvers=SOLVERS, window=args.window, batch=args.batch,
                       threads=args.threads, device="cpu", warmup=False, progress=False)
    command = "python -m deqkern.bench.schedulers " + " ".join(argv if argv is not None else sys.argv[1:])
    data = {"command": command.strip(), **run_schedulers(base, tuple(dict.fromkeys(args.schedulers)))}
    data["ratio_to_ddim"] = {
        f"{name} S={s} {solver}": ratio_to_ddim(data, name, s, solver)
        for name in data["runs"] for s in args.steps for solver in PAIRS[0]
    }
    out = args.out
    json_path = out.with_name(out.name + ".json")
    md_path = out.with_name(out.name + ".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_finite(data), indent=1) + "\n")  # NaN is not JSON: null
    md_path.write_text(markdown(data, data["command"]))
    print(md_path.read_text())
    print(f"wrote {json_path}, {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
