"""A round's stopping test and bookkeeping: rows to freeze, the logs, how near the stop is.

The kernel and its launcher :func:`round_status`; the contract is
:func:`deqkern.ops.reference.round_status`. Scalar typing: :mod:`deqkern.kernels._launch`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from deqkern.kernels._launch import acc_dtype, check_tensor, num_warps_for, on_device, pick_block, status_block_w
from deqkern.ops.reference import LINEAR_REACH, SECANT_SAFETY

#: ``STOP`` of each stopping rule of :data:`deqkern.engine.StopRule`.
STOP_CODES = {"relative": 0, "noise": 1, "x0": 2}


@triton.jit
def _sqrt_ratio(num, den, F64: tl.constexpr):
    """``sqrt(num / den)`` rounded to nearest: fp32 needs ``div_rn``/``sqrt_rn`` (plain ``/`` and
    ``sqrt`` are approximate on NVIDIA GPUs); fp64 ``/`` and ``sqrt`` are already exact-rounded."""
    if F64:
        return tl.sqrt(num / den)
    else:
        return tl.sqrt_rn(tl.div_rn(num, den))


@triton.jit
def _next_step(g_row, mult_row, gain_row, dev_row, stride_g_j, stride_mult_j, stride_gain_j, stride_dev_j, j, n,
               tiny, SAFETY: tl.constexpr):
    """For rows ``j`` of a block, the x0 rule's view of step ``j + 1`` (math: the kernel's
    docstring): ``(live, ||G_{j+1}||, k_{j+1}, r_{j+1})``, with ``r`` 0 and ``k`` unused where
    ``j + 1`` is not live. ``*_row``: the sample's rows of each tensor."""
    nxt = (j + 1) < n
    g0 = tl.load(g_row + j * stride_g_j, mask=nxt, other=1.0)
    g1 = tl.load(g_row + (j + 1) * stride_g_j, mask=nxt, other=1.0)
    m1 = tl.load(mult_row + (j + 1) * stride_mult_j, mask=nxt, other=0.0).to(tl.float64)
    gain = tl.load(gain_row + (j + 1) * stride_gain_j, mask=nxt, other=float("nan"))
    dev = tl.load(dev_row + (j + 1) * stride_dev_j, mask=nxt, other=float("nan"))
    norm0 = tl.sqrt(tl.maximum(g0, tiny).to(tl.float64))
    norm1 = tl.sqrt(tl.maximum(g1, tiny).to(tl.float64))
    h = norm1 / norm0
    # measured where finite: not NaN and not inf (x - x is NaN for both)
    has_gain = (gain - gain) == 0
    k = tl.where((dev - dev) == 0, SAFETY * dev, tl.where(has_gain, tl.maximum(gain, h), h) + tl.abs(m1))
    r = tl.where(has_gain & nxt, tl.maximum(tl.log(gain / h), 0.0), 0.0)
    return nxt, norm1, k, r


@triton.jit
def _row_weights(g_row, mult_row, gain_row, dev_row, stride_g_j, stride_mult_j, stride_gain_j, stride_dev_j, j, n,
                 tiny, r_left, SAFETY: tl.constexpr):
    """For rows ``j`` of a block, ``(w_j, sum of the block's r)``: the x0 rule's weight ``w_j = k_{j+1}
    exp(sum_{l > j+1} r_l) / N_{j+1}`` (0 where ``j + 1`` is not live), ``r_left`` the sum of ``r``
    over the rows from this block's first on (math: the kernel's docstring)."""
    nxt, norm1, k1, r1 = _next_step(g_row, mult_row, gain_row, dev_row, stride_g_j, stride_mult_j, stride_gain_j,
                                    stride_dev_j, j, n, tiny, SAFETY)
    after = r_left - tl.cumsum(r1, axis=0)  # sum of r_l over l > j + 1
    return tl.where(nxt, k1 * tl.exp(after) / norm1, 0.0), tl.sum(r1, axis=0)


