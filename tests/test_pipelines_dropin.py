"""Drop-in pipelines: ``sample_pipeline(pipe, **kw)`` returns what ``pipe(**kw)`` returns.

Oracle: diffusers' own pipeline, called with the same arguments and a generator of the same seed
(tiny random-weight pipelines from ``tiny_pipes``, float32, 32x32 images, 4x8x8 latents). The
solve runs to ``tol=1e-6`` (x0's relative error against the sequential chain); the decoded
images (``output_type="np"``, in [0, 1]) then agree to ``IMAGE_TOL = 1e-4`` absolute (measured:
about 1e-6, float32 rounding of the model; 100x margin).
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import tiny_pipes
from conftest import rel_err

import deqkern

TOL = 1e-6
IMAGE_TOL = 1e-4
STEPS = 6


def _kw(**extra):
    """A guided call with a prompt per sample and a negative prompt, seeded."""
    return {**dict(prompt=["a cat", "a hat"], negative_prompt=["dog", "cow"], num_inference_steps=STEPS,
                   guidance_scale=4.0, output_type="np"), **extra}


def _both(pipe, **kw):
    """``(pipe(**kw), sample_pipeline(pipe, **kw))`` from generators of the same seed."""
    ref = pipe(**kw, generator=torch.Generator().manual_seed(5))
    ours = deqkern.sample_pipeline(pipe, **kw, generator=torch.Generator().manual_seed(5), tol=TOL)
    return ref, ours


def _assert_same(ref, ours):
    assert type(ours) is type(ref)
    assert ours.deqkern.all_converged
    assert ours.images.shape == ref.images.shape
    assert np.abs(ours.images - ref.images).max() < IMAGE_TOL


#: every scheduler Schedule.from_diffusers reproduces that a UNet pipeline can run (flow matching
#: has no init_noise_sigma: SD3/Flux's; DPM-Solver: tests/test_pipelines_dpm.py), eta > 0 where the
#: step has it. Built without clip_sample, which the SD pipeline then sets False over the
#: scheduler's default (True): the rebuilt chain must keep the pipeline's value.
SCHEDULERS = [
    ("DDIMScheduler", 0.0), ("DDIMScheduler", 0.7), ("DDIMParallelScheduler", 0.7), ("DDPMScheduler", 0.0),
    ("DDPMParallelScheduler", 0.0), ("EulerDiscreteScheduler", 0.0), ("EulerAncestralDiscreteScheduler", 0.0),
]


def _scheduler(name: str):
    import diffusers

    return getattr(diffusers, name)(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, steps_offset=1)


@pytest.mark.parametrize("name,eta", SCHEDULERS)
def test_sd_matches_pipeline_per_scheduler(tmp_path, name, eta):
    pipe = tiny_pipes.sd_pipeline(tmp_path, scheduler=_scheduler(name))
    ref, ours = _both(pipe, **_kw(eta=eta))
    _assert_same(ref, ours)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sd_prediction_types_and_rescale(tmp_path, prediction_type):
    from deqkern.bench.pipeline import CallCounter

    pipe = tiny_pipes.sd_pipeline(tmp_path, prediction_type=prediction_type)
    ref = pipe(**_kw(guidance_rescale=0.5), generator=torch.Generator().manual_seed(5))
    counter = CallCounter(pipe.unet)
    ours = deqkern.sample_pipeline(pipe, **_kw(guidance_rescale=0.5), generator=torch.Generator().manual_seed(5),
                                   tol=TOL)
    counter.close()
    _assert_same(ref, ours)
    # guidance: ONE UNet call per round, of 2 rows per latent row: all B x S of them in round 1
    assert len(counter.rows) == ours.deqkern.rounds and counter.rows[0] == 2 * 2 * STEPS


@pytest.mark.parametrize("name,eta", [("EulerDiscreteScheduler", 0.0), ("EulerAncestralDiscreteScheduler", 0.0),
                                      ("DDIMScheduler", 0.7)])
def test_sdxl_matches_pipeline(tmp_path, name, eta):
    pipe = tiny_pipes.sdxl_pipeline(tmp_path, scheduler=_scheduler(name))
    # distinct negative size ids: the pipeline tiles [negative; positive] over its doubled batch
    ref, ours = _both(pipe, **_kw(eta=eta, negative_original_size=(16, 16), negative_target_size=(32, 32)))
    _assert_same(ref, ours)


def test_new_prompt_reuses_the_kept_sampler(tmp_path):
    """A second call with other prompts reuses the pipe's sampler (its workspace: on CUDA, its
    captured graph) with the new conditioning copied in, and still equals the pipeline."""
    pipe = tiny_pipes.sd_pipeline(tmp_path)
    first = deqkern.sample_pipeline(pipe, **_kw(), generator=torch.Generator().manual_seed(5), tol=TOL)
    ref, ours = _both(pipe, **_kw(prompt=["a bat", "a mat"]))
    assert not first.deqkern.info["reused_workspace"] and ours.deqkern.info["reused_workspace"]
    _assert_same(ref, ours)
    assert np.abs(ours.images - first.images).max() > 1e-3  # the new prompt did change the images


@pytest.mark.parametrize("extra", [
    {"guidance_scale": 1.0},  # no guidance: the prompt embeddings as plain model_kwargs
    {"prompt": "a cat", "negative_prompt": None, "num_images_per_prompt": 2},
    {"prompt": None, "negative_prompt": None, "prompt_embeds": torch.randn(2, 12, 16),
     "latents": torch.randn(2, 4, 8, 8)},
])
def test_sd_call_variants(tmp_path, extra):
    pipe = tiny_pipes.sd_pipeline(tmp_path)
    _assert_same(*_both(pipe, **_kw(**extra)))


def test_default_output_type_is_the_pipelines(tmp_path):
    """No ``output_type``: PIL images like the pipeline's (uint8: equal up to one level of rounding)."""
    pipe = tiny_pipes.sd_pipeline(tmp_path)
    kw = {k: v for k, v in _kw().items() if k != "output_type"}
    ref, ours = _both(pipe, **kw)
    assert [type(im) for im in ours.images] == [type(im) for im in ref.images]
    diff = [np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() for a, b in zip(ours.images, ref.images)]
    assert max(diff) <= 1
    image, nsfw = deqkern.sample_pipeline(pipe, **kw, return_dict=False, tol=TOL)  # the pipeline's tuple
    assert len(image) == 2 and nsfw is None
    out, res = deqkern.sample_pipeline(pipe, **kw, return_solve=True, tol=TOL)
    assert out.deqkern is res and res.all_converged


