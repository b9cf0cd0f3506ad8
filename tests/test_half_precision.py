"""Half-precision models (issue 10 item 4): the model sees float16/bfloat16 at its input only,
while latents and all solver state stay float32, and a ``tol`` below what a half model allows
warns by name.

Oracles: the sequential sampler with the same half model (its state float32 too), compared in
float64; ``converged`` must mean x0 within ``tol`` of it for ``tol`` at the dtype's measured floor
(``deqkern.sampling.HALF_TOL_FLOOR``, bench/solver_studies.py half-precision).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import digits_chain, rel_err
from test_kernels import _rounding_floor, _status_inputs

import deqkern
from deqkern.graphs import state_tensors
from deqkern.ops import reference
from deqkern.ops.reference import rounding_floor
from deqkern.sampling import HALF_TOL_FLOOR

HALF = [torch.float16, torch.bfloat16]


class _TinyNet(torch.nn.Module):
    """Two 3x3 convolutions and the timestep as a bias: a cheap model to cast to half (the
    digits UNet in float16 costs ~50 ms per row on a CPU)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 1, 3, padding=1)
        self.seen: set[torch.dtype] = set()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.add(x.dtype)
        h = torch.nn.functional.silu(self.a(x) + (t.to(x.dtype) / 1000).view(-1, 1, 1, 1))
        return self.b(h)


def _tiny(dtype: torch.dtype, seed: int = 0) -> _TinyNet:
    return _TinyNet(seed).to(dtype).eval()


