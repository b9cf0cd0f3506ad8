"""The CPU-side capture audit (deqkern.graph_audit): fixed-shape rounds run as a CUDA graph
would replay them, and every hazard a graph would hide is refused with where it came from.

The engine's static rounds must pass the audit in every configuration and give bit-identical
results to plain static execution (the audit's warm-up is undone by the same state restore a
capture uses, so any state missing from the restore shows up as a difference). Models that
sync with the host, or whose calls differ, must be refused with a message naming the cause.
"""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_unet

import deqkern
from deqkern.errors import CaptureHazard
from deqkern.graph_audit import audit_replay

S = 12


def _setup(ddim, eta=0.0, batch=2, seed=0, shape=(2, 2, 4), clip=None):
    sched = deqkern.Schedule.from_diffusers(ddim, S, eta=eta)
    if clip is not None:
        sched = deqkern.Schedule.ddim(
            ddim.alphas_cumprod, sched.timesteps.tolist(), eta=eta,
            transform=deqkern.X0Transform("clip", clip),
        )
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    noise = torch.randn(S, batch, *shape, generator=g, dtype=torch.float64) if eta else None
    return sched, x, noise


@pytest.mark.parametrize(
    "solver,opts,window,eta,clip,form",
    [
        ("picard", None, S, 0.0, None, "drift"),
        ("anderson", {"mixing": "row"}, 5, 0.5, None, "drift"),
        ("anderson", {"mixing": "sample"}, S, 0.0, 1.0, "drift"),
        ("anderson", {"mixing": "triangular"}, 7, 0.3, 1.0, "drift"),
        ("picard", None, 5, 0.3, 1.0, "secant"),
        ("anderson", {"mixing": "triangular"}, S, 0.0, None, "secant"),
    ],
)
def test_static_rounds_pass_the_audit_and_match_static(gmm64, ddim, solver, opts, window, eta, clip, form):
    sched, x, noise = _setup(ddim, eta, clip=clip)
    kw = dict(solver=solver, tol=1e-6, window=window, noise=noise, solver_options=opts, rounds_per_graph=3, form=form)
    with torch.no_grad():
        static = deqkern.sample(gmm64, x, sched, execution="static", **kw)
        audited = deqkern.sample(gmm64, x, sched, execution="audit", **kw)
    assert audited.info["execution"] == "audit" and not audited.info["graph"]
    executed, tail = audited.info["rounds_executed"], audited.info["tail_chunks"]
    assert audited.info["audited_calls"] == (executed - tail) // 3 + tail >= 2
    assert audited.info["ops_per_chunk"] > 0
    assert torch.equal(audited.x0, static.x0)
    assert audited.rounds == static.rounds and audited.converged.tolist() == static.converged.tolist()


def test_unet_with_guidance_low_precision_and_warm_start_passes_the_audit(ddim):
    """A diffusers UNet2DModel (the bench's model class), fp16-free on CPU but with a float32
    model dtype under float64 state, classifier-free guidance on a conditioned stand-in and a warm
    start: all inside the captured rounds."""
    unet = tiny_unet()
    sched, x, _ = _setup(ddim, shape=(1, 8, 8))
    init = torch.randn(S, *x.shape, dtype=torch.float64)
    with torch.no_grad():
        static = deqkern.sample(unet, x, sched, tol=1e-4, model_dtype=torch.float32, init=init,
                                execution="static", rounds_per_graph=2, max_iters=6)
        audited = deqkern.sample(unet, x, sched, tol=1e-4, model_dtype=torch.float32, init=init,
                                 execution="audit", rounds_per_graph=2, max_iters=6)
    assert torch.equal(audited.x0, static.x0) and audited.info["audited_calls"] >= 2

    def conditioned(x, t, cond):
        return 0.1 * x * cond.view(-1, 1, 1, 1)

    g = deqkern.Guidance(
        scale=3.0, cond={"cond": torch.tensor([1.0, 2.0], dtype=torch.float64)},
        uncond={"cond": torch.zeros(1, dtype=torch.float64)},
    )
    with torch.no_grad():
        res = deqkern.sample(conditioned, x, sched, guidance=g, execution="audit", rounds_per_graph=2)
    assert res.info["audited_calls"] >= 2


def test_sequential_steps_pass_the_audit(gmm64, ddim):
    sched, x, noise = _setup(ddim, eta=0.5)
    with torch.no_grad():
        ref = deqkern.sample_sequential(gmm64, x, sched, noise, execution="eager")
        audited = deqkern.sample_sequential(gmm64, x, sched, noise, execution="audit", rounds_per_graph=4)
    assert torch.equal(audited.x0, ref.x0) and audited.info["audited_calls"] == S // 4


class _ItemModel(torch.nn.Module):
    """Reads a value on the host: the graph would freeze it at its capture-time value."""

    def forward(self, x, t):
        return x * float(t.max()) / 1000


