"""Inversion through the fixed point (issue 5): implicit gradients, phantom gradients, invert().

Oracle: plain autograd through the sequential chain (``deqkern.sample_sequential`` is built from
differentiable ops). Model: the analytic Gaussian-mixture denoiser in float64, tiny S. Bounds:

* exact implicit gradient with both solves run to exactness (tol 1e-300, so only the triangular
  structure stops them after S rounds): relative error <= 1e-8 (observed ~1e-15);
* adjoint solved to ``tol = 1e-6`` (forward exact): relative error <= 1e-4.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import rel_err
from gmm import GMMDenoiser

import deqkern
from deqkern.inversion import (
    GradConfig, ImplicitStats, InvertConfig, ddim_encode, invert, sample_with_implicit_grad, sequential_chain,
)
from deqkern.model import ModelEvaluator

S = 8
SHAPE = (2, 2, 4)
EXACT = dict(solver="picard", tol=1e-300)  # forward: Picard, exact after S rounds


def _sched(ddim, eta=0.0, clip=False, steps=S):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config({**ddim.config, "clip_sample": clip, "clip_sample_range": 1.0})
    return deqkern.Schedule.from_diffusers(sched, steps, eta=eta)


def _inputs(batch, eta, steps=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *SHAPE, generator=g, dtype=torch.float64)
    noise = torch.randn(steps, batch, *SHAPE, generator=g, dtype=torch.float64) if eta else None
    target = 0.5 * torch.randn(batch, *SHAPE, generator=g, dtype=torch.float64)
    return x, noise, target


def _reference_grads(model, x, noise, target, sched):
    """dL/dx_T and dL/dz by autograd through the sequential chain, L = sum (x0 - target)^2."""
    xa = x.clone().requires_grad_()
    za = None if noise is None else noise.clone().requires_grad_()
    loss = (deqkern.sample_sequential(model, xa, sched, za).x0 - target).square().sum()
    loss.backward()
    return xa.grad, None if za is None else za.grad


def _implicit_grads(model, x, noise, target, sched, grad="exact", grad_options=None, stats=None, **forward):
    xb = x.clone().requires_grad_()
    zb = None if noise is None else noise.clone().requires_grad_()
    x0 = sample_with_implicit_grad(model, xb, sched, zb, grad, grad_options=grad_options, stats=stats, **forward)
    (x0 - target).square().sum().backward()
    return xb.grad, None if zb is None else zb.grad


# ---------------------------------------------------------------------- exact implicit gradient
# the scan form needs affine steps: clip_sample (nonlinear) is covered by drift and plain only
CHAINS = [(eta, clip, form) for eta, clip in [(0.0, False), (0.5, False), (0.0, True), (1.0, True)]
          for form in ("drift", "plain", "scan") if not (clip and form == "scan")]
ADJOINT_SOLVERS = [("picard", None), ("anderson", {"mixing": "row"}), ("anderson", {"mixing": "sample"}),
                   ("anderson", {"mixing": "triangular"})]


@pytest.mark.parametrize("eta,clip,form", CHAINS)
@pytest.mark.parametrize("solver,opts", ADJOINT_SOLVERS, ids=["picard", "and-row", "and-sample", "and-tri"])
def test_exact_gradient_equals_sequential_backprop(gmm64, ddim, eta, clip, form, solver, opts):
    sched = _sched(ddim, eta, clip)
    x, noise, target = _inputs(2, eta)
    ref_x, ref_z = _reference_grads(gmm64, x, noise, target, sched)
    stats = ImplicitStats()
    cfg = GradConfig(solve={"solver": solver, "solver_options": opts, "tol": 1e-300}, form=form)
    g_x, g_z = _implicit_grads(gmm64, x, noise, target, sched, grad_options=cfg, stats=stats, **EXACT)
    assert rel_err(g_x, ref_x) <= 1e-8
    if eta:
        assert rel_err(g_z, ref_z) <= 1e-8
    assert stats.backward_rounds == S and stats.backward_converged  # triangular: exact after S rounds
    assert stats.backward_evals == (S + 1) * S * 2  # graph build + one VJP row per step, sample, round


@pytest.mark.parametrize("eta,clip", [(0.0, False), (1.0, True)])
@pytest.mark.parametrize("window", [None, 3])
def test_recomputed_vjps_in_a_window_give_the_exact_gradient(gmm64, ddim, eta, clip, window):
    """``vjp="recompute"``: each round re-evaluates only its live rows with autograd, so memory
    is O(window) instead of O(S); the gradient is the same, and only live rows are computed
    (S*B per round without a window — the same count as the stored graph's VJPs — fewer with)."""
    sched = _sched(ddim, eta, clip)
    x, noise, target = _inputs(2, eta)
    ref_x, ref_z = _reference_grads(gmm64, x, noise, target, sched)
    stats = ImplicitStats()
    cfg = GradConfig(solve={"tol": 1e-300, "window": window}, vjp="recompute")
    g_x, g_z = _implicit_grads(gmm64, x, noise, target, sched, grad_options=cfg, stats=stats, **EXACT)
    assert rel_err(g_x, ref_x) <= 1e-8
    if eta:
        assert rel_err(g_z, ref_z) <= 1e-8
    assert stats.backward_converged and stats.backward_rounds == S
    live_rows = sum(min(window or S, S - r) for r in range(S)) * 2  # one row freezes per round here
    assert stats.backward_evals == live_rows


@pytest.mark.parametrize("eta,clip", [(0.0, False), (0.5, True)])
def test_adjoint_tolerance(gmm64, ddim, eta, clip):
    """Stopped by its tolerance, the drift-form adjoint needs fewer than S rounds and stays accurate."""
    steps = 20
    sched = _sched(ddim, eta, clip, steps)
    x, noise, target = _inputs(3, eta, steps, seed=1)
    ref_x, ref_z = _reference_grads(gmm64, x, noise, target, sched)
    stats = ImplicitStats()
    g_x, g_z = _implicit_grads(gmm64, x, noise, target, sched, grad_options={"tol": 1e-6}, stats=stats, **EXACT)
    assert rel_err(g_x, ref_x) <= 1e-4
    if eta:
        assert rel_err(g_z, ref_z) <= 1e-4
    assert stats.backward_converged and stats.backward_rounds < steps
    assert len(stats.adjoint_residuals) == stats.backward_rounds


def test_gradcheck(gmm64, ddim):
    """torch.autograd.gradcheck on the autograd.Function, float64, w.r.t. x_T and the noise."""
    steps = 4
    sched = _sched(ddim, 0.5, steps=steps)
    x, noise, _ = _inputs(1, 0.5, steps, seed=2)
    cfg = GradConfig(solve={"solver": "picard", "tol": 1e-300})

    def fn(x_T, z):
        return sample_with_implicit_grad(gmm64, x_T, sched, z, grad_options=cfg, **EXACT)

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), noise.requires_grad_()), eps=1e-6, atol=1e-6)