def test_progress_follows_pipeline_config(tmp_path, capsys):
    """The bar obeys ``set_progress_bar_config`` (disabled by tiny_pipes; then options such as
    ``file`` and ``desc``) and counts the S steps, with the rounds."""
    pipe = tiny_pipes.sd_pipeline(tmp_path)
    deqkern.sample_pipeline(pipe, **_kw())
    assert "deqkern" not in capsys.readouterr().err
    buf = io.StringIO()
    pipe.set_progress_bar_config(file=buf, desc="tiny", ascii=True)
    res = deqkern.sample_pipeline(pipe, **_kw()).deqkern
    text = buf.getvalue()
    assert "tiny" in text and f"{STEPS}/{STEPS}" in text and f"rounds={res.rounds}" in text


def test_callback_reads_and_interrupts_like_the_pipeline(tmp_path):
    """``callback_on_step_end`` sees each step's latents and tensors as in the pipeline's loop (after
    the solve), and an interrupt ends the output at that step; a callback that edits raises."""
    pipe = tiny_pipes.sd_pipeline(tmp_path)

    def recorder(log):
        def callback(p, i, t, values):
            log.append((i, float(t), {k: v.clone() for k, v in values.items()}))
            p._interrupt = i == 3
            return values
        return callback

    logs = ([], [])
    kw = _kw(output_type="latent", callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    ref = pipe(**kw, callback_on_step_end=recorder(logs[0]), generator=torch.Generator().manual_seed(5))
    ours = deqkern.sample_pipeline(pipe, **kw, callback_on_step_end=recorder(logs[1]),
                                   generator=torch.Generator().manual_seed(5), tol=TOL)
    assert len(logs[0]) == 4  # steps 0..3, then interrupted
    assert [(i, t) for i, t, _ in logs[1]] == [(i, t) for i, t, _ in logs[0]]
    for (_, _, a), (_, _, b) in zip(logs[1], logs[0]):
        assert torch.equal(a["prompt_embeds"], b["prompt_embeds"])
        assert rel_err(a["latents"], b["latents"]) < 1e-4
    assert rel_err(ours.images, ref.images) < 1e-4

    def edit(p, i, t, values):
        return {"latents": values["latents"] * 0}

    with pytest.raises(ValueError, match="callback_on_step_end.*latents"):
        deqkern.sample_pipeline(pipe, **_kw(callback_on_step_end=edit))


def test_unsupported_pipelines_schedulers_and_options(tmp_path):
    """Errors name the class or argument and list what is supported."""
    from diffusers import HeunDiscreteScheduler, StableDiffusionImg2ImgPipeline

    sd = tiny_pipes.sd_pipeline(tmp_path)
    pipe = StableDiffusionImg2ImgPipeline(**sd.components)
    with pytest.raises(TypeError, match="StableDiffusionImg2ImgPipeline.*StableDiffusionPipeline"):
        deqkern.sample_pipeline(pipe, prompt="a cat")
    heun = tiny_pipes.sd_pipeline(tmp_path, scheduler=HeunDiscreteScheduler(num_train_timesteps=1000))
    with pytest.raises(deqkern.UnsupportedSchedulerOption, match="HeunDiscreteScheduler.*DDIMScheduler"):
        deqkern.sample_pipeline(heun, prompt="a cat")
    with pytest.raises(ValueError, match="timesteps.*reproduced"):
        deqkern.sample_pipeline(sd, prompt="a cat", timesteps=[999, 500])
    with pytest.raises(TypeError, match="no argument.*'stepz'"):
        deqkern.sample_pipeline(sd, prompt="a cat", stepz=3)
    with pytest.raises(TypeError, match="positional"):
        deqkern.sample_pipeline(sd, "a cat")


@pytest.mark.parametrize("execution", ["eager", "audit"])
def test_sampler_conditioning_per_call(execution):
    """A new prompt per call: of the same layout it is copied into the sampler's own tensors and
    the kept workspace is reused ("audit" replays the first call's rounds as a captured graph
    would, and raises if a replay would differ); of another layout the workspace is rebuilt.
    Oracle: the sequential chain with that call's guidance; bound 1e-4 relative (float32, tol 1e-6)."""
    from diffusers import DDIMScheduler

    model = tiny_pipes.unet(16)
    sched = deqkern.Schedule.from_diffusers(DDIMScheduler(num_train_timesteps=1000, clip_sample=False), STEPS)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 4, 8, 8, generator=g)

    def guide(tokens: int) -> deqkern.Guidance:
        embeds = {"encoder_hidden_states": torch.randn(2, tokens, 16, generator=g)}
        return deqkern.Guidance(3.0, embeds, {"encoder_hidden_states": torch.randn(1, tokens, 16, generator=g)})

    conds = [guide(5), guide(5), guide(7), guide(7)]
    kept = conds[0].cond["encoder_hidden_states"].clone()
    sampler = deqkern.ParallelSampler(model, sched, tol=TOL, execution=execution, guidance=conds[0])
    results = [sampler(x_T)] + [sampler(x_T, guidance=c) for c in conds[1:]]
    assert [r.info["reused_workspace"] for r in results] == [False, True, False, True]
    for res, cond in zip(results, conds):
        oracle = deqkern.sample_sequential(model, x_T, sched, guidance=cond, execution="eager").x0
        assert res.all_converged and rel_err(res.x0, oracle) < 1e-4
    assert torch.equal(conds[0].cond["encoder_hidden_states"], kept)  # the caller's tensors are not written


