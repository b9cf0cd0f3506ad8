"""Anderson mixing: the next iterate from the history, written straight into the model's input
buffer (docs/math.md §4.2, §6).

The kernel and its launcher :func:`anderson_mix`; the contract is
:func:`deqkern.ops.reference.anderson_mix`. Scalar typing: :mod:`deqkern.kernels._launch`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from deqkern.kernels._launch import (
    MAX_GRID_YZ, MAX_HISTORY, acc_dtype, block_d_for, check_tensor, num_warps_for, on_device, pick_block, sm_count,
)


@triton.jit
def _anderson_mix_kernel(
    hx_ptr, hf_ptr, alpha_ptr, out_ptr,
    D, beta: tl.float64,
    stride_hx_k, stride_hx_b, stride_hx_j, stride_hx_d,
    stride_hf_k, stride_hf_b, stride_hf_j, stride_hf_d,
    stride_alpha_b, stride_alpha_j, stride_alpha_k,
    stride_out_b, stride_out_j, stride_out_d,
    M: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program = one row ``(b, j)`` x one block of ``BLOCK_D`` latent elements::

        out[b, j] = sum_k alpha[b, j, k] (X_k[b, j] + beta F_k[b, j]),   k = 0 .. M-1

    accumulated in ``ACC`` (fp32, fp64 for fp64 history) and rounded once to ``out``'s dtype.

    Pointers (element strides explicit): hx, hf ``[M, B, W, D]``; alpha ``[B, W, M]`` any float;
    out ``[B, W, D]``, any float dtype and any strides (e.g. a view into the model's fp16 input
    batch). ``beta`` is an fp64 scalar used in ``ACC`` (see :mod:`deqkern.kernels._launch`).
    Grid ``(cdiv(D, BLOCK_D), W, B)``. Memory: reads 2 M N, writes N (N = B W D); the M-loop is
    unrolled so all 2 M loads of a program are in flight together.
    """
    pid_d = tl.program_id(0)
    j = tl.program_id(1).to(tl.int64)  # 64-bit row offsets: M * B * W * D may exceed 2**31
    b = tl.program_id(2).to(tl.int64)
    offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    x_k = hx_ptr + b * stride_hx_b + j * stride_hx_j
    f_k = hf_ptr + b * stride_hf_b + j * stride_hf_j
    a_k = alpha_ptr + b * stride_alpha_b + j * stride_alpha_j
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    # rounded once to ACC (fp64 scalars: deqkern.kernels._launch)
    beta_acc = tl.full([], beta, ACC)
    for _ in tl.static_range(M):
        a = tl.load(a_k).to(ACC)
        xk = tl.load(x_k + offs * stride_hx_d, mask=dmask, other=0.0).to(ACC)
        fk = tl.load(f_k + offs * stride_hf_d, mask=dmask, other=0.0).to(ACC)
        acc += a * (xk + beta_acc * fk)
        # advance the pointers, not k * stride: a 32-bit product could overflow
        x_k += stride_hx_k
        f_k += stride_hf_k
        a_k += stride_alpha_k
    tl.store(out_ptr + b * stride_out_b + j * stride_out_j + offs * stride_out_d, acc.to(out_ptr.dtype.element_ty),
             mask=dmask)


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
    acc_tl, _ = acc_dtype("hist_x", hist_x)
    m, batch, width, dim = hist_x.shape
    if not 1 <= m <= MAX_HISTORY:
        raise ValueError(f"hist_x: expected 1 to {MAX_HISTORY} history slots, got {m}")
    check_tensor("hist_f", hist_f, tuple(hist_x.shape), hist_x)
    check_tensor("alpha", alpha, (batch, width, m), hist_x, same_dtype=False)
    acc_dtype("alpha", alpha)
    if out is None:
        out = torch.empty(batch, width, dim, dtype=hist_x.dtype, device=hist_x.device)
    else:
        check_tensor("out", out, (batch, width, dim), hist_x, same_dtype=False)
        acc_dtype("out", out)
    if max(batch, width) > MAX_GRID_YZ:
        raise ValueError(f"hist_x: at most {MAX_GRID_YZ} samples and rows per launch, got {batch} x {width}")
    block = pick_block("block_d", block_d, lambda: block_d_for(dim, batch * width, sm_count(hist_x.device)))
    with on_device(hist_x.device):
        _anderson_mix_kernel[(-(-dim // block), width, batch)](
            hist_x, hist_f, alpha, out, dim, float(beta),
            *hist_x.stride(), *hist_f.stride(), *alpha.stride(), *out.stride(),
            M=m, ACC=acc_tl, BLOCK_D=block, num_warps=num_warps_for(block),
        )
    return out
