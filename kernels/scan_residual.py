"""Fused scan + residual + row norms + Anderson Gram row of one fixed-point round (math.md §3, §6).

Only ``@triton.jit`` code; the launcher (shape checks, allocation, grid) is
:func:`deqkern.ops.triton_ops.scan_residual` and the contract is
:func:`deqkern.ops.reference.scan_residual`.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _scan_residual_kernel(
    xw_ptr, e_ptr, z_ptr, coef_ptr, nrows_ptr, hist_ptr, g_ptr, f_ptr, part_ptr,
    W, D, clip_range: tl.float64,
    s_xb, s_xj, s_xd,
    s_eb, s_ej, s_ed,
    s_zb, s_zj, s_zd,
    s_cb, s_cj, s_cc,
    s_nb,
    s_hk, s_hb, s_hj, s_hd,
    s_gb, s_gj, s_gd,
    s_fb, s_fj, s_fd,
    s_pn, s_pb, s_pj, s_pc,
    HAS_Z: tl.constexpr, CLIP: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """One program = one sample ``b`` x one block of ``BLOCK_D`` latent elements, all ``W`` rows.

    For every element, sequentially over the rows ``j = 0 .. W-1`` (the scan is sequential in
    time and independent across elements)::

        s_j    = cx x_j + co e_j [+ c0 clamp(px x_j + po e_j, -clip, clip)] [+ sigma z_j]
        g_j    = L_j g_{j-1} + (s_j - L_j x_j),     g_{-1} = x_0 (the anchor, row 0 of xw)
        f_j    = g_j - x_{j+1}

    with ``x_j = xw[b, j]``; rows ``j >= n_rows[b]`` are dead: ``g_j = x_{j+1}``, ``f_j = 0``
    (their e, z and history are not read). Per row it also reduces its block of ``f_j^2``,
    ``g_j^2``, ``<f_j, hist_f[k, b, j]>`` (``k < M``) and the count of non-finite ``e_j`` on
    live rows, and stores the partial sums, which the launcher adds over the blocks in a fixed
    order (deterministic, no atomics).

    Pointers (element strides passed explicitly, ``s_<tensor><dim>``):
      xw ``[B, W+1, D]``; e, z, g, f ``[B, W, D]`` (z unread unless ``HAS_Z``); coef ``[B, W, 7]``
      in ``COEF_FIELDS`` order (L, cx, co, c0, px, po, sigma); nrows ``[B]`` int; hist ``[M, B, W,
      D]`` (unread when ``M == 0``); part ``[n_blocks, B, W, 3 + M]`` fp32/fp64: (f_sq, g_sq,
      gram_0 .. gram_{M-1}, non-finite count) of this block.
    Constexprs: ``HAS_Z`` noise term; ``CLIP`` fuse the clip_sample clamp; ``M`` history length
    (0: no Gram row), ``M_PAD`` its next power of two; ``ACC`` accumulation dtype (fp32, fp64
    for fp64 inputs); ``BLOCK_D`` elements per program; ``NUM_STAGES`` software-pipeline depth
    of the row loop (the loads of later rows are issued while row ``j`` is reduced).
    ``clip_range`` is declared fp64 and used in ``ACC``.
    Memory: reads x once (N, each row loaded once and carried to the next step), e and z (2N),
    hist (M N); writes g and f (2N); N = B W D; plus the partial sums, ``(3 + M) / BLOCK_D`` of N
    (< 9%, < 3% from BLOCK_D = 512). Arithmetic is a few FMAs per element: memory-bound.
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # 64-bit row offsets: B * W * D may exceed 2**31
    offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    n_live = tl.load(nrows_ptr + b * s_nb)
    # Scalar row pointers, advanced by one row per step (a pointer *tensor* carried through the
    # loop would cost a 64-bit register per element).
    x_row = xw_ptr + b * s_xb
    e_row = e_ptr + b * s_eb
    z_row = z_ptr + b * s_zb
    c_row = coef_ptr + b * s_cb
    h_row = hist_ptr + b * s_hb
    g_row = g_ptr + b * s_gb
    f_row = f_ptr + b * s_fb
    p_row = part_ptr + pid_d * s_pn + b * s_pb
    # `clip_range` is declared fp64: unannotated, a Python float reaches a GPU kernel as fp32 but stays
    # float64 in the CPU interpreter, which would hide the GPU's rounding from the tests. tl.full
    # rounds it once for fp32 kernels (an fp64 operand would promote their math to fp64) and keeps
    # it exact for fp64 ones, compiled or interpreted (tl.cast would round through fp32 there).
    clip = tl.full([], clip_range, ACC)
    # x_j of row 0 is the anchor, which is also g_{-1}.
    x = tl.load(x_row + offs * s_xd, mask=dmask, other=0.0).to(ACC)
    g = x
    if M > 0:
        ks = tl.arange(0, M_PAD)
        kmask = ks < M
        h_offs = ks.to(tl.int64)[:, None] * s_hk  # 64-bit: M * B * W * D may exceed 2**31
    for j in tl.range(0, W, num_stages=NUM_STAGES):
        live = j < n_live
        # e, z and the history are read only on live rows (written as a bound, not `dmask & live`,
        # which the CPU interpreter of triton 3.9 mis-types when `live` is a scalar)
        lmask = offs < tl.where(live, D, 0)
        x_row += s_xj
        x_next = tl.load(x_row + offs * s_xd, mask=dmask, other=0.0).to(ACC)
        L = tl.load(c_row).to(ACC)
        cx = tl.load(c_row + s_cc).to(ACC)
        co = tl.load(c_row + 2 * s_cc).to(ACC)
        out = tl.load(e_row + offs * s_ed, mask=lmask, other=0.0).to(ACC)
        s = cx * x + co * out
        if CLIP:
            c0 = tl.load(c_row + 3 * s_cc).to(ACC)
            px = tl.load(c_row + 4 * s_cc).to(ACC)
            po = tl.load(c_row + 5 * s_cc).to(ACC)
            x0 = px * x + po * out
            s = s + c0 * tl.minimum(tl.maximum(x0, -clip), clip)
        if HAS_Z:
            sigma = tl.load(c_row + 6 * s_cc).to(ACC)
            s = s + sigma * tl.load(z_row + offs * s_zd, mask=lmask, other=0.0).to(ACC)
        g = L * g + (s - L * x)
        # Dead rows keep the iterate: g = x_{j+1} exactly, so f is exactly 0 (as the reference).
        g_out = tl.where(live, g, x_next)
        f = g_out - x_next
        tl.store(g_row + offs * s_gd, g_out.to(g_ptr.dtype.element_ty), mask=dmask)
        tl.store(f_row + offs * s_fd, f.to(f_ptr.dtype.element_ty), mask=dmask)
        tl.store(p_row, tl.sum(f * f, axis=0))
        tl.store(p_row + s_pc, tl.sum(g_out * g_out, axis=0))
        if M > 0:
            # One [M, BLOCK_D] tile of the history: all M loads in flight at once.
            h = tl.load(
                h_row + h_offs + offs[None, :] * s_hd, mask=kmask[:, None] & lmask[None, :], other=0.0
            ).to(ACC)
            tl.store(p_row + (2 + ks) * s_pc, tl.sum(h * f[None, :], axis=1), mask=kmask)
        # the row's non-finite model outputs (0 on dead rows: nothing read), so the round can
        # report a diverging model without a pass of its own over e
        tl.store(p_row + (2 + M) * s_pc, tl.sum(((out != out) | (tl.abs(out) == float("inf"))).to(ACC), axis=0))
        x = x_next
        e_row += s_ej
        z_row += s_zj
        c_row += s_cj
        h_row += s_hj
        g_row += s_gj
        f_row += s_fj
        p_row += s_pj
