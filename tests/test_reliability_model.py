"""Issue 10, model side: gradients through sample(), guided batching, and the model's argument errors.

Oracle for gradients: autograd through the sequential chain (``sample_sequential(...,
execution="eager")``), float64, on a nonlinear model with a timestep-dependent Jacobian. The
parallel forward and the adjoint are solved to ``tol = 1e-10``, so the gradient must match the
oracle to ``GRAD_RTOL = 1e-7`` relative L2 error (observed <= 1e-16; at the default tol 1e-3,
<= 4e-4).
"""
from __future__ import annotations

import pytest
import torch
from conftest import rel_err

import deqkern
from deqkern.model import ModelEvaluator

S = 8
GRAD_RTOL = 1e-7
TIGHT = 1e-10
AC = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
STEPS = list(range(999, -1, -125))  # S = 8


def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A nonlinear eps-model whose Jacobian changes with the timestep."""
    return torch.tanh(0.7 * x) * (0.5 + t.view(-1, *[1] * (x.ndim - 1)) / 1000)


def _chain(kind: str) -> deqkern.Schedule:
    return deqkern.Schedule.ddim(AC, STEPS) if kind == "ddim" else deqkern.Schedule.ddpm(AC, STEPS)


def _inputs(kind: str, seed: int, batch: int = 2, shape=(3, 4)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    noise = torch.randn(S, batch, *shape, generator=g, dtype=torch.float64) if kind == "ddpm" else None
    weight = torch.randn(batch, *shape, generator=g, dtype=torch.float64)  # L = <weight, x0>
    return x, noise, weight


def _oracle(sched):
    """The sequential chain, differentiable by autograd (eager execution)."""
    return lambda a, z: deqkern.sample_sequential(model, a, sched, z, execution="eager")


def _grads(run, x, noise, weight):
    """dL/dx_T and dL/dnoise of L = <weight, x0> where x0 = run(x_T, noise).x0."""
    xa = x.clone().requires_grad_()
    za = None if noise is None else noise.clone().requires_grad_()
    (run(xa, za).x0 * weight).sum().backward()
    return xa.grad, None if za is None else za.grad


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_sample_gradient_is_the_sequential_chains(kind, solver):
    """Item 1: deqkern.sample with a differentiable x_T (and noise) gives autograd's gradient
    through the sequential chain, not the identity that the solver's in-place buffers gave."""
    sched = _chain(kind)
    x, noise, weight = _inputs(kind, seed=11 if solver == "picard" else 12)
    ref_x, ref_z = _grads(_oracle(sched), x, noise, weight)
    got_x, got_z = _grads(lambda a, z: deqkern.sample(model, a, sched, solver, tol=TIGHT, noise=z), x, noise, weight)
    assert rel_err(got_x, ref_x) <= GRAD_RTOL
    if kind == "ddpm":
        assert rel_err(got_z, ref_z) <= GRAD_RTOL


@pytest.mark.parametrize("execution", ["eager", "static", "audit"])
def test_reused_sampler_gradient_and_previous_input_untouched(execution):
    """A reused ParallelSampler gives each call its own exact gradient and writes nothing into
    an earlier call's x_T (its workspace buffers carried the first input's graph). "audit" runs
    the forward as a CUDA graph would (trajectory included), on the CPU."""
    sched = _chain("ddim")
    sampler = deqkern.ParallelSampler(model, sched, "anderson", tol=TIGHT, execution=execution)
    (x1, _, w1), (x2, _, w2) = _inputs("ddim", seed=21), _inputs("ddim", seed=22)
    a = x1.clone().requires_grad_()
    first = sampler(a)
    got, _ = _grads(lambda v, z: sampler(v), x2, None, w2)
    ref, _ = _grads(_oracle(sched), x2, None, w2)
    assert a.grad is None
    assert rel_err(got, ref) <= GRAD_RTOL
    (first.x0 * w1).sum().backward()
    ref1, _ = _grads(_oracle(sched), x1, None, w1)
    assert rel_err(a.grad, ref1) <= GRAD_RTOL


