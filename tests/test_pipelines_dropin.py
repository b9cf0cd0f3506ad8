"""Drop-in pipelines: ``sample_pipeline(pipe, **kw)`` returns what ``pipe(**kw)`` returns.

Oracle: diffusers' own pipeline, called with the same arguments and a generator of the same seed
(tiny random-weight pipelines from ``tiny_pipes``, float32, 32x32 images, 4x8x8 latents). The
solve runs to ``tol=1e-6`` (x0's relative error against the sequential chain); the decoded
images (``output_type="np"``, in [0, 1]) then agree to ``IMAGE_TOL = 1e-4`` absolute: float32
rounding of the model (~1e-6 relative) and the tolerance, through a VAE of gain ~1.
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
#: has no init_noise_sigma: SD3/Flux's), eta > 0 where the step has it. Built without clip_sample,
#: which the SD pipeline then sets False over the scheduler's default (True): the rebuilt chain
#: must keep the pipeline's value.
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
    pipe = tiny_pipes.sd_pipeline(tmp_path, prediction_type=prediction_type)
    ref, ours = _both(pipe, **_kw(guidance_rescale=0.5))
    _assert_same(ref, ours)
    # guidance: 2 model rows per latent row, all B x S of them in round 1 (none frozen yet)
    assert ours.deqkern.model_evals >= 2 * 2 * STEPS


@pytest.mark.parametrize("name,eta", [("EulerDiscreteScheduler", 0.0), ("EulerAncestralDiscreteScheduler", 0.0),
                                      ("DDIMScheduler", 0.7)])
def test_sdxl_matches_pipeline(tmp_path, name, eta):
    pipe = tiny_pipes.sdxl_pipeline(tmp_path, scheduler=_scheduler(name))
    # distinct negative size ids: the pipeline tiles [negative; positive] over its doubled batch
    ref, ours = _both(pipe, **_kw(eta=eta, negative_original_size=(16, 16), negative_target_size=(32, 32)))
    _assert_same(ref, ours)


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
