"""Fused scan + residual + row norms + Anderson Gram row of one fixed-point round (docs/math.md §3, §6).

The kernel and its launcher :func:`scan_residual` (shape checks, allocation, grid); the contract is
:func:`deqkern.ops.reference.scan_residual`. Scalar typing and interpreter notes:
:mod:`deqkern.kernels._launch`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from deqkern.kernels._launch import (
    MAX_GRID_YZ, MAX_HISTORY, SCAN_STAGES, acc_dtype, check_tensor, next_pow2, num_warps_for, on_device, pick_block,
    scan_block_d, sm_count,
)
from deqkern.ops.reference import ScanResult
from deqkern.schedule import X0Transform


@triton.jit
def _scan_residual_kernel(
    xw_ptr, e_ptr, z_ptr, coef_ptr, nrows_ptr, hist_ptr, g_ptr, f_ptr, part_ptr, ms_ptr, u0_ptr,
    W, D, clip_range: tl.float64,
    stride_xw_b, stride_xw_j, stride_xw_d,
    stride_e_b, stride_e_j, stride_e_d,
    stride_z_b, stride_z_j, stride_z_d,
    stride_coef_b, stride_coef_j, stride_coef_c,
    stride_nrows_b,
    stride_hist_k, stride_hist_b, stride_hist_j, stride_hist_d,
    stride_g_b, stride_g_j, stride_g_d,
    stride_f_b, stride_f_j, stride_f_d,
    stride_part_n, stride_part_b, stride_part_j, stride_part_c,
    stride_ms_b, stride_ms_j, stride_ms_c,
    stride_u0_b, stride_u0_d,
    HAS_Z: tl.constexpr, CLIP: tl.constexpr, MULTISTEP: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """One program = one sample ``b`` x one block of ``BLOCK_D`` latent elements, all ``W`` rows.

    For every element, sequentially over the rows ``j = 0 .. W-1`` (the scan is sequential in
    time and independent across elements)::

        s_j    = cx x_j + co e_j [+ c0 clamp(px x_j + po e_j, -clip, clip)] [+ c1 u_{j-1}] [+ sigma z_j]
        g_j    = L_j (g_{j-1} - x_j) + s_j,         g_{-1} = x_0 (the anchor, row 0 of xw)
        f_j    = g_j - x_{j+1}

    and, for a multistep chain (``MULTISTEP``, docs/math.md §1.1), the converted output carried
    in registers from row to row, ``u_j = ux x_j + uo e_j [+ uf clamp(...)]``, ``u_{-1}`` = u0.

    with ``x_j = xw[b, j]``; rows ``j >= n_rows[b]`` are dead: ``g_j = x_{j+1}``, ``f_j = 0``
    (their e, z and history are not read). Per row it also reduces its block of ``f_j^2``,
    ``g_j^2``, ``<f_j, hist_f[k, b, j]>`` (``k < M``) and the count of non-finite ``e_j`` on
    live rows, and stores the partial sums, which the launcher adds over the blocks in a fixed
    order (deterministic, no atomics).

    Pointers (element strides explicit, ``stride_<tensor>_<dim>``):
      xw ``[B, W+1, D]``; e, z, g, f ``[B, W, D]`` (z unread unless ``HAS_Z``); coef ``[B, W, 7]``
      in ``COEF_FIELDS`` order (L, cx, co, c0, px, po, sigma); nrows ``[B]`` int; hist ``[M, B, W,
      D]`` (unread when ``M == 0``); part ``[n_blocks, B, W, 3 + M]`` fp32/fp64: (f_sq, g_sq,
      gram_0 .. gram_{M-1}, non-finite count) of this block; ms ``[B, W, 4]`` (c1, ux, uo, uf) and
      u0 ``[B, D]`` (both unread unless ``MULTISTEP``).
    Constexprs: ``HAS_Z`` noise term; ``CLIP`` fuse the clip_sample clamp; ``MULTISTEP`` the
    previous-output term (one-step chains compile without it: no extra load); ``M`` history length
    (0: no Gram row), ``M_PAD`` its next power of two; ``ACC`` accumulation dtype (fp32, fp64
    for fp64 inputs); ``BLOCK_D`` elements per program; ``NUM_STAGES`` software-pipeline depth
    of the row loop (the loads of later rows are issued while row ``j`` is reduced).
    ``clip_range`` is an fp64 scalar used in ``ACC`` (see :mod:`deqkern.kernels._launch`).
    Memory: reads x once (N, each row loaded once and carried to the next step), e and z (2N),
    hist (M N); writes g and f (2N); N = B W D; a multistep chain adds u0 (N / W: one row per
    sample, the rest carried) and four scalars per row; plus the partial sums, ``(3 + M) / BLOCK_D`` of N
    (< 9%, < 3% from BLOCK_D = 512). Arithmetic is a few FMAs per element: memory-bound.
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # 64-bit row offsets: B * W * D may exceed 2**31
    offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    n_live = tl.load(nrows_ptr + b * stride_nrows_b)
    # Scalar row pointers, advanced by one row per step (a pointer *tensor* carried through the
    # loop would cost a 64-bit register per element).
    x_row = xw_ptr + b * stride_xw_b
    e_row = e_ptr + b * stride_e_b
    z_row = z_ptr + b * stride_z_b
    c_row = coef_ptr + b * stride_coef_b
    h_row = hist_ptr + b * stride_hist_b
    g_row = g_ptr + b * stride_g_b
    f_row = f_ptr + b * stride_f_b
    p_row = part_ptr + pid_d * stride_part_n + b * stride_part_b
    m_row = ms_ptr + b * stride_ms_b
    # rounded once to ACC (fp64 scalars: deqkern.kernels._launch)
    clip = tl.full([], clip_range, ACC)
    # x_j of row 0 is the anchor, which is also g_{-1}.
    x = tl.load(x_row + offs * stride_xw_d, mask=dmask, other=0.0).to(ACC)
    g = x
    if MULTISTEP:
        u = tl.load(u0_ptr + b * stride_u0_b + offs * stride_u0_d, mask=dmask, other=0.0).to(ACC)
    if M > 0:
        ks = tl.arange(0, M_PAD)
        kmask = ks < M
        h_offs = ks.to(tl.int64)[:, None] * stride_hist_k  # 64-bit: M * B * W * D may exceed 2**31
    for j in tl.range(0, W, num_stages=NUM_STAGES):
        live = j < n_live
        # e, z and the history are read only on live rows (a bound, not `dmask & live`: interpreter
        # quirks in deqkern.kernels._launch)
        lmask = offs < tl.where(live, D, 0)
        x_row += stride_xw_j
        x_next = tl.load(x_row + offs * stride_xw_d, mask=dmask, other=0.0).to(ACC)
        L = tl.load(c_row).to(ACC)
        cx = tl.load(c_row + stride_coef_c).to(ACC)
        co = tl.load(c_row + 2 * stride_coef_c).to(ACC)
        out = tl.load(e_row + offs * stride_e_d, mask=lmask, other=0.0).to(ACC)
        s = cx * x + co * out
        if CLIP:
            c0 = tl.load(c_row + 3 * stride_coef_c).to(ACC)
            px = tl.load(c_row + 4 * stride_coef_c).to(ACC)
            po = tl.load(c_row + 5 * stride_coef_c).to(ACC)
            x0 = tl.minimum(tl.maximum(px * x + po * out, -clip), clip)
            s = s + c0 * x0
        if MULTISTEP:
            # the previous row's converted output enters, this row's replaces it (a register carry)
            s = s + tl.load(m_row).to(ACC) * u
            u = tl.load(m_row + stride_ms_c).to(ACC) * x + tl.load(m_row + 2 * stride_ms_c).to(ACC) * out
            if CLIP:
                u = u + tl.load(m_row + 3 * stride_ms_c).to(ACC) * x0
        if HAS_Z:
            sigma = tl.load(c_row + 6 * stride_coef_c).to(ACC)
            s = s + sigma * tl.load(z_row + offs * stride_z_d, mask=lmask, other=0.0).to(ACC)
        # the difference first: s keeps its precision where the latents dwarf it (ops.window.residual_scan)
        g = L * (g - x) + s
        # Dead rows keep the iterate: g = x_{j+1} exactly, so f is exactly 0 (as the reference).
        g_out = tl.where(live, g, x_next)
        f = g_out - x_next
        tl.store(g_row + offs * stride_g_d, g_out.to(g_ptr.dtype.element_ty), mask=dmask)
        tl.store(f_row + offs * stride_f_d, f.to(f_ptr.dtype.element_ty), mask=dmask)
        tl.store(p_row, tl.sum(f * f, axis=0))
        tl.store(p_row + stride_part_c, tl.sum(g_out * g_out, axis=0))
        if M > 0:
            # One [M, BLOCK_D] tile of the history: all M loads in flight at once.
            h = tl.load(
                h_row + h_offs + offs[None, :] * stride_hist_d, mask=kmask[:, None] & lmask[None, :], other=0.0
            ).to(ACC)
            tl.store(p_row + (2 + ks) * stride_part_c, tl.sum(h * f[None, :], axis=1), mask=kmask)
        # the row's non-finite model outputs (0 on dead rows: nothing read), so the round can
        # report a diverging model without a pass of its own over e
        tl.store(p_row + (2 + M) * stride_part_c,
                 tl.sum(((out != out) | (tl.abs(out) == float("inf"))).to(ACC), axis=0))
        x = x_next
        e_row += stride_e_j
        z_row += stride_z_j
        c_row += stride_coef_j
        m_row += stride_ms_j
        h_row += stride_hist_j
        g_row += stride_g_j
        f_row += stride_f_j
        p_row += stride_part_j