def test_no_graph_without_grad():
    """Without a differentiable input (or with grad mode off) x0 carries no autograd graph."""
    sched = _chain("ddim")
    x, _, _ = _inputs("ddim", seed=3)
    plain = deqkern.sample(model, x, sched)
    with torch.no_grad():
        off = deqkern.sample(model, x.clone().requires_grad_(), sched)
    init = torch.zeros(S, *x.shape, dtype=x.dtype, requires_grad=True)
    warm = deqkern.sample(model, x, sched, init=init)
    for res in (plain, off, warm):
        assert not res.x0.requires_grad and res.x0.grad_fn is None


def test_differentiable_result_reports_the_solve():
    """The routed solve still reports convergence and costs, the trajectory without a graph,
    and the backward's costs in info['grad'] once backward ran."""
    sched = _chain("ddim")
    x, _, w = _inputs("ddim", seed=4)
    xa = x.clone().requires_grad_()
    res = deqkern.sample(model, xa, sched, tol=TIGHT, return_trajectory=True)
    seq = deqkern.sample_sequential(model, x, sched, return_trajectory=True)
    assert res.all_converged and res.model_evals > 0 and res.x0.requires_grad
    assert not res.trajectory.requires_grad
    assert rel_err(res.trajectory, seq.trajectory) <= 1e-8
    (res.x0 * w).sum().backward()
    assert res.info["grad"].backward_rounds >= 1 and res.info["grad"].backward_converged


def test_unconverged_forward_refuses_backward():
    """max_iters too small: the forward is flagged unconverged and backward() raises instead of
    returning the gradient of a point that is not the chain's."""
    sched = _chain("ddim")
    x, _, _ = _inputs("ddim", seed=5)
    res = deqkern.sample(model, x.clone().requires_grad_(), sched, "picard", tol=TIGHT, max_iters=2)
    assert not res.all_converged
    with pytest.raises(RuntimeError, match="max_iters"):
        res.x0.sum().backward()


def test_sequential_non_eager_refuses_differentiable_input():
    """The fixed-buffer sequential executions are not differentiable: said by name, not silent."""
    sched = _chain("ddim")
    x, _, _ = _inputs("ddim", seed=6)
    with pytest.raises(ValueError, match="execution"):
        deqkern.sample_sequential(model, x.clone().requires_grad_(), sched, execution="static")


class Recorder:
    """A model that records the batch size of every call (conditioning shapes too)."""

    def __init__(self):
        self.calls: list[int] = []
        self.kwargs: list[dict] = []

    def __call__(self, x, t, **kwargs):
        self.calls.append(x.shape[0])
        self.kwargs.append(kwargs)
        cond = kwargs.get("cond")
        shift = 0.0 if cond is None else cond.reshape(x.shape[0], -1).mean(1).view(-1, *[1] * (x.ndim - 1))
        return torch.tanh(0.5 * x) + 0.1 * shift


def _guidance(batch: int) -> deqkern.Guidance:
    g = torch.Generator().manual_seed(9)
    return deqkern.Guidance(3.0, cond={"cond": torch.randn(batch, 5, generator=g, dtype=torch.float64)},
                            uncond={"cond": torch.zeros(1, 5, dtype=torch.float64)})


@pytest.mark.parametrize("execution", ["eager", "static"])
def test_guided_round_is_one_model_call_of_twice_the_rows(execution):
    """Item 5: with guidance and no max_batch, every round is ONE model call of 2 x (live rows),
    and model_evals counts the rows the model saw."""
    sched = _chain("ddim")
    x, _, _ = _inputs("ddim", seed=7, batch=1)
    rec = Recorder()
    res = deqkern.sample(rec, x, sched, "picard", guidance=_guidance(1), execution=execution, rounds_per_graph=1)
    assert len(rec.calls) == res.info.get("rounds_executed", res.rounds)
    assert all(n % 2 == 0 for n in rec.calls)
    if execution == "eager":
        assert rec.calls[0] == 2 * S
    else:
        assert set(rec.calls) == {2 * S}
    assert res.model_evals == sum(rec.calls)
    seq_rec = Recorder()
    seq = deqkern.sample_sequential(seq_rec, x, sched, guidance=_guidance(1), execution=execution, rounds_per_graph=4)
    assert seq.model_evals == sum(seq_rec.calls) == 2 * S and set(seq_rec.calls) == {2}


