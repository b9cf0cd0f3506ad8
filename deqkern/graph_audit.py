"""Check on any device, a CPU included, that a callable can be captured as a CUDA graph.

A CUDA graph replays the kernels recorded at capture with the arguments they had then: the same
buffers, the same shapes, the same scalars. A chunk of rounds is safe to capture only if every
call issues exactly that work again, and never waits for the host. Both properties live in the
sequence of ATen ops the chunk dispatches, which is visible on a CPU:

* *host syncs*: ``.item()``/``int()``/``bool()`` of a tensor, ``nonzero``, boolean-mask indexing,
  ``torch.tensor(data)`` (a host-to-device copy). On a GPU they fail capture, or worse, read
  the value once and bake it into every replay.
* *replay drift*: a Python counter, a Python float computed from data, a shape that depends on
  progress, or a state tensor rebound to a new buffer makes a later call dispatch different ops
  or arguments from the captured call. Eager execution is then right and the graph is wrong,
  and only comparing calls shows it.

:func:`audit_replay` runs the chunk several times under a ``TorchDispatchMode`` that records
each op with its non-tensor arguments and, for each tensor, its dtype, shape, strides and which
buffer it lives in: a buffer created inside the call is named by order of creation; one from
before the call by its address, which must be the same in every call. Every recorded call must
match the first (the captured one); the warm-up before it, as before a real capture, is not
recorded.
Triton kernels launched under the CPU interpreter are not ATen ops and are not recorded; their
launchers' allocations and reductions are.
"""
from __future__ import annotations

import traceback
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from deqkern.errors import CaptureHazard

#: ATen ops that make the host wait for the device, with what usually issues them.
_SYNC_OPS = {
    "aten::_local_scalar_dense": "reads a tensor value on the host (.item(), int(), float(), bool())",
    "aten::is_nonzero": "reads a tensor value on the host (bool() of a tensor, `if tensor:`)",
    "aten::equal": "torch.equal returns a Python bool",
    "aten::nonzero": "nonzero has a data-dependent shape",
    "aten::masked_select": "masked_select has a data-dependent shape",
    "aten::_unique2": "unique has a data-dependent shape",
    "aten::unique_consecutive": "unique_consecutive has a data-dependent shape",
    "aten::repeat_interleave": "repeat_interleave with tensor repeats and no output_size has a data-dependent shape",
    # only for data with a dimension: a 0-d one is a Python number (``x[i] = 1.0`` wraps it),
    # which becomes a fill on a CUDA tensor
    "aten::lift_fresh": "torch.tensor(data) copies host data to the device",
    "aten::_assert_async": "an async assert syncs on failure and is refused by capture",
}
#: Ops that index with their tensor arguments: a boolean index is a hidden nonzero.
_INDEX_OPS = ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_")


class ReplayAudit:
    """Records calls of one chunk, as a CUDA graph would: the first recorded call is the captured
    one, and every later call must dispatch exactly its work (it stands for a replay)."""

    def __init__(self) -> None:
        self.captured: list[str] | None = None  #: the captured call's trace, one line per ATen op
        self.calls = 0  #: recorded calls
        self._kernel_ops = 0
        self._outer: dict[int, tuple[str, torch.UntypedStorage]] = {}  # see _Recorder

    @property
    def ops_per_call(self) -> int:
        """ATen ops the captured call dispatched."""
        return 0 if self.captured is None else len(self.captured)

    @property
    def kernel_ops_per_call(self) -> int:
        """Of those, the ops that launch a device kernel: not views, allocations or copies of a
        buffer onto itself (triton's CPU interpreter makes those around each launch). On a GPU
        each is a node of the captured graph; Triton launches come on top."""
        return self._kernel_ops

    def record(self, chunk: Callable[[], None]) -> None:
        """Run ``chunk`` once, recording it; raise :class:`CaptureHazard` if it syncs with the
        host or, after the first recorded call, dispatches anything the first did not."""
        rec = _Recorder(self._outer)
        with rec:
            chunk()
        if rec.hazards:
            raise CaptureHazard(f"call {self.calls} syncs with the host:\n  " + "\n  ".join(rec.hazards))
        if self.captured is None:
            self.captured, self._kernel_ops = rec.trace, rec.kernel_ops
        elif rec.trace != self.captured:
            raise CaptureHazard(
                f"call {self.calls} differs from the captured call 0: " + _first_difference(self.captured, rec.trace)
            )
        self.calls += 1