def scan_residual(
    xw: torch.Tensor,
    e: torch.Tensor,
    z: torch.Tensor | None,
    coef: torch.Tensor,
    n_rows: torch.Tensor,
    transform: X0Transform,
    hist_f: torch.Tensor | None = None,
    *,
    ms: torch.Tensor | None = None,
    u_prev: torch.Tensor | None = None,
    block_d: int | None = None,
) -> ScanResult:
    """:func:`deqkern.ops.reference.scan_residual` in one kernel launch plus a tiny reduction.

    ``transform.kind`` must be ``"none"`` or ``"clip"`` (fused); dynamic thresholding needs a
    per-row quantile over all of D before any element's step, which a one-pass, D-blocked kernel
    cannot compute: :func:`deqkern.ops.dispatch.scan_residual` sends it to the reference.
    ``ms`` ``[B, W, 4]`` and ``u_prev`` ``[B, D]``: a multistep chain's coefficients and the
    converted output before the window (both or neither). ``block_d`` overrides the launch
    heuristic (a power of two; tests use it to get several D-blocks per row). Norms and Gram row
    come back in fp32 (fp64 for fp64 inputs); the partial sums of the D-blocks are added by
    ``torch.sum`` in a fixed order rather than with atomics, so results are bitwise reproducible
    run to run (the stopping rule compares them to a tolerance).
    """
    if transform.kind not in ("none", "clip"):
        raise ValueError(
            f"transform: the scan kernel fuses 'none' and 'clip', got {transform.kind!r} "
            "(deqkern.ops.scan_residual runs it with the reference)"
        )
    if xw.ndim != 3 or xw.shape[1] < 2:
        raise ValueError(f"xw: expected shape [B, W+1, D] with W >= 1, got {tuple(xw.shape)}")
    acc_tl, acc_torch = acc_dtype("xw", xw)
    batch, width, dim = xw.shape[0], xw.shape[1] - 1, xw.shape[2]
    check_tensor("e", e, (batch, width, dim), xw)
    if z is not None:
        check_tensor("z", z, (batch, width, dim), xw)
    check_tensor("coef", coef, (batch, width, 7), xw, same_dtype=False)
    acc_dtype("coef", coef)
    check_tensor("n_rows", n_rows, (batch,), xw, same_dtype=False)
    if n_rows.dtype.is_floating_point or n_rows.dtype == torch.bool:
        raise TypeError(f"n_rows: expected an integer tensor, got {n_rows.dtype}")
    if (ms is None) != (u_prev is None):
        raise ValueError("ms, u_prev: a multistep chain passes both, a one-step chain neither")
    if ms is not None:
        check_tensor("ms", ms, (batch, width, 4), xw, same_dtype=False)
        acc_dtype("ms", ms)
        check_tensor("u_prev", u_prev, (batch, dim), xw)
    m = 0 if hist_f is None else hist_f.shape[0]
    if hist_f is not None:
        if not 1 <= m <= MAX_HISTORY:
            raise ValueError(f"hist_f: expected 1 to {MAX_HISTORY} history slots, got {m}")
        check_tensor("hist_f", hist_f, (m, batch, width, dim), xw)
    if batch > MAX_GRID_YZ:
        raise ValueError(f"xw: at most {MAX_GRID_YZ} samples per launch, got {batch}")
    tiles = 2 + (z is not None) + m  # [BLOCK_D] rows loaded per step: x, e, z, history
    block = pick_block("block_d", block_d,
                       lambda: scan_block_d(dim, batch, tiles, xw.element_size(), sm_count(xw.device)))
    n_blocks = -(-dim // block)
    g = torch.empty(batch, width, dim, dtype=xw.dtype, device=xw.device)
    f = torch.empty(batch, width, dim, dtype=xw.dtype, device=xw.device)
    part = torch.empty(n_blocks, batch, width, 3 + m, dtype=acc_torch, device=xw.device)
    # Absent operands: any valid pointer with zero strides; the constexprs keep them unread.
    z_t, z_s = (z, z.stride()) if z is not None else (e, (0, 0, 0))
    h_t, h_s = (hist_f, hist_f.stride()) if hist_f is not None else (e, (0, 0, 0, 0))
    ms_t, ms_s = (ms, ms.stride()) if ms is not None else (coef, (0, 0, 0))
    u_t, u_s = (u_prev, u_prev.stride()) if u_prev is not None else (e, (0, 0))
    with on_device(xw.device):
        _scan_residual_kernel[(n_blocks, batch)](
            xw, e, z_t, coef, n_rows, h_t, g, f, part, ms_t, u_t,
            width, dim, float(transform.clip_range),
            *xw.stride(), *e.stride(), *z_s, *coef.stride(), n_rows.stride(0), *h_s,
            *g.stride(), *f.stride(), *part.stride(), *ms_s, *u_s,
            HAS_Z=z is not None, CLIP=transform.kind == "clip", MULTISTEP=ms is not None,
            M=m, M_PAD=next_pow2(max(m, 1)),
            ACC=acc_tl, BLOCK_D=block, NUM_STAGES=SCAN_STAGES, num_warps=num_warps_for(block),
        )
    total = part.sum(0)
    return ScanResult(
        g=g, f=f, f_sq=total[..., 0], g_sq=total[..., 1], gram=total[..., 2:2 + m] if hist_f is not None else None,
        nonfinite=total[..., 2 + m],
    )
