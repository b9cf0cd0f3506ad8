"""One solve across the ranks of a ``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs).

Every rank holds the model, the schedule and the same inputs; each rank runs the same
:class:`deqkern.ParallelSampler` call with ``process_group=`` and every rank returns the same
:class:`~deqkern.SampleResult`. Two splits (``strategy=``):

``"rows"``: one round's model batch across the ranks. A round evaluates ``M = g * N`` model rows
(``N`` live latent rows, all B*W in fixed-shape rounds; ``g = 2`` under classifier-free guidance,
the uncond rows then the cond rows, split as the model sees them). Rank ``r`` evaluates the
contiguous slice ``[lo_r, hi_r)`` of :func:`balanced_slices` (sizes ``floor(M/P)`` or
``ceil(M/P)``: within one row of balanced) in chunks of ``max_batch`` rows, and one all-gather of
fixed slots of ``m = ceil(M/P)`` rows (plus two status numbers: the rank's model raised or ran out
of memory, and the ``M`` it saw) fills the round's output on every rank. The solver update then
runs on every rank on identical data, so every rank holds the same iterate with no further
communication. The alternative, the update on one rank and a broadcast of the iterate
(``B (W+1) D`` numbers), saves no time: the other ranks wait for the update either way, so it
adds the broadcast to every round (0.1-0.3 ms on gloo against 13-19 ms of solver work per round
on the digits model: chosen by bench/distributed_study.py, ``broadcast_iterate_s``). Per round and rank, a ring
all-gather moves ``(P - 1) m D`` numbers in and out, and the round costs

    t_round(P) = t_model(ceil(M / P)) + t_latency + (P - 1) m D bytes_per_number / bandwidth

against ``t_model(M)`` on one rank (:func:`predicted_speedup`).

``"samples"``: plain data parallel. Rank ``r`` solves the samples ``[lo_r, hi_r)`` of the batch
(per-sample conditioning sliced with them) with no communication between rounds; x0, the
trajectory and the per-sample summaries are all-gathered at the end. It stops each rank at its
own samples' last round and communicates once, so it wins when the batch divides among the ranks
(the default then); with ``B mod P != 0`` the largest slice sets the pace and ``"rows"`` balances
better, and with ``B < P`` some rank would idle.

Safety: before a solve the ranks exchange a fingerprint (x_T, noise and init shapes, dtypes and
checksums, the device type, the model's parameter and buffer checksum, the schedule's
coefficients, the solve config, the conditioning) and every rank raises :class:`RankMismatch`
naming the first rank that differs from rank 0. A model that raises on one rank makes every rank
raise :class:`RankError` naming it (``torch.OutOfMemoryError`` on every rank when it ran out of
memory, so all ranks halve the window together). Failures outside the model call rely on the
collective timeout of ``init_process_group(timeout=...)``. Under NCCL each rank must have called
``torch.cuda.set_device`` (the fingerprint travels as a CUDA tensor). Identical iterates need identical
arithmetic: ranks on the same kind of device and library versions (bitwise-equal checksums are
required for that reason).

deqkern imports this module only when a sampler is given ``process_group``.
"""
from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterator, Mapping

import torch

from deqkern.model import ModelEvaluator

#: ``process_group="world"``: the default (WORLD) group of ``init_process_group``
WORLD = "world"
STRATEGIES: tuple[str, ...] = ("rows", "samples")
#: devices each backend carries (a backend string such as ``"cpu:gloo,cuda:nccl"`` maps its own)
_BACKEND_DEVICES = {"gloo": ("cpu",), "nccl": ("cuda",), "mpi": ("cpu",)}
#: gathered status numbers: the model raised / ran out of memory on that rank
_OK, _RAISED, _OOM = 0.0, 1.0, 2.0
_STATUS = 2  #: gathered numbers after each rank's slot: [status, the model rows it saw]


class RankError(RuntimeError):
    """A rank's model raised during a distributed solve; ``ranks`` lists the ranks at fault."""

    def __init__(self, message: str, ranks: list[int]) -> None:
        super().__init__(message)
        self.ranks = ranks