class _Recorder(TorchDispatchMode):
    """Records one call's ops; buffer names are local to the call, addresses of older buffers
    are shared across calls through ``outer``."""

    def __init__(self, outer: dict[int, tuple[str, torch.UntypedStorage]]) -> None:
        super().__init__()
        # storage address -> (name, the storage) for buffers that predate the call. Holding the
        # storage keeps its address from being reused: a buffer a later call allocates in its
        # place (a rebound attribute, say) then gets a new address and a new name.
        self.outer = outer
        self.local: dict[int, str] = {}  # storage address -> name, for buffers made in this call
        self.trace: list[str] = []
        self.hazards: list[str] = []
        self.kernel_ops = 0  # see ReplayAudit.kernel_ops_per_call

    def _name(self, storage: torch.UntypedStorage) -> str:
        ptr = storage.data_ptr()
        if ptr in self.local:
            return self.local[ptr]
        if ptr not in self.outer:
            self.outer[ptr] = (f"ext{len(self.outer)}", storage)
        return self.outer[ptr][0]

    def _describe(self, leaves: list[Any]) -> str:
        out = []
        for v in leaves:
            if isinstance(v, torch.Tensor):
                out.append(
                    f"{self._name(v.untyped_storage())}+{v.storage_offset()}:{str(v.dtype)[6:]}{list(v.shape)}/{list(v.stride())}"
                )
            elif isinstance(v, torch.UntypedStorage):  # its repr would print the data
                out.append(f"storage {self._name(v)}")
            elif isinstance(v, torch.ScriptObject):  # a process group or work handle: its repr is its address
                out.append("ScriptObject")
            else:
                out.append(repr(v))
        return ", ".join(out)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        kwargs = kwargs or {}
        name = func._schema.name
        leaves, _ = tree_flatten((args, kwargs))
        benign = (name == "aten::lift_fresh" and leaves[0].dim() == 0) or (
            name == "aten::repeat_interleave" and kwargs.get("output_size") is not None  # size given: no sync
        )
        if name in _SYNC_OPS and not benign:
            self.hazards.append(f"{name}: {_SYNC_OPS[name]}, at {_caller()}")
        elif name in _INDEX_OPS and any(
            isinstance(v, torch.Tensor) and v.dtype == torch.bool for v in leaves[1:]
        ):
            self.hazards.append(f"{name} with a boolean index: a hidden nonzero (data-dependent shape), at {_caller()}")
        if name == "aten::lift_fresh":
            # its input was made from host data outside the dispatcher: it has no history, and its
            # address may be one a freed buffer of this call had. It is named by its value.
            line = f"{name}(host {leaves[0].tolist()!r})"
            in_ptrs: set[int] = set()
        else:
            line = f"{name}({self._describe(leaves)})"
            in_ptrs = {v.untyped_storage().data_ptr() for v in leaves if isinstance(v, torch.Tensor)}
        self_copy = name == "aten::copy_" and _same_view(leaves[0], leaves[1])
        if not (func.is_view or name in _NO_KERNEL or self_copy):
            self.kernel_ops += 1
        result = func(*args, **kwargs)
        outs, _ = tree_flatten(result)
        for o in outs:
            if isinstance(o, torch.Tensor):
                ptr = o.untyped_storage().data_ptr()
                # a view or an in-place result keeps its input's buffer; anything else is new,
                # even at an address a freed buffer of this call had
                if ptr not in in_ptrs:
                    self.local[ptr] = f"new{len(self.trace)}"
        self.trace.append(f"{line} -> {self._describe(outs)}")
        return result


#: Ops that allocate or rebind storage without launching a kernel.
_NO_KERNEL = frozenset({"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
                        "aten::new_empty_strided", "aten::set_", "aten::lift_fresh"})


def _same_view(a: Any, b: Any) -> bool:
    """``a`` and ``b`` are the same elements of the same buffer (a copy between them moves nothing)."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.shape == b.shape and a.stride() == b.stride())


def audit_replay(chunk: Callable[[], None], calls: int = 3) -> ReplayAudit:
    """Run ``chunk`` once unrecorded (the warm-up before a capture), then record it ``calls``
    times (>= 2: the captured call and at least one replay) with :meth:`ReplayAudit.record`.
    The chunk runs for real and advances whatever state it updates."""
    if calls < 2:
        raise ValueError(f"calls: expected at least 2 (the captured call and a replay), got {calls}")
    chunk()
    audit = ReplayAudit()
    for _ in range(calls):
        audit.record(chunk)
    return audit


def _caller() -> str:
    """The innermost frame of the caller's code: outside torch and this module."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and frame.filename != __file__:
            return f"{path}:{frame.lineno} ({frame.line})"
    return "unknown"


def _first_difference(a: list[str], b: list[str]) -> str:
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"op {k} was\n  {x}\nand is now\n  {y}"
    return f"{len(a)} ops were recorded, {len(b)} are dispatched now (op {min(len(a), len(b))} onwards differs)"