def test_sampler_model_kwargs_per_call():
    """Unguided conditioning per call (``model_kwargs``), and a bad one is refused naming it."""
    from diffusers import DDIMScheduler

    model = tiny_pipes.unet(16)
    sched = deqkern.Schedule.from_diffusers(DDIMScheduler(num_train_timesteps=1000, clip_sample=False), STEPS)
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    kws = [{"encoder_hidden_states": torch.randn(2, 5, 16, generator=g)} for _ in range(2)]
    sampler = deqkern.ParallelSampler(model, sched, tol=TOL, model_kwargs=kws[0])
    sampler(x_T)
    for kw in (kws[1], kws[0]):
        res = sampler(x_T, model_kwargs=kw)
        assert res.info["reused_workspace"]
        assert rel_err(res.x0, deqkern.sample_sequential(model, x_T, sched, model_kwargs=kw).x0) < 1e-4
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        sampler(x_T, model_kwargs={"encoder_hidden_states": torch.randn(3, 5, 16)})
    with pytest.raises(TypeError, match="model_kwargs"):
        sampler(x_T, model_kwargs=[1])


def test_bench_pipeline_sd_tiny(tmp_path):
    """``python -m deqkern.bench --pipeline sd-tiny``: one UNet call per round, of 2 x window x batch
    rows while no row is frozen, and images equal to the pipeline's (to the bench's tol 1e-4)."""
    import json

    from deqkern.bench.__main__ import main

    out = tmp_path / "pipe.json"
    assert main(["--pipeline", "sd-tiny", "--quick", "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("python -m deqkern.bench --pipeline sd-tiny")
    for r in report["results"]:
        assert r["converged"] and r["model_calls"] == r["rounds"] and r["pipeline_calls"] == r["steps"]
        assert r["rows_per_call"][0] == 2 * r["window"] * r["batch"]
        assert r["image_max_abs_diff"] < IMAGE_TOL


def test_guidance_rescale_is_diffusers_rescale_noise_cfg():
    """``Guidance(rescale=r)`` applies diffusers' ``rescale_noise_cfg`` to each row's guided output
    (oracle: that function on the two halves; float64, bound 1e-12 relative); bad values refused."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    from deqkern.model import ModelEvaluator

    g = torch.Generator().manual_seed(2)
    rows = 3

    def model(x, t, scale):
        return x * scale.view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1).to(x.dtype)

    cond, uncond = torch.rand(rows, generator=g, dtype=torch.float64), torch.rand(1, generator=g, dtype=torch.float64)
    guidance = deqkern.Guidance(3.0, {"scale": cond}, {"scale": uncond}, rescale=0.7)
    x, t = torch.randn(rows, 2, 3, 3, generator=g, dtype=torch.float64), torch.tensor([900, 500, 100])
    ours = ModelEvaluator(model, guidance=guidance)(x, t, torch.arange(rows), round_index=0)
    c, u = model(x, t, cond), model(x, t, uncond.expand(rows))
    assert rel_err(ours, rescale_noise_cfg(u + 3.0 * (c - u), c, guidance_rescale=0.7)) < 1e-12
    for bad in (-0.1, float("nan"), True):
        with pytest.raises(ValueError, match="guidance.rescale"):
            deqkern.Guidance(3.0, {"scale": cond}, {"scale": uncond}, rescale=bad)