class RankMismatch(ValueError):
    """The ranks of a distributed solve disagree on its inputs; ``rank`` is the first that differs from rank 0."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


def balanced_slices(total: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` slices of ``range(total)``, one per part, sizes differing by at most
    one (the first ``total mod parts`` parts get the extra row)."""
    base, extra = divmod(total, parts)
    out, lo = [], 0
    for r in range(parts):
        hi = lo + base + (r < extra)
        out.append((lo, hi))
        lo = hi
    return out


@dataclass(frozen=True)
class Group:
    """A resolved process group: its handle (None: WORLD), this rank and the world size, the backend."""

    handle: Any
    rank: int
    world: int
    backend: str

    def check_device(self, device: torch.device) -> None:
        """``ValueError`` naming ``process_group`` and this rank unless the backend carries ``device``'s tensors."""
        backend = self.backend.lower()
        if ":" in backend:  # "cpu:gloo,cuda:nccl": the devices it maps
            carries = tuple(part.split(":")[0] for part in backend.split(","))
        else:
            carries = _BACKEND_DEVICES.get(backend, (device.type,))
        if device.type not in carries:
            raise ValueError(f"process_group: rank {self.rank}: backend {self.backend!r} cannot carry {device.type} "
                             f"tensors (x_T is on {device}); expected {' or '.join(carries)} tensors, or a backend "
                             f"for {device.type} (nccl for cuda, gloo for cpu)")


def resolve_group(process_group: Any) -> Group:
    """``process_group`` (``"world"`` or a ``torch.distributed.ProcessGroup``) as a :class:`Group`;
    a ``ValueError`` naming the argument when torch.distributed is not initialised or the value is
    neither."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group: torch.distributed is not initialised; call "
                         "torch.distributed.init_process_group(...) first (torchrun sets its environment)")
    if isinstance(process_group, str) and process_group == WORLD:
        handle = None
    elif isinstance(process_group, dist.ProcessGroup):
        handle = process_group
    else:
        raise ValueError(f"process_group: expected None, {WORLD!r} or a torch.distributed.ProcessGroup, "
                         f"got {process_group!r}")
    return Group(handle, dist.get_rank(handle), dist.get_world_size(handle), str(dist.get_backend(handle)))


def default_strategy(batch: int, world: int, on_round: bool) -> str:
    """``"samples"`` when the batch divides among the ranks (no communication between rounds,
    each rank stops with its own samples) and no per-round callback needs the whole batch;
    ``"rows"`` otherwise (balanced to a row whatever the batch)."""
    return "samples" if batch % world == 0 and not on_round else "rows"


# ------------------------------------------------------------------------------ collectives
def _all_gather(out: torch.Tensor, inp: torch.Tensor, group: Group) -> None:
    import torch.distributed as dist

    # all_gather_single is all_gather_into_tensor's newer name (torch 2.13 deprecates the old one)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group.handle)


def _all_gather_object(obj: Any, group: Group) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * group.world
    dist.all_gather_object(out, obj, group=group.handle)
    return out


@dataclass
class RowGather:
    """All-gathers ``total`` rows of which this rank holds the :func:`balanced_slices` slice, in
    fixed slots of ``ceil(total / P)`` rows plus ``_STATUS`` numbers per rank, through flat
    buffers kept across calls (a captured graph reads the same addresses every round)."""

    group: Group
    send: torch.Tensor | None = None
    recv: torch.Tensor | None = None
    #: per (total, device): the gathered slots' rows in order (the slots' padding left out)
    index: dict = field(default_factory=dict)
    #: bytes this rank received, summed over calls, in the last call, and the calls
    bytes_in: int = 0
    last: int = 0
    calls: int = 0

    def __call__(self, local: torch.Tensor | None, total: int, row_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, status: float) -> tuple[torch.Tensor, list[list[float]] | None]:
        """``(all rows [total, *row_shape], per rank [status, total] or None while capturing)``."""
        world = self.group.world
        slot = -(-total // world)
        row = math.prod(row_shape)
        width = slot * row + _STATUS
        send, recv = self._buffers(width, dtype, device)
        if local is not None and local.numel():
            send[: local.numel()].copy_(local.reshape(-1))
        send[-2].fill_(status)  # scalar fills: no host copy, so a captured graph can hold them
        send[-1].fill_(total)
        _all_gather(recv, send, self.group)
        self.last = (world - 1) * width * recv.element_size()
        self.bytes_in += self.last
        self.calls += 1
        grid = recv.view(world, width)
        rows = grid[:, : slot * row].reshape(world * slot, *row_shape).index_select(0, self._index(total, device))
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        return rows, None if capturing else grid[:, -_STATUS:].tolist()  # the round's host read (not in a graph)

    def _buffers(self, width: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        need = width * self.group.world
        if self.recv is None or self.recv.numel() < need or self.recv.dtype != dtype or self.recv.device != device:
            self.send = torch.zeros(width, dtype=dtype, device=device)
            self.recv = torch.empty(need, dtype=dtype, device=device)
        elif self.send.numel() < width:
            self.send = torch.zeros(width, dtype=dtype, device=device)
        return self.send[:width], self.recv[:need]

    def _index(self, total: int, device: torch.device) -> torch.Tensor:
        key = (total, device)
        if key not in self.index:
            slot = -(-total // self.group.world)
            order = [r * slot + i for r, (lo, hi) in enumerate(balanced_slices(total, self.group.world))
                     for i in range(hi - lo)]
            self.index[key] = torch.tensor(order, dtype=torch.int64, device=device)
        return self.index[key]



def _raise_failures(statuses: list[list[float]], group: Group, total: int, own: BaseException | None) -> None:
    """Every rank raises when some rank's model raised (``torch.OutOfMemoryError`` when one ran
    out of memory), or when the ranks disagree on the round's rows."""
    bad = [r for r, (s, _) in enumerate(statuses) if s != _OK]
    if bad:
        oom = any(statuses[r][0] == _OOM for r in bad)
        msg = (f"process_group: the model raised on rank(s) {bad} (this is rank {group.rank})"
               + (f": {type(own).__name__}: {own}" if own is not None else "; see that rank's error"))
        if oom:
            raise torch.OutOfMemoryError(msg) from own
        raise RankError(msg, bad) from own
    totals = [int(t) for _, t in statuses]
    if len(set(totals)) > 1:
        raise RankError(f"process_group: the ranks' rounds have {totals} model rows (rank {group.rank}: {total}); "
                        "their iterates differ (ranks must compute alike: same device kind and versions)",
                        [r for r, t in enumerate(totals) if t != totals[0]])


