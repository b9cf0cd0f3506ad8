"""The sequential chain, ``x[k+1] = step_k(x[k], model(x[k], t_k), z_k)``: the oracle's step, written
once (:class:`ChainStep`) and used by the eager sequential sampler, its fixed-shape / CUDA-graph
workspace (:class:`SequentialWorkspace`, the fair baseline for graphed parallel sampling) and the
checkpointed backprop baseline of the inversion.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from deqkern.errors import NonFiniteModelOutput
from deqkern.graphs import ChunkRunner
from deqkern.model import ModelEvaluator
from deqkern.ops import step_rows
from deqkern.ops.window import converted_rows
from deqkern.schedule import Schedule


class ChainStep:
    """One step of the chain for a batch shaped like ``x_T`` (coefficients and timesteps on its
    device, in its dtype), docs/math.md §1.

    A multistep chain's step also reads the previous step's converted output (docs/math.md §1.1):
    :meth:`advance` takes it, :meth:`converted` makes it, and :meth:`__call__` carries it from step
    to step, so there the steps must run in order from ``k = 0``.

    ``k`` is a Python int (eager: the model output is checked, an error names round ``k``) or a
    ``[1]`` int64 device tensor (fixed shapes: unchecked and without a host sync, so a chunk of
    steps can be captured as a CUDA graph). Differentiable by autograd when called so.
    """

    def __init__(self, ev: ModelEvaluator, schedule: Schedule, x_T: torch.Tensor) -> None:
        self.ev, self.transform, self.shape = ev, schedule.transform, x_T.shape
        self.coef = schedule.packed(x_T.device, x_T.dtype)
        self.ts = schedule.timesteps.to(x_T.device)
        self.idx = torch.arange(x_T.shape[0], device=x_T.device)
        self.ms = schedule.packed_multistep(x_T.device, x_T.dtype)
        self._u: torch.Tensor | None = None  # the previous step's converted output (__call__)

    def model_out(self, x: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
        """``model(x, t_k)`` as ``[B, D]`` rows (checked for an int ``k``)."""
        batch = self.shape[0]
        if isinstance(k, int):
            e = self.ev(x.reshape(self.shape), self.ts[k].expand(batch), self.idx, round_index=k)
        else:
            e = self.ev.raw(x.reshape(self.shape), self.ts.index_select(0, k).expand(batch), self.idx)
        return e.reshape(batch, -1)

    def _row(self, table: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
        """Row ``k`` of a per-step table, expanded over the batch."""
        row = table[k] if isinstance(k, int) else table.index_select(0, k)[0]
        return row.expand(self.shape[0], -1)

    def advance(
        self, x: torch.Tensor, e: torch.Tensor, k: int | torch.Tensor, z: torch.Tensor | None,
        u_prev: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``step_k(x, e, z)`` of ``[B, D]`` rows, ``z`` the step's noise (any shape of ``x_T``);
        ``u_prev`` ``[B, D]``: step ``k-1``'s converted output (multistep chains; unread at ``k = 0``)."""
        batch = self.shape[0]
        zf = None if z is None else z.reshape(batch, -1)
        ms = None if self.ms is None else self._row(self.ms, k)
        if ms is not None and u_prev is None:
            u_prev = torch.zeros_like(e)  # only step 0 has none, and its c1 is 0
        return step_rows(x.reshape(batch, -1), e, zf, self._row(self.coef, k), self.transform, ms, u_prev)

    def converted(self, x: torch.Tensor, e: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor | None:
        """Step ``k``'s converted output ``[B, D]`` (what step ``k+1`` reads), None for a one-step chain."""
        if self.ms is None:
            return None
        return converted_rows(x.reshape(self.shape[0], -1), e, self._row(self.coef, k), self._row(self.ms, k),
                              self.transform)

    def __call__(self, x: torch.Tensor, k: int | torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """``x[k+1]`` from ``x = x[k]``, shaped like ``x_T``."""
        e = self.model_out(x, k)
        u_prev = None if isinstance(k, int) and k == 0 else self._u
        nxt = self.advance(x, e, k, z, u_prev)
        self._u = self.converted(x, e, k)
        return nxt.reshape(self.shape)


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
        self.step = ChainStep(ev, schedule, x)
        self.state = x.reshape(batch, -1).clone()
        self.k = torch.zeros(1, dtype=torch.int64, device=dev)
        #: the first step whose model output was not finite (S: none), recorded on the device as
        #: the parallel rounds' ``bad_t`` is: a captured chunk cannot raise in the step at fault
        self.bad_k = torch.full((1,), s, dtype=torch.int64, device=dev)
        self.z = torch.zeros(s, batch, math.prod(x.shape[1:]), device=dev, dtype=dt) if has_noise else None
        #: the previous step's converted output (multistep chains; zero before step 0, whose c1 is 0)
        self.u = torch.zeros_like(self.state) if schedule.is_multistep else None
        self.runner: ChunkRunner | None = None

    def _one_step(self) -> None:
        e = self.step.model_out(self.state, self.k)
        z = None if self.z is None else self.z.index_select(0, self.k)[0]
        steps = self.schedule.num_steps
        torch.minimum(self.bad_k, torch.where(torch.isfinite(e).all(), steps, self.k), out=self.bad_k)
        nxt = self.step.advance(self.state, e, self.k, z, self.u)
        if self.u is not None:
            self.u.copy_(self.step.converted(self.state, e, self.k))
        self.state.copy_(nxt)
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
        if self.u is not None:
            self.u.zero_()
        if self.z is not None:
            self.z.copy_(noise.reshape(self.z.shape))
        full, rest = divmod(s, self.steps_per_graph)
        if self.runner is None and full > 0:
            state = [self.state, self.k, self.bad_k] + ([self.u] if self.u is not None else [])
            self.runner = ChunkRunner(self._chunk, state, "sequential steps", self.mode)
        for _ in range(full):
            self.runner()
        for _ in range(rest):
            self._one_step()
        self.ev.evaluations = s * self.shape[0] * self.ev.rows_per_latent
        out = self.state.reshape(self.shape).clone()
        bad_k = int(self.bad_k)
        if bad_k < s:
            t = int(self.step.ts[bad_k])
            raise NonFiniteModelOutput(f"model output is not finite in round {bad_k} at timestep(s) [{t}]")
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteModelOutput("the sequential chain is not finite: a step overflowed (model output finite)")
        info = {"rounds_per_graph": self.steps_per_graph, "graph": False}
        if self.runner is not None:
            info.update(self.runner.summary())
        return out, info