@triton.jit
def _round_status_kernel(
    f_ptr, g_ptr, bad_ptr, t_ptr, nrows_ptr, k0_ptr, rounds_ptr, var_ptr, delta_ptr, worst_ptr, log_ptr, done_ptr,
    badt_ptr, mult_ptr, spent_ptr, gain_ptr, dev_ptr, floor_ptr, past_ptr,
    W, S, D, max_iters: tl.int32, tol: tl.float64, reach_sq: tl.float64,
    stride_f_b, stride_f_j, stride_g_b, stride_g_j, stride_bad_b, stride_bad_j, stride_t_b, stride_t_j,
    stride_nrows_b, stride_k0_b, stride_delta_b, stride_worst_b, stride_log_r, stride_log_b, stride_done_b,
    stride_badt_r, stride_mult_b, stride_mult_j, stride_spent_b, stride_gain_b, stride_gain_j, stride_dev_b,
    stride_dev_j, stride_floor_b, stride_floor_j, stride_past_b, STOP: tl.constexpr, ACC: tl.constexpr,
    BLOCK_W: tl.constexpr, SAFETY: tl.constexpr, HAS_FLOOR: tl.constexpr, HAS_PAST: tl.constexpr,
):
    """One program = one sample ``b``: the stopping test of its ``n = n_rows[b]`` live window
    rows (``n = 0``: inactive) from their squared norms ``f = ||G(x) - x||^2``, ``g = ||G(x)||^2``,
    and everything a round records, in one launch instead of some forty tiny ops.

    Per live row ``j < n`` (position ``p = k0 + j``), the test's error::

        err_j = sqrt(f_j / max(g_j, tiny))                    relative, x0   (in ACC)
              = sqrt(f_j / (D var[min(p, S - 1)]))              noise          (in fp64)

    and with ``lead`` the leading rows that pass, the rows the sample freezes ``delta =
    min(lead + 1, n)``. Relative, noise: row ``j`` passes if ``err_j <= tol``. x0 (in fp64; the
    budget :func:`deqkern.ops.reference.x0_accepted_rows`, ``L_j = mult[b, j]``)::

        N_j   = sqrt(max(g_j, tiny)),  h_j = N_j / N_{j-1}
        k_j   = SAFETY dev[b, j]             where dev[b, j] is finite (measured)
              = max(h_j, gain[b, j]) + |L_j| elsewhere (h_j where gain[b, j] is not finite)
        r_j   = max(log(gain[b, j] / h_j), 0) where gain[b, j] is finite and j < n, else 0
        w_j   = k_{j+1} exp(sum_{j+1 < l < n} r_l) / N_{j+1}                 (0 unless j + 1 < n)
        c_j   = max(sqrt(f_j) - rho_j, 0) w_j m   (rho_j = floor[b, j] with HAS_FLOOR, else 0;
                                                m = past[b] with HAS_PAST, else 1; a zero c_j stays 0)
              = inf where f_j > reach_sq g_j     (reach_sq = LINEAR_REACH^2: past the rule's first order)
        pass  : sum_{i <= j} c_i <= max(tol - spent[b], 0) share_j
        share_j = sum_{i <= j} w_i / sum_{i < n} w_i   where n = S - k0 (the window holds every row
                                                      left) and the sum is positive and finite;
                                                      1 where also j + 2 >= n
                = (j + 2) / max(S - k0, 1)             elsewhere
        spent[b] += sum_{i <= delta - 2} c_i                   (nothing if delta < 2)

    Writes ``delta[b]``; ``worst[b] = max_j err_j / tol`` over live rows in fp64 (NaN counts as
    inf, 0 without live rows); ``log[min(rounds, max_iters), b] = sqrt(sum f / max(sum g,
    1e-300))`` over live rows, NaN when inactive; ``done[b] = rounds + 1`` if the sample's last
    row freezes now (``k0 + delta == S``, ``delta > 0``), else unchanged; ``bad_t[min(rounds,
    max_iters)]`` raised (atomic max: the samples share it) to the largest timestep ``t[b, j]`` of
    a live row with non-finite model outputs (``bad[b, j] > 0``). Tolerances are
    compared in the error's dtype, as the reference's tensor-vs-Python-float comparisons are;
    division and square root round to nearest, as torch's do (:func:`_sqrt_ratio`).

    Pointers: f, g, bad ``[B, W]`` (ACC); t ``[B, W]`` int64; n_rows, k0, delta, done ``[B]``
    int64; rounds ``()`` int64; var ``[S]`` fp64 (read only by the noise rule); worst ``[B]``
    fp64; log ``[max_iters + 1, B]`` fp64; badt ``[max_iters + 1]`` int64; mult ``[B, W]``
    (any float dtype; read by x0); spent ``[B]`` fp64 (read and written by x0); gain, dev ``[B, W]``
    fp64 (the steps' secants, read by x0); floor ``[B, W]`` fp64 (the residuals' rounding floor,
    :func:`deqkern.ops.reference.rounding_floor`, read by x0 with ``HAS_FLOOR``); past ``[B]`` fp64
    (the charge for the chain past a sliding window, :func:`deqkern.ops.reference.past_window_factor`,
    read by x0 with ``HAS_PAST``). Grid ``(B,)``;
    the window in blocks of ``BLOCK_W``, three times for x0 (the sum of ``r``, then of ``w``,
    first). Memory: reads 4 B W values (x0: 9, 10 with a floor; + B with past), writes 4 B — launch-bound by
    design: it replaces small ops, not bandwidth.
    """
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(nrows_ptr + b * stride_nrows_b)
    k0 = tl.load(k0_ptr + b * stride_k0_b)
    rounds = tl.load(rounds_ptr)
    # tolerances rounded once to the error's dtype (fp64 scalars: deqkern.kernels._launch)
    if STOP == 1:
        t_row = tl.full([], tol, tl.float64)
    else:
        t_row = tl.full([], tol, ACC)
    if ACC == tl.float64:  # torch.finfo(dtype).tiny, as the reference clamps ||G||^2
        tiny = tl.full([], 2.2250738585072014e-308, tl.float64)
    else:
        tiny = tl.full([], 1.1754943508222875e-38, tl.float32)
    first_fail = tl.zeros([], tl.int32) + W  # first row whose test fails (rows past n: not live, fail)
    # the x0 rule: the running sum of row costs, what the freeze pays, the budget spent before
    spend = tl.zeros([], tl.float64)
    paid = tl.zeros([], tl.float64)
    g_row = g_ptr + b * stride_g_b
    mult_row = mult_ptr + b * stride_mult_b
    gain_row = gain_ptr + b * stride_gain_b
    dev_row = dev_ptr + b * stride_dev_b
    r_left = tl.zeros([], tl.float64)  # sum of r_l over the rows l not yet passed (x0)
    w_total = tl.zeros([], tl.float64)  # sum of the rows' weights (x0)
    w_run = tl.zeros([], tl.float64)  # the running sum of the weights (x0)
    if STOP == 2:
        spent = tl.load(spent_ptr + b * stride_spent_b)
        if HAS_PAST:
            charge = tl.load(past_ptr + b * stride_past_b)
        for w0 in range(0, W, BLOCK_W):
            _, _, _, r = _next_step(g_row, mult_row, gain_row, dev_row, stride_g_j, stride_mult_j, stride_gain_j,
                                    stride_dev_j, w0 + tl.arange(0, BLOCK_W), n, tiny, SAFETY)
            r_left += tl.sum(r, axis=0)
        r_all = r_left
        for w0 in range(0, W, BLOCK_W):
            w_blk, r_blk = _row_weights(g_row, mult_row, gain_row, dev_row, stride_g_j, stride_mult_j, stride_gain_j,
                                        stride_dev_j, w0 + tl.arange(0, BLOCK_W), n, tiny, r_all, SAFETY)
            r_all -= r_blk
            w_total += tl.sum(w_blk, axis=0)
    # share the budget by weight where the window holds every row left (and the weights sum to a
    # positive finite number), else by rows
    by_weight = (n == S - k0) & (w_total > 0) & (w_total < float("inf"))
    f_sum = tl.zeros([], ACC)
    g_sum = tl.zeros([], ACC)
    worst = tl.zeros([], tl.float64)
    bad_t = tl.zeros([], tl.int64) - 1
    for w0 in range(0, W, BLOCK_W):
        j = w0 + tl.arange(0, BLOCK_W)
        live = j < n
        f = tl.load(f_ptr + b * stride_f_b + j * stride_f_j, mask=live, other=0.0)
        g = tl.load(g_ptr + b * stride_g_b + j * stride_g_j, mask=live, other=0.0)
        if STOP == 1:
            pos = tl.minimum(k0 + j, S - 1)
            var = tl.load(var_ptr + pos, mask=live, other=1.0)
            err = _sqrt_ratio(f.to(tl.float64), D * var, True)
        else:
            err = _sqrt_ratio(f, tl.maximum(g, tiny), ACC == tl.float64)
        if STOP == 2:
            w_blk, r_blk = _row_weights(g_row, mult_row, gain_row, dev_row, stride_g_j, stride_mult_j, stride_gain_j,
                                        stride_dev_j, j, n, tiny, r_left, SAFETY)
            r_left -= r_blk
            f64 = f.to(tl.float64)
            above = tl.sqrt(f64)
            if HAS_FLOOR:  # a half-precision model: the residual its rounding alone gives is not charged
                rho = tl.load(floor_ptr + b * stride_floor_b + j * stride_floor_j, mask=live, other=0.0)
                above = tl.maximum(above - rho, 0.0)
            cost = tl.where(f64 <= reach_sq * g.to(tl.float64), above * w_blk, float("inf"))
            if HAS_PAST:
                cost = tl.where(cost > 0, cost * charge, cost)
            cost = tl.where((j + 1) < n, cost, 0.0)
            run = spend + tl.cumsum(cost, axis=0)
            spend += tl.sum(cost, axis=0)
            share = tl.where(j + 2 >= n, 1.0, (w_run + tl.cumsum(w_blk, axis=0)) / tl.where(by_weight, w_total, 1.0))
            w_run += tl.sum(w_blk, axis=0)
            # (tol - spent) share or (tol - spent) (j + 2) / left, in the reference's order of operations
            rem = tl.maximum(tol - spent, 0.0)
            allow = tl.where(by_weight, rem * share,
                             rem * (j + 2).to(tl.float64) / tl.maximum(S - k0, 1).to(tl.float64))
            passed = live & (run <= allow)
        else:
            passed = live & (err <= t_row)
        first_fail = tl.minimum(first_fail, tl.min(tl.where(passed, W, j), axis=0))
        if STOP == 2:
            # rows before the first failure and before the last live row: all passed, and the
            # running sum grows, so its largest value there is what the freeze pays
            paid = tl.maximum(paid, tl.max(tl.where((j < first_fail) & (j < n - 1), run, 0.0), axis=0))
        f_sum += tl.sum(tl.where(live, f, 0.0), axis=0)
        g_sum += tl.sum(tl.where(live, g, 0.0), axis=0)
        ratio = err.to(tl.float64) / tol
        ratio = tl.where(ratio != ratio, float("inf"), ratio)
        worst = tl.maximum(worst, tl.max(tl.where(live, ratio, 0.0), axis=0))
        bad = tl.load(bad_ptr + b * stride_bad_b + j * stride_bad_j, mask=live, other=0.0)
        t = tl.load(t_ptr + b * stride_t_b + j * stride_t_j, mask=live, other=-1)
        bad_t = tl.maximum(bad_t, tl.max(tl.where(bad > 0, t, -1), axis=0))
    delta = tl.minimum(first_fail + 1, n)
    if STOP == 2:
        tl.store(spent_ptr + b * stride_spent_b, spent + paid)
    tl.store(delta_ptr + b * stride_delta_b, delta)
    tl.store(worst_ptr + b * stride_worst_b, worst)
    resid = _sqrt_ratio(f_sum, tl.maximum(g_sum, tl.full([], 1e-300, ACC)), ACC == tl.float64).to(tl.float64)
    log_at = tl.minimum(rounds, max_iters)
    tl.store(log_ptr + log_at * stride_log_r + b * stride_log_b, tl.where(n > 0, resid, float("nan")))
    tl.atomic_max(badt_ptr + log_at * stride_badt_r, bad_t, mask=bad_t >= 0)
    done = tl.load(done_ptr + b * stride_done_b)
    tl.store(done_ptr + b * stride_done_b, tl.where((k0 + delta == S) & (delta > 0), rounds + 1, done))


