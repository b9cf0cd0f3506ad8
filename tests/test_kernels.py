"""Tier 2 (and 3): the Triton kernels against the float64 reference.

Without CUDA the kernels run under triton's CPU interpreter (marker ``interpreter``); on a CUDA
machine the same tests run the compiled kernels on CUDA tensors (marker ``gpu``), plus a CUDA
graph capture/replay test. Triton decides whether ``@triton.jit`` compiles or interprets when a
kernel is *decorated* (and decorates its own standard library when triton is first imported), so
``TRITON_INTERPRET=1`` is set here at collection, before anything imports triton, and the
launchers are imported inside the fixture. :mod:`deqkern.ops.dispatch` is imported *before* the
variable is set: it reads it once, so the rest of the session keeps running CPU ops on the
reference. The engine under the kernels runs in a subprocess (:func:`test_engine_on_kernels`).

Inputs are fresh random fp32 (the interpreter's comfortable dtype) unless stated; every buffer the
launchers allocate starts as NaN so an element a kernel forgets to write fails the comparison.
Bounds are norm-wise relative errors against the float64 reference of the same inputs.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import deqkern.ops.dispatch  # first, before TRITON_INTERPRET is set: see above
from deqkern.ops import reference
from deqkern.schedule import X0Transform

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
_TRITON_PRELOADED = "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytestmark = pytest.mark.gpu if CUDA else pytest.mark.interpreter

RTOL_ROWS = 1e-5  # g, f, mixed iterate: a handful of fp32 roundings per element
RTOL_SUMS = 1e-4  # norms and Gram row: fp32 sums over D
RTOL_SOLVE = 1e-9  # Anderson weights: both in float64


@pytest.fixture(scope="module")
def ops():
    """:mod:`deqkern.ops.triton_ops`, interpreted on CPU / compiled on CUDA (skips with the reason
    when that cannot be arranged)."""
    pytest.importorskip("triton")
    if not CUDA:
        if _TRITON_PRELOADED:
            pytest.skip("triton was imported before TRITON_INTERPRET could be set; run this file on its own")
        if os.environ["TRITON_INTERPRET"].lower() not in ("1", "true", "on", "yes"):
            pytest.skip(f"no CUDA and TRITON_INTERPRET={os.environ['TRITON_INTERPRET']} set by the environment")
    from deqkern.ops import triton_ops

    return triton_ops


def dev(args: dict) -> dict:
    """The tensors of ``args`` on the test device (inputs are drawn on the CPU: same on both)."""
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def f64(args: dict) -> dict:
    """The float tensors of ``args`` in float64 on the CPU: the reference's inputs."""
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in args.items()}


