"""Anderson mixing: the next iterate from the history, written straight into the model's input
buffer (math.md §4, §6).

Only ``@triton.jit`` code; the launcher is :func:`deqkern.ops.triton_ops.anderson_mix` and the
contract :func:`deqkern.ops.reference.anderson_mix`.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _anderson_mix_kernel(
    hx_ptr, hf_ptr, alpha_ptr, out_ptr,
    D, beta: tl.float64,
    s_xk, s_xb, s_xj, s_xd,
    s_fk, s_fb, s_fj, s_fd,
    s_ab, s_aj, s_ak,
    s_ob, s_oj, s_od,
    M: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program = one row ``(b, j)`` x one block of ``BLOCK_D`` latent elements::

        out[b, j] = sum_k alpha[b, j, k] (X_k[b, j] + beta F_k[b, j]),   k = 0 .. M-1

    accumulated in ``ACC`` (fp32, fp64 for fp64 history) and rounded once to ``out``'s dtype.

    Pointers (element strides explicit): hx, hf ``[M, B, W, D]``; alpha ``[B, W, M]`` any float;
    out ``[B, W, D]``, any float dtype and any strides (e.g. a view into the model's fp16 input
    batch). ``beta`` is declared fp64 and used in ``ACC``.
    Grid ``(cdiv(D, BLOCK_D), W, B)``. Memory: reads 2 M N, writes N (N = B W D); the M-loop is
    unrolled so all 2 M loads of a program are in flight together.
    """
    pid_d = tl.program_id(0)
    j = tl.program_id(1).to(tl.int64)  # 64-bit row offsets: M * B * W * D may exceed 2**31
    b = tl.program_id(2).to(tl.int64)
    offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    x_k = hx_ptr + b * s_xb + j * s_xj
    f_k = hf_ptr + b * s_fb + j * s_fj
    a_k = alpha_ptr + b * s_ab + j * s_aj
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    # `beta` is declared fp64: unannotated, a Python float reaches a GPU kernel as fp32 but stays
    # float64 in the CPU interpreter, which would hide the GPU's rounding from the tests. tl.full
    # rounds it once for fp32 kernels (an fp64 operand would promote their math to fp64) and keeps
    # it exact for fp64 ones, compiled or interpreted (tl.cast would round through fp32 there).
    beta_acc = tl.full([], beta, ACC)
    for _ in tl.static_range(M):
        a = tl.load(a_k).to(ACC)
        xk = tl.load(x_k + offs * s_xd, mask=dmask, other=0.0).to(ACC)
        fk = tl.load(f_k + offs * s_fd, mask=dmask, other=0.0).to(ACC)
        acc += a * (xk + beta_acc * fk)
        # advance the pointers, not k * stride: a 32-bit product could overflow
        x_k += s_xk
        f_k += s_fk
        a_k += s_ak
    tl.store(out_ptr + b * s_ob + j * s_oj + offs * s_od, acc.to(out_ptr.dtype.element_ty), mask=dmask)
