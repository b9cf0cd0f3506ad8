"""Zero-copy interop with any array library that speaks DLPack (cupy, numpy, JAX, ...).

``sample`` and ``sample_sequential`` accept such arrays for ``x_T``, ``noise`` and ``init`` and
return ``x0`` (and the trajectory) as the caller's kind: the input is wrapped with
``torch.from_dlpack`` (no copy, same device) and the result handed back through the caller
library's own ``from_dlpack``. The model is still called with torch tensors.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch


def to_torch(obj: Any, name: str) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """``(tensor, back)``: a zero-copy torch view of ``obj`` and the function that turns a torch
    result into ``obj``'s array kind (identity for torch tensors)."""
    if obj is None or isinstance(obj, torch.Tensor):
        return obj, _identity
    if not hasattr(obj, "__dlpack__"):
        raise TypeError(f"{name}: expected a torch tensor or an array supporting DLPack, got {type(obj).__name__}")
    tensor = torch.from_dlpack(obj)
    lib = importlib.import_module(type(obj).__module__.split(".")[0])
    from_dlpack = getattr(lib, "from_dlpack", None)
    if from_dlpack is None:
        raise TypeError(f"{name}: {lib.__name__} has no from_dlpack to hand results back")

    def back(t: torch.Tensor) -> Any:
        return from_dlpack(t.detach().contiguous())

    return tensor, back


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t
