"""Launchers of the Triton kernels: check shapes and dtypes, allocate outputs, compute the grid.

Same functions, same results as :mod:`deqkern.ops.reference` (the tests compare them); imported
only when :mod:`deqkern.ops.dispatch` takes a Triton path, because importing it imports triton.
Strides are passed to the kernels as they are: no input is made contiguous. Launch settings come
from :mod:`deqkern.kernels._launch` (no autotuning: deterministic, CUDA-graph safe).
"""
from __future__ import annotations

import contextlib

import torch
import triton.language as tl

from deqkern.kernels._launch import (
    SCAN_STAGES, block_d_for, next_pow2, num_warps_for, scan_block_d, status_block_w,
)
from deqkern.kernels.anderson_mix import _anderson_mix_kernel
from deqkern.kernels.anderson_solve import _anderson_solve_kernel
from deqkern.kernels.commit_window import _commit_window_kernel
from deqkern.kernels.round_status import STOP_CODES, _round_status_kernel
from deqkern.kernels.scan_residual import _scan_residual_kernel
from deqkern.ops.reference import ScanResult
from deqkern.schedule import X0Transform

#: Largest Anderson history the kernels take (the ``[m, BLOCK_D]`` Gram tile of the scan kernel
#: and the ``[16, 16]`` system tile of the solve kernel are sized for it).
MAX_HISTORY = 8
#: Grid axes 1 and 2 of a CUDA launch hold at most 65535 programs.
_MAX_GRID_YZ = 65535
#: Accumulation dtype per data dtype: fp32 for every low-precision input, fp64 keeps fp64 exact.
_ACC = {
    torch.float16: (tl.float32, torch.float32),
    torch.bfloat16: (tl.float32, torch.float32),
    torch.float32: (tl.float32, torch.float32),
    torch.float64: (tl.float64, torch.float64),
}


def _acc_dtype(name: str, t: torch.Tensor) -> tuple[tl.dtype, torch.dtype]:
    if t.dtype not in _ACC:
        raise TypeError(f"{name}: expected float16/bfloat16/float32/float64, got {t.dtype}")
    return _ACC[t.dtype]


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor, same_dtype: bool = True) -> None:
    """``t`` has ``shape``, lives on ``like``'s device and (if ``same_dtype``) has its dtype."""
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected a tensor on {like.device}, got {t.device}")
    if same_dtype and t.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype}, got {t.dtype}")


def _block(block_d: int | None, heuristic) -> int:
    """``block_d`` if given (a power of two >= 16, as ``tl.arange`` needs), else ``heuristic()``."""
    if block_d is None:
        return heuristic()
    if block_d < 16 or block_d & (block_d - 1):
        raise ValueError(f"block_d: expected a power of two >= 16, got {block_d}")
    return block_d


