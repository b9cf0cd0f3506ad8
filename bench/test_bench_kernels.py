"""Micro-benchmarks of the per-round ops: Triton kernel vs the eager PyTorch reference vs
``torch.compile`` of the reference, plus torchdeq's Anderson iteration as the peer.

    pytest bench/ --benchmark-only            # timings (meaningful on a GPU only)
    pytest bench/ -q --benchmark-disable      # run every benchmark once: do they work?

Every benchmark first makes one untimed call on the inputs it then times, its output buffers
poisoned with NaN, and checks the result against the float64 reference
(:mod:`deqkern.ops.reference`) within a stated relative error (the helpers and bounds of
``tests/test_kernels.py``); that call also compiles. Each op's bandwidth is computed from the bytes
one call must read and write (:func:`bytes_moved`, from the tensors' shapes and dtypes) and
compared with a device-to-device copy timed the same way (``benchmark.extra_info``:
``bytes_moved``, ``gbps``, ``copy_gbps``, ``fraction_of_copy``). One timed call is ``REPS``
launches followed by one device sync (host timer around synchronized work, launch overhead
amortized). On CUDA the sizes are a 64-step
window of 4 SD latents (4x64x64): N = 4.2M floats per tensor, larger than the L2 of an H100
together; without CUDA they are tiny and the kernels run under the interpreter (see conftest.py).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import statistics
import time

import pytest
import torch
from test_kernels import RTOL_ROWS, RTOL_SOLVE, RTOL_SUMS, check, f64, poisoned_allocations

from deqkern.ops import reference
from deqkern.schedule import X0Transform

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
#: (B, W, D, m): batch, window rows, latent size, Anderson history (DEQ-DDIM's m = 5)
SIZES = (4, 64, 4 * 64 * 64, 5) if CUDA else (2, 6, 256, 3)
REPS = 10 if CUDA else 1
IMPLS = ["triton", "eager", "compiled"]
RTOL_FP16 = 1e-3  # an fp16 model input: one rounding to fp16 (unit roundoff 2^-11)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _timed(fn):
    """The callable the benchmarks time: ``REPS`` calls, then one device sync."""

    def run():
        for _ in range(REPS):
            fn()
        _sync()

    return run


def _median_seconds(fn, rounds: int = 20) -> float:
    run = _timed(fn)
    run()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / REPS


@pytest.fixture(scope="session")
def copy_gbps() -> float:
    """Device-to-device copy bandwidth (read + write bytes / s) of one window-sized tensor."""
    batch, width, dim, _ = SIZES
    x = torch.randn(batch * width * dim * 4, device=DEVICE)  # 4 tensors' worth: out of L2
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / _median_seconds(lambda: y.copy_(x)) / 1e9


def _implementation(impl: str, op: str):
    """The function ``op`` of ``impl``, or a skip with the reason."""
    if impl == "triton":
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed")
        from deqkern.ops import triton_ops

        return getattr(triton_ops, op)
    fn = getattr(reference, op)
    if impl == "compiled":
        if not CUDA:
            pytest.skip("torch.compile of the reference is measured on CUDA only: on this CPU it spends "
                        "tens of seconds compiling C++ per op and the interpreter-sized inputs measure nothing")
        return torch.compile(fn)
    return fn


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for name in ("triton", "torchdeq"):
        if importlib.util.find_spec(name) is not None:
            out[name] = importlib.metadata.version(name)
    return out


def bytes_moved(read, written) -> int:
    """Bytes one call reads plus writes: the sizes of the tensors in ``read`` and ``written``
    (``None`` skipped), the traffic a fused kernel cannot avoid; ``gbps`` is this over the time."""
    return sum(t.numel() * t.element_size() for t in (*read, *written) if t is not None)


def _oracle_args(args: dict) -> dict:
    """Fresh float64 copies of ``args``' tensors (integers copied as they are): the reference's
    inputs, untouched by the in-place ops that the benchmarks run on ``args``."""
    return f64({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()})


def _first_call(fn):
    """The untimed first call (it compiles), every buffer it allocates poisoned with NaN."""
    with poisoned_allocations():
        out = fn()
    _sync()
    return out


def _bench(benchmark, fn, nbytes: int, copy_gbps: float, group: str) -> None:
    """Time ``fn``, whose checked first call (:func:`_first_call`) the caller has made."""
    benchmark.group = group
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if CUDA else "cpu (Triton kernels interpreted)", **_versions(),
        bytes_moved=nbytes, reps_per_call=REPS, copy_gbps=float(f"{copy_gbps:.4g}"),
        sizes="B={} W={} D={} m={}".format(*SIZES),
    )
    benchmark(_timed(fn))
    if benchmark.stats is not None:  # None under --benchmark-disable
        gbps = nbytes / (benchmark.stats.stats.median / REPS) / 1e9
        benchmark.extra_info.update(gbps=float(f"{gbps:.4g}"), fraction_of_copy=float(f"{gbps / copy_gbps:.3g}"))


def _scan_args(with_history: bool):
    batch, width, dim, m = SIZES
    g = torch.Generator(device=DEVICE).manual_seed(0)
    coef = torch.rand(batch, width, 7, device=DEVICE, generator=g)
    coef[..., 0] = 1.0  # drift form: the reference takes its cumsum path
    return dict(
        xw=torch.randn(batch, width + 1, dim, device=DEVICE, generator=g),
        e=torch.randn(batch, width, dim, device=DEVICE, generator=g),
        z=torch.randn(batch, width, dim, device=DEVICE, generator=g),
        coef=coef, n_rows=torch.full((batch,), width, device=DEVICE),
        transform=X0Transform("clip", 1.0),
        hist_f=torch.randn(m, batch, width, dim, device=DEVICE, generator=g) if with_history else None,
    )


def _mix_args():
    batch, width, dim, m = SIZES
    g = torch.Generator(device=DEVICE).manual_seed(1)
    alpha = torch.softmax(torch.randn(batch, width, m, device=DEVICE, generator=g, dtype=torch.float64), -1)
    return dict(
        hist_x=torch.randn(m, batch, width, dim, device=DEVICE, generator=g),
        hist_f=torch.randn(m, batch, width, dim, device=DEVICE, generator=g), alpha=alpha, beta=1.0,
    )


def _solve_args():
    batch, width, _, m = SIZES
    g = torch.Generator(device=DEVICE).manual_seed(2)
    f = torch.randn(batch * width, m, 4 * m, device=DEVICE, generator=g, dtype=torch.float64)
    return dict(
        gram=f @ f.transpose(1, 2), valid=torch.ones(batch * width, m, dtype=torch.bool, device=DEVICE),
        newest=torch.zeros(batch * width, dtype=torch.int64, device=DEVICE), ridge=1e-3,
    )


def _scan_bytes(args: dict, res: reference.ScanResult) -> int:
    read = [args[k] for k in ("xw", "e", "z", "coef", "n_rows", "hist_f")]
    return bytes_moved(read, [res.g, res.f, res.f_sq, res.g_sq, res.gram, res.nonfinite])


def _mix_bytes(args: dict, mixed: torch.Tensor) -> int:
    return bytes_moved([args["hist_x"], args["hist_f"], args["alpha"]], [mixed])


def _solve_bytes(args: dict, alpha: torch.Tensor, ok: torch.Tensor) -> int:
    return bytes_moved([args["gram"], args["valid"], args["newest"]], [alpha, ok])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_history", [False, True], ids=["picard", "anderson"])
def test_scan_residual(benchmark, copy_gbps, impl, with_history):
    fn = _implementation(impl, "scan_residual")
    args = _scan_args(with_history)
    want = reference.scan_residual(**_oracle_args(args))
    got = _first_call(lambda: fn(**args))
    check("g", got.g, want.g, RTOL_ROWS)
    check("f", got.f, want.f, RTOL_ROWS)
    for name in ("f_sq", "g_sq", "nonfinite") + (("gram",) if with_history else ()):
        check(name, getattr(got, name), getattr(want, name), RTOL_SUMS)
    group = f"scan_residual[{'anderson' if with_history else 'picard'}]"
    _bench(benchmark, lambda: fn(**args), _scan_bytes(args, got), copy_gbps, group)


@pytest.mark.parametrize("impl", IMPLS)
def test_anderson_mix(benchmark, copy_gbps, impl):
    fn = _implementation(impl, "anderson_mix")
    args = _mix_args()
    got = _first_call(lambda: fn(**args))
    check("mixed", got, reference.anderson_mix(**_oracle_args(args)), RTOL_ROWS)
    _bench(benchmark, lambda: fn(**args), _mix_bytes(args, got), copy_gbps, "anderson_mix")


def _commit_args():
    batch, width, dim, _ = SIZES
    g = torch.Generator(device=DEVICE).manual_seed(3)
    return dict(
        xw=torch.randn(batch, width + 1, dim, device=DEVICE, generator=g),
        mixed=torch.randn(batch, width, dim, device=DEVICE, generator=g),
        g=torch.randn(batch, width, dim, device=DEVICE, generator=g),
        delta=torch.full((batch,), 2, device=DEVICE), n_rows=torch.full((batch,), width, device=DEVICE),
        out=torch.full((batch, width, dim), float("nan"), device=DEVICE, dtype=torch.float16),
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_commit_window(benchmark, copy_gbps, impl):
    """Freeze + slide + fp16 model input: reads one source row per row, writes xw and the input."""
    fn = _implementation(impl, "commit_window")
    args = _commit_args()
    want = _oracle_args(args)
    reference.commit_window(**want)
    _first_call(lambda: fn(**args))
    check("xw", args["xw"], want["xw"], 0.0)  # a select and a gather: exact
    check("out", args["out"], want["out"], RTOL_FP16)
    # one source row (anchor, g or mixed) read per row of xw
    nbytes = bytes_moved([args["xw"], args["delta"], args["n_rows"]], [args["xw"], args["out"]])
    _bench(benchmark, lambda: fn(**args), nbytes, copy_gbps, "commit_window")


@pytest.mark.parametrize("impl", IMPLS)
def test_anderson_solve(benchmark, copy_gbps, impl):
    """``B*W`` bordered systems; far from bandwidth-bound (launches and tiny arithmetic): the
    bytes are reported for completeness, the time per call is the number that matters."""
    fn = _implementation(impl, "anderson_weights")
    args = _solve_args()
    want_alpha, want_ok = reference.anderson_weights(**_oracle_args(args))
    alpha, ok = _first_call(lambda: fn(**args))
    check("alpha", alpha, want_alpha, RTOL_SOLVE)
    assert torch.equal(ok.cpu(), want_ok.cpu()) and bool(want_ok.all())
    _bench(benchmark, lambda: fn(**args), _solve_bytes(args, alpha, ok), copy_gbps, "anderson_solve")


def _status_args():
    batch, width, _, _ = SIZES
    g = torch.Generator(device=DEVICE).manual_seed(4)
    steps, max_iters = 2 * width, 8
    return dict(
        f_sq=torch.rand(batch, width, device=DEVICE, generator=g) * 1e-3,
        g_sq=torch.rand(batch, width, device=DEVICE, generator=g) + 0.5,
        nonfinite=torch.zeros(batch, width, device=DEVICE), t=torch.zeros(batch, width, dtype=torch.int64, device=DEVICE),
        bad_t=torch.full((max_iters + 1,), -1, dtype=torch.int64, device=DEVICE),
        n_rows=torch.full((batch,), width, device=DEVICE), k0=torch.zeros(batch, dtype=torch.int64, device=DEVICE),
        rounds=torch.zeros((), dtype=torch.int64, device=DEVICE),
        noise_var=torch.ones(steps, dtype=torch.float64, device=DEVICE),
        worst=torch.full((batch,), float("nan"), dtype=torch.float64, device=DEVICE),
        res_log=torch.full((max_iters + 1, batch), float("nan"), dtype=torch.float64, device=DEVICE),
        done_round=torch.zeros(batch, dtype=torch.int64, device=DEVICE),
        mult=torch.ones(batch, width, device=DEVICE), spent=torch.zeros(batch, dtype=torch.float64, device=DEVICE),
        # the x0 rule's measured secants on every row: the rule's full path (both passes)
        gain=torch.rand(batch, width, dtype=torch.float64, device=DEVICE, generator=g) + 0.5,
        dev=torch.rand(batch, width, dtype=torch.float64, device=DEVICE, generator=g) * 1e-2,
        stop="x0", tol=1e-3, dim=64,
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_round_status(benchmark, copy_gbps, impl):
    """The stopping test and bookkeeping of a round: a few hundred bytes, so launch-bound — the
    kernel's point is one launch instead of about forty; time per call is the number."""
    fn = _implementation(impl, "round_status")
    args = _status_args()
    want = _oracle_args(args)
    want_delta = reference.round_status(**want)
    delta = _first_call(lambda: fn(**args))
    for name, got, expected in (("delta", delta, want_delta), ("done_round", args["done_round"], want["done_round"]),
                                ("bad_t", args["bad_t"], want["bad_t"])):
        assert got.cpu().tolist() == expected.cpu().tolist(), name
    check("worst", args["worst"], want["worst"], RTOL_ROWS)
    check("res_log", args["res_log"], want["res_log"], RTOL_SUMS)
    check("spent", args["spent"], want["spent"], RTOL_SUMS)
    # the [B, W] norms and timesteps and the [B] state in, delta, the state and one log row out
    # (noise_var is read by the noise rule only)
    read = [args[k] for k in ("f_sq", "g_sq", "nonfinite", "t", "n_rows", "k0", "done_round", "mult", "spent", "gain",
                              "dev")]
    nbytes = bytes_moved(read, [delta, args["worst"], args["done_round"], args["res_log"][0], args["spent"]])
    _bench(benchmark, lambda: fn(**args), nbytes, copy_gbps, "round_status")


