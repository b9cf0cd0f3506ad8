"""Distributed solves (``process_group=``, deqkern/distributed.py) on CPU with gloo.

Each test spawns a group of 2 or 3 processes (this file run as a script: ``_worker``) on a free
port, bounded by timeouts on the process group and on the processes. A worker runs several
scenarios and writes per rank what it saw (x0 against the single-process solve of the same
inputs in the same process, rows per model call, the errors raised); the tests assert on that.
Models are float64, so the distributed and the single-process x0 agree to float64 rounding:
tolerance ``TOL`` (relative L2). The single-process solve is itself checked against the
sequential oracle elsewhere (tests/test_sampling.py); here it is the oracle.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
#: distributed x0 against single-process x0, relative L2, float64 models
TOL = 1e-12
#: seconds: process-group init and collectives (a hang fails the test instead of the suite)
COLLECTIVE_TIMEOUT = 30
SPAWN_TIMEOUT = 120


# ------------------------------------------------------------------------------ the parent side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, tmp_path: Path) -> list[dict]:
    """Run the worker on ``world`` ranks; per rank, its results."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the reference ops: interpreted kernels are slow (tested elsewhere)
    procs = [subprocess.Popen([sys.executable, str(HERE), str(world), str(r), str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=SPAWN_TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, text) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{text[-4000:]}"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def _check_group(results: list[dict]) -> None:
    """The assertions every group shares: equality, identical results, balance, errors."""
    for name in results[0]["solves"]:
        per_rank = [r["solves"][name] for r in results]
        for rank, got in enumerate(per_rank):
            assert got["x0_err"] <= TOL, (name, rank, got["x0_err"])
            assert got["traj_err"] is None or got["traj_err"] <= TOL, (name, rank, got["traj_err"])
            assert got["window_oom"] == per_rank[0]["window_oom"], (name, rank)
            assert got["rounds"] == got["ref_rounds"], (name, rank)
            # every rank returns the same result: bitwise the same x0
            assert got["x0_sum"] == per_rank[0]["x0_sum"], (name, rank)
        if per_rank[0]["strategy"] == "rows":
            calls = [got["rows_per_round"] for got in per_rank]
            assert len({len(c) for c in calls}) == 1, (name, calls)
            for call in zip(*calls):  # each round: every rank within one model row of balanced
                assert max(call) - min(call) <= 1, (name, call)
            assert sum(map(sum, calls)) == per_rank[0]["ref_model_evals"], name  # the rows one process saw
            assert per_rank[0]["rank_rows"] == [sum(c) for c in calls], name
            assert per_rank[0]["bytes_per_round"] > 0
        for got in per_rank:  # max_batch holds per rank
            assert got["max_batch"] is None or got["max_call"] <= got["max_batch"], (name, got["max_call"])
    for name in ("raises_rows", "raises_samples"):
        for rank, r in enumerate(results):
            err = r["errors"][name]
            assert err["type"] == "RankError" and "rank(s) [1]" in err["message"], (name, rank, err)
    for name in [n for n in results[0]["errors"] if n.startswith("mismatch_")]:
        for rank, r in enumerate(results):
            err = r["errors"][name]
            assert err["type"] == "RankMismatch" and "rank 1's" in err["message"], (name, rank, err)
            assert name != "mismatch_model" or "model" in err["message"]
            assert name != "mismatch_schedule" or "schedule" in err["message"]


def test_two_ranks(tmp_path):
    results = _spawn(2, tmp_path)
    _check_group(results)
    assert set(results[0]["errors"]) >= {"mismatch_schedule", "mismatch_x_T", "mismatch_x_T_dtype"}
    for rank in range(2):  # an OOM on one rank halves the window on every rank
        oom = json.loads((tmp_path / f"oom{rank}.json").read_text())
        assert oom["window_oom"] == [12, 6] and oom["window"] == 3, oom
        assert oom["x0_err"] <= TOL and oom["audit_x0_err"] <= TOL, oom
    assert set(results[0]["solves"]) >= {"ddim_full_rows", "ddim_window_rows_static", "ddpm_window_rows",
                                         "guided_rows", "ddim_samples", "guided_samples", "ddpm_samples"}


def test_three_ranks(tmp_path):
    results = _spawn(3, tmp_path)
    _check_group(results)


def test_bench_cli_under_torchrun(tmp_path):
    """``torchrun -m deqkern.bench --distributed``: rank 0 prints the per-rank rows and writes the JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "deqkern.bench", "--distributed", "--steps", "5", "--batch", "1", "--solvers", "anderson-tri",
           "--no-warmup", "--no-plots", "--no-progress", "--out", str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SPAWN_TIMEOUT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1  # rank 0 only
    record = [r for r in json.loads((tmp_path / "bench.json").read_text())["runs"] if r["solver"] == "anderson-tri"][0]
    note = [n for n in record["notes"] if n.startswith("2 ranks: model rows per rank")]
    assert note and "bytes gathered per round" in note[0], record["notes"]
    assert record["x0_rel_err"] < 1e-3


def test_bench_distributed_outside_torchrun(capsys, monkeypatch):
    from deqkern.bench.__main__ import main

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["--distributed", "--steps", "5", "--no-progress"])
    assert exc.value.code == 2
    assert "argument --distributed: run under torchrun (not set: RANK, WORLD_SIZE" in capsys.readouterr().err


def test_bench_distributed_not_with_pipeline(capsys):
    from deqkern.bench.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--pipeline", "sd-tiny", "--distributed", "--quick"])
    assert exc.value.code == 2
    assert "argument --distributed: not with --pipeline" in capsys.readouterr().err


def test_world_from_env_destroys_the_group_after_a_normal_block(monkeypatch):
    """The bench's group ends with the block, so no gloo rank outlives its peers holding it (that
    aborted a rank at exit in CI); a block that raises leaves it, as a destroy could hang there."""
    import torch.distributed as dist

    from deqkern.distributed import world_from_env

    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with world_from_env("cpu", pytest.fail) as rank:
        assert rank == 0 and dist.is_initialized() and dist.get_backend() == "gloo"
    assert not dist.is_initialized()
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    with pytest.raises(RuntimeError, match="inside the block"):
        with world_from_env("cpu", pytest.fail):
            raise RuntimeError("inside the block")
    assert dist.is_initialized()
    dist.destroy_process_group()

def test_bad_input_without_a_group():
    import deqkern
    from deqkern.distributed import Group
    from gmm import GMMDenoiser

    sched, model = _chain(ddpm=False)
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialised"):
        deqkern.ParallelSampler(model, sched, process_group="world")
    with pytest.raises(ValueError, match="strategy: .*needs process_group"):
        deqkern.ParallelSampler(model, sched, strategy="rows")
    with pytest.raises(ValueError, match="strategy: expected None"):
        deqkern.ParallelSampler(model, sched, process_group="world", strategy="pixels")
    with pytest.raises(ValueError, match="process_group: rank 1: backend 'gloo' cannot carry cuda"):
        Group(None, 1, 2, "gloo").check_device(torch.device("cuda"))
    with pytest.raises(ValueError, match="process_group: rank 0: backend 'nccl' cannot carry cpu"):
        Group(None, 0, 2, "nccl").check_device(torch.device("cpu"))
    Group(None, 0, 2, "cpu:gloo,cuda:nccl").check_device(torch.device("cuda"))  # carried: no error
    assert isinstance(model, GMMDenoiser)


def test_balanced_slices():
    from deqkern.distributed import balanced_slices

    for total in range(0, 30):
        for parts in range(1, 7):
            sl = balanced_slices(total, parts)
            sizes = [hi - lo for lo, hi in sl]
            assert sl[0][0] == 0 and sl[-1][1] == total and max(sizes) - min(sizes) <= 1
            assert all(a[1] == b[0] for a, b in zip(sl, sl[1:]))


def test_cost_model_matches_hand_computation():
    from deqkern.distributed import Interconnect, predicted_speedup

    # t(n) = 1 + n / 100 (ms): rows cost a hundredth of the fixed overhead
    out = predicted_speedup(lambda n: 1e-3 * (1 + n / 100), {10: 12, 100: 6}, steps=100, batch=4, row_bytes=256,
                            ranks=4, link=Interconnect(bandwidth=1e9, latency_s=1e-5))
    one_100 = 6 * 1e-3 * (1 + 400 / 100)
    many_100 = 6 * (1e-3 * (1 + 100 / 100) + 1e-5 + 3 * 100 * 256 / 1e9)
    assert out["time_1"] == pytest.approx(min(one_100, 12 * 1e-3 * 1.4), rel=1e-12)
    assert out["time_p"] == pytest.approx(min(many_100, 12 * (1e-3 * 1.1 + 1e-5 + 3 * 10 * 256 / 1e9)), rel=1e-12)
    assert out["speedup"] == pytest.approx(out["time_1"] / out["time_p"], rel=1e-12)


# ------------------------------------------------------------------------------ the worker side
def _chain(ddpm: bool, steps: int = 12, eta_offset: int = 0):
    """A float64 DDIM or DDPM chain of ``steps`` and the GMM denoiser on [*, 2, 2, 4] latents."""
    import deqkern
    from gmm import GMMDenoiser

    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    ts = torch.linspace(999 - eta_offset, 0, steps).round().long()
    sched = deqkern.Schedule.ddpm(ac, ts) if ddpm else deqkern.Schedule.ddim(ac, ts)
    return sched, GMMDenoiser(ac, (2, 2, 4), dtype=torch.float64)


class Counting(torch.nn.Module):
    """The model, recording the rows of every call (and raising on call ``fail_at`` when set)."""

    def __init__(self, inner: torch.nn.Module, fail_at: int | None = None) -> None:
        super().__init__()
        self.inner, self.rows, self.fail_at = inner, [], fail_at

    def forward(self, x, t, **kwargs):
        if self.fail_at is not None and len(self.rows) == self.fail_at:
            raise RuntimeError("this rank's model fails")
        self.rows.append(x.shape[0])
        return self.inner(x, t, **kwargs)


class OutOfMemoryAbove(torch.nn.Module):
    """The model, raising ``torch.OutOfMemoryError`` on calls of more than ``rows`` rows (None: never)."""

    def __init__(self, inner: torch.nn.Module, rows: int | None) -> None:
        super().__init__()
        self.inner, self.limit = inner, rows

    def forward(self, x, t):
        if self.limit is not None and x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("out of memory (test)")
        return self.inner(x, t)


class Conditional(torch.nn.Module):
    """A conditional model: the GMM denoiser plus a term of each row's embedding."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.inner, self.proj = inner, torch.nn.Parameter(torch.randn(5, 16, generator=g, dtype=torch.float64))

    def forward(self, x, t, encoder_hidden_states):
        return self.inner(x, t) + 0.1 * torch.tanh(encoder_hidden_states @ self.proj).reshape(x.shape)


ROUND_END = -1  #: a mark in Counting.rows: the round ended


def _per_round(rows: list[int]) -> list[int]:
    """Model rows per round from calls' rows and ROUND_END marks (no marks: a round per call)."""
    if ROUND_END not in rows:
        return rows
    out, acc = [], 0
    for n in rows:
        if n == ROUND_END:
            out.append(acc)
            acc = 0
        else:
            acc += n
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _solve_both(name: str, out: dict, model, sched, x_T, noise=None, strategy=None, group="world", **kw) -> None:
    """The distributed solve of ``kw`` and the single-process one, compared, into ``out[name]``."""
    import deqkern

    counting = Counting(model)
    ref = deqkern.sample(model, x_T, sched, noise=noise, tol=1e-8, **kw)
    if strategy == "rows" and kw.get("execution") != "static":  # static rounds: one call per round and rank
        kw["on_round"] = lambda _: counting.rows.append(ROUND_END)
    res = deqkern.sample(counting, x_T, sched, noise=noise, tol=1e-8, process_group=group, strategy=strategy, **kw)
    out[name] = {"x0_err": _rel(res.x0, ref.x0), "traj_err": None if ref.trajectory is None else
                 _rel(res.trajectory, ref.trajectory), "window_oom": res.info["window_oom"], "rounds": res.rounds,
                 "ref_rounds": ref.rounds, "x0_sum": float(res.x0.sum()), "rows_per_round": _per_round(counting.rows),
                 "max_call": max(counting.rows, default=0), "max_batch": kw.get("max_batch"),
                 "strategy": res.info["strategy"],
                 "ref_model_evals": ref.model_evals, "rank_rows": res.info["rank_rows"],
                 "bytes_per_round": res.info.get("bytes_per_round")}


def _error(fn) -> dict:
    try:
        fn()
    except Exception as exc:  # recorded for the parent's assertions
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": None, "message": ""}


def _worker(world: int, rank: int, port: int, out_dir: Path) -> None:
    import torch.distributed as dist

    import deqkern

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT))
    gen = torch.Generator().manual_seed(7)
    batch = 2 if world == 3 else 4  # 3 ranks: a batch that does not divide, rows split unevenly
    x_T = torch.randn(batch, 2, 2, 4, generator=gen, dtype=torch.float64)
    ddim, model = _chain(ddpm=False)
    ddpm, _ = _chain(ddpm=True)
    noise = torch.randn(12, *x_T.shape, generator=gen, dtype=torch.float64)
    emb = torch.randn(batch, 5, generator=gen, dtype=torch.float64)
    guidance = deqkern.Guidance(3.0, cond={"encoder_hidden_states": emb},
                                uncond={"encoder_hidden_states": torch.zeros(1, 5, dtype=torch.float64)})
    cond_model = Conditional(model)
    solves: dict = {}
    # 3 ranks (slow to start on a shared CPU) run the splits that differ with the world size: uneven
    # rows, an idle rank under "samples", failures; 2 ranks run every scenario
    full = world == 2
    _solve_both("ddim_full_rows", solves, model, ddim, x_T, strategy="rows")
    _solve_both("ddim_window_rows_static", solves, model, ddim, x_T, window=5, strategy="rows", execution="static",
                stop="relative")
    _solve_both("guided_rows", solves, cond_model, ddim, x_T, window=6, guidance=guidance, max_batch=3,
                strategy="rows")
    _solve_both("ddim_samples", solves, model, ddim, x_T, window=5, strategy="samples", return_trajectory=True)
    if full:
        _solve_both("ddim_rows_new_group", solves, model, ddim, x_T, window=3, strategy="rows",
                    group=dist.new_group([0, 1]))  # a ProcessGroup, not the default one
        _solve_both("ddpm_window_rows", solves, model, ddpm, x_T, noise, window=4, strategy="rows", stop="noise")
        per_sample = {"encoder_hidden_states": emb}  # conditioning per sample, gathered to the rows
        _solve_both("cond_rows", solves, cond_model, ddim, x_T, window=4, model_kwargs=per_sample, strategy="rows")
        _solve_both("cond_samples", solves, cond_model, ddim, x_T, model_kwargs=per_sample, strategy="samples")
        _solve_both("ddpm_samples", solves, model, ddpm, x_T, noise, strategy="samples")
        _solve_both("guided_samples", solves, cond_model, ddim, x_T, guidance=guidance, strategy="samples")
    errors: dict = {}
    failing = Counting(model, fail_at=2 if rank == 1 else None)
    for strategy in ("rows", "samples"):
        errors[f"raises_{strategy}"] = _error(lambda: deqkern.sample(
            failing, x_T, ddim, process_group="world", strategy=strategy))
        failing.rows.clear()
    _, other = _chain(ddpm=False)
    if rank == 1:
        other.mu.add_(1e-3)  # another checkpoint
    errors["mismatch_model"] = _error(lambda: deqkern.sample(other, x_T, ddim, process_group="world"))
    if full:
        _more_checks(rank, model, ddim, x_T, errors, out_dir)
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"solves": solves, "errors": errors}))
    dist.destroy_process_group()


