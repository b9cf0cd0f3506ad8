"""Dispatch layer: the per-round operations, routed to a Triton kernel or the PyTorch reference.

Triton runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before
import; everything else uses :mod:`deqkern.ops.reference`. Same results, same API.
"""
from deqkern.ops.dispatch import (
    anderson_mix, anderson_weights, backend_for, commit_window, round_status, scan_residual,
)
# ops with no kernel of their own (the multistep carry, the x0 rule's secants, rounding floor and
# charge past the window): the reference's
from deqkern.ops.reference import (
    LINEAR_REACH, SECANT_SAFETY, ScanResult, carry_converted, latent_gain_bound, latent_gains, past_window_factor,
    rounding_floor, step_secants,
)
from deqkern.ops.window import row_mask, step_rows

__all__ = [
    "LINEAR_REACH", "SECANT_SAFETY", "ScanResult", "anderson_mix", "anderson_weights", "backend_for", "carry_converted",
    "commit_window", "latent_gain_bound", "latent_gains", "past_window_factor", "round_status", "rounding_floor",
    "row_mask", "scan_residual", "step_rows", "step_secants",
]