def test_sequential_chain_baseline_is_plain_autograd(gmm64, ddim):
    """The checkpointed baseline gives the same value and gradient as the un-checkpointed chain."""
    sched = _sched(ddim, 0.5, clip=True)
    x, noise, target = _inputs(2, 0.5, seed=3)
    ref_x, ref_z = _reference_grads(gmm64, x, noise, target, sched)
    xa, za = x.clone().requires_grad_(), noise.clone().requires_grad_()
    (sequential_chain(ModelEvaluator(gmm64), xa, sched, za) - target).square().sum().backward()
    assert rel_err(xa.grad, ref_x) <= 1e-12 and rel_err(za.grad, ref_z) <= 1e-12


# ---------------------------------------------------------------------- phantom gradient
def test_phantom_one_step_is_a_scaled_residual(gmm64, ddim):
    """k=1: the model Jacobian is dropped. Drift form: dL/dx_T = tau dL/dx0, dL/dz_k = tau sigma_k dL/dx0;
    scan form (the paper's): dL/dx_T = tau prod(A) dL/dx0. No model evaluation in backward."""
    sched = _sched(ddim, 0.5)
    x, noise, target = _inputs(2, 0.5, seed=4)
    tau = 0.1
    stats = ImplicitStats()
    g_x, g_z = _implicit_grads(gmm64, x, noise, target, sched, "phantom", {"phantom_tau": tau}, stats, **EXACT)
    with torch.no_grad():
        dl = 2 * (deqkern.sample_sequential(gmm64, x, sched, noise).x0 - target)
    assert rel_err(g_x, tau * dl) <= 1e-10
    assert rel_err(g_z, tau * sched.sigma.view(S, 1, 1, 1, 1) * dl) <= 1e-10
    assert stats.backward_evals == 0 and stats.backward_rounds == 0
    g_scan, _ = _implicit_grads(gmm64, x, noise, target, sched.with_form("scan"), "phantom", {"phantom_tau": tau},
                                **EXACT)
    assert rel_err(g_scan, tau * float(sched.a_coef.prod()) * dl) <= 1e-10


