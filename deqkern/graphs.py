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
from dataclasses import fields
from typing import Any, Callable

import torch

from deqkern.engine import Problem, SolveState, run_round
from deqkern.errors import NonFiniteModelOutput
from deqkern.graph_audit import ReplayAudit
from deqkern.model import ModelEvaluator
from deqkern.ops import step_rows
from deqkern.schedule import Schedule
from deqkern.solvers import Solver

log = logging.getLogger("deqkern")


def _state_tensors(*objs: Any) -> list[torch.Tensor]:
    """Every tensor held by the given state objects (dataclass fields or attributes)."""
    out = []
    for obj in objs:
        is_dc = hasattr(obj, "__dataclass_fields__")
        items = [getattr(obj, f.name) for f in fields(obj)] if is_dc else vars(obj).values()
        out.extend(v for v in items if isinstance(v, torch.Tensor))
    return out


def _snapshot(state: list[torch.Tensor]) -> Callable[[], None]:
    """A function that puts ``state`` back, in place, as it is now."""
    saved = [t.clone() for t in state]

    def restore() -> None:
        for t, v in zip(state, saved):
            t.copy_(v)

    return restore


def capture(chunk: Callable[[], None], state: list[torch.Tensor]) -> tuple[torch.cuda.CUDAGraph | None, str]:
    """Capture ``chunk`` as a CUDA graph without changing ``state``.

    Warm-up runs on a side stream first (so lazy initialisation, cuBLAS handles and Triton
    compilation happen before capture), then the state is restored in place — the graph
    bakes in tensor addresses, so state must never be reallocated. Returns ``(graph, "")`` or
    ``(None, reason)``.
    """
    if not all(t.is_cuda for t in state):
        return None, "CUDA graphs need every state tensor on a CUDA device"
    restore = _snapshot(state)
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


def _runner(
    chunk: Callable[[], None], state: list[torch.Tensor], what: str, mode: str, info: dict[str, Any]
) -> tuple[Callable[[], None], ReplayAudit | None]:
    """How each chunk runs, recorded in ``info``: ``mode="graph"`` replays a captured graph (or,
    when capture fails, runs the chunk with the reason logged); ``"audit"`` runs it as a graph
    would, on any device — warm-up, state restored, then every call recorded and checked
    against the first (:mod:`deqkern.graph_audit`); ``"static"`` runs it plainly. Returns the
    step and the audit, if any."""
    info["graph"] = False
    if mode == "graph":
        graph, reason = capture(chunk, state)
        if graph is not None:
            info["graph"] = True
            return graph.replay, None
        log.warning("deqkern: %s without a CUDA graph (%s)", what, reason)
        info["graph_fallback"] = reason
    elif mode == "audit":
        restore = _snapshot(state)
        chunk()  # the warm-up a capture runs, undone as capture undoes it
        restore()
        audit = ReplayAudit()
        return lambda: audit.record(chunk), audit
    return chunk, None


def _audit_info(audit: ReplayAudit | None) -> dict[str, Any]:
    return {} if audit is None else {"audited_calls": audit.calls, "ops_per_chunk": audit.ops_per_call}


def run_static(
    p: Problem, st: SolveState, solver: Solver, ev: ModelEvaluator, rounds_per_graph: int, mode: str
) -> dict[str, Any]:
    """Run fixed-shape rounds in chunks of ``rounds_per_graph`` until every sample converged or
    ``max_iters`` rounds ran; one host sync per chunk. ``mode``: ``"static"``, ``"graph"`` or
    ``"audit"`` (see :func:`_runner`). Returns execution info for the result."""

    def chunk() -> None:
        for _ in range(rounds_per_graph):
            run_round(p, st, solver, ev, static=True)

    info: dict[str, Any] = {"rounds_per_graph": rounds_per_graph}
    step, audit = _runner(chunk, _state_tensors(st, solver), "fixed-shape rounds", mode, info)
    replays = 0
    while True:
        step()
        replays += 1
        bad = st.bad_t[: p.max_iters]
        if bool((bad >= 0).any()):  # the chunk's one host sync
            r = int(torch.nonzero(bad >= 0)[0, 0])
            raise NonFiniteModelOutput(f"model output is not finite in round {r} at timestep(s) [{int(bad[r])}]")
        if int(st.rounds) >= p.max_iters or bool((st.k0 >= p.steps).all()):
            break
    # every executed round evaluates all B*W rows, including rounds after convergence in the
    # last chunk: that is what the device actually computed
    ev.evaluations = replays * rounds_per_graph * p.batch * p.width
    info["rounds_executed"] = replays * rounds_per_graph
    return {**info, **_audit_info(audit)}


def run_sequential_static(
    schedule: Schedule, x: torch.Tensor, noise: torch.Tensor | None, ev: ModelEvaluator,
    steps_per_graph: int, mode: str,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The sequential chain with the step index on the device, ``steps_per_graph`` steps per
    captured graph (the fair baseline for graphed parallel sampling); ``mode`` as in
    :func:`run_static`. Returns ``(x0, info)``."""
    s, batch = schedule.num_steps, x.shape[0]
    dev, dt = x.device, x.dtype
    coef = schedule.packed(dev, dt)
    ts = schedule.timesteps.to(dev)
    idx = torch.arange(batch, device=dev)
    state = x.reshape(batch, -1).clone()
    k = torch.zeros(1, dtype=torch.int64, device=dev)
    zflat = None if noise is None else noise.reshape(s, batch, -1)

    def one_step() -> None:
        e = ev.raw(state.reshape(x.shape), ts.index_select(0, k).expand(batch), idx).reshape(batch, -1)
        z = None if zflat is None else zflat.index_select(0, k)[0]
        state.copy_(step_rows(state, e, z, coef.index_select(0, k).expand(batch, -1), schedule.transform))
        k.add_(1)

    def chunk() -> None:
        for _ in range(steps_per_graph):
            one_step()

    info: dict[str, Any] = {"rounds_per_graph": steps_per_graph, "graph": False}
    full, rest = divmod(s, steps_per_graph)
    step, audit = _runner(chunk, [state, k], "sequential steps", mode, info) if full > 0 else (chunk, None)
    for _ in range(full):
        step()
    for _ in range(rest):
        one_step()
    ev.evaluations = s * batch
    out = state.reshape(x.shape)
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteModelOutput("model output is not finite in the sequential chain (graphed: round unknown)")
    return out, {**info, **_audit_info(audit)}