def round_status(
    f_sq: torch.Tensor, g_sq: torch.Tensor, nonfinite: torch.Tensor, t: torch.Tensor, n_rows: torch.Tensor,
    k0: torch.Tensor, rounds: torch.Tensor, noise_var: torch.Tensor, worst: torch.Tensor, res_log: torch.Tensor,
    done_round: torch.Tensor, bad_t: torch.Tensor, mult: torch.Tensor, spent: torch.Tensor, gain: torch.Tensor,
    dev: torch.Tensor, *, stop: str, tol: float, dim: int, floor: torch.Tensor | None = None,
    past: torch.Tensor | None = None, block_w: int | None = None,
) -> torch.Tensor:
    """:func:`deqkern.ops.reference.round_status` as one kernel; returns ``delta``."""
    if f_sq.ndim != 2:
        raise ValueError(f"f_sq: expected shape [B, W], got {tuple(f_sq.shape)}")
    if f_sq.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"f_sq: expected float32 or float64 (the scan's accumulation dtype), got {f_sq.dtype}")
    acc_tl, _ = acc_dtype("f_sq", f_sq)
    if stop not in STOP_CODES:
        raise ValueError(f"stop: expected one of {sorted(STOP_CODES)}, got {stop!r}")
    batch, width = f_sq.shape
    steps = noise_var.numel()
    check_tensor("g_sq", g_sq, (batch, width), f_sq)
    check_tensor("nonfinite", nonfinite, (batch, width), f_sq)
    rows = res_log.shape[0]
    for name, v, shape in (("t", t, (batch, width)), ("n_rows", n_rows, (batch,)), ("k0", k0, (batch,)),
                           ("done_round", done_round, (batch,)), ("bad_t", bad_t, (rows,))):
        if v.shape != shape or v.dtype != torch.int64 or v.device != f_sq.device:
            raise ValueError(f"{name}: expected int64 of shape {shape} on {f_sq.device}, got {v.dtype} "
                             f"{tuple(v.shape)} on {v.device}")
    if rounds.shape != () or rounds.dtype != torch.int64:
        raise ValueError(f"rounds: expected a 0-d int64 tensor, got {rounds.dtype} {tuple(rounds.shape)}")
    check_tensor("mult", mult, (batch, width), f_sq, same_dtype=False)
    if not mult.is_floating_point():
        raise TypeError(f"mult: expected a floating-point tensor (the scan's multipliers L), got {mult.dtype}")
    for name, v, shape in (("noise_var", noise_var, (steps,)), ("worst", worst, (batch,)),
                           ("res_log", res_log, (rows, batch)), ("spent", spent, (batch,)),
                           ("gain", gain, (batch, width)), ("dev", dev, (batch, width)),
                           *((("floor", floor, (batch, width)),) if floor is not None else ()),
                           *((("past", past, (batch,)),) if past is not None else ())):
        if v.shape != shape or v.dtype != torch.float64 or v.device != f_sq.device:
            raise ValueError(f"{name}: expected float64 of shape {shape} on {f_sq.device}, got {v.dtype} "
                             f"{tuple(v.shape)} on {v.device}")
    block = pick_block("block_w", block_w, lambda: status_block_w(width))
    delta = torch.empty(batch, dtype=torch.int64, device=f_sq.device)
    rho = dev if floor is None else floor  # any [B, W] fp64 pointer: unread without HAS_FLOOR
    charge = spent if past is None else past  # any [B] fp64 pointer: unread without HAS_PAST
    with on_device(f_sq.device):
        _round_status_kernel[(batch,)](
            f_sq, g_sq, nonfinite, t, n_rows, k0, rounds, noise_var, delta, worst, res_log, done_round, bad_t,
            mult, spent, gain, dev, rho, charge, width, steps, dim, rows - 1, float(tol), LINEAR_REACH**2,
            *f_sq.stride(), *g_sq.stride(), *nonfinite.stride(), *t.stride(), n_rows.stride(0), k0.stride(0),
            delta.stride(0), worst.stride(0), *res_log.stride(), done_round.stride(0), bad_t.stride(0),
            *mult.stride(), spent.stride(0), *gain.stride(), *dev.stride(), *rho.stride(), charge.stride(0),
            STOP=STOP_CODES[stop], ACC=acc_tl, BLOCK_W=block, SAFETY=SECANT_SAFETY, HAS_FLOOR=floor is not None,
            HAS_PAST=past is not None,
            num_warps=num_warps_for(block),
        )
    return delta