@pytest.mark.parametrize("steps", [1, 3])
def test_phantom_is_approximate_but_a_descent_direction(gmm64, ddim, steps):
    """Not the gradient (asserted), but positively correlated with it and a small step along it
    lowers the loss."""
    sched = _sched(ddim)
    x, _, _ = _inputs(2, 0.0, seed=5)
    with torch.no_grad():
        target = deqkern.sample_sequential(gmm64, x + 0.3 * torch.randn_like(x), sched).x0
    ref, _ = _reference_grads(gmm64, x, None, target, sched)
    stats = ImplicitStats()
    g, _ = _implicit_grads(gmm64, x, None, target, sched, "phantom", {"phantom_steps": steps}, stats, **EXACT)
    cos = float((g * ref).sum() / (g.norm() * ref.norm()))
    assert 0.3 < cos < 1 - 1e-6
    with torch.no_grad():
        def loss(v):
            return float((deqkern.sample_sequential(gmm64, v, sched).x0 - target).square().sum())
        assert loss(x - 1e-2 * g / g.norm()) < loss(x)
    assert stats.backward_evals == (0 if steps == 1 else (2 * steps - 1) * S * 2)


# ---------------------------------------------------------------------- invert()
def _target(model, sched, batch=2, seed=6, noise=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *SHAPE, generator=g, dtype=torch.float64)
    with torch.no_grad():
        return deqkern.sample_sequential(model, x, sched, noise).x0


@pytest.mark.parametrize("method", ["implicit", "phantom", "sequential_backprop"])
def test_invert_reduces_loss_and_reports_costs(gmm64, ddim, method):
    sched = _sched(ddim, steps=10)
    target = _target(gmm64, sched)
    res = invert(gmm64, target, sched, method, max_steps=25, lr=0.05, target_limit=None, exact_curve=True)
    first, last = res.curve[0], res.curve[-1]
    assert res.stop_reason == "max_steps" and res.steps == 25 and len(res.curve) == 26
    assert res.loss < 0.2 * first.exact_loss
    assert res.reconstruction.shape == target.shape and res.x_T.shape == target.shape
    # costs: cumulative, the DDIM-encoding init (S*B model rows) included; the last point is
    # only evaluated (no backward), so the totals are its counts
    assert res.init_evals == 10 * 2 and first.model_evals > res.init_evals
    assert all(b.model_evals > a.model_evals and b.wall_time >= a.wall_time for a, b in zip(res.curve, res.curve[1:]))
    assert res.model_evals == last.model_evals == res.init_evals + res.forward_evals + res.backward_evals
    if method == "sequential_backprop":
        assert res.backward_evals == 25 * 2 * 10 * 2  # recompute + VJP per step, sample, update
    if method == "implicit":
        assert all(p.backward_rounds >= 1 for p in res.curve[:-1])