def test_guided_max_batch_counts_model_rows():
    """max_batch = 6 model rows: chunks of 3 guided latent rows, 6 model rows each."""
    sched = _chain("ddim")
    x, _, _ = _inputs("ddim", seed=8, batch=1)
    rec = Recorder()
    res = deqkern.sample(rec, x, sched, "picard", guidance=_guidance(1), max_batch=6, max_iters=1)
    assert rec.calls == [6, 6, 4]
    assert res.model_evals == 16


@pytest.mark.parametrize("fn", [deqkern.sample, deqkern.sample_sequential])
@pytest.mark.parametrize("bad", ["broadcast", "extra"])
def test_wrong_output_shape_names_model(fn, bad):
    """A model returning [N, 1] (which the sequential step silently broadcast) or an extra
    channel fails with one error naming the model and both shapes."""
    x, _, _ = _inputs("ddim", seed=1)

    def wrong(v, t):
        return v[:, :1] if bad == "broadcast" else torch.cat([v, v], dim=1)

    with pytest.raises(ValueError, match=r"model: expected an output of the input's shape \(\d+, 3, 4\), got"):
        fn(wrong, x, _chain("ddim"))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(model_kwargs=[torch.zeros(2, 5)]), TypeError, "model_kwargs: expected a mapping"),
        (dict(guidance={"scale": 2.0}), TypeError, "guidance: expected a deqkern.Guidance"),
        (dict(model_dtype="half-ish"), ValueError, "model_dtype"),
        (dict(model_dtype=torch.int32), ValueError, "model_dtype"),
        (dict(model_kwargs={"added": {"time_ids": torch.zeros(3, 6)}}), ValueError,
         r"model_kwargs\['added'\]\['time_ids'\]: expected a tensor with leading dim 1 or 2, got \(3, 6\)"),
    ],
)
def test_bad_model_arguments_are_named(kwargs, exc, match):
    x, _, _ = _inputs("ddim", seed=1)
    with pytest.raises(exc, match=match):
        deqkern.sample(model, x, _chain("ddim"), **kwargs)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "2", True])
def test_guidance_scale_must_be_finite_number(scale):
    with pytest.raises(ValueError, match="guidance.scale"):
        deqkern.Guidance(scale, cond={}, uncond={})


def test_guidance_halves_that_cannot_be_concatenated():
    with pytest.raises(ValueError, match=r"guidance.cond\['e'\] \(2, 5\) and guidance.uncond\['e'\] \(1, 4\)"):
        deqkern.Guidance(2.0, cond={"e": torch.zeros(2, 5)}, uncond={"e": torch.zeros(1, 4)})
    with pytest.raises(ValueError, match=r"guidance.cond\['a'\]\['s'\] and guidance.uncond\['a'\]\['s'\]"):
        deqkern.Guidance(2.0, cond={"a": {"s": 0.5}}, uncond={"a": {"s": 1.0}})
    with pytest.raises(TypeError, match="guidance.cond: expected a mapping"):
        deqkern.Guidance(2.0, cond=[torch.zeros(1)], uncond={})


