"""Half-precision models under classifier-free guidance: the guided output carries the rounding of
both model outputs, weighed by ``1 - s`` and ``s``, so the x0 rule leaves that much uncharged
(``Guidance.rounding_scale``) and the default ``tol`` is the dtype's floor times
``Guidance.rounding_gain`` (``deqkern.sampling.tol_floor``).

Oracles: the formulas evaluated in float64 by hand; the same evaluator without chunking; the
same-dtype guided sequential sampler, compared in float64, and what that sampler moves by when x_T
moves by 4 float32 ulps (the chain's own amplification of the model's rounding).
"""
from __future__ import annotations

import math
import socket
import warnings

import pytest
import torch
from conftest import digits_chain, rel_err

import deqkern
from deqkern.model import ModelEvaluator
from deqkern.sampling import HALF_TOL_FLOOR, default_tol, tol_floor

HALF = [torch.float16, torch.bfloat16]


class _CondNet(torch.nn.Module):
    """A 3x3 convolution of ``k * x`` plus the timestep: ``k`` per sample is the conditioning, so
    the uncond and cond halves run different arithmetic, as a text encoder's prompts do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.a(x * k.to(x.dtype).view(-1, 1, 1, 1)) + (t.to(x.dtype) / 1000).view(-1, 1, 1, 1)


class _DigitsCond(torch.nn.Module):
    """The trained digits UNet fed ``k * x``: the guided digits chain (uncond ``k = 0.97``)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.unet(x * k.to(x.dtype).view(-1, 1, 1, 1), t).sample


def _guidance(scale: float, batch: int, rescale: float = 0.0) -> deqkern.Guidance:
    return deqkern.Guidance(scale=scale, cond={"k": torch.linspace(0.9, 1.1, batch)},
                            uncond={"k": torch.full((1,), 0.97)}, rescale=rescale)


@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0, 7.5])
def test_rounding_scale_is_the_weighed_norms(scale, rescale):
    """``sqrt(((1 - s) ||u||)^2 + (s ||c||)^2)`` per row, times ``r std(c) / std(g) + 1 - r``."""
    g = torch.Generator().manual_seed(1)
    u, c = torch.randn(5, 3, 4, generator=g), 1.3 * torch.randn(5, 3, 4, generator=g)
    got = _guidance(scale, 5, rescale).rounding_scale(u, c)
    u64, c64 = u.double().flatten(1), c.double().flatten(1)
    want = ((1 - scale) ** 2 * u64.square().sum(1) + scale**2 * c64.square().sum(1)).sqrt()
    guided = u64 + scale * (c64 - u64)
    factor = rescale * c64.std(1) / guided.std(1) + 1 - rescale if rescale else 1.0
    assert got.dtype == torch.float64 and got.shape == (5,)
    torch.testing.assert_close(got, want * factor, rtol=1e-12, atol=0)


def test_rounding_gain():
    """``max(1, hypot(1 - s, s))``: 1 without guidance's extra weight, 9.96 at the common 7.5."""
    assert _guidance(1.0, 1).rounding_gain == 1.0
    assert _guidance(0.5, 1).rounding_gain == 1.0  # the weights shrink the rounding: no floor below one output's
    assert _guidance(7.5, 1).rounding_gain == pytest.approx(math.hypot(6.5, 7.5), rel=1e-15)
    assert _guidance(-2.0, 1).rounding_gain == pytest.approx(math.hypot(3.0, 2.0), rel=1e-15)