@contextmanager
def poisoned_allocations():
    """Every ``torch.empty`` (the launchers' only allocator) returns NaN (integers: 127)."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else 127)

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


def check(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Relative L2 error ``||got - want|| / ||want||`` in float64 within ``rtol``; the NaN/inf
    patterns must agree; the message names the worst element."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = got.detach().cpu().double(), want.detach().cpu().double()
    finite = torch.isfinite(w)
    mismatch = torch.isfinite(g) != finite
    if mismatch.any():
        idx = tuple(torch.nonzero(mismatch)[0].tolist())
        raise AssertionError(f"{name}: non-finite mismatch at {idx}: got {g[idx].item()}, want {w[idx].item()}")
    diff = (g - w).where(finite, torch.zeros_like(g))
    err = float(diff.norm() / w.where(finite, torch.zeros_like(w)).norm().clamp(min=1e-300))
    if err > rtol:
        idx = tuple(torch.nonzero(diff.abs() == diff.abs().max())[0].tolist())
        raise AssertionError(
            f"{name}: relative error {err:.2e} > {rtol:.0e}; worst at {idx}: got {g[idx].item()}, want {w[idx].item()}"
        )


# ---------------------------------------------------------------------------------- scan-residual
def _scan_inputs(batch, width, dim, m, form, has_z, n_rows, gen, dtype=torch.float32):
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    coef = torch.rand(batch, width, 7, generator=gen, dtype=torch.float64) * 2 - 1
    coef[..., 0] = 1.0 if form == "drift" else 0.9 + 0.2 * torch.rand(batch, width, generator=gen)
    coef[..., 6] = coef[..., 6].abs() * 0.5  # sigma >= 0
    return dict(
        xw=randn(batch, width + 1, dim), e=randn(batch, width, dim), z=randn(batch, width, dim) if has_z else None,
        coef=coef.to(dtype), n_rows=torch.tensor(n_rows, dtype=torch.int64),
        hist_f=randn(m, batch, width, dim) if m else None,
    )


SCAN_CASES = [
    # (B, W, D, block_d, m, form, clip, z, n_rows): W not a power of two, D not a multiple of the
    # block, several D-blocks, dead rows (n < W, n = 0), W = 1, every history length class
    (1, 5, 37, None, 0, "drift", False, False, [4]),
    (3, 7, 300, 128, 3, "scan", False, True, [7, 5, 0]),
    (3, 7, 300, 128, 8, "drift", True, True, [7, 5, 0]),
    (1, 6, 513, 256, 1, "scan", False, False, [6]),
    (3, 1, 130, 128, 3, "drift", True, False, [1, 0, 1]),
    (2, 4, 16, None, 8, "scan", False, True, [2, 4]),
]


@pytest.mark.parametrize("batch,width,dim,block,m,form,clip,has_z,n_rows", SCAN_CASES)
def test_scan_residual_matches_reference(ops, batch, width, dim, block, m, form, clip, has_z, n_rows):
    gen = torch.Generator().manual_seed(batch * 1000 + width * 100 + dim + m)
    args = _scan_inputs(batch, width, dim, m, form, has_z, n_rows, gen)
    transform = X0Transform("clip", 0.8) if clip else X0Transform()
    with poisoned_allocations():
        got = ops.scan_residual(**dev(args), transform=transform, block_d=block)
    want = reference.scan_residual(**f64(args), transform=transform)
    check("g", got.g, want.g, RTOL_ROWS)
    check("f", got.f, want.f, RTOL_ROWS)
    check("f_sq", got.f_sq, want.f_sq, RTOL_SUMS)
    check("g_sq", got.g_sq, want.g_sq, RTOL_SUMS)
    if m:
        check("gram", got.gram, want.gram, RTOL_SUMS)
    else:
        assert got.gram is None
    assert torch.equal(got.nonfinite.cpu(), want.nonfinite.float()) and not want.nonfinite.any()
    assert got.g.dtype == got.f.dtype == torch.float32 and got.f_sq.dtype == torch.float32
    for b, n in enumerate(n_rows):  # dead rows: exactly the iterate, exactly zero residual
        assert torch.equal(got.g[b, n:].cpu(), args["xw"][b, n + 1:])
        assert not got.f[b, n:].any() and not got.f_sq[b, n:].any()
        if m:
            assert not got.gram[b, n:].any()


def test_scan_residual_counts_non_finite_model_outputs(ops):
    """NaN and +-inf in ``e`` are counted per live row (exactly, as the reference); dead rows'
    ``e`` is never read, so non-finite values there count nothing and leave g and f exact."""
    args = _scan_inputs(2, 6, 300, 2, "drift", False, [4, 6], torch.Generator().manual_seed(8))
    e = args["e"]
    e[0, 1, 5], e[0, 1, 299], e[0, 3, 0] = float("nan"), float("inf"), -float("inf")  # live rows 1 and 3
    e[0, 4, :7] = float("nan")  # dead row (n = 4)
    e[1, 5, 130:140] = float("inf")  # live, in the second D-block at BLOCK_D = 128
    with poisoned_allocations():
        got = ops.scan_residual(**dev(args), transform=X0Transform(), block_d=128)
    want = reference.scan_residual(**f64(args), transform=X0Transform())
    expected = torch.zeros(2, 6)
    expected[0, 1], expected[0, 3], expected[1, 5] = 2, 1, 10
    assert torch.equal(want.nonfinite.float(), expected)
    assert torch.equal(got.nonfinite.cpu(), expected)
    assert torch.equal(got.g[0, 4:].cpu(), args["xw"][0, 5:]) and not got.f[0, 4:].any()


def test_scan_residual_clip_changes_the_answer(ops):
    """The clip branch is live in the cases above: clamping changes g."""
    args = _scan_inputs(1, 4, 64, 0, "drift", False, [4], torch.Generator().manual_seed(5))
    clipped = ops.scan_residual(**dev(args), transform=X0Transform("clip", 0.8))
    plain = ops.scan_residual(**dev(args), transform=X0Transform("clip", 100.0))
    assert (clipped.g - plain.g).abs().max() > 1e-2


def test_scan_residual_fp64_is_exact_to_fp64(ops):
    args = _scan_inputs(2, 5, 100, 3, "scan", True, [5, 3], torch.Generator().manual_seed(3), torch.float64)
    got = ops.scan_residual(**dev(args), transform=X0Transform("clip", 0.8), block_d=128)
    want = reference.scan_residual(**args, transform=X0Transform("clip", 0.8))
    assert got.g.dtype == got.f_sq.dtype == torch.float64
    for name in ("g", "f", "f_sq", "g_sq", "gram"):
        check(name, getattr(got, name), getattr(want, name), 1e-12)


def test_scan_residual_fp16_inputs(ops):
    """fp16 in and out, fp32 accumulation; the bound is fp16 rounding of the stored g and f."""
    args = _scan_inputs(2, 5, 100, 3, "drift", True, [5, 2], torch.Generator().manual_seed(4), torch.float16)
    got = ops.scan_residual(**dev(args), transform=X0Transform(), block_d=128)
    want = reference.scan_residual(**f64(args), transform=X0Transform())
    assert got.g.dtype == torch.float16 and got.f_sq.dtype == torch.float32
    check("g", got.g, want.g, 2e-3)
    check("f", got.f, want.f, 2e-3)
    check("gram", got.gram, want.gram, 2e-3)


def test_scan_residual_rejects_bad_input(ops):
    args = dev(_scan_inputs(1, 3, 8, 0, "drift", False, [3], torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="threshold"):
        ops.scan_residual(**args, transform=X0Transform("threshold"))
    with pytest.raises(ValueError, match="e: expected shape"):
        ops.scan_residual(**{**args, "e": args["e"][:, :2]}, transform=X0Transform())
    with pytest.raises(TypeError, match="z: expected dtype"):
        ops.scan_residual(**{**args, "z": args["e"].double()}, transform=X0Transform())
    with pytest.raises(ValueError, match="block_d"):
        ops.scan_residual(**args, transform=X0Transform(), block_d=96)
    with pytest.raises(ValueError, match="hist_f: expected 1 to 8"):
        ops.scan_residual(**{**args, "hist_f": torch.zeros(9, 1, 3, 8, device=DEVICE)}, transform=X0Transform())


# ---------------------------------------------------------------------------------- Anderson solve
def _spd_problems(r, m, gen):
    """Grams of random residual sets of very different scales, random masks with ``newest`` valid."""
    f = torch.randn(r, m, 3 * m, generator=gen, dtype=torch.float64)
    f = f * torch.logspace(-3, 3, r, dtype=torch.float64).view(r, 1, 1)
    gram = f @ f.transpose(1, 2)
    valid = torch.rand(r, m, generator=gen) < 0.7
    newest = torch.randint(0, m, (r,), generator=gen)
    valid[torch.arange(r), newest] = True
    return gram, valid, newest


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("ridge", [1e-3, 0.0])
def test_anderson_solve_matches_reference(ops, m, ridge):
    gram, valid, newest = _spd_problems(24, m, torch.Generator().manual_seed(m))
    with poisoned_allocations():
        alpha, ok = ops.anderson_weights(gram.to(DEVICE), valid.to(DEVICE), newest.to(DEVICE), ridge)
    alpha, ok = alpha.cpu(), ok.cpu()
    want_alpha, want_ok = reference.anderson_weights(gram, valid, newest, ridge)
    assert alpha.dtype == torch.float64 and ok.dtype == torch.bool
    assert torch.equal(ok, want_ok) and bool(ok.all())
    check("alpha", alpha, want_alpha, RTOL_SOLVE)
    assert torch.allclose(alpha.sum(-1), torch.ones(24, dtype=torch.float64))
    assert not alpha[~valid].any()  # invalid slots get exactly zero weight


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the interpreter divides by the zero pivot
def test_anderson_solve_singular_and_degenerate(ops):
    m = 3
    gram, valid, newest = _spd_problems(5, m, torch.Generator().manual_seed(9))
    valid[0] = False  # no usable slot: the border row is zero, singular -> fallback
    gram[1] = 1.0  # three identical residuals, no ridge: exactly singular -> fallback
    valid[1] = True
    gram[2, 1, 1] = float("nan")  # non-finite Gram -> fallback
    valid[2, 1] = True
    gram[3] = 0.0  # converged rows (all residuals zero): the ridge floor keeps it solvable
    valid[3] = True
    alpha, ok = ops.anderson_weights(gram.to(DEVICE), valid.to(DEVICE), newest.to(DEVICE), 0.0)
    alpha, ok = alpha.cpu(), ok.cpu()
    want_alpha, want_ok = reference.anderson_weights(gram, valid, newest, 0.0)
    assert ok.tolist() == want_ok.tolist() == [False, False, False, True, True]
    fallback = torch.nn.functional.one_hot(newest[:3], m).double()
    assert torch.equal(alpha[:3], fallback)
    check("alpha", alpha, want_alpha, RTOL_SOLVE)
    assert torch.allclose(alpha[3], torch.full((m,), 1 / m, dtype=torch.float64))


def test_anderson_solve_option(ops, monkeypatch):
    """The dispatcher on the Triton backend: ``solve="kernel"`` runs the Triton kernel,
    ``"solve_ex"`` the reference, both equal to the float64 reference; a bad name is refused. On
    CPU the dispatcher read TRITON_INTERPRET before it was set (module docstring): it is told here."""
    monkeypatch.setattr(deqkern.ops.dispatch, "_INTERPRET", True)
    launches = []
    kernel = ops.anderson_weights
    monkeypatch.setattr(ops, "anderson_weights", lambda *args: launches.append(1) or kernel(*args))
    gram, valid, newest = _spd_problems(6, 3, torch.Generator().manual_seed(2))
    want = reference.anderson_weights(gram, valid, newest, 1e-3)
    gram, valid, newest = gram.to(DEVICE), valid.to(DEVICE), newest.to(DEVICE)
    for solve, kernel_launches in (("kernel", 1), ("solve_ex", 0)):
        launches.clear()
        with poisoned_allocations():
            alpha, ok = deqkern.ops.dispatch.anderson_weights(gram, valid, newest, 1e-3, solve=solve)
        assert len(launches) == kernel_launches, solve
        check("alpha", alpha, want[0], RTOL_SOLVE)
        assert torch.equal(ok.cpu(), want[1])
    with pytest.raises(ValueError, match="solve"):
        deqkern.ops.dispatch.anderson_weights(gram, valid, newest, 1e-3, solve="lu")


# ---------------------------------------------------------------------------------- Anderson mix
def _mix_inputs(m, batch, width, dim, gen):
    """``(hist_x, hist_f, alpha)`` drawn on the CPU, returned on the test device."""
    hx = torch.randn(m, batch, width, dim, generator=gen)
    hf = torch.randn(m, batch, width, dim, generator=gen)
    alpha = torch.randn(batch, width, m, generator=gen, dtype=torch.float64)
    return hx.to(DEVICE), hf.to(DEVICE), alpha.to(DEVICE)


def _mix_reference(hx, hf, alpha, beta):
    return reference.anderson_mix(hx.cpu().double(), hf.cpu().double(), alpha.cpu(), beta)


@pytest.mark.parametrize("m,batch,width,dim,block", [(1, 1, 5, 37, None), (3, 3, 7, 300, 128), (8, 2, 3, 513, 256)])
def test_anderson_mix_matches_reference(ops, m, batch, width, dim, block):
    hx, hf, alpha = _mix_inputs(m, batch, width, dim, torch.Generator().manual_seed(m + dim))
    with poisoned_allocations():
        got = ops.anderson_mix(hx, hf, alpha, 0.7, block_d=block)
    assert got.dtype == torch.float32 and got.shape == (batch, width, dim)
    check("x_new", got, _mix_reference(hx, hf, alpha, 0.7), RTOL_ROWS)


def test_anderson_mix_into_strided_out(ops):
    """``out`` a strided view (stride 2 along D, batch and window swapped): written in place, the
    elements between the view's stay untouched."""
    m, batch, width, dim = 3, 3, 5, 200
    hx, hf, alpha = _mix_inputs(m, batch, width, dim, torch.Generator().manual_seed(7))
    buf = torch.full((width, batch, 2 * dim + 1), float("nan"), device=DEVICE)
    out = buf.transpose(0, 1)[..., 1::2]
    got = ops.anderson_mix(hx, hf, alpha, 1.0, out=out, block_d=128)
    assert got.data_ptr() == out.data_ptr()
    check("x_new", out, _mix_reference(hx, hf, alpha, 1.0), RTOL_ROWS)
    assert buf[..., 0::2].isnan().all()


