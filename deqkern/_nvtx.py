"""nvtx ranges around the phases of a round (model, scan, solve, mix), so Nsight shows each.

A no-op unless CUDA is available and the ``nvtx`` package is installed (the ``bench`` extra).
"""
from __future__ import annotations

import contextlib
from functools import lru_cache
from typing import ContextManager

import torch


@lru_cache(maxsize=1)
def _nvtx():
    if not torch.cuda.is_available():
        return None
    try:
        import nvtx
    except ImportError:
        return None
    return nvtx


def annotate(name: str) -> ContextManager:
    """``with annotate("scan"): ...`` — an nvtx range in the ``deqkern`` domain, or nothing."""
    mod = _nvtx()
    if mod is None:
        return contextlib.nullcontext()
    return mod.annotate(name, domain="deqkern")
