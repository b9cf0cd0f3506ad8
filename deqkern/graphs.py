"""CUDA-graph capture and replay of fixed-shape chunks of work (a leaf: it knows nothing of the
solve).

A chunk (``K`` solver rounds, :func:`deqkern.engine.static_runners`, or ``K`` sequential steps,
:class:`deqkern.sequential.SequentialWorkspace`; all in place, no host sync) is captured once and
replayed. The same chunk callable runs eagerly when capture is impossible (CPU, a model that
syncs with the host), so the runner's logic is exercised by the CPU tests; ``"audit"`` runs it
as a graph would (warm-up, restore, every call checked against the captured one), on a CPU too.
"""
from __future__ import annotations

import logging
from dataclasses import fields
from typing import Any, Callable

import torch

from deqkern.graph_audit import ReplayAudit

log = logging.getLogger("deqkern")


def state_tensors(*objs: Any) -> list[torch.Tensor]:
    """Every tensor held by the given state objects (dataclass fields or attributes), and by
    the state objects they hold (the solve state's secant state), depth first."""
    out = []
    for obj in objs:
        is_dc = hasattr(obj, "__dataclass_fields__")
        items = [getattr(obj, f.name) for f in fields(obj)] if is_dc else vars(obj).values()
        for v in items:
            if isinstance(v, torch.Tensor):
                out.append(v)
            elif hasattr(v, "__dataclass_fields__"):
                out.extend(state_tensors(v))
    return out


def snapshot(state: list[torch.Tensor]) -> Callable[[], None]:
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