class _WithParameter(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.w = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x, t):
        return self.inner(x, t) * self.w


@pytest.mark.parametrize("method", ["implicit", "phantom", "sequential_backprop"])
def test_model_parameters_get_no_gradient(gmm64, ddim, method):
    model = _WithParameter(gmm64)
    sched = _sched(ddim, steps=6)
    invert(model, _target(gmm64, sched), sched, method, max_steps=2, target_limit=None,
           grad_options={"phantom_steps": 2})
    assert model.w.grad is None


def test_implicit_and_sequential_backprop_take_the_same_steps(gmm64, ddim):
    """Same gradient => the same optimisation path (up to the solves' tolerances)."""
    sched = _sched(ddim, steps=10)
    target = _target(gmm64, sched, seed=7)
    opts = dict(max_steps=8, lr=0.05, target_limit=None)
    imp = invert(gmm64, target, sched, "implicit", tol=1e-10, grad_options={"tol": 1e-10}, **opts)
    seq = invert(gmm64, target, sched, "sequential_backprop", **opts)
    assert rel_err(imp.x_T, seq.x_T) <= 1e-6
    assert max(abs(a.loss - b.loss) / b.loss for a, b in zip(imp.curve, seq.curve)) <= 1e-6


def test_invert_stochastic_chain_optimises_noise_too(gmm64, ddim):
    sched = _sched(ddim, eta=0.5, steps=10)
    g = torch.Generator().manual_seed(8)
    noise = torch.randn(10, 2, *SHAPE, generator=g, dtype=torch.float64)
    target = _target(gmm64, sched, noise=torch.randn(10, 2, *SHAPE, generator=g, dtype=torch.float64))
    res = invert(gmm64, target, sched, "implicit", noise=noise, optimize_noise=True, max_steps=15, lr=0.05,
                 target_limit=None)
    assert res.loss < 0.5 * res.curve[0].loss
    assert res.noise is not None and not torch.equal(res.noise, noise)


def test_invert_stops_on_threshold_and_budgets(gmm64, ddim):
    sched = _sched(ddim, steps=10)
    target = _target(gmm64, sched, seed=9)
    kw = dict(lr=0.05, target_limit=None, max_steps=1000)
    first = invert(gmm64, target, sched, "phantom", max_steps=0, target_limit=None).curve[0].loss
    res = invert(gmm64, target, sched, "phantom", loss_threshold=0.5 * first, **kw)
    assert res.stop_reason == "loss_threshold" and res.curve[-1].loss <= 0.5 * first
    assert res.first_reaching(0.5 * first) is res.curve[-1]
    res = invert(gmm64, target, sched, "sequential_backprop", eval_budget=500, **kw)
    assert res.stop_reason == "eval_budget" and res.model_evals >= 500 > res.curve[-2].model_evals
    res = invert(gmm64, target, sched, "implicit", time_budget=1e-9, **kw)
    assert res.stop_reason == "time_budget" and res.steps == 0


def test_ddim_encode(gmm64, ddim):
    """Exact when the model output does not depend on x (the only approximation is evaluating the
    model one step off), including the noise of a stochastic chain; a good start for the GMM."""

    def const(x, t):
        return torch.cos(t.double()).view(-1, 1, 1, 1).expand(x.shape) * 0.3

    for eta in (0.0, 0.7):
        sched = _sched(ddim, eta)
        x, noise, _ = _inputs(2, eta, seed=10)
        with torch.no_grad():
            x0 = deqkern.sample_sequential(const, x, sched, noise).x0
        assert rel_err(ddim_encode(ModelEvaluator(const), x0, sched, noise), x) <= 1e-10
    sched = _sched(ddim, steps=10)
    target = _target(gmm64, sched, seed=11)
    res = invert(gmm64, target, sched, "ddim_encode", target_limit=None)
    noise_start = invert(gmm64, target, sched, "phantom", init="noise", max_steps=0, target_limit=None)
    assert res.steps == 0 and res.model_evals == 2 * 10 * 2 and res.loss < noise_start.loss