def _sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device; None under the CPU interpreter."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _on(device: torch.device):
    """Triton launches on the *current* CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def scan_residual(
    xw: torch.Tensor,
    e: torch.Tensor,
    z: torch.Tensor | None,
    coef: torch.Tensor,
    n_rows: torch.Tensor,
    transform: X0Transform,
    hist_f: torch.Tensor | None = None,
    *,
    block_d: int | None = None,
) -> ScanResult:
    """:func:`deqkern.ops.reference.scan_residual` in one kernel launch plus a tiny reduction.

    ``transform.kind`` must be ``"none"`` or ``"clip"`` (fused); dynamic thresholding needs a
    per-row quantile over all of D before any element's step, which a one-pass, D-blocked kernel
    cannot compute: :func:`deqkern.ops.dispatch.scan_residual` sends it to the reference.
    ``block_d`` overrides the launch heuristic (a power of two; tests use it to get several
    D-blocks per row). Norms and Gram row come back in fp32 (fp64 for fp64 inputs); the partial
    sums of the D-blocks are added by ``torch.sum`` in a fixed order rather than with atomics, so
    results are bitwise reproducible run to run (the stopping rule compares them to a tolerance).
    """
    if transform.kind not in ("none", "clip"):
        raise ValueError(
            f"transform: the scan kernel fuses 'none' and 'clip', got {transform.kind!r} "
            "(deqkern.ops.scan_residual runs it with the reference)"
        )
    if xw.ndim != 3 or xw.shape[1] < 2:
        raise ValueError(f"xw: expected shape [B, W+1, D] with W >= 1, got {tuple(xw.shape)}")
    acc_tl, acc_torch = _acc_dtype("xw", xw)
    batch, width, dim = xw.shape[0], xw.shape[1] - 1, xw.shape[2]
    _check("e", e, (batch, width, dim), xw)
    if z is not None:
        _check("z", z, (batch, width, dim), xw)
    _check("coef", coef, (batch, width, 7), xw, same_dtype=False)
    _acc_dtype("coef", coef)
    _check("n_rows", n_rows, (batch,), xw, same_dtype=False)
    if n_rows.dtype.is_floating_point or n_rows.dtype == torch.bool:
        raise TypeError(f"n_rows: expected an integer tensor, got {n_rows.dtype}")
    m = 0 if hist_f is None else hist_f.shape[0]
    if hist_f is not None:
        if not 1 <= m <= MAX_HISTORY:
            raise ValueError(f"hist_f: expected 1 to {MAX_HISTORY} history slots, got {m}")
        _check("hist_f", hist_f, (m, batch, width, dim), xw)
    if batch > _MAX_GRID_YZ:
        raise ValueError(f"xw: at most {_MAX_GRID_YZ} samples per launch, got {batch}")
    tiles = 2 + (z is not None) + m  # [BLOCK_D] rows loaded per step: x, e, z, history
    block = _block(block_d, lambda: scan_block_d(dim, batch, tiles, xw.element_size(), _sm_count(xw.device)))
    n_blocks = -(-dim // block)
    g = torch.empty(batch, width, dim, dtype=xw.dtype, device=xw.device)
    f = torch.empty(batch, width, dim, dtype=xw.dtype, device=xw.device)
    part = torch.empty(n_blocks, batch, width, 3 + m, dtype=acc_torch, device=xw.device)
    # Absent operands: any valid pointer with zero strides; the constexprs keep them unread.
    z_t, z_s = (z, z.stride()) if z is not None else (e, (0, 0, 0))
    h_t, h_s = (hist_f, hist_f.stride()) if hist_f is not None else (e, (0, 0, 0, 0))
    with _on(xw.device):
        _scan_residual_kernel[(n_blocks, batch)](
            xw, e, z_t, coef, n_rows, h_t, g, f, part,
            width, dim, float(transform.clip_range),
            *xw.stride(), *e.stride(), *z_s, *coef.stride(), n_rows.stride(0), *h_s,
            *g.stride(), *f.stride(), *part.stride(),
            HAS_Z=z is not None, CLIP=transform.kind == "clip", M=m, M_PAD=next_pow2(max(m, 1)),
            ACC=acc_tl, BLOCK_D=block, NUM_STAGES=SCAN_STAGES, num_warps=num_warps_for(block),
        )
    total = part.sum(0)
    return ScanResult(
        g=g, f=f, f_sq=total[..., 0], g_sq=total[..., 1], gram=total[..., 2:2 + m] if hist_f is not None else None,
        nonfinite=total[..., 2 + m],
    )


def anderson_weights(
    gram: torch.Tensor, valid: torch.Tensor, newest: torch.Tensor, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`deqkern.ops.reference.anderson_weights` with one Triton program per problem.

    Returns ``(alpha [R, m] float64, ok [R] bool)``; same masking, relative ridge and one-hot
    fallback as the reference.
    """
    if gram.ndim != 3 or gram.shape[1] != gram.shape[2]:
        raise ValueError(f"gram: expected shape [R, m, m], got {tuple(gram.shape)}")
    _acc_dtype("gram", gram)
    r, m = gram.shape[0], gram.shape[1]
    if not 1 <= m <= MAX_HISTORY:
        raise ValueError(f"gram: expected 1 to {MAX_HISTORY} history slots, got {m}")
    _check("valid", valid, (r, m), gram, same_dtype=False)
    if valid.dtype != torch.bool:
        raise TypeError(f"valid: expected a bool tensor, got {valid.dtype}")
    _check("newest", newest, (r,), gram, same_dtype=False)
    if newest.dtype.is_floating_point or newest.dtype == torch.bool:
        raise TypeError(f"newest: expected an integer tensor, got {newest.dtype}")
    alpha = torch.empty(r, m, dtype=torch.float64, device=gram.device)
    ok = torch.empty(r, dtype=torch.int8, device=gram.device)
    if r > 0:
        with _on(gram.device):
            _anderson_solve_kernel[(r,)](
                gram, valid, newest, alpha, ok, float(ridge),
                *gram.stride(), *valid.stride(), newest.stride(0), *alpha.stride(), ok.stride(0),
                M=m, NP=next_pow2(m + 1), num_warps=1,
            )
    return alpha, ok.view(torch.bool)