@pytest.mark.parametrize("name,dtype", [("float32", torch.float32), ("float64", torch.float64),
                                        ("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_model_dtype_by_name(name, dtype):
    """model_dtype accepts a dtype's name: the model sees that dtype, x0 keeps x_T's."""
    seen = []

    def m(v, t):
        seen.append(v.dtype)
        return torch.tanh(v)

    x, _, _ = _inputs("ddim", seed=2)
    res = deqkern.sample(m, x.float(), _chain("ddim"), model_dtype=name, max_iters=1)
    assert set(seen) == {dtype} and res.x0.dtype == torch.float32


def test_nested_and_non_tensor_conditioning_matches_per_sample_calls():
    """SDXL-style conditioning: added_cond_kwargs (nested per-sample tensors) is gathered by
    sample and cross_attention_kwargs (non-tensor) passed through, guided and not; the batched
    solve equals the per-sample sequential chains to 1e-10 (float64, Picard to exactness)."""
    g = torch.Generator().manual_seed(13)
    batch = 3
    x = torch.randn(batch, 4, generator=g, dtype=torch.float64)
    emb = torch.randn(batch, 4, generator=g, dtype=torch.float64)
    ids = torch.randn(batch, 2, generator=g, dtype=torch.float64)

    def cond_model(v, t, added_cond_kwargs, cross_attention_kwargs):
        assert cross_attention_kwargs == {"scale": 0.5}
        a = added_cond_kwargs
        return torch.tanh(v + a["text_embeds"] * cross_attention_kwargs["scale"]) + a["time_ids"].sum(1, keepdim=True)

    sched = _chain("ddim")
    kwargs = {"added_cond_kwargs": {"text_embeds": emb, "time_ids": ids}, "cross_attention_kwargs": {"scale": 0.5}}
    guided = deqkern.Guidance(2.5, cond={"added_cond_kwargs": {"text_embeds": emb, "time_ids": ids}},
                              uncond={"added_cond_kwargs": {"text_embeds": torch.zeros(1, 4, dtype=torch.float64),
                                                            "time_ids": ids}})
    for opts in (dict(model_kwargs=kwargs), dict(model_kwargs={"cross_attention_kwargs": {"scale": 0.5}},
                                                  guidance=guided)):
        got = deqkern.sample(cond_model, x, sched, "picard", tol=1e-300, **opts).x0
        for b in range(batch):
            one = dict(opts)
            if "guidance" in one:
                one["guidance"] = deqkern.Guidance(2.5, cond={"added_cond_kwargs": {
                    "text_embeds": emb[b : b + 1], "time_ids": ids[b : b + 1]}}, uncond={"added_cond_kwargs": {
                    "text_embeds": torch.zeros(1, 4, dtype=torch.float64), "time_ids": ids[b : b + 1]}})
            else:
                one["model_kwargs"] = {**kwargs, "added_cond_kwargs": {"text_embeds": emb[b : b + 1],
                                                                       "time_ids": ids[b : b + 1]}}
            ref = deqkern.sample_sequential(cond_model, x[b : b + 1], sched, **one).x0
            assert rel_err(got[b : b + 1], ref) <= 1e-10


def test_evaluator_counts_guided_rows_directly():
    """ModelEvaluator.raw: one call of 2N rows for N guided rows; evaluations += 2N."""
    rec = Recorder()
    ev = ModelEvaluator(rec, guidance=_guidance(2))
    x = torch.zeros(10, 3, dtype=torch.float64)
    ev.raw(x, torch.zeros(10, dtype=torch.int64), torch.arange(10) % 2)
    assert rec.calls == [20] and ev.evaluations == 20


def test_inversion_exact_curve_with_nested_conditioning():
    """invert()'s exact-curve re-evaluation tiles nested and non-tensor conditioning like the
    solve gathers it: its exact losses equal the sequential chain's loss at the same x_T."""
    from deqkern.inversion import invert

    g = torch.Generator().manual_seed(17)
    target = 0.5 * torch.randn(2, 4, generator=g, dtype=torch.float64)
    kwargs = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 4, generator=g, dtype=torch.float64)},
              "cross_attention_kwargs": {"scale": 0.5}}

    def cond_model(v, t, added_cond_kwargs, cross_attention_kwargs):
        return torch.tanh(v + cross_attention_kwargs["scale"] * added_cond_kwargs["text_embeds"])

    res = invert(cond_model, target, _chain("ddim"), "implicit", model_kwargs=kwargs, max_steps=1, exact_curve=True,
                 tol=TIGHT)
    first = res.curve[0]
    assert first.exact_loss is not None and abs(first.exact_loss - first.loss) <= 1e-10 * first.loss


def test_guided_gradient_is_the_sequential_chains():
    """The adjoint's model Jacobians see the sampler's conditioning and guidance."""
    sched = _chain("ddim")
    x, _, w = _inputs("ddim", seed=31)
    guidance = _guidance(2)

    def oracle(a, z):
        return deqkern.sample_sequential(Recorder(), a, sched, guidance=guidance, execution="eager")

    ref, _ = _grads(oracle, x, None, w)
    got, _ = _grads(lambda a, z: deqkern.sample(Recorder(), a, sched, tol=TIGHT, guidance=guidance), x, None, w)
    assert rel_err(got, ref) <= GRAD_RTOL