@pytest.mark.parametrize("guided", [False, True])
def test_raw_reports_the_rounding_scale(guided):
    """``raw(rounding=True)``: the same outputs, and per row ``||e||`` (unguided) or the guidance's
    rounding scale of that row's uncond and cond outputs; chunked by ``max_batch`` as one call."""
    net = _CondNet().half()
    batch, rows = 3, 6
    x = torch.randn(rows, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    t = torch.arange(rows) * 100
    idx = torch.arange(rows) % batch
    kwargs = {} if guided else {"model_kwargs": {"k": torch.linspace(0.9, 1.1, batch)}}
    guidance = _guidance(7.5, batch) if guided else None
    whole = ModelEvaluator(net, guidance=guidance, model_dtype=torch.float16, **kwargs)
    chunked = ModelEvaluator(net, guidance=guidance, model_dtype=torch.float16, max_batch=4, **kwargs)
    out, scale = whole.raw(x, t, idx, rounding=True)
    torch.testing.assert_close(out, whole.raw(x, t, idx), rtol=0, atol=0)
    if guided:
        with torch.no_grad():
            xin = x.half()
            u = net(xin, t, k=torch.full((rows,), 0.97))
            c = net(xin, t, k=torch.linspace(0.9, 1.1, batch)[idx])
        want = guidance.rounding_scale(u, c)
    else:
        want = out.double().flatten(1).norm(dim=1)
    assert scale.dtype == torch.float64 and scale.shape == (rows,)
    torch.testing.assert_close(scale, want, rtol=1e-3, atol=0)  # u, c from another batch: half rounding
    c_out, c_scale = chunked.raw(x, t, idx, rounding=True)
    torch.testing.assert_close(c_scale, scale, rtol=1e-3, atol=0)
    torch.testing.assert_close(c_out, out, rtol=1e-2, atol=1e-2)


def test_row_split_evaluator_reports_the_same_rounding_scale(monkeypatch):
    """The distributed evaluator (one gloo rank) gathers the halves and reports the same scale."""
    import torch.distributed as dist

    from deqkern.distributed import resolve_group, row_split

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        net = _CondNet().half()
        x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(3))
        t, idx = torch.arange(4) * 200, torch.arange(4) % 2
        ev = ModelEvaluator(net, guidance=_guidance(7.5, 2), model_dtype=torch.float16)
        split = row_split(ev, resolve_group("world"))
        out, scale = split.raw(x, t, idx, rounding=True)
        want_out, want = ev.raw(x, t, idx, rounding=True)
        torch.testing.assert_close(scale, want, rtol=1e-3, atol=0)
        torch.testing.assert_close(out, want_out, rtol=1e-2, atol=1e-2)  # combined in float32 there
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", HALF)
def test_default_tol_under_guidance(dtype):
    """A guided half model's default ``tol`` is its floor times the rounding gain, in
    ``info["tol"]``; below it a named ``tol`` warns naming the guidance scale; float32 models keep
    1e-3 whatever the guidance."""
    g = _guidance(7.5, 1)
    floor = HALF_TOL_FLOOR[dtype] * g.rounding_gain
    assert tol_floor(dtype, g) == floor and default_tol(dtype, g) == floor
    assert tol_floor(torch.float32, g) == 0.0 and default_tol(torch.float32, g) == 1e-3
    assert tol_floor(dtype) == HALF_TOL_FLOOR[dtype]
    sched = deqkern.Schedule.ddim(torch.linspace(0.999, 0.01, 1000, dtype=torch.float64), [900, 600, 300, 0])
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    net = _CondNet().to(dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        res = deqkern.sample(net, x, sched, model_dtype=dtype, guidance=g)
    assert res.info["tol"] == floor
    with torch.no_grad(), pytest.warns(UserWarning, match=f"tol=0.001 is below .* at guidance scale 7.5"):
        deqkern.sample(net, x, sched, model_dtype=dtype, guidance=g, tol=1e-3)


def test_guided_float16_digits_does_not_go_sequential():
    """The digits UNet in float16 at guidance 7.5, DDIM S = 25, full window, batch 4, default tol:
    at most float32's 13 rounds (11; before the guided rounding was left uncharged: all 25, the
    residuals stopping at ten times the unguided rounding; with the rounding carried by ``L``
    instead of the steps' gains: 14; bench/solver_studies.py guided-half).
    Every sample within tol of the same-dtype guided sequential x0, or within twice what that
    sampler itself moves by when x_T moves by 4 float32 ulps (a chain that amplifies the model's
    rounding beyond any tol of a half model: the floor holds 9 samples in 10)."""
    unet, sched = digits_chain(25)
    model = _DigitsCond(unet.half()).eval()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(120))
    g = deqkern.Guidance(scale=7.5, cond={"k": torch.ones(4)}, uncond={"k": torch.full((1,), 0.97)})
    kw = {"model_dtype": torch.float16, "guidance": g}
    with torch.no_grad():
        ref = deqkern.sample_sequential(model, x, sched, **kw).x0
        moved = deqkern.sample_sequential(model, x * (1 + 4 * torch.finfo(torch.float32).eps), sched, **kw).x0
        res = deqkern.sample(model, x, sched, execution="eager", **kw)
    tol = res.info["tol"]
    assert tol == pytest.approx(HALF_TOL_FLOOR[torch.float16] * math.hypot(6.5, 7.5))
    assert res.all_converged and res.rounds <= 13, res.rounds_per_sample
    for b in range(4):
        err = rel_err(res.x0[b], ref[b])
        assert err <= max(tol, 2 * rel_err(moved[b], ref[b])), (b, err / tol)


def test_guided_half_study_runs_quick(tmp_path):
    """``bench/solver_studies.py guided-half`` at --quick sizes: its command line stays true, it
    reports a floor per (dtype, scale) and the rule before and now on every half chain."""
    from test_bench_scripts import ROOT, _load

    if not (ROOT / "bench" / "solver_studies.py").exists():
        pytest.skip("run from a source checkout")
    report = _load("solver_studies").main(["guided-half", "--quick", "--out", str(tmp_path / "r.json")])
    assert {(f["dtype"], f["scale"]) for f in report["floors"]} == {
        (str(dt), s) for dt in HALF for s in (1.0, 3.0, 7.5)}
    for dt in map(str, HALF):
        assert {r["variant"] for r in report["rows"] if r["dtype"] == dt} == {"now", "before"}
    assert all(r["converged"] and r["rounds"] <= r["steps"] for r in report["rows"])