# ---------------------------------------------------------------------- bad input
class _ShapedGMM(GMMDenoiser):
    """The GMM with a diffusers-style ``config`` naming its latent shape."""

    config = SimpleNamespace(in_channels=2, sample_size=(2, 4))


@pytest.fixture
def shaped(ddim):
    return _ShapedGMM(ddim.alphas_cumprod, SHAPE, dtype=torch.float64)


def test_bad_input(shaped, ddim):
    sched = _sched(ddim)
    good = torch.zeros(2, *SHAPE, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"target_x0: expected shape \[B, 2, 2, 4\]"):
        invert(shaped, torch.zeros(2, 1, 4, 4, dtype=torch.float64), sched)
    with pytest.raises(ValueError, match="target_x0: expected shape"):
        invert(shaped, torch.zeros(8, dtype=torch.float64), sched)
    with pytest.raises(ValueError, match=r"target_x0: values reach 255"):
        invert(shaped, good + 255, sched)
    with pytest.raises(ValueError, match="target_x0: contains NaN"):
        invert(shaped, good + float("nan"), sched)
    with pytest.raises(ValueError, match="noise: the schedule is stochastic"):
        invert(shaped, good, _sched(ddim, eta=0.5))
    with pytest.raises(FloatingPointError, match="loss_fn: the loss is not finite"):
        invert(shaped, good, sched, "implicit", loss_fn=lambda x0, t: (x0 - t).sum() * float("nan"))
    with pytest.raises(ValueError, match="method"):
        invert(shaped, good, sched, "newton")
    with pytest.raises(ValueError, match="not options of InvertConfig"):
        invert(shaped, good, sched, learning_rate=0.1)
    with pytest.raises(ValueError, match="lr"):
        invert(shaped, good, sched, lr=-1.0)
    with pytest.raises(ValueError, match="grad_options.form"):
        invert(shaped, good, _sched(ddim, clip=True), grad_options={"form": "scan"})
    with pytest.raises(ValueError, match="grad_options.solve.tol"):
        GradConfig(solve={"tol": 0})
    with pytest.raises(ValueError, match="grad_options.window: expected an integer >= 1"):
        invert(shaped, good, sched, grad_options={"window": 0})
    with pytest.raises(ValueError, match="grad_options.vjp: expected 'stored' or 'recompute'"):
        GradConfig(vjp="checkpoint")
    with pytest.raises(ValueError, match="grad"):
        sample_with_implicit_grad(shaped, good, sched, grad="ift")
    with pytest.raises(ValueError, match="optimize_noise"):
        invert(shaped, good, sched, optimize_noise=True)
    with pytest.raises(ValueError, match="x_T_init"):
        invert(shaped, good, sched, x_T_init=torch.zeros(3, *SHAPE, dtype=torch.float64))
    assert isinstance(InvertConfig(), InvertConfig)


def test_invert_cli_runs_every_method_briefly(tmp_path):
    """``python -m deqkern.invert`` end to end on one held-out digit, S = 5, a 1 s budget per
    method, the implicit method with a recomputed adjoint in a window; it writes its report."""
    import json

    from deqkern.inversion import METHODS
    from deqkern.invert import main

    argv = ["--steps", "5", "--num-images", "1", "--budget", "1", "--max-steps", "3", "--adjoint-window", "2",
            "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "inversion.json").read_text())
    runs = {r["method"] for r in report["runs"]}
    assert runs == set(METHODS) and (tmp_path / "inversion.png").exists()
    with pytest.raises(SystemExit):
        main(["--adjoint-window", "0"])
