"""The chains ``--scheduler`` names, built as a diffusers user builds them: the scheduler class
``from_config`` of the model's own scheduler config (its training betas), ``set_timesteps(S)``, the
latents multiplied by ``init_noise_sigma``, and :meth:`deqkern.Schedule.from_diffusers` reproducing
that scheduler's ``step()``.

``flow`` samples the epsilon model through its exact velocity conversion
(:class:`deqkern.models.flow.FlowFromEpsilon`) with the flow sigmas placed on DDIM's timestep grid
(:func:`flow_sigmas`); diffusers is imported inside the functions.
"""
from __future__ import annotations

from typing import Any, Literal

import torch

from deqkern._validate import OptionError
from deqkern.schedule import Schedule

SchedulerName = Literal["ddim", "ddpm", "euler", "euler-a", "flow", "dpm++2m"]
SCHEDULERS: tuple[str, ...] = ("ddim", "ddpm", "euler", "euler-a", "flow", "dpm++2m")

#: the diffusers class of each name, and the options set on top of the model's config
CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "flow": ("FlowMatchEulerDiscreteScheduler", {"shift": 1.0}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def scheduler_config(name: str, model_config: dict[str, Any], clip_sample: bool) -> dict[str, Any]:
    """The chain's scheduler config: the model's, as class ``name`` (flow: its own, the model's betas
    do not apply); DDIM/DDPM x0 clipping off unless asked."""
    cls, options = CLASSES[name]
    if name == "flow":
        return {"_class_name": cls, "num_train_timesteps": model_config["num_train_timesteps"], **options}
    conf = {**dict(model_config), "_class_name": cls, **options}
    if not clip_sample:
        # The seed's scan form (deq-ddim, *-scan) needs affine steps: no x0 clipping.
        conf.update(clip_sample=False, thresholding=False)
    return conf


def flow_sigmas(model_config: dict[str, Any], steps: int) -> list[float]:
    """The S flow sigmas ``s_k = sigma_vp / (alpha + sigma_vp)`` at DDIM's timesteps for ``steps``.

    On this grid the converted model is evaluated at the epsilon model's own integer timesteps
    (no interpolation), and the flow Euler chain is DDIM's chain in flow coordinates, so the rounds
    of the two compare the chains' coordinates, not different discretisations. diffusers' default
    flow grid starts at s = 1 (alpha = 0), a level the epsilon model never saw.
    """
    from diffusers import DDIMScheduler

    from deqkern.models.flow import flow_sigma

    ddim = DDIMScheduler.from_config(model_config)
    ddim.set_timesteps(steps)
    return flow_sigma(ddim.alphas_cumprod.double()[ddim.timesteps]).tolist()


def chain_model(name: str, unet: Any, model_config: dict[str, Any]) -> Any:
    """The model chain ``name`` samples: the UNet, or for ``flow`` its velocity conversion."""
    if name != "flow":
        return unet
    from diffusers import DDPMScheduler

    from deqkern.models.flow import FlowFromEpsilon

    if model_config.get("prediction_type", "epsilon") != "epsilon":
        raise OptionError("scheduler", f"flow converts an epsilon-prediction model; this one predicts "
                                       f"{model_config['prediction_type']!r}")
    return FlowFromEpsilon(unet, DDPMScheduler.from_config(model_config).alphas_cumprod)


def build_chain(name: str, conf: dict[str, Any], model_config: dict[str, Any], steps: int, eta: float,
                x_T: torch.Tensor) -> tuple[Schedule, torch.Tensor]:
    """``(schedule, x_T * init_noise_sigma)`` of ``steps`` steps of scheduler ``conf`` (built by
    :func:`scheduler_config` from the model's ``model_config``); DDIM's ``eta``.

    Raises :class:`deqkern.UnsupportedSchedulerOption` for a scheduler deqkern does not reproduce."""
    import diffusers

    kwargs = {"sigmas": flow_sigmas(model_config, steps)} if name == "flow" else {}
    schedule = Schedule.from_diffusers(conf, steps, eta=eta if name == "ddim" else None, **kwargs)
    sched = getattr(diffusers, conf["_class_name"]).from_config(conf)
    sched.set_timesteps(steps, **kwargs)
    # flow matching has no init_noise_sigma: its pipelines start from unit noise
    return schedule, x_T * float(getattr(sched, "init_noise_sigma", 1.0))
