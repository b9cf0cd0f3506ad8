"""Fixed-shape execution of solver rounds, captured as CUDA graphs when possible.

A chunk of ``K`` rounds (model batch + scan + solve + mix, all in place, no host sync) is
captured once and replayed; convergence (and non-finite model output) is checked once per
replay. The same chunk callable runs eagerly when capture is impossible (CPU, a model that
syncs with the host), so the runner's logic — buffer reuse, chunking, the per-chunk check, the
device-side Anderson slot ring — is exercised by the CPU tests; ``"audit"`` execution runs it
as a graph would (warm-up, restore, every call checked against the captured one), on a CPU too.

The sequential baseline is captured the same way (K steps per graph, the step index on the
device), so parallel-vs-sequential timings compare like with like.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from deqkern.engine import Problem, SolveState, run_round, snapshot, state_tensors
from deqkern.errors import NonFiniteModelOutput
from deqkern.graph_audit import ReplayAudit
from deqkern.model import ModelEvaluator
from deqkern.ops import step_rows
from deqkern.schedule import Schedule
from deqkern.solvers import Solver

log = logging.getLogger("deqkern")


def capture(chunk: Callable[[], None], state: list[torch.Tensor]) -> tuple[torch.cuda.CUDAGraph | None, str]:
    """Capture ``chunk`` as a CUDA graph without changing ``state``.

    Warm-up runs on a side stream first (so lazy initialisation, cuBLAS handles and Triton
    compilation happen before capture), then the state is restored in place — the graph
    bakes in tensor addresses, so state must never be reallocated. Returns ``(graph, "")`` or
    ``(None, reason)``.
    """
    if not all(t.is_cuda for t in state):
        return None, "CUDA graphs need every state tensor on a CUDA device"
    restore = snapshot(state)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            chunk()
        torch.cuda.current_stream().wait_stream(side)
        restore()  # undo the warm-up; capture itself records kernels without running them
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chunk()
    except Exception as exc:  # capture is best-effort: any failure means eager execution
        torch.cuda.synchronize()
        restore()
        return None, f"capture failed: {type(exc).__name__}: {exc}"
    return graph, ""


class ChunkRunner:
    """One chunk of fixed-shape work over fixed buffers, made once and run many times.

    ``mode="graph"`` captures the chunk when made and replays the graph on every call (or, when
    capture fails, runs the chunk, with the reason logged); ``"audit"`` runs it as a graph would,
    on any device — warm-up, state restored, then every call recorded and checked against the
    first (:mod:`deqkern.graph_audit`); ``"static"`` runs it plainly. Made after the state holds
    real data: the warm-up runs on it.
    """

    def __init__(self, chunk: Callable[[], None], state: list[torch.Tensor], what: str, mode: str) -> None:
        self.info: dict[str, Any] = {"graph": False}
        self.audit: ReplayAudit | None = None
        self._step = chunk
        if mode == "graph":
            graph, reason = capture(chunk, state)
            if graph is not None:
                self.info["graph"] = True
                self._step = graph.replay
            else:
                log.warning("deqkern: %s without a CUDA graph (%s)", what, reason)
                self.info["graph_fallback"] = reason
        elif mode == "audit":
            restore = snapshot(state)
            chunk()  # the warm-up a capture runs, undone as capture undoes it
            restore()
            audit = self.audit = ReplayAudit()
            self._step = lambda: audit.record(chunk)

    def __call__(self) -> None:
        self._step()

    def summary(self) -> dict[str, Any]:
        """Execution info for a result: graph or not (and why), the audit's counts."""
        out = dict(self.info)
        if self.audit is not None:
            out.update(audited_calls=self.audit.calls, ops_per_chunk=self.audit.ops_per_call,
                       kernel_ops_per_chunk=self.audit.kernel_ops_per_call)
        return out


#: A solve whose worst live row is within this factor of its stopping test (``SolveState.worst``,
#: ``err / tol`` in the rule's own units) runs the rest of its rounds one per chunk. Each chunk
#: ends at a host sync, so a K-round chunk can run up to K-1 rounds past convergence, each a full
#: B*W-row model batch; one-round chunks cost a sync per round instead.
#: Chosen by bench/solver_studies.py tail-chunks.
TAIL_FACTOR = 100.0


@dataclass
class StaticRunners:
    """The chunks of fixed-shape rounds over one workspace: ``bulk`` runs ``rounds`` rounds and
    ``tail`` one (``None`` when ``rounds`` is 1)."""

    bulk: ChunkRunner
    tail: ChunkRunner | None
    rounds: int

    def summary(self) -> dict[str, Any]:
        """Execution info of both: graphed only if both were captured; the audit's calls of both,
        its ops (and kernel ops) per chunk of the bulk and (``ops_per_round``,
        ``kernel_ops_per_round``) of the tail."""
        out = self.bulk.summary()
        if self.tail is not None:
            tail = self.tail.summary()
            out["graph"] = out["graph"] and tail["graph"]
            if "graph_fallback" in tail:
                out.setdefault("graph_fallback", tail["graph_fallback"])
            if self.tail.audit is not None:
                out["audited_calls"] += tail["audited_calls"]
                out["ops_per_round"] = tail["ops_per_chunk"]
                out["kernel_ops_per_round"] = tail["kernel_ops_per_chunk"]
        return out