def test_anderson_mix_into_fp16_out(ops):
    """The model-dtype path: fp32 history, fp16 output, rounded once from the fp32 sum."""
    m, batch, width, dim = 8, 2, 3, 130
    hx, hf, alpha = _mix_inputs(m, batch, width, dim, torch.Generator().manual_seed(8))
    out = torch.full((batch, width, dim), float("nan"), dtype=torch.float16, device=DEVICE)
    ops.anderson_mix(hx, hf, alpha, 0.5, out=out)
    want = _mix_reference(hx, hf, alpha, 0.5)
    check("x_new", out, want, 1e-3)
    assert torch.equal(out.cpu(), want.float().half())  # one rounding: the fp32 sum differs from fp64 by << fp16 ulp


def test_anderson_mix_bf16_history(ops):
    m, batch, width, dim = 3, 1, 2, 40
    hx, hf, alpha = _mix_inputs(m, batch, width, dim, torch.Generator().manual_seed(1))
    try:
        got = ops.anderson_mix(hx.bfloat16(), hf.bfloat16(), alpha, 1.0)
    except Exception as err:  # noqa: BLE001 - whatever the interpreter raises, the reason is shown
        if CUDA:
            raise
        pytest.skip(f"triton's CPU interpreter cannot run bfloat16 here: {type(err).__name__}: {err}")
    check("x_new", got, _mix_reference(hx.bfloat16(), hf.bfloat16(), alpha, 1.0), 1e-2)