def _more_checks(rank: int, model, ddim, x_T, errors: dict, out_dir: Path) -> None:
    """OOM on one rank, the graph audit, mismatched schedules and inputs: into ``errors`` and ``oom.json``."""
    import deqkern

    # rank 1 runs out of memory above 6 rows a call: every rank halves the window alike (12 -> 6 -> 3)
    small = OutOfMemoryAbove(model, 6 if rank == 1 else None)
    ref = deqkern.sample(model, x_T, ddim, tol=1e-8, window=3)  # the window that fits: 4 x 3 rows over 2 ranks
    res = deqkern.sample(small, x_T, ddim, tol=1e-8, process_group="world", strategy="rows")
    oom = {"window_oom": res.info["window_oom"], "window": res.info["window"], "x0_err": _rel(res.x0, ref.x0)}
    # the graph audit replays the rounds' all-gather as a captured graph would (same buffers, same ops)
    ref = deqkern.sample(model, x_T, ddim, window=5, execution="audit")
    res = deqkern.sample(model, x_T, ddim, window=5, execution="audit", process_group="world", strategy="rows")
    oom["audit_x0_err"] = _rel(res.x0, ref.x0)
    (out_dir / f"oom{rank}.json").write_text(json.dumps(oom))
    sched_1, _ = _chain(ddpm=False, eta_offset=10 if rank == 1 else 0)
    errors["mismatch_schedule"] = _error(lambda: deqkern.sample(model, x_T, sched_1, process_group="world"))
    x_1 = x_T + (1e-6 if rank == 1 else 0.0)  # e.g. a seed per rank
    errors["mismatch_x_T"] = _error(lambda: deqkern.sample(model, x_1, ddim, process_group="world"))
    x_2 = x_T.float() if rank == 1 else x_T  # another dtype
    errors["mismatch_x_T_dtype"] = _error(lambda: deqkern.sample(model, x_2, ddim, process_group="world"))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