# ------------------------------------------------------------------------------ the row split
@dataclass
class CommStats:
    """What one rank's split evaluator did in a solve: the model rows its model saw and the gather."""

    local_rows: int = 0
    last_slice: int = 0  #: this rank's model rows in the last call
    gather: RowGather | None = None


@dataclass
class RowSplitEvaluator(ModelEvaluator):
    """A :class:`ModelEvaluator` that evaluates this rank's slice of each call's model rows and
    all-gathers the rest (see the module docstring). ``evaluations`` counts every rank's rows (the
    rows the model saw, as on one rank); ``stats.local_rows`` this rank's."""

    group: Group | None = None
    stats: CommStats = field(default_factory=CommStats)

    def raw(self, x: torch.Tensor, t: torch.Tensor, sample_idx: torch.Tensor,
            rounding: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        rows, g = x.shape[0], self.rows_per_latent
        if self.inputs is not None:
            x, t = self.inputs.apply(x, t)
        total = rows * g
        lo, hi = balanced_slices(total, self.group.world)[self.group.rank]
        local, status, failure = None, _OK, None
        try:
            local = self._model_rows(x, t, sample_idx, lo, hi)
        except torch.OutOfMemoryError as exc:
            status, failure = _OOM, exc
        except Exception as exc:  # any model error: the other ranks must hear of it, not hang
            status, failure = _RAISED, exc
        # gathered in the state's precision at least (the status numbers stay exact)
        dtype = torch.promote_types(x.dtype, torch.float32)
        out, statuses = self.stats.gather(local, total, tuple(x.shape[1:]), dtype, x.device, status)
        if statuses is not None:
            _raise_failures(statuses, self.group, total, failure)
        elif failure is not None:  # while capturing a graph: capture fails, and the graph path falls back
            raise failure
        self.stats.local_rows += hi - lo
        self.stats.last_slice = hi - lo
        self.evaluations += total
        out, scale = self.finish(out, rounding)
        return (out.to(x.dtype), scale) if rounding else out.to(x.dtype)

    def _model_rows(self, x: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, lo: int, hi: int) -> torch.Tensor | None:
        """Model rows ``[lo, hi)`` of the call's model batch (under guidance: uncond rows ``0..N-1``,
        then cond rows ``N..2N-1``), in chunks of ``max_batch``; None for an empty slice."""
        if hi <= lo:
            return None
        xin = x if self.model_dtype is None else x.to(self.model_dtype)
        step = hi - lo if self.max_batch is None else self.max_batch
        return torch.cat([self._chunk(xin, t, idx, a, min(a + step, hi)) for a in range(lo, hi, step)])

    def _chunk(self, xin: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        n = xin.shape[0]
        if self.guidance is None:
            return self._call_chunk(xin[lo:hi], t[lo:hi], idx[lo:hi], rounding=False)[0]
        u, c = slice(min(lo, n), min(hi, n)), slice(max(lo, n) - n, max(hi, n) - n)
        return self.guided_rows((xin[u], t[u], idx[u]), (xin[c], t[c], idx[c]))


def row_split(ev: ModelEvaluator, group: Group) -> RowSplitEvaluator:
    """``ev`` (its model, conditioning, ``max_batch`` per rank, ...) as this rank's split evaluator."""
    values = {f.name: getattr(ev, f.name) for f in fields(ModelEvaluator) if f.init}
    return RowSplitEvaluator(**values, group=group, stats=CommStats(gather=RowGather(group)))


# ------------------------------------------------------------------------------ up-front checks
def tensor_checksum(tensors: list[torch.Tensor]) -> list[float]:
    """Per tensor, float64 ``[sum, sum of squares, sum of index-weighted values]``: equal on ranks
    holding equal tensors on the same kind of device (one host copy)."""
    if not tensors:
        return []
    rows = []
    for v in tensors:
        d = v.detach().reshape(-1).double()
        w = torch.arange(1, d.numel() + 1, device=d.device, dtype=torch.float64) / max(d.numel(), 1)
        rows.append(torch.stack([d.sum(), d.square().sum(), (d * w).sum()]))
    return torch.stack(rows).reshape(-1).cpu().tolist()


def _conditioning(kwargs: Mapping[str, Any]) -> tuple[list[torch.Tensor], list[str]]:
    """The tensors (and a description of the other values) under ``kwargs``, recursively."""
    tensors, other = [], []
    for name in sorted(kwargs):
        value = kwargs[name]
        if isinstance(value, Mapping):
            t, o = _conditioning(value)
            tensors += t
            other += [f"{name}.{x}" for x in o]
        elif isinstance(value, torch.Tensor):
            tensors.append(value)
            other.append(f"{name}:{tuple(value.shape)}:{value.dtype}")
        else:
            other.append(f"{name}={value!r}")
    return tensors, other


def fingerprint(ev: ModelEvaluator, schedule: Any, config: Any, strategy: str,
                inputs: dict[str, torch.Tensor | None]) -> dict[str, Any]:
    """What every rank must agree on, field by field (see the module docstring)."""
    out: dict[str, Any] = {}
    for name, v in inputs.items():
        out[name] = None if v is None else (tuple(v.shape), str(v.dtype), v.device.type, tensor_checksum([v]))
    model = ev.model
    if isinstance(model, torch.nn.Module):
        out["model"] = tensor_checksum([*model.parameters(), *model.buffers()])
    coef = torch.cat([schedule.packed("cpu", torch.float64).reshape(-1), schedule.timesteps.double().cpu()])
    out["schedule"] = hashlib.sha256(coef.numpy().tobytes()).hexdigest()
    out["config"] = repr(config)
    out["strategy"] = strategy
    cond = dict(ev.model_kwargs)
    if ev.guidance is not None:
        cond.update(guidance_scale=float(ev.guidance.scale), guidance_rescale=float(ev.guidance.rescale), uncond=ev.guidance.uncond, cond=ev.guidance.cond)
    tensors, other = _conditioning(cond)
    out["conditioning"] = (other, tensor_checksum(tensors))
    out["max_batch, model_dtype"] = (ev.max_batch, str(ev.model_dtype))
    return out


def check_agreement(group: Group, mine: dict[str, Any]) -> None:
    """Every rank raises :class:`RankMismatch` naming the first rank and field that differ from rank 0's."""
    every = _all_gather_object(mine, group)
    for r, theirs in enumerate(every):
        for key, value in theirs.items():
            if value != every[0].get(key):
                what = "shape, dtype, device or values" if key in ("x_T", "noise", "init") else "checksum or value"
                raise RankMismatch(f"process_group: rank {r}'s {key} ({what}) differs from rank 0's; every rank "
                                   f"must hold the same model, schedule, options and inputs (this is rank "
                                   f"{group.rank})", r)


# ------------------------------------------------------------------------------ the sampler's hook
@dataclass
class Distributed:
    """A :class:`deqkern.ParallelSampler`'s distribution: its group, the ``strategy`` asked for
    (None: :func:`default_strategy` per call), the row-split evaluator and, per batch size, the
    evaluators of this rank's samples."""

    group: Group
    strategy: str | None
    rows_ev: RowSplitEvaluator
    samples_ev: dict[int, ModelEvaluator] = field(default_factory=dict)

    @classmethod
    def make(cls, process_group: Any, strategy: str | None, ev: ModelEvaluator) -> "Distributed":
        if strategy is not None and strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected None (chosen per call), 'rows' or 'samples', got {strategy!r}")
        group = resolve_group(process_group)
        return cls(group, strategy, row_split(ev, group))

    def remade(self, ev: ModelEvaluator) -> "Distributed":
        """This distribution for the sampler's new evaluator ``ev`` (conditioning of a new layout)."""
        return Distributed(self.group, self.strategy, row_split(ev, self.group))

    def run(self, sampler: Any, x_T: torch.Tensor, noise: torch.Tensor | None, init: torch.Tensor | None,
            solve: Callable[..., Any], on_round: Any) -> Any:
        """The sampler's solve across the ranks; ``solve(x_T, noise, init, ev)`` is its
        single-process solve with evaluator ``ev`` returning a :class:`SampleResult` (x0 and the
        trajectory as torch tensors)."""
        group, batch = self.group, x_T.shape[0]
        group.check_device(x_T.device)
        strategy = self.strategy or default_strategy(batch, group.world, on_round is not None)
        if strategy == "samples" and on_round is not None:
            raise ValueError("on_round: needs strategy='rows' (with 'samples' each rank holds part of the batch)")
        mine = fingerprint(sampler.ev, sampler.schedule, sampler.config, strategy,
                           {"x_T": x_T, "noise": noise, "init": init})
        check_agreement(group, mine)
        if strategy == "rows":
            return self._rows(x_T, noise, init, solve)
        return self._samples(sampler.ev, x_T, noise, init, solve)

    def _rows(self, x_T: torch.Tensor, noise: torch.Tensor | None, init: torch.Tensor | None,
              solve: Callable[..., Any]) -> Any:
        """Every rank solves the whole batch, each round's model rows split (:class:`RowSplitEvaluator`)."""
        stats = self.rows_ev.stats
        stats.local_rows, stats.gather.bytes_in, stats.gather.calls = 0, 0, 0
        res = solve(x_T, noise, init, self.rows_ev)
        if res.info.get("graph"):  # replays run no Python: every executed round gathered as the captured one did
            n = res.info["rounds_executed"]
            stats.local_rows, stats.gather.bytes_in, stats.gather.calls = n * stats.last_slice, n * stats.gather.last, n
        rank_rows = _all_gather_object(stats.local_rows, self.group)
        res.info.update(strategy="rows", world_size=self.group.world, rank_rows=rank_rows,
                        gathers=stats.gather.calls, bytes_per_round=stats.gather.bytes_in / max(res.rounds, 1))
        return res

    def _samples(self, ev: ModelEvaluator, x_T: torch.Tensor, noise: torch.Tensor | None,
                 init: torch.Tensor | None, solve: Callable[..., Any]) -> Any:
        """Each rank solves its slice of the batch; the results are gathered (every rank raises if one did)."""
        group, batch = self.group, x_T.shape[0]
        lo, hi = balanced_slices(batch, group.world)[group.rank]
        res, failure = None, None
        if hi > lo:
            try:
                res = solve(x_T[lo:hi], _cols(noise, lo, hi), _cols(init, lo, hi), self._slice_ev(ev, batch, lo, hi))
            except Exception as exc:  # the others must hear of it, not hang
                failure = exc
        summary = None if res is None else {k: getattr(res, k) for k in
                                            ("converged", "rounds", "model_evals", "wall_time", "residuals",
                                             "rounds_per_sample", "info")}
        if summary is not None:
            summary["has_trajectory"] = res.trajectory is not None
        every = _all_gather_object({"error": None if failure is None else f"{type(failure).__name__}: {failure}",
                                    "summary": summary}, group)
        bad = [r for r, e in enumerate(every) if e["error"] is not None]
        if bad:
            first = every[bad[0]]["error"]
            raise RankError(f"process_group: the solve raised on rank(s) {bad} (this is rank {group.rank}): {first}",
                            bad) from failure
        x0 = _gather_batch(None if res is None else res.x0, x_T, group)
        # every rank asked for the trajectory or none did (the fingerprint holds no flag: the same call)
        wants_traj = any(e["summary"] is not None and e["summary"]["has_trajectory"] for e in every)
        traj = _gather_trajectory(res, x_T, self.group) if wants_traj else None
        return _merge([e["summary"] for e in every], x0, traj, group)

    def _slice_ev(self, ev: ModelEvaluator, batch: int, lo: int, hi: int) -> ModelEvaluator:
        """``ev`` with per-sample conditioning sliced to samples ``[lo, hi)`` (views: in-place
        updates of the sampler's tensors reach it), kept per batch size."""
        if batch not in self.samples_ev:
            g = ev.guidance
            sliced = None if g is None else replace(g, cond=slice_samples(g.cond, batch, lo, hi),
                                                    uncond=slice_samples(g.uncond, batch, lo, hi))
            self.samples_ev[batch] = replace(ev, model_kwargs=slice_samples(ev.model_kwargs, batch, lo, hi),
                                             guidance=sliced, evaluations=0)
        return self.samples_ev[batch]


def slice_samples(kwargs: Mapping[str, Any], batch: int, lo: int, hi: int) -> dict[str, Any]:
    """Conditioning of samples ``[lo, hi)``: per-sample tensors (leading dim ``batch``) sliced as
    views, shared ones (leading dim 1) and other values as they are, dicts recursively."""
    out: dict[str, Any] = {}
    for name, value in kwargs.items():
        if isinstance(value, Mapping):
            out[name] = slice_samples(value, batch, lo, hi)
        elif isinstance(value, torch.Tensor) and value.shape[0] == batch and batch != 1:
            out[name] = value[lo:hi]
        else:
            out[name] = value
    return out


def _cols(v: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
    """Samples ``[lo, hi)`` of a ``[S, B, ...]`` tensor (noise, init)."""
    return None if v is None else v[:, lo:hi]


def _gather_batch(local: torch.Tensor | None, like: torch.Tensor, group: Group) -> torch.Tensor:
    """The whole batch ``like.shape`` from every rank's :func:`balanced_slices` slice ``local`` of it."""
    rows, _ = RowGather(group)(local, like.shape[0], tuple(like.shape[1:]), like.dtype, like.device, _OK)
    return rows


def _gather_trajectory(res: Any, x_T: torch.Tensor, group: Group) -> torch.Tensor:
    """The whole batch's trajectory ``[S+1, B, ...]`` from every rank's ``[S+1, b_r, ...]``."""
    steps1 = max(s for s in _all_gather_object(None if res is None else res.trajectory.shape[0], group) if s)
    local = None if res is None else res.trajectory.transpose(0, 1)
    return _gather_batch(local, x_T.new_empty(x_T.shape[0], steps1, *x_T.shape[1:]), group).transpose(0, 1)


def _merge(summaries: list[dict | None], x0: torch.Tensor, traj: torch.Tensor | None, group: Group) -> Any:
    """One :class:`SampleResult` of the whole batch from the ranks' summaries (rounds: the most
    any rank ran; residuals per round padded with NaN past a rank's last round)."""
    from deqkern.sampling import SampleResult

    done = [s for s in summaries if s is not None]
    rounds = max(s["rounds"] for s in done)
    residuals = [[v for s in done for v in (s["residuals"][r] if r < s["rounds"] else [math.nan] * len(s["converged"]))]
                 for r in range(rounds)]
    info = {**done[0]["info"], "strategy": "samples", "world_size": group.world,
            "rank_rows": [0 if s is None else s["model_evals"] for s in summaries],
            "rank_rounds": [0 if s is None else s["rounds"] for s in summaries]}
    return SampleResult(
        x0=x0, converged=torch.cat([s["converged"] for s in done]), rounds=rounds,
        model_evals=sum(s["model_evals"] for s in done), wall_time=max(s["wall_time"] for s in done),
        residuals=residuals, rounds_per_sample=[r for s in done for r in s["rounds_per_sample"]],
        trajectory=traj, info=info,
    )


# ------------------------------------------------------------------------------ cost model
@dataclass(frozen=True)
class Interconnect:
    """An all-gather's cost: ``latency_s + bytes / bandwidth`` per round (ring: each rank moves
    ``(P - 1)`` slots). Defaults: NVLink 4 (H100 SXM) at a conservative 300 GB/s per direction, 20 us."""

    bandwidth: float = 300e9  #: bytes per second into each rank
    latency_s: float = 20e-6


def predicted_speedup(t_rows: Callable[[int], float], rounds: Mapping[int, int], *, steps: int, batch: int,
                      row_bytes: int, ranks: int, guidance: bool = False,
                      link: Interconnect = Interconnect()) -> dict[str, Any]:
    """The cost model of ``strategy="rows"``: P ranks against one, each at its best window.

    ``t_rows(n)``: seconds of one model call on ``n`` rows on one device (a measured batch-cost
    curve); ``rounds[W]``: rounds of a solve at window W (measured); ``row_bytes``: bytes of one
    gathered row (``D * 4`` in float32). With ``g = 2`` rows per latent under guidance,
    ``M(W) = g B W`` model rows per round (the most, fixed-shape rounds) and ``m = ceil(M / P)``:

        T_1(W) = rounds(W) * t(M)
        T_P(W) = rounds(W) * (t(m) + latency + (P - 1) m row_bytes / bandwidth)
        sequential = S * t(g B)

    Returns the best window and time of each, ``speedup`` (``min T_1 / min T_P``) and the
    speedups of both over sequential. Solver work between model calls is left out (small
    against a UNet on a GPU; it is the same on every rank).
    """
    g = 2 if guidance else 1
    one, many = {}, {}
    for w, r in rounds.items():
        m_rows = g * batch * w
        slot = -(-m_rows // ranks)
        one[w] = r * t_rows(m_rows)
        many[w] = r * (t_rows(slot) + link.latency_s + (ranks - 1) * slot * row_bytes / link.bandwidth)
    w1, wp = min(one, key=one.get), min(many, key=many.get)
    seq = steps * t_rows(g * batch)
    return {"ranks": ranks, "best_window_1": w1, "time_1": one[w1], "best_window_p": wp, "time_p": many[wp],
            "speedup": one[w1] / many[wp], "speedup_1_vs_sequential": seq / one[w1],
            "speedup_p_vs_sequential": seq / many[wp], "sequential": seq}


@contextmanager
def world_from_env(device: str, error: Callable[[str], Any]) -> Iterator[int]:
    """The WORLD group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...)
    for the ``with`` block: nccl on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on CPU; yields
    this rank. ``error`` reports a missing environment naming ``--distributed``.

    A block that ends normally meets the other ranks at a barrier and destroys the group. Without
    that, a gloo rank that outlives its peers can abort at interpreter exit ("terminate called
    without an active exception", pytorch/pytorch#190489) after its work is done. A block that
    raises leaves the group as it is: a destroy there could wait forever on a rank that is still
    inside a collective."""
    import os

    import torch.distributed as dist

    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        error(f"argument --distributed: run under torchrun (not set: {', '.join(missing)})")
    if device.startswith("cuda:"):
        error(f"argument --device: with --distributed use cuda or auto (rank r takes cuda:LOCAL_RANK), got {device}")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    yield dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