def test_anderson_mix_fp64_is_exact_to_fp64(ops):
    """fp64 history with a damping that fp32 cannot represent (0.7): exact to fp64 rounding, so
    ``beta`` reaches the kernel as fp64 (an unannotated float would be fp32 on a GPU)."""
    m, batch, width, dim = 4, 2, 3, 300
    hx, hf, alpha = _mix_inputs(m, batch, width, dim, torch.Generator().manual_seed(9))
    with poisoned_allocations():
        got = ops.anderson_mix(hx.double(), hf.double(), alpha, 0.7, block_d=128)
    assert got.dtype == torch.float64
    check("x_new", got, _mix_reference(hx, hf, alpha, 0.7), 1e-12)


# ---------------------------------------------------------------------------------- CUDA graphs
@pytest.mark.gpu
def test_round_of_kernels_replays_in_a_cuda_graph(ops):
    """scan + status + solve + mix captured once, outputs poisoned after capture, replayed:
    bit-identical to eager launches (fixed launch configs, no order-dependent atomics — the
    status kernel's one atomic is a max —, no host sync inside the round)."""
    if not CUDA:
        pytest.skip("needs a CUDA device (CUDA graph capture)")
    m, batch, width, dim = 5, 2, 9, 1000
    gen = torch.Generator().manual_seed(11)
    scan = dev(_scan_inputs(batch, width, dim, m, "scan", True, [9, 4], gen))
    gram, valid, newest = (t.to(DEVICE) for t in _spd_problems(batch * width, m, gen))
    hx, hf, _ = _mix_inputs(m, batch, width, dim, gen)
    out = torch.empty(batch, width, dim, dtype=torch.float16, device=DEVICE)
    status = dev(_status_inputs(batch, width, 3 * width, 4, torch.float32, gen))
    status.update(n_rows=scan["n_rows"])

    def round_():
        res = ops.scan_residual(**scan, transform=X0Transform("clip", 0.8))
        delta = ops.round_status(**{**status, "f_sq": res.f_sq, "g_sq": res.g_sq, "nonfinite": res.nonfinite},
                                 stop="x0", tol=1e-3, dim=dim)
        alpha, ok = ops.anderson_weights(gram, valid, newest, 1e-3)
        ops.anderson_mix(hx, hf, alpha.view(batch, width, m), 1.0, out=out)
        return [res.g, res.f, res.f_sq, res.g_sq, res.gram, res.nonfinite, delta, status["worst"], alpha, ok, out]

    side = torch.cuda.Stream()  # warm-up (compiles every kernel) off the capture stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        round_()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = round_()
    eager = [t.clone() for t in round_()]
    state_after_eager = {k: status[k].clone() for k in ("res_log", "done_round", "bad_t")}
    for t in captured:
        t.fill_(False if t.dtype == torch.bool else float("nan") if t.is_floating_point() else -1)
    graph.replay()
    torch.cuda.synchronize()
    names = ("g", "f", "f_sq", "g_sq", "gram", "nonfinite", "delta", "worst", "alpha", "ok", "out")
    for name, got, want in zip(names, captured, eager):
        assert torch.equal(got, want), f"{name} differs after replay"
    # the status kernel's in/out state (one log row, done, bad_t: max-accumulated) is not poisoned:
    # its updates are idempotent, so every replay leaves what the eager calls left
    for name in ("res_log", "done_round", "bad_t"):
        assert torch.equal(status[name], state_after_eager[name]), f"{name} differs after replay"


