"""Commit a round: freeze the accepted rows, slide every window, write the next model input.

The kernel and its launcher :func:`commit_window`; the contract is
:func:`deqkern.ops.reference.commit_window`. Interpreter notes: :mod:`deqkern.kernels._launch`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from deqkern.kernels._launch import (
    MAX_GRID_YZ, acc_dtype, block_d_for, check_tensor, num_warps_for, on_device, pick_block, sm_count,
)


@triton.jit
def _window_row(r, use, delta, anchor, g_row, m_row, stride_g_j, stride_g_d, stride_mixed_j, stride_mixed_d, offs, D):
    """Row ``r + 1`` of ``[anchor, rows...]`` for one block of elements: the anchor for ``r < 0``,
    row ``r``'s ``G`` value (``g_row``) if it froze (``r < delta``), else the solver's proposal
    (``m_row``); zeros, with nothing read, where ``use`` is 0."""
    rc = tl.maximum(r, 0).to(tl.int64)
    from_anchor = use * (r < 0).to(tl.int32)
    from_g = use * (r >= 0).to(tl.int32) * (r < delta).to(tl.int32)
    from_mixed = use * (r >= delta).to(tl.int32)
    val = tl.where(offs < tl.where(from_anchor > 0, D, 0), anchor, 0.0).to(anchor.dtype)
    val += tl.load(g_row + rc * stride_g_j + offs * stride_g_d, mask=offs < tl.where(from_g > 0, D, 0), other=0.0)
    val += tl.load(m_row + rc * stride_mixed_j + offs * stride_mixed_d, mask=offs < tl.where(from_mixed > 0, D, 0),
                   other=0.0)
    return val


@triton.jit
def _commit_window_kernel(
    xw_ptr, mixed_ptr, g_ptr, delta_ptr, nrows_ptr, k0_ptr, init_ptr, out_ptr, coords_ptr, e_ptr, coef_ptr, z_ptr,
    W, D, S,
    stride_xw_b, stride_xw_j, stride_xw_d,
    stride_mixed_b, stride_mixed_j, stride_mixed_d,
    stride_g_b, stride_g_j, stride_g_d,
    stride_delta_b, stride_nrows_b, stride_k0_b,
    stride_init_p, stride_init_b, stride_init_d,
    stride_out_b, stride_out_j, stride_out_d, stride_coords_p,
    stride_e_b, stride_e_j, stride_e_d, stride_coef_p, stride_coef_f, stride_z_p, stride_z_b, stride_z_d,
    HAS_INIT: tl.constexpr, HAS_OUT: tl.constexpr, EXTRAP: tl.constexpr, COORDS: tl.constexpr,
    AHEAD: tl.constexpr, NOISE: tl.constexpr, BLOCK_D: tl.constexpr,
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
    With ``COORDS`` (no init; ``coords`` ``[S+1]`` the latents' scale by position) an entering row
    reads ``full[i]`` as ``c_src / c_i full[i]``, ``c_i = coords[min(k0 + i, S)]``: both rules act in
    VP coordinates (docs/math.md §3); three scalar loads per row.
    With ``AHEAD`` (no init, no ``EXTRAP``/``COORDS``) the entering rows are the chain stepped from
    the last computed row with the last live row's model output ``u = e[b, n - 1]`` held
    (docs/math.md §2); they are consecutive (``src = n + 1, n + 2, ...``), so one register vector
    ``v`` carries the chain from row to row::

        v = full[n];  for each entering row:  v <- cx_q v + co_q u (+ sigma_q z[q, b]),  q = k0 + src - 1

    ``e`` ``[B, W, D]`` the round's model outputs; ``coef`` ``[S, 7]`` the steps by position (fields
    1, 2, 6: ``cx``, ``co``, ``sigma``), three scalar loads per entering row; with ``NOISE`` the
    step noise ``z`` ``[S, B, D]``, one ``[D]`` read per entering row. ``u`` is one ``[D]`` read
    per sample.

    In place is safe: the elements of ``xw`` read are the anchor ``xw[b, 0]``, only by rows that
    also write the anchor's value, and an inactive sample's row ``i``, read just before it is
    written by the same program. Pointers (element strides explicit): xw ``[B, W+1, D]``;
    mixed, g ``[B, W, D]``; delta, nrows, k0 ``[B]`` int; init ``[S+1, B, D]`` (unread unless
    ``HAS_INIT``); out ``[B, W, D]`` any float dtype (unwritten unless ``HAS_OUT``); coords ``[S+1]``
    in xw's dtype (unread unless ``COORDS``). Grid
    ``(cdiv(D, BLOCK_D), B)``. Memory: reads N (one source row per row), writes N (+ N for
    ``out``), N = B (W+1) D — it replaces a select, a concatenation, a gather and a copy; with
    ``EXTRAP`` the entering rows read one more row each.
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    delta = tl.load(delta_ptr + b * stride_delta_b)
    n = tl.load(nrows_ptr + b * stride_nrows_b)
    anchor = tl.load(xw_ptr + b * stride_xw_b + offs * stride_xw_d, mask=dmask, other=0.0)
    g_row = g_ptr + b * stride_g_b
    m_row = mixed_ptr + b * stride_mixed_b
    if HAS_INIT or COORDS or AHEAD:
        k0 = tl.load(k0_ptr + b * stride_k0_b)
    if AHEAD:
        # the last live row's model output, read once, and the chain from the last computed row
        # (nothing read when the sample is inactive)
        u = tl.load(e_ptr + b * stride_e_b + tl.maximum(n - 1, 0).to(tl.int64) * stride_e_j + offs * stride_e_d,
                    mask=offs < tl.where(n > 0, D, 0), other=0.0).to(anchor.dtype)
        v = _window_row(n - 1, (n > 0).to(tl.int32), delta, anchor, g_row, m_row, stride_g_j, stride_g_d,
                        stride_mixed_j, stride_mixed_d, offs, D)
    for i in range(0, W + 1):
        src = i + delta
        # 0/1 flags and masks written as bounds (interpreter quirks: deqkern.kernels._launch)
        if HAS_INIT:
            keep = (src <= n).to(tl.int32)  # 0: a row entering the window, read from init
        else:
            keep = 1  # no init: rows past the computed ones copy the last computed one
        val = _window_row(tl.minimum(src, n) - 1, keep, delta, anchor, g_row, m_row, stride_g_j, stride_g_d,
                          stride_mixed_j, stride_mixed_d, offs, D)
        if HAS_INIT:
            p = tl.minimum(k0 + src, S).to(tl.int64)
            val += tl.load(init_ptr + p * stride_init_p + b * stride_init_b + offs * stride_init_d,
                           mask=offs < tl.where(keep == 0, D, 0), other=0.0)
        if COORDS:
            # entering rows (src > n) read full[i] as c_src / c_i full[i]; other rows 1
            c_src = tl.load(coords_ptr + tl.minimum(k0 + src, S) * stride_coords_p)
            c_last = tl.load(coords_ptr + tl.minimum(k0 + n, S) * stride_coords_p)
            c_prev = tl.load(coords_ptr + tl.maximum(tl.minimum(k0 + n - 1, S), 0) * stride_coords_p)
            r_last = tl.where(src > n, c_src / c_last, 1.0).to(val.dtype)
            r_prev = tl.where(src > n, c_src / c_prev, 1.0).to(val.dtype)
            val = val * r_last
        if EXTRAP:
            # rows entering (src > n): + (src - n) (last - prev), prev = full[n - 1] (anchor at n <= 1)
            ahead = tl.maximum(src - n, 0)
            prev = _window_row(n - 2, (ahead > 0).to(tl.int32), delta, anchor, g_row, m_row, stride_g_j, stride_g_d,
                               stride_mixed_j, stride_mixed_d, offs, D)
            if COORDS:
                prev = prev * r_prev
            val += tl.where(offs < tl.where(ahead > 0, D, 0), ahead.to(val.dtype) * (val - prev), 0.0).to(val.dtype)
        if AHEAD:
            enter = (src > n).to(tl.int32)
            q = tl.minimum(tl.maximum(k0 + src - 1, 0), S - 1).to(tl.int64)
            cx = tl.load(coef_ptr + q * stride_coef_p + 1 * stride_coef_f).to(val.dtype)
            co = tl.load(coef_ptr + q * stride_coef_p + 2 * stride_coef_f).to(val.dtype)
            step = cx * v + co * u
            if NOISE:
                sig = tl.load(coef_ptr + q * stride_coef_p + 6 * stride_coef_f).to(val.dtype)
                step += sig * tl.load(z_ptr + q * stride_z_p + b * stride_z_b + offs * stride_z_d,
                                      mask=offs < tl.where(enter > 0, D, 0), other=0.0).to(val.dtype)
            v = tl.where(enter > 0, step, v)
            val = tl.where(offs < tl.where(enter > 0, D, 0), v, val)
        idle = offs < tl.where(n == 0, D, 0)
        val = tl.where(idle, tl.load(xw_ptr + b * stride_xw_b + i * stride_xw_j + offs * stride_xw_d, mask=idle,
                                     other=0.0), val)
        tl.store(xw_ptr + b * stride_xw_b + i * stride_xw_j + offs * stride_xw_d, val, mask=dmask)
        if HAS_OUT:
            tl.store(out_ptr + b * stride_out_b + i * stride_out_j + offs * stride_out_d,
                     val.to(out_ptr.dtype.element_ty),
                     mask=offs < tl.where(i < W, D, 0))


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
    coords: torch.Tensor | None = None,
    ahead: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    block_d: int | None = None,
) -> None:
    """:func:`deqkern.ops.reference.commit_window` as one kernel (in place on ``xw``)."""
    if xw.ndim != 3:
        raise ValueError(f"xw: expected shape [B, W+1, D], got {tuple(xw.shape)}")
    acc_dtype("xw", xw)
    batch, rows, dim = xw.shape
    width = rows - 1
    check_tensor("mixed", mixed, (batch, width, dim), xw)
    check_tensor("g", g, (batch, width, dim), xw)
    check_tensor("delta", delta, (batch,), xw, same_dtype=False)
    check_tensor("n_rows", n_rows, (batch,), xw, same_dtype=False)
    if init is not None:
        if k0 is None:
            raise ValueError("k0: required with init (positions of the windows)")
        check_tensor("k0", k0, (batch,), xw, same_dtype=False)
        if init.ndim != 3 or init.shape[1:] != (batch, dim):
            raise ValueError(f"init: expected shape [S+1, {batch}, {dim}], got {tuple(init.shape)}")
        check_tensor("init", init, tuple(init.shape), xw)
    if out is not None:
        check_tensor("out", out, (batch, width, dim), xw, same_dtype=False)
        acc_dtype("out", out)
    scaled = coords is not None and init is None
    if scaled:
        if k0 is None:
            raise ValueError("k0: required with coords (positions of the windows)")
        check_tensor("k0", k0, (batch,), xw, same_dtype=False)
        if coords.ndim != 1 or coords.numel() < 1:
            raise ValueError(f"coords: expected shape [S+1], got {tuple(coords.shape)}")
        check_tensor("coords", coords, tuple(coords.shape), xw)
    held = ahead is not None and init is None
    if held:
        e, coef, noise = ahead
        if k0 is None:
            raise ValueError("k0: required with ahead (positions of the windows)")
        check_tensor("k0", k0, (batch,), xw, same_dtype=False)
        check_tensor("e", e, (batch, width, dim), xw, same_dtype=False)
        if coef.ndim != 2 or coef.shape[1] != 7 or coef.shape[0] < 1:
            raise ValueError(f"coef: expected shape [S, 7], got {tuple(coef.shape)}")
        check_tensor("coef", coef, tuple(coef.shape), xw)
        if noise is not None:
            check_tensor("noise", noise, (coef.shape[0], batch, dim), xw, same_dtype=False)
        # the held rows replace both other rules for entering rows (the only rows those touch)
        extrapolate, scaled = False, False
    if batch > MAX_GRID_YZ:
        raise ValueError(f"xw: at most {MAX_GRID_YZ} samples per launch, got {batch}")
    block = pick_block("block_d", block_d, lambda: block_d_for(dim, batch, sm_count(xw.device)))
    init_t = init if init is not None else xw
    init_strides = init.stride() if init is not None else (0, 0, 0)
    k0_t = k0 if k0 is not None else delta
    out_t = out if out is not None else xw
    out_strides = out.stride() if out is not None else (0, 0, 0)
    coords_t = coords if scaled else xw
    last_pos = (init.shape[0] - 1 if init is not None else coords.numel() - 1 if scaled
                else coef.shape[0] if held else 0)
    with on_device(xw.device):
        _commit_window_kernel[(-(-dim // block), batch)](
            xw, mixed, g, delta, n_rows, k0_t, init_t, out_t, coords_t,
            *((e, coef, xw if noise is None else noise) if held else (xw, xw, xw)),
            width, dim, last_pos,
            *xw.stride(), *mixed.stride(), *g.stride(),
            delta.stride(0), n_rows.stride(0), k0_t.stride(0),
            *init_strides, *out_strides, coords_t.stride(0) if scaled else 0,
            *(e.stride() + coef.stride() + (noise.stride() if noise is not None else (0, 0, 0)) if held
              else (0,) * 8),
            HAS_INIT=init is not None, HAS_OUT=out is not None, EXTRAP=extrapolate and init is None, COORDS=scaled,
            AHEAD=held, NOISE=held and noise is not None,
            BLOCK_D=block, num_warps=num_warps_for(block),
        )