class _CountingModel(torch.nn.Module):
    """A Python counter in the computation: eager is right, a replay would repeat call 1."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return x * (0.1 + 1e-3 * self.calls)


class _MaskModel(torch.nn.Module):
    """Boolean-mask indexing: a data-dependent shape (a hidden nonzero)."""

    def forward(self, x, t):
        out = torch.zeros_like(x)
        keep = x > 0
        out[keep] = x[keep]
        return out


class _HostDataModel(torch.nn.Module):
    """torch.tensor(list) in the forward: a host-to-device copy on every call."""

    def forward(self, x, t):
        return x * torch.tensor([0.1, 0.2], dtype=x.dtype).mean()


class _RebindingModel(torch.nn.Module):
    """Keeps the previous output in a buffer it replaces on every call: each call reads a buffer
    the captured call never saw (a graph would keep reading the one it captured)."""

    def __init__(self):
        super().__init__()
        self.prev = None

    def forward(self, x, t):
        out = 0.1 * x if self.prev is None or self.prev.shape != x.shape else 0.1 * x + 0 * self.prev
        self.prev = out.clone()
        return out


@pytest.mark.parametrize(
    "model,match",
    [
        (_ItemModel(), r"syncs with the host:\n  aten::_local_scalar_dense.*test_graph_audit.py:\d+ \(return x \* float"),
        (_CountingModel(), r"call 1 differs from the captured call 0: op \d+ was"),
        (_MaskModel(), r"boolean index: a hidden nonzero"),
        (_HostDataModel(), r"aten::lift_fresh: torch.tensor\(data\) copies host data to the device"),
        (_RebindingModel(), r"call 1 differs from the captured call 0"),
    ],
    ids=["item", "python-counter", "bool-mask", "host-data", "rebound-buffer"],
)
def test_capture_hazards_are_refused_with_their_cause(ddim, model, match):
    sched, x, _ = _setup(ddim)
    with torch.no_grad():
        deqkern.sample(model, x, sched, execution="static", tol=1e-3)  # each is fine without a graph
        with pytest.raises(CaptureHazard, match=match):
            deqkern.sample(model, x, sched, execution="audit", tol=1e-3, rounds_per_graph=2)


def test_state_missing_from_the_restore_is_caught(gmm64, ddim):
    """A chunk that updates state the restore does not know about drifts from call to call."""
    outside = torch.zeros(1)

    def chunk():
        outside.add_(1)
        if int(outside) > 2:  # the graph would never take this branch again
            outside.mul_(2)

    with pytest.raises(CaptureHazard, match="syncs with the host"):
        audit_replay(chunk)
    counter = {"n": 0}

    def drifting():
        counter["n"] += 1
        outside.add_(counter["n"])  # a Python int baked into the op

    with pytest.raises(CaptureHazard, match=r"call 1 differs.*\n  aten::add_\(ext\d+\+0:float32\[1\]/\[1\], 2\)"):
        audit_replay(drifting)


def test_audit_replay_checks_its_arguments():
    with pytest.raises(ValueError, match="calls: expected at least 2"):
        audit_replay(lambda: None, calls=1)
    assert audit_replay(lambda: None).ops_per_call == 0


@pytest.mark.parametrize("name", ["digits", "ddpm-cifar10"])
def test_bench_models_pass_the_audit(name):
    """The models the benchmarks capture: the embedded digits UNet (``python -m deqkern.bench``)
    and diffusers' DDPM CIFAR10 UNet of the GPU end-to-end benchmark (35.7M parameters, random
    weights, with attention), with their own schedulers; S = 4 to keep it to seconds."""
    from deqkern.models import build_paper_unet, load_digits_model

    if name == "digits":
        unet, scheduler = load_digits_model()
        shape = (2, 1, 8, 8)
    else:
        from diffusers import DDPMScheduler

        unet, scheduler = build_paper_unet(name, torch.device("cpu"), torch.float32), DDPMScheduler()
        shape = (1, 3, 32, 32)
    sched = deqkern.Schedule.from_diffusers(scheduler, 4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    noise = torch.randn(4, *shape, generator=gen)  # DDPM: a stochastic chain
    with torch.no_grad():
        res = deqkern.sample(unet, x, sched, noise=noise, execution="audit", rounds_per_graph=1, tol=1e-3)
    assert res.info["audited_calls"] >= 2 and res.info["ops_per_chunk"] > 500


def test_benign_look_alikes_are_not_refused():
    """Ops that look like syncs but are not on a GPU: repeat_interleave with int repeats or with
    ``output_size``, and a Python number written into a tensor (a fill, not a host copy)."""
    x = torch.randn(3, 4)
    reps = torch.tensor([1, 2, 1])
    buf = torch.zeros(3)

    def chunk():
        x.repeat_interleave(2, 0)
        x.repeat_interleave(reps, 0, output_size=4)
        buf[0] = 1.0

    assert audit_replay(chunk).ops_per_call > 0
    with pytest.raises(CaptureHazard, match="repeat_interleave with tensor repeats and no output_size"):
        audit_replay(lambda: x.repeat_interleave(reps, 0))