# ---------------------------------------------------------------------------------- whole engine
_ENGINE_SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
import deqkern
from deqkern.ops import dispatch
from gmm import GMMDenoiser
dev = torch.device(sys.argv[1])
S = 12
betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
ac = torch.cumprod(1 - betas, 0).float()
ts = list(range(1000 - 1000 // S, -1, -(1000 // S)))[:S]
sched = deqkern.Schedule.ddim(ac, ts, eta=0.5, transform=deqkern.X0Transform("clip", 1.5))
model = GMMDenoiser(ac, (2, 2, 4)).to(dev)
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 2, 2, 4, generator=g).to(dev)
noise = torch.randn(S, 2, 2, 2, 4, generator=g).to(dev)
ref = deqkern.sample_sequential(model, x, sched, noise, execution="eager").x0
out = {"backend": dispatch.backend_for(x)}
cases = [("picard", "picard", "kernel", "eager"), ("anderson-kernel", "anderson", "kernel", "eager"),
         ("anderson-solve_ex", "anderson", "solve_ex", "eager"), ("anderson-static", "anderson", "kernel", "static"),
         ("anderson-audit", "anderson", "kernel", "audit"), ("anderson-solve_ex-audit", "anderson", "solve_ex", "audit"),
         ("picard-secant-static", "picard", "kernel", "static"), ("picard-relative-static", "picard", "kernel", "static"),
         ("picard-noise-static", "picard", "kernel", "static")]
if dev.type == "cuda":
    cases.append(("anderson-graph", "anderson", "kernel", "graph"))
for name, solver, solve, execution in cases:
    dispatch.ANDERSON_SOLVE = solve
    form = "secant" if name.endswith("secant-static") else None  # per-row multipliers in the scan kernel
    stop = next((rule for rule in ("relative", "noise") if rule in name), "x0")  # each rule in the status kernel
    res = deqkern.sample(model, x, sched, solver=solver, tol=1e-5, window=5, noise=noise, execution=execution, form=form,
                         stop=stop)
    out[name] = {"converged": res.all_converged, "rounds": res.rounds,
                 "err": float((res.x0 - ref).double().norm() / ref.double().norm()), "info": str(res.info.get("graph"))}
out["triton_loaded"] = "triton" in sys.modules
print(json.dumps(out))
"""


def test_engine_on_kernels(ops):
    """The whole parallel solve with every op dispatched to the kernels (clipped, stochastic DDIM,
    a sliding window, so rows die and the history shifts; every stopping rule; eager and
    fixed-shape "static" rounds,
    the same audited as a CUDA graph would replay them (deqkern.graph_audit), the secant form's
    per-row multipliers, CUDA-graphed rounds on CUDA; both Anderson solve paths) equals the
    sequential sampler. In a
    subprocess, where dispatch sees TRITON_INTERPRET (CPU) at import."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).parent)
    if not CUDA:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", _ENGINE_SCRIPT, DEVICE.type], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["backend"] == "triton" and out["triton_loaded"]
    cases = [k for k in out if k not in ("backend", "triton_loaded")]
    assert len(cases) == (10 if CUDA else 9)
    for name in cases:
        assert out[name]["converged"], out
        assert out[name]["err"] <= 1e-4, out
    if CUDA:
        assert out["anderson-graph"]["info"] == "True", f"graph capture fell back: {out}"


# ---------------------------------------------------------------------------------- commit-window
@pytest.mark.parametrize("has_init,extrapolate", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16])
@pytest.mark.parametrize("batch,width,dim", [(3, 5, 37), (1, 1, 130), (4, 7, 200)])
def test_commit_window(ops, batch, width, dim, has_init, extrapolate, out_dtype):
    """Freeze + slide + next model input in one pass == the reference, exactly when it only moves
    values (a select and a gather); with ``extrapolate`` the entering rows are ``last + k (last -
    prev)``: within 1e-6 relative (a GPU may fuse it into an FMA); every (delta, n) corner across
    the batch, incl. done samples and n = 1 (the anchor as the previous row)."""
    gen = torch.Generator().manual_seed(batch * 100 + width + dim)
    steps = 3 * width
    n = torch.randint(0, width + 1, (batch,), generator=gen)
    n[0] = 0  # a finished sample: nothing live, nothing accepted
    delta = torch.minimum(torch.randint(0, width + 1, (batch,), generator=gen), n)
    if batch > 1:
        delta[-1] = n[-1]  # every live row accepted
    if batch > 2:
        n[1], delta[1] = 1, 0  # one live row, extrapolated from the anchor
    k0 = torch.randint(0, steps - width, (batch,), generator=gen)
    args = dict(
        xw=torch.randn(batch, width + 1, dim, generator=gen), mixed=torch.randn(batch, width, dim, generator=gen),
        g=torch.randn(batch, width, dim, generator=gen), delta=delta, n_rows=n, k0=k0,
        init=torch.randn(steps + 1, batch, dim, generator=gen) if has_init else None, extrapolate=extrapolate,
    )
    want = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    want_out = torch.full((batch, width, dim), float("nan"), dtype=out_dtype) if out_dtype else None
    reference.commit_window(**want, out=want_out)
    got = dev(args)
    got_out = torch.full((batch, width, dim), float("nan"), dtype=out_dtype, device=DEVICE) if out_dtype else None
    with poisoned_allocations():
        ops.commit_window(**got, out=got_out)
    bound = 1e-6 if extrapolate else 0.0
    check("xw", got["xw"], want["xw"], bound)
    if out_dtype is not None:
        check("out", got_out, want_out, 1e-3 if extrapolate and out_dtype == torch.float16 else bound)


