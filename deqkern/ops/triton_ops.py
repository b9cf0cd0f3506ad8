"""The Triton launchers, one namespace for :mod:`deqkern.ops.dispatch` (each launcher lives next to
its kernel in :mod:`deqkern.kernels`; this module only gathers them).

Same functions, same results as :mod:`deqkern.ops.reference` (the tests compare them); imported
only when :mod:`deqkern.ops.dispatch` takes a Triton path, because importing it imports triton.
"""
from __future__ import annotations

from deqkern.kernels.anderson_mix import anderson_mix
from deqkern.kernels.anderson_solve import anderson_weights
from deqkern.kernels.commit_window import commit_window
from deqkern.kernels.round_status import round_status
from deqkern.kernels.scan_residual import scan_residual

__all__ = ["anderson_mix", "anderson_weights", "commit_window", "round_status", "scan_residual"]
