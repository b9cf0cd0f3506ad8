"""Pure-PyTorch reference of every per-round operation of the parallel solver.

This module is the contract: the Triton kernels in :mod:`deqkern.kernels` compute the same
functions of the same tensors, and the tests compare them. It runs on any device and dtype
(float64 for the oracles, float32 on CPU in production).

Shapes used throughout (one solver *window* per sample):

* ``B`` samples, ``W`` window rows, ``D`` = latent size (C*H*W), ``m`` Anderson history.
* ``xw``   ``[B, W+1, D]`` latents of the window: row 0 is the frozen anchor ``x[k0]``, row
  ``j >= 1`` the current iterate of ``x[k0 + j]``.
* ``e``    ``[B, W, D]`` model outputs at the inputs ``xw[:, :W]``.
* ``z``    ``[B, W, D]`` pre-drawn noise of the steps ``k0 .. k0+W-1`` (or ``None``).
* ``coef`` ``[B, W, 7]`` step coefficients in :data:`deqkern.schedule.COEF_FIELDS` order.
* ``n_rows`` ``[B]`` int: rows ``j < n_rows[b]`` are live, the rest are ignored (left at
  ``g = x``, ``f = 0``).
* ``ms``   ``[B, W, 4]`` multistep coefficients (:data:`deqkern.schedule.MULTISTEP_FIELDS`) and
  ``u_prev`` ``[B, D]`` the converted output of the step before the window's first (frozen, at
  ``x[k0-1]``): multistep chains only (docs/math.md §1.1), ``None`` otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deqkern.ops.window import converted_rows, one_hot, residual_scan, row_mask, step_rows
from deqkern.schedule import X0Transform


@dataclass
class ScanResult:
    """Output of :func:`scan_residual` (all fp32/fp64 accumulations)."""

    g: torch.Tensor  #: ``[B, W, D]`` new iterate G(X) of rows ``x[k0+1 ..]``
    f: torch.Tensor  #: ``[B, W, D]`` residual ``G(X) - X``
    f_sq: torch.Tensor  #: ``[B, W]`` squared norm of each residual row
    g_sq: torch.Tensor  #: ``[B, W]`` squared norm of each new-iterate row
    gram: torch.Tensor | None  #: ``[B, W, m]`` ``<f, hist_f[k]>`` per row, when history is given
    nonfinite: torch.Tensor  #: ``[B, W]`` non-finite model outputs ``e`` per live row (0 on dead rows)


def relative_row_error(f_sq: torch.Tensor, g_sq: torch.Tensor) -> torch.Tensor:
    """``||G(x) - x|| / ||G(x)||`` per row from the squared norms (the ``relative`` stopping rule)."""
    return (f_sq / g_sq.clamp(min=torch.finfo(g_sq.dtype).tiny)).sqrt()


def accepted_rows(passed: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``[B]`` rows each sample freezes: its leading rows that pass the stopping test, plus one —
    the first failing row's G is computed from accepted inputs — and at most its ``n`` live rows."""
    return torch.minimum(passed.to(torch.int64).cumprod(dim=1).sum(dim=1) + 1, n)


#: Safety factor on a measured ``||J - L||`` (:func:`x0_row_costs`): the secant measures the
#: step along the last change of its input, the freeze's error runs along the new residual (true
#: gain up to 2.5x the secant on the digits model; 4 left x0 1.4 tol away there at S = 20, 8 within).
#: Chosen by bench/solver_studies.py budget.
SECANT_SAFETY = 8.0

#: The x0 rule is first order: it trusts a secant only along a move of at most this share of the
#: row's latent, and freezes a row (but the last of a freeze) only with a residual within it.
#: Beyond, the model's slope can change over the stretch (the contract suite's deep profile:
#: secants 15x below the local slope on moves of 67-100% of the latent, x0 up to 4.4x outside its
#: bound; a residual 1.3x its latent frozen with a slope measured elsewhere, 2.8x).
#: Chosen by bench/solver_studies.py reach.
LINEAR_REACH = 0.1


def latent_gains(g_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||G_j||, h_j)`` ``[B, W]`` float64 from a round's squared row norms: the latents and their
    gains ``h_j = ||G_j|| / ||G_{j-1}||`` (``h_0 = 1``: the x0 rule never reads it), the x0 rule's
    estimate of a step's ``||J||`` where it has measured nothing better."""
    tiny = torch.finfo(g_sq.dtype).tiny
    norm = g_sq.to(torch.float64).clamp(min=tiny).sqrt()
    h = torch.ones_like(norm)
    h[:, 1:] = norm[:, 1:] / norm[:, :-1]
    return norm, h


