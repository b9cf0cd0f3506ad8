"""The x0 rule's error budget from measured step gains (docs/math.md §4.3, issue 14 item 1).

Oracles: the secants of a linear step are its exact gains; the costs by hand from their formula;
in a solve, the secants of a linear model's chain are the schedule's ``|J - L|``; a converged
solve's x0 within the bound of the sequential sampler's (tests/test_x0_bound.py's ``bound_ratio``).
"""
from __future__ import annotations

import math

import pytest
import torch
from test_x0_bound import bound_ratio

import deqkern
from deqkern import engine
from deqkern.engine import Problem, SolveState, run_round
from deqkern.model import ModelEvaluator
from deqkern.ops.reference import LINEAR_REACH, SECANT_SAFETY, past_window_factor, step_secants, x0_row_costs
from deqkern.solvers import get_solver


def _ddim(steps: int) -> deqkern.Schedule:
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    return deqkern.Schedule.ddim(ac, list(range(999, -1, -(1000 // steps)))[:steps])


def test_step_secants_of_a_linear_step_are_its_gains():
    """``s = a x`` per row: ``gain = |a|``, ``dev = |a - L|`` for any move (float64, 1e-12 relative);
    a row whose input did not move has no secant (NaN), including an exactly-zero move."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 5, 1, generator=g, dtype=torch.float64)
    mult = torch.randn(3, 5, generator=g, dtype=torch.float64)
    x_prev, x = (torch.randn(3, 5, 7, generator=g, dtype=torch.float64) for _ in range(2))
    x[1, 2] = x_prev[1, 2]
    gain, dev = step_secants(x - x_prev, a * (x - x_prev), mult)
    moved = torch.ones(3, 5, dtype=torch.bool)
    moved[1, 2] = False
    torch.testing.assert_close(gain[moved], a[..., 0].abs()[moved], rtol=1e-12, atol=0)
    torch.testing.assert_close(dev[moved], (a[..., 0] - mult).abs()[moved], rtol=1e-12, atol=0)
    assert math.isnan(float(gain[1, 2])) and math.isnan(float(dev[1, 2]))


def test_x0_row_costs_with_measured_secants_by_hand():
    """``c_j = ||F_j|| k_{j+1} exp(sum_{l > j+1} r_l) / ||G_{j+1}||``: ``k`` the measured ``dev``
    times ``SECANT_SAFETY`` (rows 1, 3) or the latent bound ``h + |L|`` (row 2, unmeasured); ``r``
    the log of a measured gain above the latent's ``h`` (row 3: 3 over 1), 0 where it is below
    (rows 1, 2) or the row is dead (row 4, whose secants are ignored); the last live row costs 0."""
    f_sq = torch.tensor([[4e-6, 1e-6, 9e-6, 1e-6, 5.0]], dtype=torch.float64)
    g_sq = torch.tensor([[1.0, 4.0, 1.0, 1.0, 1.0]], dtype=torch.float64)  # norms 1, 2, 1, 1
    mult = torch.tensor([[1.0, 1.0, -0.5, 1.0, 1.0]], dtype=torch.float64)
    live = torch.tensor([[True, True, True, True, False]])
    nan = float("nan")
    gain = torch.tensor([[nan, 1.0, 0.25, 3.0, 9.0]], dtype=torch.float64)  # h = 2, 1/2, 1: r = 0, 0, log 3
    dev = torch.tensor([[nan, 1e-3, nan, 2e-3, 9.0]], dtype=torch.float64)
    k1, k2, k3 = SECANT_SAFETY * 1e-3, 0.5 + 0.5, SECANT_SAFETY * 2e-3
    want = [2e-3 * k1 * 3.0 / 2.0, 1e-3 * k2 * 3.0 / 1.0, 3e-3 * k3 / 1.0, 0.0, 0.0]
    got = x0_row_costs(f_sq, g_sq, mult, live, gain, dev)[0]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def _linear_chain(steps: int, rounds: int, c: float) -> tuple[Problem, SolveState]:
    """A linear model ``e = c x`` on a DDIM chain, ``rounds`` Picard rounds of the full window
    (drift form, stop x0 at tol 1e-300: nothing freezes past row 0)."""
    sched = _ddim(steps)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = Problem(
        coef=sched.packed(dtype=torch.float64), timesteps=sched.timesteps, noise_var=sched.noise_var, noise=None,
        init=None, transform=sched.transform, shape=x.shape, width=steps, tol=1e-300, stop="x0", max_iters=steps,
        form="drift",
    )
    st = SolveState.start(p, x, return_trajectory=False)
    cfg, factory = get_solver("picard")
    with torch.no_grad():
        for _ in range(rounds):
            run_round(p, st, factory(cfg), ModelEvaluator(lambda v, t: c * v), static=False)
    return p, st


def test_secant_along_a_long_move_is_dropped(monkeypatch):
    """A row keeps the secant of its last move only if the move is at most ``LINEAR_REACH`` of its
    latent (docs/math.md §4.3): at each Picard round's measurement, rows that moved by more have no
    ``J - L`` (NaN) even on a linear model but keep the gain, and rows that moved less have both;
    both occur."""
    seen = {"long": 0, "near": 0}
    measure = engine.StepSecants.measure

    def checked(self, xw, g, coef, live, e, f=None, scale=None, coarse=False):
        x = xw[:, : g.shape[1]]
        moved = (x - self.x).norm(dim=-1) / x.norm(dim=-1)
        had = self.valid & live
        out = measure(self, xw, g, coef, live, e, f, scale, coarse)
        long, near = had & (moved > LINEAR_REACH), had & (moved <= LINEAR_REACH) & (moved > 0)
        # J - L dropped; the gain kept (the rule takes the larger of it and the latent's)
        assert bool(self.dev[long].isnan().all()) and bool(torch.isfinite(self.gain[long]).all())
        assert bool(torch.isfinite(self.dev[near]).all())
        seen["long"] += int(long.sum())
        seen["near"] += int(near.sum())
        return out

    monkeypatch.setattr(engine.StepSecants, "measure", checked)
    _linear_chain(12, 8, 0.7)
    assert seen["long"] > 0 and seen["near"] > 0, seen


def _two_scalar_rows(dtype: torch.dtype):
    """StepSecants of one sample, two 1-D rows of the step ``e`` (``cx = 0``, ``co = 1``, ``L = 0``),
    and ``measure(x0, x1, g0, g1)``: one round with those inputs and step outputs."""
    sec = engine.StepSecants.start(1, 2, 1, "cpu", dtype)
    coef = torch.zeros(1, 2, 7, dtype=dtype)
    coef[..., 2] = 1.0
    live = torch.ones(1, 2, dtype=torch.bool)

    def measure(x0: float, x1: float, g0: float, g1: float) -> None:
        xw = torch.tensor([[[x0], [x1], [0.0]]], dtype=dtype)
        out = torch.tensor([[[g0], [g1]]], dtype=dtype)
        sec.measure(xw, out, coef, live, out)  # the step is its model output

    return sec, coef, measure


def test_first_secant_after_a_jump_leans_toward_the_bound():
    """A row's first measurement since a move past LINEAR_REACH is ``returned`` (also with a round
    between that moved it not at all, so measured nothing), and only that one; a row that never
    jumped is not. first_direction tilts a returned row's ``dev`` by the angle between its move
    and the residual its input carries, here orthogonal, to the latent-gain bound over
    SECANT_SAFETY, ``(max(h, gain) + |L|) / 8``, and leaves the other row's (docs/math.md §4.3; the
    deep profile's DDPM chain of ``tanh(0.1 x)``, 1.37x outside before). Float64, exact."""
    sec = engine.StepSecants.start(1, 2, 2, "cpu", torch.float64)
    coef = torch.zeros(1, 2, 7, dtype=torch.float64)
    coef[..., 2] = 1.0  # the step is its model output, e = 2 x
    live = torch.ones(1, 2, dtype=torch.bool)
    returned = []
    rows0 = [(1.0, 1.0), (1.001, 1.0), (1.002, 1.0), (1.003, 1.0)]  # small moves along e1
    rows1 = [(1.0, 0.0), (3.0, 0.0), (3.0, 0.0), (3.0, 0.001)]  # a jump, no move, a small move
    for r0, r1 in zip(rows0, rows1):
        xw = torch.tensor([[r0, r1, (0.0, 0.0)]], dtype=torch.float64)
        e = 2 * xw[:, :2]
        dx = sec.measure(xw, e, coef, live, e)[0]
        returned.append(sec.returned[0].tolist())
    assert returned == [[False, False], [False, False], [False, False], [False, True]]
    dev = torch.full((1, 2), 0.01, dtype=torch.float64)
    one = torch.ones(1, 2, dtype=torch.float64)
    f = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)  # row 1's input carries (1, 0)
    tilted = sec.first_direction(dev, one, dx, f, torch.zeros(1, 2, dtype=torch.float64), one,
                                 torch.zeros(1, dtype=torch.bool))
    assert tilted.tolist() == [[0.01, (1.0 + 0.0) / SECANT_SAFETY]]


def test_lend_keeps_the_extremes_over_the_solve():
    """Rows not measured yet borrow the model's Jacobian from every row the solve has measured
    (docs/math.md §4.3), not only the latest round's: a 1-D model whose slopes are 3 and 2 in one
    round and 0.5 in the next lends ``<u, Eu>`` in [0.5, 3], ``||Eu||^2`` 9 and nothing off ``u``
    (1-D; float64, 1e-9), and keeps that through a round that measures nothing."""
    sec, _, measure = _two_scalar_rows(torch.float64)
    measure(1.0, 2.0, 0.0, 0.0)
    assert bool(sec.lend.isnan().all())  # nothing measured yet
    measure(1.01, 2.02, 0.03, 0.04)  # slopes 3 and 2
    assert torch.allclose(sec.lend, torch.tensor([[2.0, 3.0, 9.0, 0.0]], dtype=torch.float64), rtol=1e-9, atol=1e-9)
    measure(1.02, 2.02, 0.035, 0.04)  # row 0: slope 0.5; row 1 did not move
    assert torch.allclose(sec.lend, torch.tensor([[0.5, 3.0, 9.0, 0.0]], dtype=torch.float64), rtol=1e-9, atol=1e-9)
    measure(1.02, 2.02, 0.035, 0.04)  # nothing moved: the lend stays
    assert torch.allclose(sec.lend, torch.tensor([[0.5, 3.0, 9.0, 0.0]], dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_lend_pairs_each_rows_slope_with_its_own_gain():
    """The lend bounds ``||(a I + b E) u||`` over the measured moves by ``(a + b <u, Eu>)^2`` at the
    extreme slopes plus ``b^2`` times the largest part of ``Eu`` off ``u`` (docs/math.md §4.3).
    Fresh random 2-D linear models, one per row of a window of 6 (float64): for random ``(a, b)``
    the lend is at least every measured row's own ``||(a I + b E_j) u_j||`` and at most the largest
    of them plus ``|b| sqrt(off_max^2 - off_min^2)`` (the off-``u`` parts' spread); where ``a`` cancels ``b E`` (``a = -1``,
    ``b = 1``, slopes 0.9 and 1.1 along ``u``, nothing off it) it is 0.1, where pairing the extreme
    slope with the largest ``||Eu||^2`` read 0.64 (relative 1e-9)."""
    g = torch.Generator().manual_seed(20261201)
    width = 6
    sec = engine.StepSecants.start(1, width, 2, "cpu", torch.float64)
    coef = torch.zeros(1, width, 7, dtype=torch.float64)
    coef[..., 2] = 1.0  # the step is its model output
    live = torch.ones(1, width, dtype=torch.bool)
    mats = torch.randn(width, 2, 2, generator=g, dtype=torch.float64)
    x1 = torch.randn(width, 2, generator=g, dtype=torch.float64)
    u = torch.randn(width, 2, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    for x in (x1, x1 + 1e-3 * u):
        xw = torch.cat([x, torch.zeros(1, 2, dtype=torch.float64)]).unsqueeze(0)
        e = torch.einsum("jkl,jl->jk", mats, x).unsqueeze(0)
        sec.measure(xw, e, coef, live, e)
    eu = torch.einsum("jkl,jl->jk", mats, u)
    off = (eu.square().sum(1) - (eu * u).sum(1).square()).sqrt()
    for _ in range(20):
        a, b = (float(v) for v in 3 * torch.randn(2, generator=g, dtype=torch.float64))
        own = (a * u + b * eu).norm(dim=1)
        lent = float(sec._lent(torch.tensor([[a]], dtype=torch.float64), torch.tensor([[b]], dtype=torch.float64)))
        assert lent >= float(own.max()) * (1 - 1e-9)
        assert lent <= float(own.max()) + abs(b) * float((off.max().square() - off.min().square()).sqrt()) + 1e-9
    sec, coef, measure = _two_scalar_rows(torch.float64)
    measure(1.0, 2.0, 0.0, 0.0)
    measure(1.01, 2.02, 0.009, 0.022)  # slopes 0.9 and 1.1
    lent = sec._lent(torch.tensor([[-1.0]], dtype=torch.float64), torch.tensor([[1.0]], dtype=torch.float64))
    assert float(lent) == pytest.approx(0.1, rel=1e-9)


def test_lend_is_kept_in_the_model_input_units():
    """Where the model sees its latent scaled (Euler: ``x / sqrt(sigma^2 + 1)``), the latent's Jacobian
    is ``scale E_model``: the lend keeps ``E_model`` and a row at another scale borrows it at its own.
    Row 0 (scale 0.5) and row 1 (scale 0.25) both measure the latent slope 1, so model slopes 2 and
    4; the lend is ``<u, Eu>`` in [2, 4], ``||Eu||^2`` 16 and nothing off ``u``, and a row of scale 0.1 borrows
    ``|co| 0.1 4`` (float64, 1e-9)."""
    sec, coef, _ = _two_scalar_rows(torch.float64)
    live = torch.ones(1, 2, dtype=torch.bool)
    scale = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    for x0, x1 in ((1.0, 2.0), (1.01, 2.02)):  # the step e has latent slope 1 on both rows
        xw = torch.tensor([[[x0], [x1], [0.0]]], dtype=torch.float64)
        out = torch.tensor([[[x0], [x1]]], dtype=torch.float64)
        sec.measure(xw, out, coef, live, out, scale=scale)
    assert torch.allclose(sec.lend, torch.tensor([[2.0, 4.0, 16.0, 0.0]], dtype=torch.float64), rtol=1e-9, atol=1e-9)
    sec.forget(torch.tensor([[False, True]]))  # row 1 borrows
    rule = sec.rule_dev(coef, torch.ones(1, 2, dtype=torch.float64), torch.tensor([[0.5, 0.1]], dtype=torch.float64))
    assert float(rule[0, 1]) == pytest.approx(0.4, rel=1e-9)


def test_affine_secant_comes_from_the_model_outputs():
    """float32, one row of a linear model ``e = 3 x`` (``cx = 0.9``, ``co = 0.05``, ``L = 1``), D = 64:
    a move of 1e-4 of the latent measures ``J - L = cx - L + 3 co = 0.05`` from the model outputs
    (``ds = cx dx + co de`` in float64), with a slack of ``|co|`` times 4 ulps of ``||e|| + ||e'||``
    over ``||dx||`` (about 1e-3): a measurement, at least the true value and within twice the slack
    of it. Recovered from the scan's float32 step outputs instead, the slack would be about 0.03,
    over SECANT_SLACK_CAP: no measurement (docs/math.md §4.3)."""
    from deqkern.engine import SECANT_SLACK_CAP

    gen = torch.Generator().manual_seed(0)
    sec = engine.StepSecants.start(1, 1, 64, "cpu", torch.float32)
    coef = torch.zeros(1, 1, 7, dtype=torch.float32)
    coef[..., 0], coef[..., 1], coef[..., 2] = 1.0, 0.9, 0.05
    live = torch.ones(1, 1, dtype=torch.bool)
    x = torch.randn(1, 64, generator=gen)
    move = torch.randn(1, 64, generator=gen)
    for row in (x, x + 1e-4 * x.norm() * move / move.norm()):  # row 0's input is the window's anchor
        e = 3.0 * row
        g = 0.9 * row + 0.05 * e  # the scan's G of row 0: its step output
        sec.measure(torch.stack([row, torch.zeros_like(row)], dim=1), g.unsqueeze(1), coef, live, e.unsqueeze(1))
    eps = torch.finfo(torch.float32).eps
    dx = 1e-4 * float(x.norm())
    slack = 4 * eps * 0.05 * 2 * float(3.0 * x.norm()) / dx
    assert slack < SECANT_SLACK_CAP < 24 * eps * float(x.norm()) / dx
    dev = float(sec.dev[0, 0])
    assert 0.05 <= dev <= 0.05 + 2 * slack, (dev, slack)


def test_loose_secant_is_the_last_resort_before_the_latent_gain():
    """A float32 secant whose rounding slack is over SECANT_SLACK_CAP is no measurement (``dev``
    stays NaN), but a row with nothing else, neither its own ``dev`` nor a lend, takes it with its
    slack (``dev_loose``) rather than the latent's gain; once another row is measured, the lend
    comes first. Rows at 1 and 2."""
    from deqkern.engine import SECANT_SLACK_CAP

    sec, coef, measure = _two_scalar_rows(torch.float32)
    measure(1.0, 2.0, 0.5, 0.5)
    x0 = torch.tensor(1.0, dtype=torch.float32) + 1e-5  # a move of ~80 ulps: slack ~0.05
    dx, ds = float(x0) - 1.0, 3 * (float(x0) - 1.0)
    measure(float(x0), 2.0, 0.5 + ds, 0.5)  # row 0 moves 1e-5 with slope 3; row 1 does not move
    slack = 4 * torch.finfo(torch.float32).eps * (0.5 + 0.5 + ds) / dx
    assert slack > SECANT_SLACK_CAP and bool(sec.dev.isnan().all()) and bool(sec.lend.isnan().all())
    h = torch.ones(1, 2, dtype=torch.float64)  # the latents' gains: unread, no row moved far
    rule = sec.rule_dev(coef, h)
    assert abs(float(rule[0, 0]) - (3 + slack)) < 0.02 * 3  # the loose secant, slack included
    assert math.isnan(float(rule[0, 1]))  # nothing at all: the latent's gain
    measure(float(x0) + 1e-5, 2.1, 0.5 + 2 * ds, 0.6)  # row 1 measured (slope 1), row 0 loose again
    assert bool(torch.isfinite(sec.dev[0, 1])) and math.isnan(float(sec.dev[0, 0]))
    assert float(sec.rule_dev(coef, h)[0, 0]) == pytest.approx(1.0, rel=1e-3)  # the lend: |co E| = 1


def test_loose_secant_keeps_the_tightest_bound():
    """A row at the rounding floor moves a few ulps a round, and a secant's slack grows as ``1 /
    ||dx||``: the row keeps the tightest loose bound it has measured near its position, not the
    latest (float32). Row 0 (latent 1, model slope 3) moves 1e-4 (slack about 0.03, over
    SECANT_SLACK_CAP), then about 5e-7 (slack about 6): the rule still reads the first loose secant,
    slope plus its slack (within 2%); a move past LINEAR_REACH starts it afresh."""
    from deqkern.engine import SECANT_SLACK_CAP

    sec = engine.StepSecants.start(1, 2, 1, "cpu", torch.float32)
    coef = torch.zeros(1, 2, 7, dtype=torch.float32)
    coef[..., 2] = 1.0
    live = torch.ones(1, 2, dtype=torch.bool)
    eps = torch.finfo(torch.float32).eps

    def measure(x0: torch.Tensor) -> None:
        xw = torch.stack([x0, torch.tensor(2.0), torch.tensor(0.0)]).view(1, 3, 1)
        out = torch.stack([3 * x0, torch.tensor(0.5)]).view(1, 2, 1)
        sec.measure(xw, out, coef, live, out)

    x_a = torch.tensor(1.0)
    x_b = x_a + 1e-4
    measure(x_a)
    measure(x_b)
    dx = float(x_b - x_a)
    slack = 4 * eps * float(3 * x_a + 3 * x_b) / dx
    assert slack > SECANT_SLACK_CAP and math.isnan(float(sec.dev[0, 0]))
    h = torch.ones(1, 2, dtype=torch.float64)
    first = float(sec.rule_dev(coef, h)[0, 0])
    assert first == pytest.approx(3 + slack, rel=0.02)
    measure(x_b + 5e-7)  # a few ulps: a slack about 6
    assert float(sec.dev_loose[0, 0]) == first == float(sec.rule_dev(coef, h)[0, 0])
    measure(torch.tensor(1.5))  # past LINEAR_REACH: forgotten
    assert math.isnan(float(sec.dev_loose[0, 0]))


def test_far_row_takes_the_latent_gain_bound_as_a_measured_secant():
    """A row whose last move went past LINEAR_REACH keeps no ``J - L`` of its own and borrows no
    lend: the rule gives it ``max(h, gain) + |L|`` (here ``L = 0``), which the cost then scales by
    SECANT_SAFETY like a measured secant (float64, 1e-9). Row 1 moves from 2 to 3 (a third of its
    latent) with slope 0.4."""
    sec, coef, measure = _two_scalar_rows(torch.float64)
    measure(1.0, 2.0, 0.5, 0.5)
    measure(1.0, 3.0, 0.5, 0.9)
    assert bool(sec.far[0, 1]) and not bool(sec.far[0, 0])
    assert math.isnan(float(sec.dev[0, 1])) and float(sec.gain[0, 1]) == pytest.approx(0.4, rel=1e-9)
    for h_row, want in ((2.0, 2.0), (0.1, 0.4)):  # the larger of the latent's gain and the secant's
        rule = sec.rule_dev(coef, torch.tensor([[1.0, h_row]], dtype=torch.float64))
        assert float(rule[0, 1]) == pytest.approx(want, rel=1e-9)


def test_far_row_gain_is_at_least_the_lent_gain():
    """A row whose last move went past LINEAR_REACH keeps its long secant's gain, but the rule
    reads at least the gain lent from the rows measured near (``J = cx + co E`` with the model's
    measured Jacobian; here ``cx = 0``, ``co = 1``): row 0 moves 0.01 with slope 3, row 1 moves a
    third of its latent with slope 0.4, so row 1's gain reads 3 (float64, 1e-9); a near row keeps
    its own."""
    sec, coef, measure = _two_scalar_rows(torch.float64)
    measure(1.0, 2.0, 0.5, 0.5)
    measure(1.01, 3.0, 0.53, 0.9)
    assert bool(sec.far[0, 1]) and not bool(sec.far[0, 0])
    gain = sec.rule_gain(coef)
    assert float(sec.gain[0, 1]) == pytest.approx(0.4, rel=1e-9)
    assert float(gain[0, 1]) == pytest.approx(3.0, rel=1e-9)
    assert float(gain[0, 0]) == pytest.approx(3.0, rel=1e-9)


def test_solve_measures_the_steps_j_minus_l(monkeypatch):
    """A linear model ``e = c x`` makes every step linear, ``J_k = cx_k + co_k c``: after three
    rounds, each row that kept its position holds ``gain = |J_k|`` and ``dev = |J_k - 1|`` (drift
    form) for its position (float64, 1e-9 relative), the model's gain is ``|c|``, and the rule's
    ``||J - L||`` of the other rows is the schedule's bound with it. A linear step's secant is
    exact along any move, so the reach is lifted here (Picard's first moves are long)."""
    monkeypatch.setattr(engine, "LINEAR_REACH", math.inf)
    steps, c = 12, 0.7
    sched = _ddim(steps)
    p, st = _linear_chain(steps, 3, c)
    pos = (st.k0.unsqueeze(1) + torch.arange(steps)).clamp(max=steps - 1)
    jac = (sched.cx + sched.co * c)[pos]
    seen = torch.isfinite(st.secants.dev)
    assert int(seen.sum()) >= steps  # most of both windows
    torch.testing.assert_close(st.secants.gain[seen], jac[seen].abs(), rtol=1e-9, atol=0)
    torch.testing.assert_close(st.secants.dev[seen], (jac[seen] - 1).abs(), rtol=1e-9, atol=0)
    # the model's gain is |c|; rows without a secant rebuild ||(J - L) dx|| from the model's measured
    # Jacobian, which for E = c I is |cx + co c - L| = |J - L| exactly (the triangle bound |cx - L| +
    # |co| |c| is larger wherever the two terms cancel)
    torch.testing.assert_close(st.secants.model_gain, torch.full((2,), c, dtype=torch.float64), rtol=1e-9, atol=0)
    coef = p.coef[pos]
    rule = st.secants.rule_dev(coef, torch.ones_like(st.secants.dev))  # the latents' gains: unread, no far rows
    assert bool((~seen).any())
    torch.testing.assert_close(rule[~seen], (jac[~seen] - 1).abs(), rtol=1e-9, atol=1e-15)
    triangle = (coef[..., 1] - 1).abs() + coef[..., 2].abs() * c
    assert bool((rule[~seen] <= triangle[~seen] * (1 + 1e-12)).all())
    torch.testing.assert_close(rule[seen], st.secants.dev[seen], rtol=0, atol=0)


def test_measured_budget_keeps_the_bound_where_the_latent_gain_misleads():
    """A chain whose latent shrinks a hundredfold in its last step (``prediction_type="sample"``,
    model ``tanh(0.008 x)``) while ``J - L`` there stays about 1: full and small windows, Picard and
    Anderson, fresh seeds; every sample converged and within the bound of the sequential x0."""
    b = torch.linspace(0.0005697633622623655, 0.01451780031411802, 1000, dtype=torch.float64)
    sched = deqkern.Schedule.ddim(torch.cumprod(1 - b, 0), [795, 600, 357, 250, 196, 192], prediction_type="sample")
    model = lambda v, t: torch.tanh(0.008 * v)  # noqa: E731
    for seed in (21, 22):
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        ref = deqkern.sample_sequential(model, x, sched).x0
        for solver in ("picard", "anderson"):
            for window in (None, 3):
                res = deqkern.sample(model, x, sched, solver, tol=1e-3, window=window)
                assert res.all_converged
                assert float(bound_ratio(res.x0, ref, x, 1e-3).max()) <= 1.0, (seed, solver, window)


@pytest.mark.parametrize("kind,max_value", [("clip", 1.0), ("threshold", 1.0), ("threshold", 4.0), ("threshold", 1.5),
                                            ("threshold", 0.5)])
def test_jacobian_gap_against_autograd(kind, max_value):
    """``X0Transform.jacobian_gap``: ``(I - J_f) v`` (autograd's JVP of the transform, float64) is
    ``gap`` plus a remainder within ``rest`` (1e-12 slack): exactly ``gap`` for the clip and where
    the threshold's ``s`` sits at 1 or ``max_value``, for a move that reaches no edge; rows inside,
    across and beyond the range."""
    from deqkern import X0Transform

    f = X0Transform(kind, clip_range=0.7, ratio=0.9, max_value=max_value)
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(6, 40, generator=g, dtype=torch.float64) * torch.tensor([0.2, 0.5, 1.0, 1.5, 3.0, 8.0],
                                                                             dtype=torch.float64).view(-1, 1)
    v = torch.randn(6, 40, generator=g, dtype=torch.float64)
    _, jv = torch.autograd.functional.jvp(f.apply, x0, v)
    gap, rest = f.jacobian_gap(x0, v)
    miss = (v - jv - gap).norm(dim=1)
    assert rest.dtype == torch.float64 and rest.shape == (6,)
    assert bool((miss <= rest + 1e-12 * v.norm(dim=1)).all()), (miss, rest)
    if kind == "clip" or max_value <= 1.0:  # s never moves: for a move too small to reach an edge, exact
        small = 1e-6 * v
        _, jv = torch.autograd.functional.jvp(f.apply, x0, small)
        gap, rest = f.jacobian_gap(x0, small)
        assert float(rest.abs().max()) == 0.0 and float((small - jv - gap).norm(dim=1).max()) <= 1e-18
    assert float(gap[0].norm()) == 0.0 or kind == "threshold"  # row 0 inside the clip range: f is the identity


@pytest.mark.parametrize("kind,max_value", [("none", 1.0), ("clip", 1.0), ("threshold", 1.0), ("threshold", 0.5)])
def test_transform_slopes_are_its_jacobian_diagonal(kind, max_value):
    """``X0Transform.slopes``: ``slope * v`` is the transform's JVP ``J_f v`` (autograd, float64)
    wherever ``s`` cannot move (here ``max_value <= 1`` pins it), on elements away from the edge;
    ``near`` marks exactly the elements within ``size`` of it."""
    from deqkern import X0Transform

    f = X0Transform(kind, clip_range=0.7, ratio=0.9, max_value=max_value)
    g = torch.Generator().manual_seed(13)
    x0 = torch.randn(5, 40, generator=g, dtype=torch.float64) * torch.tensor([0.2, 0.5, 1.5, 3.0, 8.0],
                                                                             dtype=torch.float64).view(-1, 1)
    v = torch.randn(5, 40, generator=g, dtype=torch.float64)
    size = torch.full_like(x0, 0.05)
    slope, near, scale, moving = f.slopes(x0, size)
    _, jv = torch.autograd.functional.jvp(f.apply, x0, v)
    away = near == 0
    assert slope.dtype == torch.float64 and slope.shape == x0.shape and scale.shape == (5,)
    assert not bool(moving.any())
    assert torch.allclose((slope * v)[away], jv[away], rtol=1e-12, atol=1e-15)
    edge = {"none": None, "clip": torch.full((5, 1), 0.7, dtype=torch.float64), "threshold": scale.view(-1, 1)}[kind]
    if edge is not None:
        assert torch.equal(near, ((x0.abs() - edge).abs() <= size).to(torch.float64))
        assert bool((slope == 0).any()) and bool((slope > 0).any())  # rows inside and beyond the range


@pytest.mark.parametrize("kind,max_value", [("clip", 1.0), ("threshold", 1.0), ("threshold", 3.0), ("threshold", 0.5)])
def test_transform_kink_bounds_the_gap(kind, max_value):
    """``engine.transform_kink``: ``||(I - J_f) v|| <= kink ||v||`` for random directions at rows
    inside, across and beyond the range (autograd's JVP, float64)."""
    from deqkern import X0Transform
    from deqkern.engine import transform_kink

    f = X0Transform(kind, clip_range=0.7, ratio=0.9, max_value=max_value)
    g = torch.Generator().manual_seed(12)
    scale = torch.tensor([0.2, 0.5, 1.5, 3.0, 8.0], dtype=torch.float64).view(-1, 1)
    x0 = torch.randn(5, 30, generator=g, dtype=torch.float64) * scale
    kink = transform_kink(f, x0.shape[-1])
    for _ in range(8):
        v = torch.randn(5, 30, generator=g, dtype=torch.float64)
        _, jv = torch.autograd.functional.jvp(f.apply, x0, v)
        assert bool(((v - jv).norm(dim=1) <= kink * v.norm(dim=1) + 1e-12).all()), kink


def test_jacobian_gap_covers_the_other_side_of_the_kink():
    """An element within ``|v_i|`` of the clip edge may be on either side where the frozen error
    takes it: ``(I - J_f) v`` at a point moved by up to ``|v|`` elementwise stays within ``gap +
    rest`` of the original point's ``gap`` (both sides of the kink, float64)."""
    from deqkern import X0Transform

    f = X0Transform("clip", clip_range=1.0)
    x0 = torch.tensor([[0.99, 1.01, 0.5, -1.005, 2.0]], dtype=torch.float64)
    v = torch.tensor([[0.02, -0.02, 0.02, 0.01, 0.3]], dtype=torch.float64)
    gap, rest = f.jacobian_gap(x0, v)
    for shift in (-1.0, -0.5, 0.5, 1.0):
        moved = x0 + shift * v
        _, jv = torch.autograd.functional.jvp(f.apply, moved, v)
        assert float((v - jv - gap).norm()) <= float(rest[0]) + 1e-12
    assert float(rest[0]) > 0  # three elements straddle the edge


def test_past_window_factor_charges_the_shrink_beyond_the_safety():
    """``max(1, ||G_{n-1}|| / (SECANT_SAFETY ||px x + po e||))`` at the last live row of a sliding
    window, by hand in float64 (1e-12 relative); 1 where the window holds every row left; inf
    where the predicted x0 is 0 or not finite (every cost charged: a row freezes alone)."""
    g = torch.Generator().manual_seed(3)
    batch, width, dim = 5, 4, 6
    x = torch.randn(batch, width + 1, dim, generator=g, dtype=torch.float64) * 100
    e = torch.randn(batch, width, dim, generator=g, dtype=torch.float64)
    coef = torch.rand(batch, width, 7, generator=g, dtype=torch.float64)
    coef[..., 4] = 0.0  # x0 = po e: of order 1 against latents of order 100
    latent_sq = x[:, 1:].square().sum(-1)
    n = torch.tensor([4, 2, 3, 4, 1])
    left = torch.tensor([9, 2, 7, 4, 5])  # samples 1 and 3: the window holds every row left
    e[4, 0] = float("nan")
    e[2, 2] = 0.0
    got = past_window_factor(latent_sq, x, e, coef, n, left)
    for b in range(batch):
        j = int(n[b]) - 1
        x0_hat = coef[b, j, 4] * x[b, j] + coef[b, j, 5] * e[b, j]
        want = max(1.0, float(latent_sq[b, j].sqrt() / (SECANT_SAFETY * x0_hat.norm())))
        if int(n[b]) >= int(left[b]):
            assert float(got[b]) == 1.0
        elif not math.isfinite(float(x0_hat.norm())) or float(x0_hat.norm()) == 0.0:
            assert float(got[b]) == math.inf
        else:
            assert want > 1.0 and float(got[b]) == pytest.approx(want, rel=1e-12)
