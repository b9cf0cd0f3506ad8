"""The distributed solve on CPU/gloo: what two ranks measure, and the cost model checked against it.

    python bench/distributed_study.py --out bench/results/distributed_cpu.json

One process measures the digits model's batch-cost curve t(rows) and the single-process solves
(DDIM S=25, batch 4, windows 5/10/25: rounds, wall, time outside the model per round); then two
gloo ranks (``torch.distributed.run``, this file with ``--worker``) measure the all-gather's
latency and bandwidth, a broadcast of the iterate (the alternative to the replicated solver
update), and the distributed solves (rounds, model rows per rank, bytes gathered per round, x0
against the single process, wall). :func:`deqkern.distributed.predicted_speedup` then predicts the
two-rank time from t(rows), the rounds and the fitted link, next to the measured one. CPU only:
no GPU number here is measured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

STEPS, BATCH, WINDOWS, TOL = 25, 4, (5, 10, 25), 1e-3
ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
GATHER_NUMBERS = (64, 4096, 65536, 1048576)  #: float32 numbers per rank


def _median_time(fn, repeats: int = 3) -> float:
    fn()
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - start)
    return statistics.median(walls)


class Timed(torch.nn.Module):
    """The model, summing the seconds spent in it."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.seconds = inner, 0.0

    def forward(self, x, t):
        start = time.perf_counter()
        out = self.inner(x, t)
        self.seconds += time.perf_counter() - start
        return out


def _problem():
    import deqkern
    from deqkern.models import load_digits_model

    unet, ddpm = load_digits_model()
    from diffusers import DDIMScheduler

    sched = deqkern.Schedule.from_diffusers(DDIMScheduler.from_config(ddpm.config), STEPS)
    x_T = torch.randn(BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return unet, sched, x_T


def single() -> dict:
    """t(rows) and the single-process solves per window."""
    import deqkern

    unet, sched, x_T = _problem()
    with torch.no_grad():
        curve = {n: _median_time(lambda n=n: unet(torch.randn(n, 1, 8, 8), torch.full((n,), 500))) for n in ROWS}
    solves = {}
    for w in WINDOWS:
        timed = Timed(unet)
        res = deqkern.sample(timed, x_T, sched, tol=TOL, window=w)
        solves[w] = {"rounds": res.rounds, "model_evals": res.model_evals, "wall_s": res.wall_time,
                     "outside_model_s_per_round": (res.wall_time - timed.seconds) / res.rounds,
                     "x0": res.x0.flatten().tolist()}
    return {"t_rows_s": curve, "solves": solves}


def worker(out: Path) -> None:
    """On each of the ranks (torch.distributed.run): the link, a broadcast, the distributed solves."""
    import torch.distributed as dist

    import deqkern
    from deqkern.distributed import Group, _all_gather

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = Group(None, rank, world, "gloo")
    gather = {}
    for n in GATHER_NUMBERS:
        send, recv = torch.zeros(n), torch.empty(n * world)
        gather[n] = _median_time(lambda: _all_gather(recv, send, group), 10)
    unet, sched, x_T = _problem()
    solves = {}
    for w in WINDOWS:
        iterate = torch.zeros(BATCH, w + 1, 64)  # what a rank-0 update would broadcast every round
        bcast = _median_time(lambda: dist.broadcast(iterate, 0), 10)
        res = deqkern.sample(unet, x_T, sched, tol=TOL, window=w, process_group="world", strategy="rows")
        solves[w] = {"rounds": res.rounds, "rank_rows": res.info["rank_rows"], "model_evals": res.model_evals,
                     "bytes_per_round": res.info["bytes_per_round"], "wall_s": res.wall_time,
                     "broadcast_iterate_s": bcast, "x0": res.x0.flatten().tolist()}
    if rank == 0:
        out.write_text(json.dumps({"world": world, "gather_s": gather, "solves": solves}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/distributed_cpu.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.worker:
        worker(args.out)
        return
    from deqkern.distributed import Interconnect, predicted_speedup

    one = single()
    part = args.out.with_suffix(".ranks.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", __file__, "--worker", "--out",
           str(part)]
    subprocess.run(cmd, check=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = json.loads(part.read_text())
    part.unlink()
    g = {int(k): v for k, v in ranks["gather_s"].items()}
    small, big = min(g), max(g)
    latency = g[small]
    # ring all-gather: each rank receives (P - 1) slots
    bandwidth = (ranks["world"] - 1) * (big - small) * 4 / max(g[big] - latency, 1e-12)
    link = Interconnect(bandwidth=bandwidth, latency_s=latency)
    curve = one["t_rows_s"]

    def t_rows(n: int) -> float:  # piecewise linear in the measured rows
        pts = sorted(curve)
        lo = max([p for p in pts if p <= n], default=pts[0])
        hi = min([p for p in pts if p >= n], default=pts[-1])
        if hi == lo:
            return curve[lo] * n / lo if n > lo else curve[lo]
        return curve[lo] + (curve[hi] - curve[lo]) * (n - lo) / (hi - lo)

    rows = {}
    for w in WINDOWS:
        s, d = one["solves"][w], ranks["solves"][str(w)]
        x_1, x_2 = torch.tensor(s.pop("x0")), torch.tensor(d.pop("x0"))
        pred = predicted_speedup(t_rows, {w: s["rounds"]}, steps=STEPS, batch=BATCH, row_bytes=64 * 4, ranks=2,
                                 link=link)
        # the model's share as predicted (every round at its full B*W rows: fixed-shape rounds), plus
        # the measured work outside the model, which every rank repeats
        outside = s["rounds"] * s["outside_model_s_per_round"]
        rows[w] = {"single": s, "two_ranks": d, "x0_rel_diff": float((x_2 - x_1).norm() / x_1.norm()),
                   "predicted_wall_s_1": pred["time_1"] + outside, "predicted_wall_s_2": pred["time_p"] + outside,
                   "predicted_speedup_2": (pred["time_1"] + outside) / (pred["time_p"] + outside),
                   "measured_speedup_2": s["wall_s"] / d["wall_s"]}
    result = {
        "command": "python bench/distributed_study.py --out bench/results/distributed_cpu.json",
        "device": "CPU only (2 shared cores, 1 torch thread per rank, gloo over loopback); GPU: not measured",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__,
        "chain": f"digits model, DDIM S={STEPS}, batch {BATCH}, tol {TOL} (stop x0), anderson, eager",
        "t_rows_s": curve, "gather_s_by_float32_per_rank": g,
        "link_fit": {"latency_s": latency, "bandwidth_bytes_per_s": bandwidth}, "windows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({w: {k: v for k, v in r.items() if k not in ("single", "two_ranks")} for w, r in rows.items()},
                     indent=1))


if __name__ == "__main__":
    main()