def latent_gain_bound(gain: torch.Tensor, h: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """``[B, W]`` float64 the x0 rule's bound on an unmeasured ``||J - L||``: ``max(h, gain) + |L|``,
    ``||J||`` from the larger of the latent's gain ``h`` and the step's measured one (``h`` alone
    where ``gain`` is NaN: not measured). The latent's alone let a "sample" chain whose step's
    Jacobian outgrows the shrinking latent end 1.08x outside (the deep profile, _UNMEASURED_GAIN)."""
    jg = torch.where(torch.isfinite(gain), torch.maximum(gain, h), h)
    return jg + mult.to(torch.float64).abs()


def _next_live(live: torch.Tensor) -> torch.Tensor:
    """``[B, W]`` bool: row ``j + 1`` is live (row ``j``'s residual reaches a next step)."""
    has_next = torch.zeros_like(live)
    has_next[:, :-1] = live[:, 1:]
    return has_next


def x0_row_weights(
    g_sq: torch.Tensor, mult: torch.Tensor, live: torch.Tensor, gain: torch.Tensor, dev: torch.Tensor
) -> torch.Tensor:
    """``[B, W]`` float64: what a unit of each row's residual costs x0 if the row is frozen, in
    units of ``||x0||`` (0 unless row ``j + 1`` is live)::

        w_j = k_{j+1} exp(sum_{l = j+2}^{n-1} r_l) / ||G_{j+1}||

    with the latent's gain at step ``l``, ``h_l = ||G_l|| / ||G_{l-1}||``, and the secants of step
    ``l`` measured between two rounds (:func:`step_secants`)

        k_l = SECANT_SAFETY dev_l                 where dev_l is finite, else max(h_l, gain_l) + |L_l|
                                                  (||J|| from the larger of the latent's and the
                                                  step's measured gain, h_l alone where no gain)
        r_l = max(log(gain_l / h_l), 0)           where gain_l is finite, else 0 (the latent's gain)

    ``mult``: ``[B, W]`` the scan's multipliers ``L`` (``coef[..., 0]``, per row); ``gain``, ``dev``:
    ``[B, W]`` float64 the measured ``||J_l dx|| / ||dx||`` and ``||(J_l - L_l) dx|| / ||dx||``
    (NaN: not measured; the engine passes as ``dev`` of rows not measured yet the schedule's bound
    with the model's measured gain, :meth:`deqkern.engine.StepSecants.rule_dev`). Math:
    :func:`x0_accepted_rows`, docs/math.md §4.3.
    """
    norm, h = latent_gains(g_sq)
    k = torch.where(torch.isfinite(dev), SECANT_SAFETY * dev, latent_gain_bound(gain, h, mult))
    r = torch.where(torch.isfinite(gain) & live, (gain / h).log().clamp(min=0.0), 0.0)
    r[:, 0] = 0.0
    after = r.sum(dim=1, keepdim=True) - r.cumsum(dim=1)  # after[:, l] = sum of r over l' > l
    row = torch.zeros_like(norm)
    row[:, :-1] = k[:, 1:] * after[:, 1:].exp() / norm[:, 1:]
    return torch.where(_next_live(live), row, 0.0)


def x0_row_costs(
    f_sq: torch.Tensor, g_sq: torch.Tensor, mult: torch.Tensor, live: torch.Tensor, gain: torch.Tensor,
    dev: torch.Tensor, floor: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, W]`` float64: what each row's residual costs x0 if the row is frozen, in units of
    ``||x0||`` (the ``x0`` rule's budget is ``tol``; math: :func:`x0_accepted_rows`, docs/math.md §4.3)::

        c_j = max(||F_j|| - rho_j, 0) w_j   (w_j: :func:`x0_row_weights`; 0 unless row j + 1 is live)
            = inf where ||F_j|| > LINEAR_REACH ||G_j||            (outside the rule's first order)

    Arguments as :func:`x0_row_weights`, with ``f_sq`` ``[B, W]`` the rows' squared residuals and
    ``floor`` ``[B, W]`` float64 ``rho``, the part of each residual a half-precision model's rounding
    alone gives (:func:`rounding_floor`; None: 0).
    """
    return _costs(f_sq, g_sq, live, x0_row_weights(g_sq, mult, live, gain, dev), floor)


def _costs(f_sq: torch.Tensor, g_sq: torch.Tensor, live: torch.Tensor, weight: torch.Tensor,
           floor: torch.Tensor | None) -> torch.Tensor:
    """:func:`x0_row_costs` from the rows' weights."""
    f64 = f_sq.to(torch.float64)
    above = f64.sqrt() if floor is None else (f64.sqrt() - floor).clamp(min=0.0)
    cost = torch.where(f64 <= LINEAR_REACH**2 * g_sq.to(torch.float64), above * weight, math.inf)
    return torch.where(_next_live(live), cost, 0.0)


def past_window_factor(latent_sq: torch.Tensor, x: torch.Tensor, e: torch.Tensor, coef: torch.Tensor,
                       n_rows: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """``[B]`` float64 ``m``: the x0 rule's charge for the chain past a sliding window, by which
    it multiplies the window's row costs (:func:`x0_row_costs`; 1 where the window holds every row
    left, ``n_rows >= left``)::

        m = max(1, ||G_{n-1}|| / (SECANT_SAFETY ||x0_hat||)),   x0_hat = px x_{n-1} + po e_{n-1}

    No row past the window has been evaluated, so the rule carries a frozen row's error on to x0
    with the latents' gain ``||x0|| / ||G_{n-1}||``: it takes the error to shrink as the latent
    does. A model whose x0 prediction does not scale with its input passes the error's absolute
    size on instead (``sin(x)`` as the x0 prediction on latents of norm 1e3 left x0 1.3-2x outside
    its bound, tests/test_dpm_parity.py: test_gain_past_the_window_on_sin_chains). ``x0_hat``, the
    last live row's predicted x0, estimates ``||x0||``; at high noise it is the posterior mean,
    shorter than x0, so only a shrink past ``SECANT_SAFETY`` is charged: the trained model's chains
    past their windows ran 1.0-2.2x the latents' gain (docs/math.md §4.3).

    ``latent_sq``: ``[B, W]`` the rows' squared latents as the rule reads them; ``x``: ``[B, W, D]``
    the rows' step inputs; ``e``: ``[B, W, D]`` their model outputs; ``coef``: ``[B, W, 7]`` the
    rows' packed coefficients (``px``, ``po`` in fields 4 and 5); ``n_rows``: ``[B]`` the live rows
    the rule judges; ``left``: ``[B]`` the rows not yet frozen.
    """
    last = (n_rows - 1).clamp(min=0)
    b = torch.arange(n_rows.shape[0], device=n_rows.device)
    c = coef[b, last].to(torch.float64)
    x0_hat = c[:, 4:5] * x[b, last].to(torch.float64) + c[:, 5:6] * e[b, last].to(torch.float64)
    latent = latent_sq[b, last].to(torch.float64).sqrt()
    # a zero or non-finite estimate charges everything (inf): a row then freezes alone, as Picard
    m = (latent / (SECANT_SAFETY * x0_hat.norm(dim=1))).nan_to_num(nan=math.inf, posinf=math.inf).clamp(min=1.0)
    return torch.where(n_rows < left, m, 1.0)


#: A half-precision model's output rounding, in units of its dtype's eps times ``||e||``: what the
#: x0 rule takes for the residual one step carries from the model's rounding alone
#: (:func:`rounding_floor`). chosen by bench/solver_studies.py half-precision
MODEL_ROUNDING = 0.5


def rounding_floor(e_norm: torch.Tensor, coef: torch.Tensor, live: torch.Tensor, eps: float,
                   gain: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, W]`` float64 ``rho_j``: the residual window row ``j`` carries from a half-precision
    model's rounding alone, which the x0 rule does not charge (:func:`x0_row_costs`).

    A model in float16 or bfloat16 rounds its input and its output: evaluated at the sequential
    chain's own latents in another batch, it answers within about ``eps ||e||`` of the sequential
    run's outputs, not equal to them, so a row's residual cannot go below that, and two sequential
    runs differ at x0 by what it propagates to (``deqkern.sampling.HALF_TOL_FLOOR``). Step ``j``
    reads its output with the weight ``a_j = |co_j| + |c0_j po_j|`` (the affine part and the
    predicted x0, whose clip or threshold has slope at most 1): the rounding ``nu_j`` it adds.

    The window carries it on with the step's Jacobian ``J_j``, not only the scan's ``L_j``: within
    a round the scan gives ``f_j = L_j f_{j-1} + F_j``, and between rounds row ``j``'s input moves
    by the upstream residual ``f_{j-1}`` (Picard's update), to which the step answers with ``J_j``,
    so once the rows stop moving but for rounding ``F_j = (J_j - L_j) f_{j-1} + nu_j`` and
    ``f_j = J_j f_{j-1} + nu_j``. The rounding of different rows is independent, so::

        rho_j^2 = g_j^2 rho_{j-1}^2 + (MODEL_ROUNDING eps a_j ||e_j||)^2,    rho_{-1} = 0

    with ``g_j`` the step's measured gain ``||J_j||`` (``gain``; ``|L_j|`` where none was
    measured): with ``L`` alone, guided chains, whose ``J - L`` is large near x0, stalled at
    residuals above ``rho`` (bench/solver_studies.py guided-half). Computed as a sum in log space, ``rho_j^2 = P_j
    sum_{i <= j} (MODEL_ROUNDING eps a_i ||e_i||)^2 / P_i`` with ``P_j = prod_{m <= j} g_m^2``
    (clamped at the smallest normal, so ``g = 0`` does not divide by zero): one ``logcumsumexp``
    and no loop over the rows. A multistep step's output also reads the row before's, whose
    rounding is left out: less is subtracted, not more.

    Under classifier-free guidance the output is ``u + s (c - u)`` of two outputs that round
    independently, so ``||e_j||`` stands for ``sqrt(((1 - s) ||u_j||)^2 + (s ||c_j||)^2)``
    (:meth:`deqkern.Guidance.rounding_scale`; ten times ``||e||`` at ``s = 7.5``).

    ``e_norm``: ``[B, W]`` the rows' rounding scales: model output norms ``||e_j||``, or the
    guided rows' rounding scales (``ModelEvaluator.raw(..., rounding=True)``); ``coef``: ``[B, W, 7]`` the
    rows' step coefficients (:meth:`deqkern.schedule.Schedule.packed`, ``L`` in field 0); ``live``:
    ``[B, W]`` bool (dead rows and rows with non-finite outputs carry no rounding); ``eps``: the
    model dtype's ``torch.finfo(dtype).eps``; ``gain``: ``[B, W]`` float64 the steps' measured
    ``||J||`` as the x0 rule reads them (NaN: none; None: ``|L|`` everywhere).
    """
    c = coef.to(torch.float64)
    weight = c[..., 2].abs() + (c[..., 3] * c[..., 5]).abs()
    local = MODEL_ROUNDING * eps * weight * e_norm.to(torch.float64)
    local_sq = torch.where(live & torch.isfinite(local), local.square(), 0.0)
    carry = c[..., 0].abs() if gain is None else torch.where(torch.isfinite(gain), gain, c[..., 0].abs())
    tiny = torch.finfo(torch.float64).tiny
    log_p = carry.square().clamp(min=tiny).log().cumsum(dim=1)
    return (0.5 * (log_p + torch.logcumsumexp(local_sq.log() - log_p, dim=1))).exp()


def x0_accepted_rows(
    cost: torch.Tensor, weight: torch.Tensor, live: torch.Tensor, n: torch.Tensor, left: torch.Tensor, tol: float,
    spent: torch.Tensor,
) -> torch.Tensor:
    """``[B]`` rows each sample freezes under the ``x0`` stopping rule, whose budget follows how a
    frozen row's error reaches x0; adds what the freeze spends to ``spent`` ``[B]`` (in place).

    Why (linearised, ``J_i`` the Jacobian of step ``i``, ``L_i`` the scan's multiplier): the
    scan's new iterate ``G_j`` of a window carries the error ``eps_j = J_j eps_{j-1} - (J_j -
    L_j) F_{j-1}`` (the anchor is exact), so freezing rows ``0 .. d-1`` moves x0 by
    ``-sum_{j < d-1} (prod_{l > j+1} J_l) (J_{j+1} - L_{j+1}) F_j``: the first failing row's own
    residual costs nothing (hence "plus one"), and the others' reach x0 through the rest of the
    chain, which may shrink or grow them (prediction types ``sample``/``v_prediction`` shrink x0
    a hundredfold in their last step while ``J - L`` stays about 1). Row ``j``'s share of x0's
    error is thus ``||F_j|| ||(J_{j+1} - L_{j+1})|| ||prod_{l > j+1} J_l||``, which
    :func:`x0_row_costs` estimates as ``c_j ||x0||`` from the solve's own secants of each step
    (:func:`step_secants`): the gain of ``J - L`` where measured, and the chain's gain to x0 as
    the product of the latents' gains ``||G_l|| / ||G_{l-1}||`` (telescoping to ``||x0|| /
    ||G_{j+1}||``), each raised to the measured step gain where that is larger; an unmeasured
    ``J - L`` is bounded by ``||J|| + |L|`` with the latent's gain for ``||J||``. The rule keeps
    ``sum c_j <= tol``
    over every row a sample ever freezes:

    * ``spent`` holds the sum so far; a freeze may spend a share of what is left, ``tol - spent``;
    * a sliding window (``n < left``, ``left`` = rows not yet frozen) shares it by rows: a freeze
      of ``d`` rows may spend ``(tol - spent) d / left``, so early rows leave later ones their
      share and whatever they do not use; the rows frozen are the leading rows ``j`` with
      ``sum_{i <= j} c_i <= (tol - spent) (j + 2) / left``, plus one, at most ``n``;
    * a window that holds every row left (``n = left``: the full window, a sliding window's last)
      shares it by the rows' weights ``w_i = c_i / ||F_i||`` (``weight``, :func:`x0_row_weights`):
      row ``j`` passes if ``sum_{i <= j} c_i <= (tol - spent) sum_{i <= j} w_i / sum_{i < n} w_i``
      (all of it where ``j + 2 >= n``; by rows where the weights do not sum to a positive finite
      number). A round shrinks the window's residuals together, so a share by weight lets every
      row freeze at about the same residual; a share by rows let DDIM S = 1000's full window
      freeze 605 rows in its third round for 60% of the budget, and the last rows, where a
      residual costs x0 most, then froze a few a round (19 rounds, now 17; docs/math.md §4.3);
    * once the window reaches x0 (``d = left``) the freeze may spend all of what is left.

    Hence ``||x0 - x0_seq|| <= tol ||x0_seq||`` to first order wherever the secants (times
    ``SECANT_SAFETY``) and the latents' gains bound the steps' gains on the frozen errors; the
    bound as documented (``tol`` of :class:`deqkern.ParallelSampler`) adds a floor, ``tol max(||x0_seq||, 1e-3 ||x_T||)``, for x0 near 0, and is checked on random
    chains by ``tests/test_x0_bound.py``. The rule itself needs no floor: an x0 near 0 makes the
    last rows' costs large, down to one row per round, the sequential chain. ``cost``, ``weight``:
    ``[B, W]`` from :func:`x0_row_costs` and :func:`x0_row_weights`.
    """
    rem = (tol - spent).clamp(min=0).unsqueeze(1)
    j = torch.arange(cost.shape[1], device=cost.device)
    by_rows = rem * (j + 2) / left.clamp(min=1).unsqueeze(1)
    w = torch.where(live, weight, 0.0)
    total = w.sum(dim=1, keepdim=True)
    share = torch.where(j + 2 >= n.unsqueeze(1), 1.0, w.cumsum(dim=1) / total)
    whole = ((n == left) & torch.isfinite(total[:, 0]) & (total[:, 0] > 0)).unsqueeze(1)
    allowance = torch.where(whole, rem * share, by_rows)
    spend = cost.cumsum(dim=1)
    delta = accepted_rows(live & (spend <= allowance), n)
    # the freeze spends the residuals of its rows but the last: spend[delta - 2], none if delta < 2
    paid = spend.gather(1, (delta - 2).clamp(min=0).unsqueeze(1)).squeeze(1)
    spent.add_(torch.where(delta >= 2, paid, 0.0))
    return delta


def step_secants(dx: torch.Tensor, ds: torch.Tensor, mult: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gain, dev)`` ``[B, W]`` float64: each step's secants between two rounds at one position,

        gain = ||ds|| / ||dx||,    dev = ||ds - L dx|| / ||dx||,    dx = x - x', ds = s - s',

    estimates of ``||J dx|| / ||dx||`` and ``||(J - L) dx|| / ||dx||`` along the input's last change
    (``s = step(x)``; ``'``: the previous round; ``L`` = ``mult`` ``[B, W]``, the scan's multipliers
    this round); NaN where the input did not move. ``dx``, ``ds``: ``[B, W, D]``.
    """
    norm = lambda v: v.square().sum(-1).to(torch.float64).sqrt()  # noqa: E731
    den = norm(dx)
    inv = torch.where(den > 0, 1.0 / den, math.nan)
    return norm(ds) * inv, norm(ds - mult.to(dx.dtype).unsqueeze(-1) * dx) * inv


def window_residual(f_sq: torch.Tensor, g_sq: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``[B]`` ``||F|| / ||G(X)||`` over each sample's live rows: the residual history we report
    (dead rows ignored, a non-finite one included: ``where``, not ``* live``, which gives NaN)."""
    return (torch.where(live, f_sq, 0.0).sum(1) / torch.where(live, g_sq, 0.0).sum(1).clamp(min=1e-300)).sqrt()


def round_status(
    f_sq: torch.Tensor, g_sq: torch.Tensor, nonfinite: torch.Tensor, t: torch.Tensor, n_rows: torch.Tensor,
    k0: torch.Tensor, rounds: torch.Tensor, noise_var: torch.Tensor, worst: torch.Tensor, res_log: torch.Tensor,
    done_round: torch.Tensor, bad_t: torch.Tensor, mult: torch.Tensor, spent: torch.Tensor, gain: torch.Tensor,
    dev: torch.Tensor, *, stop: str, tol: float, dim: int, floor: torch.Tensor | None = None,
    past: torch.Tensor | None = None,
) -> torch.Tensor:
    """A round's stopping test and bookkeeping; returns ``delta`` ``[B]``, the rows each sample
    freezes (math: :func:`deqkern.kernels.round_status._round_status_kernel`).

    ``f_sq``, ``g_sq``: ``[B, W]`` ``||G(x) - x||^2``, ``||G(x)||^2`` per window row (under the x0
    rule the engine passes for ``g_sq`` the rows' latent estimates, :func:`deqkern.engine.run_round`);
    ``nonfinite``: ``[B, W]`` non-finite model outputs per row (:class:`ScanResult`); ``t``:
    ``[B, W]`` int64 the rows' timesteps; ``n_rows``: ``[B]`` live rows (0: inactive); ``k0``:
    ``[B]`` frozen prefix; ``rounds``: ``()`` rounds so far; ``noise_var``: ``[S]`` (the noise
    rule's scale; its length is S). In place: ``worst`` ``[B]`` (the worst live row's ``err /
    tol``), ``res_log`` ``[max_iters + 1, B]`` (row ``min(rounds, max_iters)``: the window
    residual, NaN when inactive), ``done_round`` ``[B]`` (``rounds + 1`` where the sample's last
    row freezes now) and ``bad_t`` ``[max_iters + 1]`` (at the same row: the largest timestep of
    a live row with a non-finite model output, if larger) and ``spent`` ``[B]`` float64 (the x0
    rule's budget spent so far, :func:`x0_accepted_rows`; other rules leave it). ``mult``:
    ``[B, W]`` the scan's multipliers ``L`` per row, ``gain``, ``dev``: ``[B, W]`` float64 the
    steps' measured secants (NaN: none; :func:`step_secants`), read by the x0 rule. ``stop``:
    ``"relative"``, ``"noise"`` or ``"x0"``; ``dim``: D, the latent size (noise rule); ``floor``:
    ``[B, W]`` float64 the residuals' rounding floor the x0 rule does not charge
    (:func:`rounding_floor`; None: 0, a model in the state's dtype); ``past``: ``[B]`` float64 the
    charge for the chain past a sliding window that multiplies the row costs
    (:func:`past_window_factor`; None: 1).
    """
    steps, width = noise_var.numel(), f_sq.shape[1]
    live = row_mask(n_rows, width)
    if stop == "noise":
        pos = (k0.unsqueeze(1) + torch.arange(width, device=k0.device)).clamp(max=steps - 1)
        err = (f_sq.to(torch.float64) / (dim * noise_var[pos])).sqrt()
    else:
        err = relative_row_error(f_sq, g_sq)
    if stop == "x0":
        weight = x0_row_weights(g_sq, mult, live, gain, dev)
        cost = _costs(f_sq, g_sq, live, weight, floor)
        if past is not None:  # 0 stays 0 where the charge is inf
            cost = torch.where(cost > 0, cost * past.unsqueeze(1), cost)
        delta = x0_accepted_rows(cost, weight, live, n_rows, steps - k0, tol, spent)
    else:
        delta = accepted_rows(live & (err <= tol), n_rows)
    ratio = (err.to(torch.float64) / tol).nan_to_num(nan=math.inf)
    worst.copy_(torch.where(live, ratio, 0.0).amax(dim=1))
    log_at = rounds.clamp(max=res_log.shape[0] - 1).view(1)
    resid = window_residual(f_sq, g_sq, live).to(torch.float64)
    res_log.index_copy_(0, log_at, torch.where(n_rows > 0, resid, math.nan).unsqueeze(0))
    done_round.copy_(torch.where((k0 + delta == steps) & (delta > 0), rounds + 1, done_round))
    worst_t = torch.where(live & (nonfinite > 0), t, -1).amax().view(1)
    bad_t.index_copy_(0, log_at, torch.maximum(bad_t.index_select(0, log_at), worst_t))
    return delta


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
    """New iterate, residual, row norms and Gram row of one fixed-point round (docs/math.md §3, §6).

    With ``s_j = step_j(x_j, e_j, z_j)`` (a multistep chain's also reads ``u_{j-1}``, the converted
    output of row ``j-1``, and ``u_{-1} = u_prev``) and ``L_j = coef[..., 0]``::

        g_{-1} = x_{k0}   (anchor, row 0 of xw)
        g_j    = L_j (g_{j-1} - x_j) + s_j              j = 0 .. W-1
        f_j    = g_j - xw_{j+1}

    Rows ``j >= n_rows[b]`` are dead (``g = xw_{j+1}``, ``f = 0``, their ``e`` ignored: it may
    be anything, non-finite included). ``L = A`` is the seed's scan form (the iterate enters only
    through ``e``); ``L = 1`` the drift form (ParaDiGMS). ``hist_f``: ``[m, B, W, D]`` residual history; ``gram[b, j, k] =
    <f[b, j], hist_f[k, b, j]>``. ``drift``: whether every ``L`` is 1 (then the scan is one
    cumulative sum: :func:`deqkern.ops.window.residual_scan`); ``None`` inspects ``coef``, which
    syncs with the host — callers that know the form (the engine, inside CUDA-graph capture) pass it.
    """
    width = e.shape[1]
    x_in = xw[:, :width]
    before = None
    if ms is not None:
        u = converted_rows(x_in, e, coef, ms, transform)
        before = torch.cat([u_prev.unsqueeze(1), u[:, :-1]], dim=1)
    s = step_rows(x_in, e, z, coef, transform, ms, before)
    L = coef[..., 0].to(xw.dtype)
    g = residual_scan(xw[:, 0], L, x_in, s, unit=drift)
    live = row_mask(n_rows, width).unsqueeze(-1)
    g = torch.where(live, g, xw[:, 1:])
    f = g - xw[:, 1:]
    acc = torch.float64 if xw.dtype == torch.float64 else torch.float32
    f_sq = f.to(acc).square().sum(-1)
    g_sq = g.to(acc).square().sum(-1)
    gram = None
    if hist_f is not None:
        gram = torch.einsum("bwd,kbwd->bwk", f.to(acc), hist_f.to(acc))
    nonfinite = (~torch.isfinite(e) & live).sum(-1).to(acc)
    return ScanResult(g=g, f=f, f_sq=f_sq, g_sq=g_sq, gram=gram, nonfinite=nonfinite)


def carry_converted(
    u_prev: torch.Tensor, xw: torch.Tensor, e: torch.Tensor, coef: torch.Tensor, ms: torch.Tensor,
    delta: torch.Tensor, transform: X0Transform,
) -> None:
    """A multistep chain's window slide of ``u_prev`` ``[B, D]``, in place: where sample ``b``
    freezes ``delta[b] >= 1`` rows, its new first live row reads the converted output of its last
    frozen input row, ``u_prev[b] = u(xw[b, d], e[b, d])``, ``d = delta[b] - 1`` — the value the
    round's scan gave the frozen rows (docs/math.md §1.1). ``xw``, ``e``, ``coef``, ``ms``: the
    round's window before the commit slides it (:func:`scan_residual`'s shapes)."""
    b = torch.arange(xw.shape[0], device=xw.device)
    d = (delta - 1).clamp(min=0)
    u = converted_rows(xw[b, d], e[b, d], coef[b, d], ms[b, d], transform)
    u_prev.copy_(torch.where((delta > 0).unsqueeze(1), u, u_prev))


def anderson_weights(
    gram: torch.Tensor, valid: torch.Tensor, newest: torch.Tensor, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Type-II Anderson mixing weights of many tiny problems at once (docs/math.md §4.2).

    ``gram``: ``[R, m, m]`` ``<F_k, F_l>``; ``valid``: ``[R, m]`` which history slots a problem
    may use; ``newest``: ``[R]`` slot of the newest entry (the fallback). Solves

        [[0, v^T], [v, H + lam I]] [nu; a] = [1; 0],   lam = ridge * mean(diag H over valid)

    (invalid slots get an identity row so their weight is exactly 0). The ridge is relative
    so it means the same at every noise level. Returns ``(a [R, m], ok [R])``; a problem whose
    system is singular or non-finite falls back to ``a = e_newest`` (plain Picard) and ``ok=False``.
    Solved in float64: the systems are tiny and Gram matrices are ill-conditioned near convergence.
    """
    r, m, _ = gram.shape
    h = gram.to(torch.float64)
    v = valid.to(torch.float64)
    count = v.sum(-1).clamp(min=1)
    mean_diag = (torch.diagonal(h, dim1=-2, dim2=-1) * v).sum(-1) / count
    lam = ridge * mean_diag + torch.finfo(torch.float64).tiny
    eye = torch.eye(m, dtype=torch.float64, device=gram.device)
    outer = v.unsqueeze(-1) * v.unsqueeze(-2)
    inner = h * outer + eye * (lam[:, None, None] * v.unsqueeze(-1)) + eye * (1 - v).unsqueeze(-1)
    system = torch.zeros(r, m + 1, m + 1, dtype=torch.float64, device=gram.device)
    system[:, 0, 1:] = v
    system[:, 1:, 0] = v
    system[:, 1:, 1:] = inner
    rhs = torch.zeros(r, m + 1, 1, dtype=torch.float64, device=gram.device)
    rhs[:, 0] = 1.0
    sol, info = torch.linalg.solve_ex(system, rhs)
    a = sol[:, 1:, 0]
    ok = (info == 0) & torch.isfinite(a).all(-1)
    fallback = one_hot(newest, m, torch.float64)
    a = torch.where(ok.unsqueeze(-1), a, fallback)
    return a, ok


def anderson_mix(hist_x: torch.Tensor, hist_f: torch.Tensor, alpha: torch.Tensor, beta: float) -> torch.Tensor:
    """Next iterate ``sum_k alpha_k (X_k + beta F_k)``.

    ``hist_x``, ``hist_f``: ``[m, B, W, D]``; ``alpha``: ``[B, W, m]``. Returns ``[B, W, D]``.
    """
    a = alpha.to(hist_x.dtype)
    return torch.einsum("bwk,kbwd->bwd", a, hist_x + beta * hist_f)


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
    """End of a round, in place: freeze, slide, and write the next model input.

    Row ``r < delta[b]`` of the window takes its ``G`` value ``g`` (frozen), the other live rows
    the solver's proposal ``mixed``; then sample ``b``'s window slides by ``delta[b]``: ``xw[b, i]``
    becomes row ``src = i + delta[b]`` of ``full = [anchor, rows...]``. Rows past the
    ``n = n_rows[b]`` computed ones start from ``init[k0[b] + src, b]`` (``init``: ``[S+1, B, D]``
    by position) or, without ``init``, copy the last computed row ``full[n]`` (ParaDiGMS'
    initialisation) or, with ``extrapolate``, continue the last step linearly:
    ``full[n] + (src - n) (full[n] - full[n-1])`` (``full[-1]`` read as ``full[0]``). With
    ``coords`` (``[S+1]`` by position, :attr:`deqkern.schedule.Schedule.coords`; needs ``k0``, unread
    with ``init``) both rules act on the VP latents ``y_i = full[i] / c_i`` and the entering row is
    ``c_src y``, ``c_i = coords[min(k0[b] + i, S)]`` (docs/math.md §3). ``out``
    (``[B, W, D]``, any float dtype, e.g. the model's input batch) receives ``xw[:, :W]``.
    ``ahead = (e, coef, noise)`` (needs ``k0``, no ``init``; replaces the two rules above): the
    entering rows are the chain stepped from the last computed row with the last live row's model
    output ``u = e[b, n - 1]`` held, ``v <- cx_q v + co_q u + sigma_q z_q`` from ``v = full[n]``
    over the steps ``q = k0 + n, ..., k0 + src - 1`` (``e``: ``[B, W, D]`` the round's model outputs;
    ``coef``: ``[S, 7]`` the affine steps by position, fields ``cx``, ``co``, ``sigma`` of
    ``COEF_FIELDS``; ``noise``: ``[S, B, D]`` the pre-drawn step noise, None for a deterministic
    chain).
    An inactive sample (``n_rows[b] == 0``: done, or past ``max_iters`` inside a fixed-shape
    chunk) keeps its window as it is: its rows hold the solve's current estimate.
    """
    batch, rows, _ = xw.shape
    width = rows - 1
    j = torch.arange(width, device=xw.device).unsqueeze(0)
    proposal = torch.where((j < delta.unsqueeze(1)).unsqueeze(-1), g, mixed)
    full = torch.cat([xw[:, :1], proposal], dim=1)
    src = torch.arange(rows, device=xw.device).unsqueeze(0) + delta.unsqueeze(1)
    b = torch.arange(batch, device=xw.device).unsqueeze(1)
    n = n_rows.unsqueeze(1)
    shifted = full[b, torch.minimum(src, n)]
    # both rules below touch only entering rows, which ahead (or init) replaces: skip them then
    held = ahead is not None and init is None
    scaled = coords is not None and init is None and not held
    if scaled and k0 is None:
        raise ValueError("k0: required with coords (positions of the windows)")
    if scaled:  # entering rows: full[n] in their own coordinates, c_src / c_n full[n]
        pos = k0.unsqueeze(1) + torch.cat([src, n - 1, n], dim=1)
        c = coords.to(xw.dtype)[pos.clamp(min=0, max=coords.numel() - 1)]
        c_src, c_prev, c_last = c[:, :rows], c[:, rows:rows + 1], c[:, rows + 1:]
        shifted = torch.where((src > n).unsqueeze(-1), shifted * (c_src / c_last).unsqueeze(-1), shifted)
    if extrapolate and init is None and not held:
        last = full[b[:, 0], n_rows].unsqueeze(1)
        prev = full[b[:, 0], (n_rows - 1).clamp(min=0)].unsqueeze(1)
        if scaled:
            last, prev = last * (c_src / c_last).unsqueeze(-1), prev * (c_src / c_prev).unsqueeze(-1)
        beyond = (src - n).clamp(min=0).to(xw.dtype).unsqueeze(-1)
        shifted = shifted + beyond * (last - prev)
    if held:
        if k0 is None:
            raise ValueError("k0: required with ahead (positions of the windows)")
        e, coef, noise = ahead
        v = full[b[:, 0], n_rows]
        u = e[b[:, 0], (n_rows - 1).clamp(min=0)].to(xw.dtype)
        held = []
        for m in range(width):  # m + 1 steps past the last computed row (entering rows are consecutive)
            q = (k0 + n_rows + m).clamp(max=coef.shape[0] - 1)
            c = coef[q].to(xw.dtype)
            v = c[:, 1:2] * v + c[:, 2:3] * u
            if noise is not None:
                v = v + c[:, 6:7] * noise[q, b[:, 0]].to(xw.dtype)
            held.append(v)
        held = torch.stack(held, dim=1)[b, (src - n - 1).clamp(min=0, max=width - 1)]
        shifted = torch.where((src > n).unsqueeze(-1), held, shifted)
    if init is not None:
        fresh = init[(k0.unsqueeze(1) + src).clamp(max=init.shape[0] - 1), b]
        shifted = torch.where((src > n_rows.unsqueeze(1)).unsqueeze(-1), fresh, shifted)
    shifted = torch.where((n_rows == 0).view(-1, 1, 1), xw, shifted)
    xw.copy_(shifted)
    if out is not None:
        out.copy_(shifted[:, :width])