def static_runners(
    p: Problem, st: SolveState, solver: Solver, ev: ModelEvaluator, rounds_per_graph: int, mode: str
) -> StaticRunners:
    """Chunks of ``rounds_per_graph`` fixed-shape rounds and of one round over ``st`` and
    ``solver``'s buffers (each captured as its own CUDA graph in ``mode="graph"``)."""

    def chunk(rounds: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(rounds):
                run_round(p, st, solver, ev, static=True)

        return run

    state = state_tensors(st, solver)
    bulk = ChunkRunner(chunk(rounds_per_graph), state, "fixed-shape rounds", mode)
    tail = ChunkRunner(chunk(1), state, "fixed-shape rounds", mode) if rounds_per_graph > 1 else None
    return StaticRunners(bulk, tail, rounds_per_graph)


def run_static(p: Problem, st: SolveState, ev: ModelEvaluator, runners: StaticRunners) -> dict[str, Any]:
    """Run chunks until every sample converged or ``max_iters`` rounds ran, one host sync per
    chunk: ``rounds``-round chunks while some live row is more than ``TAIL_FACTOR`` times away
    from its stopping test, one-round chunks after. Returns execution info for the result."""
    executed = tail_chunks = 0
    near = False
    while True:
        if near and runners.tail is not None:
            runners.tail()
            executed += 1
            tail_chunks += 1
        else:
            runners.bulk()
            executed += runners.rounds
        bad = st.bad_t[: p.max_iters]
        status = torch.stack([
            (bad >= 0).any().to(torch.float64), st.rounds.to(torch.float64),
            (st.k0 >= p.steps).all().to(torch.float64), st.worst.max(),
        ])
        any_bad, rounds, done, worst = status.tolist()  # the chunk's one host sync, one copy
        if any_bad:
            r = int(torch.nonzero(bad >= 0)[0, 0])
            raise NonFiniteModelOutput(f"model output is not finite in round {r} at timestep(s) [{int(bad[r])}]")
        if rounds >= p.max_iters or done:
            break
        near = rounds > 0 and worst <= TAIL_FACTOR
    # every executed round evaluates all B*W rows, including rounds after convergence in the
    # last chunk: that is what the device actually computed
    ev.evaluations = executed * p.batch * p.width * ev.rows_per_latent
    info = {"rounds_per_graph": runners.rounds, "rounds_executed": executed, "tail_chunks": tail_chunks}
    return {**info, **runners.summary()}


class SequentialWorkspace:
    """The sequential chain on fixed buffers, the step index on the device, ``steps_per_graph``
    steps per chunk (captured as one CUDA graph in ``mode="graph"``: the fair baseline for
    graphed parallel sampling). Made once per input shape; :meth:`run` loads new inputs in
    place and reuses the chunk, so later runs replay without capturing again."""

    def __init__(
        self, schedule: Schedule, x: torch.Tensor, has_noise: bool, ev: ModelEvaluator, steps_per_graph: int, mode: str
    ) -> None:
        s, batch = schedule.num_steps, x.shape[0]
        dev, dt = x.device, x.dtype
        self.schedule, self.shape, self.ev, self.mode, self.steps_per_graph = schedule, x.shape, ev, mode, steps_per_graph
        self.coef = schedule.packed(dev, dt)
        self.ts = schedule.timesteps.to(dev)
        self.idx = torch.arange(batch, device=dev)
        self.state = x.reshape(batch, -1).clone()
        self.k = torch.zeros(1, dtype=torch.int64, device=dev)
        #: the first step whose model output was not finite (S: none), recorded on the device as
        #: the parallel rounds' ``bad_t`` is: a captured chunk cannot raise in the step at fault
        self.bad_k = torch.full((1,), s, dtype=torch.int64, device=dev)
        self.z = torch.zeros(s, batch, self.state.shape[1], device=dev, dtype=dt) if has_noise else None
        self.runner: ChunkRunner | None = None

    def _one_step(self) -> None:
        batch = self.shape[0]
        e = self.ev.raw(self.state.reshape(self.shape), self.ts.index_select(0, self.k).expand(batch), self.idx)
        z = None if self.z is None else self.z.index_select(0, self.k)[0]
        coef = self.coef.index_select(0, self.k).expand(batch, -1)
        steps = self.schedule.num_steps
        torch.minimum(self.bad_k, torch.where(torch.isfinite(e).all(), steps, self.k), out=self.bad_k)
        self.state.copy_(step_rows(self.state, e.reshape(batch, -1), z, coef, self.schedule.transform))
        self.k.add_(1)

    def _chunk(self) -> None:
        for _ in range(self.steps_per_graph):
            self._one_step()

    def run(self, x: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, Any]]:
        """x0 of the chain from ``x`` (a new tensor) and execution info."""
        s = self.schedule.num_steps
        self.state.copy_(x.reshape(self.state.shape))
        self.k.zero_()
        self.bad_k.fill_(s)
        if self.z is not None:
            self.z.copy_(noise.reshape(self.z.shape))
        full, rest = divmod(s, self.steps_per_graph)
        if self.runner is None and full > 0:
            self.runner = ChunkRunner(self._chunk, [self.state, self.k, self.bad_k], "sequential steps", self.mode)
        for _ in range(full):
            self.runner()
        for _ in range(rest):
            self._one_step()
        self.ev.evaluations = s * self.shape[0] * self.ev.rows_per_latent
        out = self.state.reshape(self.shape).clone()
        bad_k = int(self.bad_k)
        if bad_k < s:
            t = int(self.ts[bad_k])
            raise NonFiniteModelOutput(f"model output is not finite in round {bad_k} at timestep(s) [{t}]")
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteModelOutput("the sequential chain is not finite: a step overflowed (model output finite)")
        info = {"rounds_per_graph": self.steps_per_graph, "graph": False}
        if self.runner is not None:
            info.update(self.runner.summary())
        return out, info
