"""Choose the implementation of each op from the tensors it is given.

Triton runs when the main operand is a CUDA tensor, or a CPU tensor while ``TRITON_INTERPRET``
was set (``1``/``true``/``on``/``yes``, as triton reads it) before this module was imported —
then triton's interpreter runs the kernels on the CPU, slowly, for tests. Everything else, and
everything when triton is not installed, runs :mod:`deqkern.ops.reference`. ``backend_for`` is
the single decision point both the ops and the benchmarks ask. Triton is imported only when a
Triton path is taken, so ``import deqkern`` stays light.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

from deqkern.ops import reference
from deqkern.ops.reference import ScanResult
from deqkern.schedule import X0Transform

Backend = Literal["reference", "triton"]
AndersonSolve = Literal["kernel", "solve_ex"]

#: Read once, at import: triton reads the variable when a kernel is decorated, so a later change
#: could not take effect consistently anyway.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")

#: How the Triton backend solves the bordered Anderson systems: ``"kernel"`` (one Triton program
#: per system, :mod:`deqkern.kernels.anderson_solve`) or ``"solve_ex"`` (batched
#: ``torch.linalg.solve_ex``, i.e. the reference). Default ``"kernel"``: one launch and no host
#: sync instead of the reference's dozen small ops. Which is faster is *not measured yet*.
ANDERSON_SOLVE: AndersonSolve = "kernel"


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_for(t: torch.Tensor) -> Backend:
    """The backend that will run an op whose main operand is ``t``."""
    if (t.device.type == "cuda" or (t.device.type == "cpu" and _INTERPRET)) and _triton_installed():
        return "triton"
    return "reference"


def scan_residual(
    xw: torch.Tensor,
    e: torch.Tensor,
    z: torch.Tensor | None,
    coef: torch.Tensor,
    n_rows: torch.Tensor,
    transform: X0Transform,
    hist_f: torch.Tensor | None = None,
    drift: bool | None = None,
    ms: torch.Tensor | None = None,
    u_prev: torch.Tensor | None = None,
) -> ScanResult:
    """:func:`deqkern.ops.reference.scan_residual`, fused into one Triton kernel on the Triton backend.

    The ``clip_sample`` clamp is fused; dynamic thresholding (``transform.kind == "threshold"``)
    always runs the reference: its per-row quantile needs all of a latent before any element's
    step, which the one-pass, D-blocked kernel cannot compute. ``drift`` (all ``L == 1``) only
    spares the reference a host sync; the kernel reads ``L`` per row.
    """
    if transform.kind == "threshold" or backend_for(xw) == "reference":
        return reference.scan_residual(xw, e, z, coef, n_rows, transform, hist_f, drift, ms, u_prev)
    from deqkern.ops import triton_ops

    return triton_ops.scan_residual(xw, e, z, coef, n_rows, transform, hist_f, ms=ms, u_prev=u_prev)


def anderson_weights(
    gram: torch.Tensor, valid: torch.Tensor, newest: torch.Tensor, ridge: float, *, solve: AndersonSolve | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`deqkern.ops.reference.anderson_weights`; ``solve`` (default :data:`ANDERSON_SOLVE`)
    picks the Triton kernel or ``torch.linalg.solve_ex`` on the Triton backend."""
    solve = ANDERSON_SOLVE if solve is None else solve
    if solve not in ("kernel", "solve_ex"):
        raise ValueError(f"solve: expected 'kernel' or 'solve_ex', got {solve!r}")
    if solve == "solve_ex" or backend_for(gram) == "reference":
        return reference.anderson_weights(gram, valid, newest, ridge)
    from deqkern.ops import triton_ops

    return triton_ops.anderson_weights(gram, valid, newest, ridge)


def anderson_mix(
    hist_x: torch.Tensor, hist_f: torch.Tensor, alpha: torch.Tensor, beta: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`deqkern.ops.reference.anderson_mix`; with ``out`` (any float dtype, any strides, e.g.
    the model's input buffer) the result is written there and ``out`` returned."""
    if backend_for(hist_x) == "reference":
        mixed = reference.anderson_mix(hist_x, hist_f, alpha, beta)
        return mixed if out is None else out.copy_(mixed)
    from deqkern.ops import triton_ops

    return triton_ops.anderson_mix(hist_x, hist_f, alpha, beta, out)


def commit_window(
    xw: torch.Tensor,
    mixed: torch.Tensor,
    g: torch.Tensor,
    delta: torch.Tensor,
    n_rows: torch.Tensor,
    k0: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    extrapolate: bool = False,
    coords: torch.Tensor | None = None,
    ahead: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> None:
    """:func:`deqkern.ops.reference.commit_window`, one fused kernel on the Triton backend."""
    if backend_for(xw) == "reference":
        reference.commit_window(xw, mixed, g, delta, n_rows, k0, init, out, extrapolate, coords, ahead)
        return
    from deqkern.ops import triton_ops

    triton_ops.commit_window(xw, mixed, g, delta, n_rows, k0, init, out, extrapolate=extrapolate, coords=coords,
                             ahead=ahead)


def round_status(
    f_sq: torch.Tensor, g_sq: torch.Tensor, nonfinite: torch.Tensor, t: torch.Tensor, n_rows: torch.Tensor,
    k0: torch.Tensor, rounds: torch.Tensor, noise_var: torch.Tensor, worst: torch.Tensor, res_log: torch.Tensor,
    done_round: torch.Tensor, bad_t: torch.Tensor, mult: torch.Tensor, spent: torch.Tensor, gain: torch.Tensor,
    dev: torch.Tensor, *, stop: str, tol: float, dim: int, floor: torch.Tensor | None = None,
    past: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`deqkern.ops.reference.round_status`, one kernel launch on the Triton backend."""
    args = (f_sq, g_sq, nonfinite, t, n_rows, k0, rounds, noise_var, worst, res_log, done_round, bad_t, mult, spent,
            gain, dev)
    if backend_for(f_sq) == "reference":
        return reference.round_status(*args, stop=stop, tol=tol, dim=dim, floor=floor, past=past)
    from deqkern.ops import triton_ops

    return triton_ops.round_status(*args, stop=stop, tol=tol, dim=dim, floor=floor, past=past)
