"""Commit a round: freeze the accepted rows, slide every window, write the next model input.

Only ``@triton.jit`` code; the launcher is :func:`deqkern.ops.triton_ops.commit_window` and the
contract :func:`deqkern.ops.reference.commit_window`.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _window_row(r, use, delta, anchor, g_row, m_row, s_gj, s_gd, s_mj, s_md, offs, D):
    """Row ``r + 1`` of ``[anchor, rows...]`` for one block of elements: the anchor for ``r < 0``,
    row ``r``'s ``G`` value (``g_row``) if it froze (``r < delta``), else the solver's proposal
    (``m_row``); zeros, with nothing read, where ``use`` is 0."""
    rc = tl.maximum(r, 0).to(tl.int64)
    from_anchor = use * (r < 0).to(tl.int32)
    from_g = use * (r >= 0).to(tl.int32) * (r < delta).to(tl.int32)
    from_mixed = use * (r >= delta).to(tl.int32)
    val = tl.where(offs < tl.where(from_anchor > 0, D, 0), anchor, 0.0).to(anchor.dtype)
    val += tl.load(g_row + rc * s_gj + offs * s_gd, mask=offs < tl.where(from_g > 0, D, 0), other=0.0)
    val += tl.load(m_row + rc * s_mj + offs * s_md, mask=offs < tl.where(from_mixed > 0, D, 0), other=0.0)
    return val


@triton.jit
def _commit_window_kernel(
    xw_ptr, mixed_ptr, g_ptr, delta_ptr, nrows_ptr, k0_ptr, init_ptr, out_ptr,
    W, D, S,
    s_xb, s_xj, s_xd,
    s_mb, s_mj, s_md,
    s_gb, s_gj, s_gd,
    s_db, s_nb, s_kb,
    s_ip, s_ib, s_id,
    s_ob, s_oj, s_od,
    HAS_INIT: tl.constexpr, HAS_OUT: tl.constexpr, EXTRAP: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program = one sample ``b`` x one block of ``BLOCK_D`` latent elements, rows ``i = 0..W``.

    With ``delta = delta[b]`` accepted rows, ``n = n_rows[b]`` live rows and the source row
    ``src = i + delta`` of the round's window (row 0 the anchor, row ``r + 1`` the result of row
    ``r``), in place::

        xw[b, i] = init[min(k0 + src, S), b]   if init is given and src > n   (rows entering)
                 = xw[b, 0]                    if min(src, n) == 0            (nothing computed)
                 = g[b, r]                     if r < delta, r = min(src, n) - 1  (frozen rows)
                 = mixed[b, r]                 otherwise                      (the solver's proposal)
        out[b, i] = xw[b, i] in out's dtype   for i < W                       (the next model input)

    except that an inactive sample (``n == 0``) keeps its rows (``xw[b, i]`` unchanged): they are
    the solve's current estimate, and inactive rounds still run in fixed-shape chunks.

    and with ``EXTRAP`` (no init) a row entering continues the last step linearly: to the value
    above (the last computed row, ``full[n]`` of ``full = [anchor, rows...]``) it adds
    ``(src - n) (full[n] - full[n-1])``, ``full[n-1]`` chosen the same way (anchor, g or mixed).

    In place is safe: the elements of ``xw`` read are the anchor ``xw[b, 0]``, only by rows that
    also write the anchor's value, and an inactive sample's row ``i``, read just before it is
    written by the same program. Pointers (element strides explicit): xw ``[B, W+1, D]``;
    mixed, g ``[B, W, D]``; delta, nrows, k0 ``[B]`` int; init ``[S+1, B, D]`` (unread unless
    ``HAS_INIT``); out ``[B, W, D]`` any float dtype (unwritten unless ``HAS_OUT``). Grid
    ``(cdiv(D, BLOCK_D), B)``. Memory: reads N (one source row per row), writes N (+ N for
    ``out``), N = B (W+1) D — it replaces a select, a concatenation, a gather and a copy; with
    ``EXTRAP`` the entering rows read one more row each.
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    delta = tl.load(delta_ptr + b * s_db)
    n = tl.load(nrows_ptr + b * s_nb)
    anchor = tl.load(xw_ptr + b * s_xb + offs * s_xd, mask=dmask, other=0.0)
    if HAS_INIT:
        k0 = tl.load(k0_ptr + b * s_kb)
    g_row = g_ptr + b * s_gb
    m_row = mixed_ptr + b * s_mb
    for i in range(0, W + 1):
        src = i + delta
        # 0/1 flags and masks written as bounds: the CPU interpreter of triton 3.9 mis-types
        # `tensor & scalar_bool` and crashes on scalar bool `|`
        if HAS_INIT:
            keep = (src <= n).to(tl.int32)  # 0: a row entering the window, read from init
        else:
            keep = 1  # no init: rows past the computed ones copy the last computed one
        val = _window_row(tl.minimum(src, n) - 1, keep, delta, anchor, g_row, m_row, s_gj, s_gd, s_mj, s_md, offs, D)
        if HAS_INIT:
            p = tl.minimum(k0 + src, S).to(tl.int64)
            val += tl.load(init_ptr + p * s_ip + b * s_ib + offs * s_id, mask=offs < tl.where(keep == 0, D, 0),
                           other=0.0)
        if EXTRAP:
            # rows entering (src > n): + (src - n) (last - prev), prev = full[n - 1] (anchor at n <= 1)
            ahead = tl.maximum(src - n, 0)
            prev = _window_row(n - 2, (ahead > 0).to(tl.int32), delta, anchor, g_row, m_row, s_gj, s_gd, s_mj, s_md,
                               offs, D)
            val += tl.where(offs < tl.where(ahead > 0, D, 0), ahead.to(val.dtype) * (val - prev), 0.0).to(val.dtype)
        idle = offs < tl.where(n == 0, D, 0)
        val = tl.where(idle, tl.load(xw_ptr + b * s_xb + i * s_xj + offs * s_xd, mask=idle, other=0.0), val)
        tl.store(xw_ptr + b * s_xb + i * s_xj + offs * s_xd, val, mask=dmask)
        if HAS_OUT:
            tl.store(out_ptr + b * s_ob + i * s_oj + offs * s_od, val.to(out_ptr.dtype.element_ty),
                     mask=offs < tl.where(i < W, D, 0))