@pytest.mark.parametrize("noisy,broadcast", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("batch,width,dim", [(3, 5, 37), (1, 1, 130), (4, 7, 200)])
def test_commit_window_ahead(ops, batch, width, dim, noisy, broadcast):
    """``ahead``: the entering rows are the chain stepped from the last computed row with the last
    live row's model output held, ``v <- cx_q v + co_q u (+ sigma_q z_q)`` once per position past
    it. The reference equals that loop written out by hand in float64 (1e-12 relative); the kernel
    equals the reference within 1e-5 in float32 (FMAs), frozen and kept rows exactly moved; every
    (delta, n) corner, incl. a done sample and n = 1; with and without step noise; the outputs
    also as one row per sample broadcast over the window (stride 0: what a multistep chain's
    engine passes, engine.held_converted)."""
    gen = torch.Generator().manual_seed(batch * 10 + width + dim + noisy + 2 * broadcast)
    steps = 3 * width + 2
    coef = torch.randn(steps, 7, generator=gen, dtype=torch.float64)
    coef[:, 1] = 1 + 0.1 * torch.rand(steps, generator=gen, dtype=torch.float64)  # cx
    coef[:, 2] = -0.2 * torch.rand(steps, generator=gen, dtype=torch.float64)  # co
    coef[:, 6] = 0.3 * torch.rand(steps, generator=gen, dtype=torch.float64)  # sigma
    noise = torch.randn(steps, batch, dim, generator=gen, dtype=torch.float64) if noisy else None
    n = torch.randint(0, width + 1, (batch,), generator=gen)
    n[0] = 0
    delta = torch.minimum(torch.randint(0, width + 1, (batch,), generator=gen), n)
    if batch > 1:
        delta[-1] = n[-1]
    if batch > 2:
        n[1], delta[1] = 1, 0
    k0 = torch.randint(0, steps - 2 * width, (batch,), generator=gen)
    e0 = torch.randn(batch, width if not broadcast else 1, dim, generator=gen, dtype=torch.float64)
    as_rows = (lambda v: v.expand(batch, width, dim)) if broadcast else (lambda v: v)  # noqa: E731
    e = as_rows(e0)
    args = dict(
        xw=torch.randn(batch, width + 1, dim, generator=gen, dtype=torch.float64),
        mixed=torch.randn(batch, width, dim, generator=gen, dtype=torch.float64),
        g=torch.randn(batch, width, dim, generator=gen, dtype=torch.float64), delta=delta, n_rows=n, k0=k0,
    )
    want = {k: v.clone() for k, v in args.items()}
    full = torch.cat([want["xw"][:, :1], torch.where(
        (torch.arange(width) < delta.unsqueeze(1)).unsqueeze(-1), want["g"], want["mixed"])], dim=1)
    reference.commit_window(**want, ahead=(e, coef, noise))
    held = 0
    for b in range(1, batch):
        if int(n[b]) == 0:  # inactive: kept (test_commit_window_keeps_inactive_windows)
            continue
        for i in range(width + 1):
            src = i + int(delta[b])
            if src <= int(n[b]):
                continue
            x = full[b, int(n[b])].clone()
            for q in range(int(k0[b] + n[b]), int(k0[b]) + src):  # by hand, one step at a time
                x = coef[q, 1] * x + coef[q, 2] * e[b, int(n[b]) - 1] + (coef[q, 6] * noise[q, b] if noisy else 0.0)
            check(f"held row {b},{i}", want["xw"][b, i], x, 1e-12)
            held += 1
    assert held or width == 1 or batch == 1
    got = dev({k: v.float() if v.is_floating_point() else v for k, v in args.items()})
    out = torch.full((batch, width, dim), float("nan"), device=DEVICE)
    z = noise.float().to(DEVICE) if noisy else None
    with poisoned_allocations():
        ops.commit_window(**got, out=out, ahead=(as_rows(e0.float().to(DEVICE)), coef.float().to(DEVICE), z))
    check("xw", got["xw"], want["xw"].float(), 1e-5)
    check("out", out, want["xw"][:, :width].float(), 1e-5)

@pytest.mark.parametrize("has_init,extrapolate", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_commit_window_keeps_inactive_windows(ops, impl, has_init, extrapolate):
    """An inactive sample (n = 0, delta = 0: done, or a round past max_iters inside a fixed-shape
    chunk) keeps every row of its window bit for bit, and its next model input is that window
    (before the fix, the rows were overwritten from the anchor: the x0 estimate went stale)."""
    gen = torch.Generator().manual_seed(11)
    batch, width, dim = 3, 4, 37
    xw = torch.randn(batch, width + 1, dim, generator=gen)
    args = dict(
        xw=xw.clone(), mixed=torch.randn(batch, width, dim, generator=gen), g=torch.randn(batch, width, dim, generator=gen),
        delta=torch.tensor([0, 2, 0]), n_rows=torch.tensor([0, 3, 0]), k0=torch.tensor([5, 1, 12]),
        init=torch.randn(13, batch, dim, generator=gen) if has_init else None, extrapolate=extrapolate,
    )
    out = torch.full((batch, width, dim), float("nan"), device=DEVICE)
    got = dev(args)
    with poisoned_allocations():
        (reference if impl == "reference" else ops).commit_window(**got, out=out)
    for b in (0, 2):
        check(f"xw[{b}]", got["xw"][b], xw[b], 0.0)
        check(f"out[{b}]", out[b], xw[b, :width], 0.0)
    assert not torch.equal(got["xw"][1].cpu(), xw[1]), "the active sample's window must move"


# ---------------------------------------------------------------------------------- round-status
def _status_inputs(batch, width, steps, max_iters, dtype, gen):
    """Squared norms spread over decades around the tolerances (so every row outcome occurs),
    zeros and a NaN row; n, k0 and rounds over every corner: inactive samples, windows ending
    before and at x0, a log row at max_iters."""
    f = torch.exp(torch.empty(batch, width, dtype=torch.float64).uniform_(-20, -4, generator=gen)).to(dtype)
    g = torch.exp(torch.empty(batch, width, dtype=torch.float64).uniform_(-1, 1, generator=gen)).to(dtype)
    f[0, 0], g[-1, -1] = 0.0, 0.0
    f[-1, 0] = g[-1, 0] * 2 * reference.LINEAR_REACH**2  # past the x0 rule's first order: infinite cost
    if batch > 2:
        f[2, width // 2] = float("nan")
    k0 = torch.randint(0, steps, (batch,), generator=gen)
    k0[0] = steps - min(width, steps)  # window reaching x0 exactly
    if batch > 1:
        k0[1] = steps  # done
    n = torch.where(k0 < steps, (steps - k0).clamp(max=width), 0)
    nonfinite = torch.zeros(batch, width, dtype=dtype)
    nonfinite[torch.rand(batch, width, generator=gen) < 0.2] = 3.0  # some rows, live or dead
    return dict(
        f_sq=f, g_sq=g, nonfinite=nonfinite, t=torch.randint(0, 1000, (batch, width), generator=gen),
        bad_t=torch.randint(-1, 500, (max_iters + 1,), generator=gen),
        n_rows=n, k0=k0, rounds=torch.tensor(int(torch.randint(0, max_iters + 2, (1,), generator=gen))),
        noise_var=torch.rand(steps, generator=gen, dtype=torch.float64) * 1e-3 + 1e-6,
        worst=torch.full((batch,), float("nan"), dtype=torch.float64),
        res_log=torch.randn(max_iters + 1, batch, generator=gen, dtype=torch.float64),
        done_round=torch.randint(0, 5, (batch,), generator=gen),
        # multipliers of either sign; budgets spent from none to past the smaller tolerances
        mult=(torch.rand(batch, width, generator=gen, dtype=torch.float64) * 3 - 1.5).to(dtype),
        spent=torch.rand(batch, generator=gen, dtype=torch.float64) * 1e-3,
        **_secants(batch, width, torch.Generator().manual_seed(gen.initial_seed() + 1)),
    )


def _secants(batch, width, gen):
    """The x0 rule's measured secants on about two thirds of the rows (NaN: none): gains below and
    above the latents' (``h`` about 1), ``||J - L||`` from far below to above the fallback's 2."""
    def some(lo, hi):
        v = torch.exp(torch.empty(batch, width, dtype=torch.float64).uniform_(lo, hi, generator=gen))
        return torch.where(torch.rand(batch, width, generator=gen) < 0.35, float("nan"), v)

    return {"gain": some(-1, 2), "dev": some(-8, 1)}


def _rounding_floor(f_sq, gen):
    """A half-precision model's rounding floor per row (float64): on about half the rows between 0
    and twice the row's residual (so residuals below, at and above it), 0 on the others."""
    share = torch.rand(f_sq.shape, generator=gen, dtype=torch.float64) * 2
    rho = f_sq.to(torch.float64).nan_to_num(0.0).sqrt() * share
    return torch.where(torch.rand(f_sq.shape, generator=gen) < 0.5, rho, 0.0)


@pytest.mark.parametrize("stop", ["relative", "noise", "x0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,width,steps,block_w", [(5, 7, 19, None), (4, 40, 40, 16), (3, 1, 3, None)])
@pytest.mark.parametrize("with_floor", [False, True])
def test_round_status_matches_reference(ops, stop, dtype, batch, width, steps, block_w, with_floor):
    """Rows to freeze, ``done_round`` and ``bad_t`` (the largest timestep of a live row with
    non-finite outputs, an atomic max across samples) exactly; ``worst`` and the window residual logged within
    1e-6 relative (the kernel sums the window in blocks: another order than torch's), the x0 rule's
    ``spent`` (fp64 sums) within 1e-12; ``worst``
    poisoned with NaN, the log with random values (only row ``min(rounds, max_iters)`` changes).
    W not a power of two, windows wider than the block (the loop), W = 1, fp32 and fp64 norms;
    with and without a half-precision model's rounding floor (read by the x0 rule only)."""
    gen = torch.Generator().manual_seed(batch * 1000 + width * 10 + steps)
    for tol in (1e-4, 1e-2, 0.5):  # few, some and most rows passing
        args = _status_inputs(batch, width, steps, 6, dtype, gen)
        floor = _rounding_floor(args["f_sq"], gen) if with_floor else None
        want = {k: v.clone() for k, v in args.items()}
        want_delta = reference.round_status(**want, stop=stop, tol=tol, dim=37, floor=floor)
        got = dev(args)
        with poisoned_allocations():
            got_delta = ops.round_status(**got, stop=stop, tol=tol, dim=37, block_w=block_w,
                                         floor=None if floor is None else dev({"floor": floor})["floor"])
        assert got_delta.cpu().tolist() == want_delta.tolist(), (tol, got_delta, want_delta)
        assert got["done_round"].cpu().tolist() == want["done_round"].tolist()
        assert got["bad_t"].cpu().tolist() == want["bad_t"].tolist()
        check("worst", got["worst"], want["worst"], 1e-6)
        check("res_log", got["res_log"], want["res_log"], 1e-6)
        check("spent", got["spent"], want["spent"], 1e-12)
        assert int(want_delta.sum()) > 0  # the cases exercise freezing, not only the no-op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,width,steps,block_w", [(5, 7, 19, None), (4, 40, 40, 16), (3, 1, 3, None)])
def test_round_status_past_charge_matches_reference(ops, dtype, batch, width, steps, block_w):
    """The x0 rule with the charge for the chain past a sliding window (``past``, per sample: 1,
    a factor up to 100 and inf, which leaves a zero cost at 0): rows to freeze exactly and ``spent``
    within 1e-12 of the reference; the charge freezes no more rows than without it."""
    gen = torch.Generator().manual_seed(batch * 1000 + width * 10 + steps + 7)
    for tol in (1e-4, 1e-2, 0.5):
        args = _status_inputs(batch, width, steps, 6, dtype, gen)
        past = torch.exp(torch.rand(batch, generator=gen, dtype=torch.float64) * math.log(100.0))
        past[0], past[-1] = 1.0, math.inf
        want = {k: v.clone() for k, v in args.items()}
        want_delta = reference.round_status(**want, stop="x0", tol=tol, dim=37, past=past)
        plain = reference.round_status(**{k: v.clone() for k, v in args.items()}, stop="x0", tol=tol, dim=37)
        got = dev(args)
        with poisoned_allocations():
            got_delta = ops.round_status(**got, stop="x0", tol=tol, dim=37, block_w=block_w,
                                         past=dev({"past": past})["past"])
        assert got_delta.cpu().tolist() == want_delta.tolist(), (tol, got_delta, want_delta)
        check("spent", got["spent"], want["spent"], 1e-12)
        assert bool((want_delta <= plain).all()) and int(want_delta[0]) == int(plain[0])


def test_round_status_rejects_bad_input(ops):
    gen = torch.Generator().manual_seed(0)
    args = dev(_status_inputs(2, 4, 9, 3, torch.float32, gen))
    with pytest.raises(ValueError, match="stop: expected one of"):
        ops.round_status(**args, stop="residual", tol=1e-3, dim=4)
    with pytest.raises(ValueError, match="f_sq: expected float32 or float64"):
        ops.round_status(**{**args, "f_sq": args["f_sq"].half()}, stop="x0", tol=1e-3, dim=4)
    with pytest.raises(ValueError, match="k0: expected int64"):
        ops.round_status(**{**args, "k0": args["k0"].int()}, stop="x0", tol=1e-3, dim=4)
    with pytest.raises(ValueError, match="bad_t: expected int64"):
        ops.round_status(**{**args, "bad_t": args["bad_t"][:2]}, stop="x0", tol=1e-3, dim=4)
    with pytest.raises(ValueError, match="res_log: expected float64"):
        ops.round_status(**{**args, "res_log": args["res_log"].float()}, stop="x0", tol=1e-3, dim=4)
    with pytest.raises(ValueError, match="spent: expected float64"):
        ops.round_status(**{**args, "spent": args["spent"].float()}, stop="x0", tol=1e-3, dim=4)
    with pytest.raises(ValueError, match="mult: expected shape"):
        ops.round_status(**{**args, "mult": args["mult"][:, :2]}, stop="x0", tol=1e-3, dim=4)
    with pytest.raises(ValueError, match="floor: expected float64"):
        ops.round_status(**args, stop="x0", tol=1e-3, dim=4, floor=args["f_sq"].sqrt())
