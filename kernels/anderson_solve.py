"""Batched bordered Anderson systems, one tiny Gauss-Jordan elimination per program (docs/math.md §4.2).

The kernel and its launcher :func:`anderson_weights`; the contract is
:func:`deqkern.ops.reference.anderson_weights`. Scalar typing and interpreter notes:
:mod:`deqkern.kernels._launch`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from deqkern.kernels._launch import MAX_HISTORY, acc_dtype, check_tensor, next_pow2, on_device


@triton.jit
def _anderson_solve_kernel(
    gram_ptr, valid_ptr, newest_ptr, alpha_ptr, ok_ptr, ridge: tl.float64,
    stride_gram_r, stride_gram_i, stride_gram_j,
    stride_valid_r, stride_valid_k,
    stride_newest_r,
    stride_alpha_r, stride_alpha_k,
    stride_ok_r,
    M: tl.constexpr, NP: tl.constexpr,
):
    """One program solves problem ``r``: the ``(M+1) x (M+1)`` bordered system, in float64,

        [[0, v^T], [v, H v v^T + lam diag(v) + diag(1 - v)]] [nu; a] = [1; 0]
        lam = ridge * mean(diag H over valid slots) + tiny

    (``v`` = valid mask; an invalid slot gets an identity row, so its weight is exactly 0), by
    Gauss-Jordan elimination with partial pivoting on an ``[NP, NP]`` register tile (system index
    0 = the border, ``1 .. M`` = history slots, the padding ``> M`` an identity block). A problem
    with an exactly zero pivot (as LAPACK's ``info > 0``), a non-finite system or a non-finite
    solution returns ``a = one_hot(newest)`` and ``ok = 0`` (plain Picard).

    Pointers (element strides explicit): gram ``[R, M, M]`` any float (read as fp64); valid ``[R,
    M]`` bool; newest ``[R]`` int; alpha ``[R, M]`` fp64 (out); ok ``[R]`` int8 (out).
    ``ridge`` is an fp64 scalar (see :mod:`deqkern.kernels._launch`). Memory: reads M^2 + M + 1, writes
    M + 1 values per problem; the cost is the ~M^3 register arithmetic and the launch.
    """
    r = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, NP)
    slot = i - 1
    in_h = (i >= 1) & (i <= M)
    rows = i[:, None]
    cols = i[None, :]
    eye = rows == cols
    is_h = in_h[:, None] & in_h[None, :]
    v = tl.load(valid_ptr + r * stride_valid_r + slot * stride_valid_k, mask=in_h, other=0).to(tl.float64)
    h = tl.load(gram_ptr + r * stride_gram_r + slot[:, None] * stride_gram_i + slot[None, :] * stride_gram_j,
                mask=is_h, other=0.0)
    h = h.to(tl.float64)
    count = tl.maximum(tl.sum(v, axis=0), 1.0)
    mean_diag = tl.sum(tl.sum(tl.where(eye, h, 0.0), axis=1) * v, axis=0) / count
    # + the smallest normal fp64 (2**-1022): keeps H = 0 (all residuals zero) solvable, as the reference.
    lam = ridge * mean_diag + 2.2250738585072014e-308
    vi = v[:, None]
    vj = v[None, :]
    a_sys = tl.where(is_h, h * (vi * vj) + tl.where(eye, lam * vi + (1.0 - vi), 0.0), 0.0)
    a_sys = tl.where((rows == 0) & (cols >= 1), vj, a_sys)
    a_sys = tl.where((cols == 0) & (rows >= 1), vi, a_sys)
    a_sys = tl.where(eye & (rows > M), 1.0, a_sys)
    rhs = tl.where(i == 0, 1.0, 0.0).to(tl.float64)
    # failures are counted in an int32, not or-ed into a bool (interpreter quirks: deqkern.kernels._launch)
    n_fail = tl.sum(tl.sum(tl.where(tl.abs(a_sys) < float("inf"), 0, 1), axis=1), axis=0)
    for c in tl.static_range(M + 1):
        col = tl.sum(tl.where(cols == c, a_sys, 0.0), axis=1)
        p = tl.argmax(tl.where((i >= c) & (i <= M), tl.abs(col), -1.0), axis=0)
        row_c = tl.sum(tl.where(rows == c, a_sys, 0.0), axis=0)
        row_p = tl.sum(tl.where(rows == p, a_sys, 0.0), axis=0)
        rhs_c = tl.sum(tl.where(i == c, rhs, 0.0), axis=0)
        rhs_p = tl.sum(tl.where(i == p, rhs, 0.0), axis=0)
        col_c = tl.sum(tl.where(i == c, col, 0.0), axis=0)
        piv = tl.sum(tl.where(i == p, col, 0.0), axis=0)
        # swap rows c and p (a no-op when p == c)
        a_sys = tl.where(rows == c, row_p[None, :], tl.where(rows == p, row_c[None, :], a_sys))
        rhs = tl.where(i == c, rhs_p, tl.where(i == p, rhs_c, rhs))
        col = tl.where(i == c, piv, tl.where(i == p, col_c, col))
        n_fail += tl.where(piv == 0.0, 1, 0)
        # eliminate column c from every other row (above and below: Gauss-Jordan)
        factor = tl.where(i == c, 0.0, col / piv)
        a_sys = a_sys - factor[:, None] * row_p[None, :]
        rhs = rhs - factor * rhs_p
    x = rhs / tl.sum(tl.where(eye, a_sys, 0.0), axis=1)
    n_fail += tl.sum(tl.where(in_h, tl.where(tl.abs(x) < float("inf"), 0, 1), 0), axis=0)
    newest = tl.load(newest_ptr + r * stride_newest_r)
    a = tl.where(n_fail > 0, tl.where(slot == newest, 1.0, 0.0), x)
    tl.store(alpha_ptr + r * stride_alpha_r + slot * stride_alpha_k, a.to(tl.float64), mask=in_h)
    tl.store(ok_ptr + r * stride_ok_r, tl.where(n_fail > 0, 0, 1).to(tl.int8))


def anderson_weights(
    gram: torch.Tensor, valid: torch.Tensor, newest: torch.Tensor, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`deqkern.ops.reference.anderson_weights` with one Triton program per problem.

    Returns ``(alpha [R, m] float64, ok [R] bool)``; same masking, relative ridge and one-hot
    fallback as the reference.
    """
    if gram.ndim != 3 or gram.shape[1] != gram.shape[2]:
        raise ValueError(f"gram: expected shape [R, m, m], got {tuple(gram.shape)}")
    acc_dtype("gram", gram)
    r, m = gram.shape[0], gram.shape[1]
    if not 1 <= m <= MAX_HISTORY:
        raise ValueError(f"gram: expected 1 to {MAX_HISTORY} history slots, got {m}")
    check_tensor("valid", valid, (r, m), gram, same_dtype=False)
    if valid.dtype != torch.bool:
        raise TypeError(f"valid: expected a bool tensor, got {valid.dtype}")
    check_tensor("newest", newest, (r,), gram, same_dtype=False)
    if newest.dtype.is_floating_point or newest.dtype == torch.bool:
        raise TypeError(f"newest: expected an integer tensor, got {newest.dtype}")
    alpha = torch.empty(r, m, dtype=torch.float64, device=gram.device)
    ok = torch.empty(r, dtype=torch.int8, device=gram.device)
    if r > 0:
        with on_device(gram.device):
            _anderson_solve_kernel[(r,)](
                gram, valid, newest, alpha, ok, float(ridge),
                *gram.stride(), *valid.stride(), newest.stride(0), *alpha.stride(), ok.stride(0),
                M=m, NP=next_pow2(m + 1), num_warps=1,
            )
    return alpha, ok.view(torch.bool)