def anderson_mix(
    hist_x: torch.Tensor,
    hist_f: torch.Tensor,
    alpha: torch.Tensor,
    beta: float,
    out: torch.Tensor | None = None,
    *,
    block_d: int | None = None,
) -> torch.Tensor:
    """:func:`deqkern.ops.reference.anderson_mix`, written into ``out`` when given.

    ``out``: ``[B, W, D]`` of any float dtype and any strides (say a view into the model's fp16
    input batch); the sum is accumulated in fp32 (fp64 for fp64 history) and rounded once.
    ``block_d`` overrides the launch heuristic.
    """
    if hist_x.ndim != 4:
        raise ValueError(f"hist_x: expected shape [m, B, W, D], got {tuple(hist_x.shape)}")
    acc_tl, _ = _acc_dtype("hist_x", hist_x)
    m, batch, width, dim = hist_x.shape
    if not 1 <= m <= MAX_HISTORY:
        raise ValueError(f"hist_x: expected 1 to {MAX_HISTORY} history slots, got {m}")
    _check("hist_f", hist_f, tuple(hist_x.shape), hist_x)
    _check("alpha", alpha, (batch, width, m), hist_x, same_dtype=False)
    _acc_dtype("alpha", alpha)
    if out is None:
        out = torch.empty(batch, width, dim, dtype=hist_x.dtype, device=hist_x.device)
    else:
        _check("out", out, (batch, width, dim), hist_x, same_dtype=False)
        _acc_dtype("out", out)
    if max(batch, width) > _MAX_GRID_YZ:
        raise ValueError(f"hist_x: at most {_MAX_GRID_YZ} samples and rows per launch, got {batch} x {width}")
    block = _block(block_d, lambda: block_d_for(dim, batch * width, _sm_count(hist_x.device)))
    with _on(hist_x.device):
        _anderson_mix_kernel[(-(-dim // block), width, batch)](
            hist_x, hist_f, alpha, out, dim, float(beta),
            *hist_x.stride(), *hist_f.stride(), *alpha.stride(), *out.stride(),
            M=m, ACC=acc_tl, BLOCK_D=block, num_warps=num_warps_for(block),
        )
    return out


def commit_window(
    xw: torch.Tensor,
    mixed: torch.Tensor,
    g: torch.Tensor,
    delta: torch.Tensor,
    n_rows: torch.Tensor,
    k0: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    extrapolate: bool = False,
    block_d: int | None = None,
) -> None:
    """:func:`deqkern.ops.reference.commit_window` as one kernel (in place on ``xw``)."""
    if xw.ndim != 3:
        raise ValueError(f"xw: expected shape [B, W+1, D], got {tuple(xw.shape)}")
    _acc_dtype("xw", xw)
    batch, rows, dim = xw.shape
    width = rows - 1
    _check("mixed", mixed, (batch, width, dim), xw)
    _check("g", g, (batch, width, dim), xw)
    _check("delta", delta, (batch,), xw, same_dtype=False)
    _check("n_rows", n_rows, (batch,), xw, same_dtype=False)
    if init is not None:
        if k0 is None:
            raise ValueError("k0: required with init (positions of the windows)")
        _check("k0", k0, (batch,), xw, same_dtype=False)
        if init.ndim != 3 or init.shape[1:] != (batch, dim):
            raise ValueError(f"init: expected shape [S+1, {batch}, {dim}], got {tuple(init.shape)}")
        _check("init", init, tuple(init.shape), xw)
    if out is not None:
        _check("out", out, (batch, width, dim), xw, same_dtype=False)
        _acc_dtype("out", out)
    if batch > _MAX_GRID_YZ:
        raise ValueError(f"xw: at most {_MAX_GRID_YZ} samples per launch, got {batch}")
    block = _block(block_d, lambda: block_d_for(dim, batch, _sm_count(xw.device)))
    init_t = init if init is not None else xw
    init_strides = init.stride() if init is not None else (0, 0, 0)
    k0_t = k0 if k0 is not None else delta
    out_t = out if out is not None else xw
    out_strides = out.stride() if out is not None else (0, 0, 0)
    with _on(xw.device):
        _commit_window_kernel[(-(-dim // block), batch)](
            xw, mixed, g, delta, n_rows, k0_t, init_t, out_t,
            width, dim, (init.shape[0] - 1) if init is not None else 0,
            *xw.stride(), *mixed.stride(), *g.stride(),
            delta.stride(0), n_rows.stride(0), k0_t.stride(0),
            *init_strides, *out_strides,
            HAS_INIT=init is not None, HAS_OUT=out is not None, EXTRAP=extrapolate and init is None,
            BLOCK_D=block, num_warps=num_warps_for(block),
        )


def round_status(
    f_sq: torch.Tensor, g_sq: torch.Tensor, nonfinite: torch.Tensor, t: torch.Tensor, n_rows: torch.Tensor,
    k0: torch.Tensor, rounds: torch.Tensor, noise_var: torch.Tensor, worst: torch.Tensor, res_log: torch.Tensor,
    done_round: torch.Tensor, bad_t: torch.Tensor, mult: torch.Tensor, spent: torch.Tensor, *, stop: str, tol: float,
    dim: int, block_w: int | None = None,
) -> torch.Tensor:
    """:func:`deqkern.ops.reference.round_status` as one kernel; returns ``delta``."""
    if f_sq.ndim != 2:
        raise ValueError(f"f_sq: expected shape [B, W], got {tuple(f_sq.shape)}")
    if f_sq.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"f_sq: expected float32 or float64 (the scan's accumulation dtype), got {f_sq.dtype}")
    acc_tl, _ = _acc_dtype("f_sq", f_sq)
    if stop not in STOP_CODES:
        raise ValueError(f"stop: expected one of {sorted(STOP_CODES)}, got {stop!r}")
    batch, width = f_sq.shape
    steps = noise_var.numel()
    _check("g_sq", g_sq, (batch, width), f_sq)
    _check("nonfinite", nonfinite, (batch, width), f_sq)
    rows = res_log.shape[0]
    for name, v, shape in (("t", t, (batch, width)), ("n_rows", n_rows, (batch,)), ("k0", k0, (batch,)),
                           ("done_round", done_round, (batch,)), ("bad_t", bad_t, (rows,))):
        if v.shape != shape or v.dtype != torch.int64 or v.device != f_sq.device:
            raise ValueError(f"{name}: expected int64 of shape {shape} on {f_sq.device}, got {v.dtype} "
                             f"{tuple(v.shape)} on {v.device}")
    if rounds.shape != () or rounds.dtype != torch.int64:
        raise ValueError(f"rounds: expected a 0-d int64 tensor, got {rounds.dtype} {tuple(rounds.shape)}")
    _check("mult", mult, (batch, width), f_sq, same_dtype=False)
    if not mult.is_floating_point():
        raise TypeError(f"mult: expected a floating-point tensor (the scan's multipliers L), got {mult.dtype}")
    for name, v, shape in (("noise_var", noise_var, (steps,)), ("worst", worst, (batch,)),
                           ("res_log", res_log, (rows, batch)), ("spent", spent, (batch,))):
        if v.shape != shape or v.dtype != torch.float64 or v.device != f_sq.device:
            raise ValueError(f"{name}: expected float64 of shape {shape} on {f_sq.device}, got {v.dtype} "
                             f"{tuple(v.shape)} on {v.device}")
    block = _block(block_w, lambda: status_block_w(width))
    delta = torch.empty(batch, dtype=torch.int64, device=f_sq.device)
    with _on(f_sq.device):
        _round_status_kernel[(batch,)](
            f_sq, g_sq, nonfinite, t, n_rows, k0, rounds, noise_var, delta, worst, res_log, done_round, bad_t,
            mult, spent, width, steps, dim, rows - 1, float(tol),
            *f_sq.stride(), *g_sq.stride(), *nonfinite.stride(), *t.stride(), n_rows.stride(0), k0.stride(0),
            delta.stride(0), worst.stride(0), *res_log.stride(), done_round.stride(0), bad_t.stride(0),
            *mult.stride(), spent.stride(0),
            STOP=STOP_CODES[stop], ACC=acc_tl, BLOCK_W=block, num_warps=num_warps_for(block),
        )
    return delta