def _schedule(steps: int, eta: float = 0.0) -> deqkern.Schedule:
    """A linear-beta DDIM chain of ``steps`` evenly spaced timesteps."""
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    return deqkern.Schedule.ddim(ac, list(range(999, -1, -(1000 // steps)))[:steps], eta=eta)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("execution", ["eager", "static"])
@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_solver_state_is_fp32_with_half_x_T(dtype, execution, solver):
    """x_T in half: every floating tensor of the solve (window, coefficients, residual log,
    solver history, trajectory, step noise) is float32 but the model input buffer, which is in
    the model's dtype; the model is fed its dtype; x0 and the trajectory come back in x_T's."""
    model = _tiny(dtype)
    sched = _schedule(8, eta=0.5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 4, 4, generator=g).to(dtype)
    noise = torch.randn(8, 2, 1, 4, 4, generator=g).to(dtype)
    sampler = deqkern.ParallelSampler(model, sched, solver, tol=0.05, execution=execution, cache_size=1)
    with torch.no_grad():
        res = sampler(x, noise, return_trajectory=True)
    (ws,) = sampler._cache.values()
    model_in = ws.st.model_in
    state = [t for t in state_tensors(ws.st, ws.solver) if t.is_floating_point() and t is not model_in]
    state += [ws.p.coef, ws.p.noise]
    assert {t.dtype for t in state} <= {torch.float32, torch.float64}
    assert ws.st.xw.dtype == ws.st.traj.dtype == ws.p.coef.dtype == ws.p.noise.dtype == torch.float32
    assert model_in is None if execution == "eager" else model_in.dtype == dtype
    assert model.seen == {dtype}
    assert res.x0.dtype == res.trajectory.dtype == dtype


def _seq_fp32_state(model, x, sched, dtype, **kw):
    """The sequential chain with the model in ``dtype`` fed from a float32 ``x_T``."""
    return deqkern.sample_sequential(model, x.float(), sched, model_dtype=dtype, **kw).x0


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("execution", ["eager", "static"])
def test_sequential_state_is_fp32_with_half_x_T(dtype, execution):
    """The sequential sampler from a half x_T steps in float32: its x0 equals, bit for bit, the
    chain from the same x_T in float32 with ``model_dtype`` (a half-precision state would round
    every step), cast to x_T's dtype."""
    model = _tiny(dtype)
    sched = _schedule(10)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        res = deqkern.sample_sequential(model, x, sched, execution=execution)
        ref = _seq_fp32_state(model, x, sched, dtype, execution=execution)
    assert res.x0.dtype == dtype and ref.dtype == torch.float32
    assert torch.equal(res.x0, ref.to(dtype))
    assert model.seen == {dtype}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("execution", ["eager", "static"])
def test_model_dtype_with_fp32_x_T(dtype, execution):
    """A model with half weights and a float32 x_T, ``model_dtype`` set: the model is fed its
    dtype, x0 is float32 and converged means within ``tol`` (at the dtype's floor) of the
    sequential chain with the same model (relative error, float64)."""
    tol = HALF_TOL_FLOOR[dtype]
    model = _tiny(dtype, seed=3)
    sched = _schedule(12)
    for seed in range(3):
        x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref = deqkern.sample_sequential(model, x, sched, model_dtype=dtype).x0
            res = deqkern.sample(model, x, sched, "picard", tol=tol, model_dtype=dtype, execution=execution)
        assert res.x0.dtype == torch.float32 and model.seen == {dtype}
        assert res.all_converged and rel_err(res.x0, ref) <= tol


@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_digits_bf16_converged_within_tol(solver):
    """The trained digits UNet in bfloat16 (the issue's case), ``tol`` at the bf16 floor:
    converged means each sample's x0 within ``tol`` of the bf16 sequential x0 (relative error in
    float64), on two seeds. From a bf16 x_T the solve is the same, bit for bit, and x0 is that
    result rounded once to bf16."""
    unet, sched = digits_chain(12)
    unet = unet.to(torch.bfloat16)
    tol = HALF_TOL_FLOOR[torch.bfloat16]
    for seed in range(2):
        x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(100 + seed)).to(torch.bfloat16)
        with torch.no_grad():
            ref = deqkern.sample_sequential(unet, x.float(), sched, model_dtype=torch.bfloat16).x0
            res = deqkern.sample(unet, x.float(), sched, solver, tol=tol, model_dtype=torch.bfloat16,
                                 execution="eager")
            half = deqkern.sample(unet, x, sched, solver, tol=tol, execution="eager")
        assert half.x0.dtype == torch.bfloat16 and torch.equal(half.x0, res.x0.to(torch.bfloat16))
        for b in range(x.shape[0]):
            assert not res.converged[b] or rel_err(res.x0[b], ref[b]) <= tol, (seed, b)


@pytest.mark.parametrize("dtype", HALF)
def test_tol_below_floor_warns_by_name(dtype):
    """A ``tol`` below the model dtype's floor warns naming ``tol``, the dtype and the floor,
    whether the dtype comes from x_T or from ``model_dtype``; at the floor, or with a float32
    model, nothing warns."""
    floor = HALF_TOL_FLOOR[dtype]
    sched = _schedule(4)
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with pytest.warns(UserWarning, match=rf"tol={floor / 2:g} .*floor {floor:g} .*{dtype}"):
            deqkern.sample(_tiny(dtype), x.to(dtype), sched, tol=floor / 2)
        with pytest.warns(UserWarning, match=rf"tol={floor / 2:g} .*{dtype}"):
            deqkern.sample(_tiny(dtype), x, sched, tol=floor / 2, model_dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            deqkern.sample(_tiny(dtype), x.to(dtype), sched, tol=floor)
            deqkern.sample(_tiny(torch.float32), x, sched, tol=1e-6)


@pytest.mark.parametrize("dtype", HALF)
def test_default_tol_is_the_floor_of_a_half_model(dtype):
    """A solve that names no ``tol`` takes 1e-3 with a float32 model and the floor with a half one
    (from ``x_T``'s dtype or ``model_dtype``), says so in ``info["tol"]`` and does not warn; a
    ``tol`` named in a config wins."""
    sched = _schedule(4)
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    floor = HALF_TOL_FLOOR[dtype]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert deqkern.sample(_tiny(dtype), x.to(dtype), sched).info["tol"] == floor
        assert deqkern.sample(_tiny(dtype), x, sched, model_dtype=dtype).info["tol"] == floor
        assert deqkern.sample(_tiny(torch.float32), x, sched).info["tol"] == 1e-3
        named = deqkern.sample(_tiny(dtype), x, sched, model_dtype=dtype, config={"tol": 2 * floor})
        assert named.info["tol"] == 2 * floor
    assert deqkern.sampling.default_tol(dtype) == floor and deqkern.sampling.default_tol(torch.float32) == 1e-3


def test_half_precision_study_runs_quick(tmp_path):
    """``bench/solver_studies.py half-precision`` at --quick sizes: its command line stays true and
    it reports a floor per half dtype (of 1, 2 or 5 x 10^k) and a row per dtype."""
    from test_bench_scripts import ROOT, _load

    if not (ROOT / "bench" / "solver_studies.py").exists():
        pytest.skip("run from a source checkout")
    report = _load("solver_studies").main(["half-precision", "--quick", "--out", str(tmp_path / "r.json")])
    assert set(report["floor_per_dtype"]) == {str(dt) for dt in HALF}
    for floor in report["floor_per_dtype"].values():
        assert f"{floor:.0e}"[0] in "125" and 1e-6 < floor < 1
    assert {r["dtype"] for r in report["rows"]} == {"torch.float32", *map(str, HALF)}
    assert all(r["rounds"] <= r["steps"] and r["converged"] for r in report["rows"])


def test_digits_fp16_window_rounds_follow_float32():
    """The trained digits UNet in float16, DDIM S = 100, window 10, ten times the float16 floor,
    batch 4: every sample converged within ``tol`` of the float16 sequential x0, in at most 30
    rounds (21 at tol 1e-2 on 2026-12-01; a float32 model takes 23 at tol 1e-3). With the model's rounding
    charged as slack on its outputs' secants, no secant past the first rounds was a measurement and
    the solve took 81 rounds, nearly one row a round (docs/math.md §4.3, half-precision models)."""
    unet, sched = digits_chain(100)
    unet = unet.to(torch.float16)
    tol = 10 * HALF_TOL_FLOOR[torch.float16]
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(110))
    with torch.no_grad():
        ref = deqkern.sample_sequential(unet, x, sched, model_dtype=torch.float16).x0
        res = deqkern.sample(unet, x, sched, tol=tol, window=10, model_dtype=torch.float16, execution="eager")
    assert res.all_converged and res.rounds <= 30, res.rounds_per_sample
    for b in range(x.shape[0]):
        assert rel_err(res.x0[b], ref[b]) <= tol, b


def _floor_by_rows(e_norm, coef, live, eps, gain=None):
    """``rounding_floor``'s recurrence row by row in float64: ``rho_j^2 = g_j^2 rho_{j-1}^2 +
    (MODEL_ROUNDING eps (|co_j| + |c0_j po_j|) ||e_j||)^2`` on live rows with finite outputs,
    ``g_j`` the measured gain where finite, else ``|L_j|``."""
    c = coef.double()
    out = torch.zeros(e_norm.shape, dtype=torch.float64)
    for b in range(e_norm.shape[0]):
        acc = 0.0
        for j in range(e_norm.shape[1]):
            local = reference.MODEL_ROUNDING * eps * (abs(float(c[b, j, 2])) + abs(float(c[b, j, 3] * c[b, j, 5])))
            local *= float(e_norm[b, j])
            keep = bool(live[b, j]) and torch.isfinite(torch.tensor(local))
            g = float(c[b, j, 0]) if gain is None or not torch.isfinite(gain[b, j]) else float(gain[b, j])
            acc = g**2 * acc + (local**2 if keep else 0.0)
            out[b, j] = acc**0.5
    return out


def test_rounding_floor_follows_the_scan():
    """``rounding_floor`` (one logcumsumexp) against its recurrence row by row, float64, within
    1e-10 relative, carried by ``L`` and by measured gains (NaN where none): multipliers of either sign, above and below 1 and exactly 0 (the sum restarts),
    clipped steps (``c0 po``), dead rows and a non-finite output (no rounding), wide ranges of
    output norms."""
    gen = torch.Generator().manual_seed(7)
    batch, width = 3, 40
    coef = torch.randn(batch, width, 7, generator=gen, dtype=torch.float64)
    coef[..., 0] = torch.rand(batch, width, generator=gen, dtype=torch.float64) * 2.4 - 1.2
    coef[0, 10, 0] = 0.0
    coef[1, :, 3] = 0.0  # an affine chain: no predicted x0 term
    e_norm = torch.exp(torch.empty(batch, width, dtype=torch.float64).uniform_(-5, 5, generator=gen))
    e_norm[2, 5] = float("inf")
    live = torch.ones(batch, width, dtype=torch.bool)
    live[1, 30:] = False
    eps = torch.finfo(torch.bfloat16).eps
    got = rounding_floor(e_norm, coef, live, eps)
    want = _floor_by_rows(e_norm, coef, live, eps)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, rtol=1e-10, atol=0.0), (got - want).abs().max()
    # the steps' measured gains carry it where measured (NaN: |L|), 0 restarting the sum there too
    gain = torch.rand(batch, width, generator=gen, dtype=torch.float64) * 2.5
    gain[0, :8] = float("nan")
    gain[1, 20] = 0.0
    got = rounding_floor(e_norm, coef, live, eps, gain)
    want = _floor_by_rows(e_norm, coef, live, eps, gain)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, rtol=1e-10, atol=0.0), (got - want).abs().max()


def test_rounding_floor_only_frees_rows():
    """The x0 rule with a rounding floor freezes at least the rows it freezes without one, on
    every sample, and more on some (random rounds of the kernel tests' inputs): the floor only
    lowers what a residual costs."""
    more = 0
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        args = _status_inputs(5, 12, 30, 6, torch.float64, gen)
        floor = _rounding_floor(args["f_sq"], gen)
        plain = reference.round_status(**{k: v.clone() for k, v in args.items()}, stop="x0", tol=1e-3, dim=37)
        freed = reference.round_status(**{k: v.clone() for k, v in args.items()}, stop="x0", tol=1e-3, dim=37,
                                       floor=floor)
        assert (freed >= plain).all(), (seed, plain, freed)
        more += int((freed > plain).sum())
    assert more > 0


@pytest.mark.parametrize("dtype", HALF)
def test_digits_half_at_its_floor_takes_float32_rounds(dtype):
    """The trained digits UNet in float16 and bfloat16, DDIM S = 100, full window, batch 4, ``tol``
    at the dtype's floor: every sample converged within ``tol`` of the same-dtype sequential x0
    (relative error, float64) in at most 25 rounds (float32 at tol 1e-3: 13). Charging the
    residual of the model's own rounding took 62 (float16 at 2e-3) and 98 (bfloat16 at 1e-2)
    rounds: the residuals stop at the rounding, which two sequential runs differ by too
    (``deqkern.ops.reference.rounding_floor``, bench/solver_studies.py half-precision)."""
    unet, sched = digits_chain(100)
    unet = unet.to(dtype)
    tol = HALF_TOL_FLOOR[dtype]
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(120))
    with torch.no_grad():
        ref = deqkern.sample_sequential(unet, x, sched, model_dtype=dtype).x0
        res = deqkern.sample(unet, x, sched, tol=tol, model_dtype=dtype, execution="eager")
    assert res.all_converged and res.rounds <= 25, res.rounds_per_sample
    for b in range(x.shape[0]):
        assert rel_err(res.x0[b], ref[b]) <= tol, (b, rel_err(res.x0[b], ref[b]))