ROUND_ITERS = 8


def _round_bytes() -> int:
    """Bytes of one of our Anderson rounds: scan with history, solve and mix (outputs' sizes
    from the reference)."""
    scan, solve, mix = _scan_args(True), _solve_args(), _mix_args()
    return (_scan_bytes(scan, reference.scan_residual(**scan)) + _solve_bytes(solve, *reference.anderson_weights(**solve))
            + _mix_bytes(mix, reference.anderson_mix(**mix)))


def test_anderson_round_torchdeq(benchmark, copy_gbps):
    """Peer: one iteration of torchdeq's ``anderson_solver`` (per-row mixing over the B*W rows,
    m and the ridge as ours, the map ``x -> x/2 + 1`` standing in for the scan), to set against
    the sum of our three ops; bytes are those of our fused round. Checked against the map's
    fixed point ``x = 2`` (in float64), which Anderson reaches in a few iterations of this linear
    map; its output is a fresh tensor of torchdeq's, so there is no buffer of ours to poison."""
    if importlib.util.find_spec("torchdeq") is None:
        pytest.skip("torchdeq is not installed (pip install torchdeq==0.1.0)")
    from torchdeq.solver.anderson import anderson_solver

    batch, width, dim, m = SIZES
    x0 = torch.randn(batch * width, dim, device=DEVICE)

    def solve():  # 2 setup iterations + ROUND_ITERS Anderson iterations, never stopping early
        return anderson_solver(lambda x: 0.5 * x + 1, x0, max_iter=ROUND_ITERS + 2, tol=-1.0, m=m, lam=1e-3,
                               return_final=True)[0]

    got = _first_call(solve)
    check("fixed point", got, torch.full(got.shape, 2.0, dtype=torch.float64), RTOL_ROWS)
    _bench(benchmark, solve, ROUND_ITERS * _round_bytes(), copy_gbps, "anderson_round")
    benchmark.extra_info["iterations_per_call"] = ROUND_ITERS


def test_copy(benchmark, copy_gbps):
    """The device-to-device copy every ``fraction_of_copy`` refers to, in the same table."""
    batch, width, dim, _ = SIZES
    x = torch.randn(batch * width * dim * 4, device=DEVICE)
    y = torch.full_like(x, float("nan"))
    _first_call(lambda: y.copy_(x))
    check("copy", y, x, 0.0)
    _bench(benchmark, lambda: y.copy_(x), bytes_moved([x], [y]), copy_gbps, "copy")
