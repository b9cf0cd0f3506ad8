"""The one place that imports diffusers for schedulers (lazily: ``import deqkern`` stays light)."""
from __future__ import annotations

from typing import Any, Literal

from deqkern.errors import UnsupportedSchedulerOption

Kind = Literal["ddim", "ddpm", "euler", "euler_a", "flow", "dpm"]

#: The schedulers :meth:`deqkern.Schedule.from_diffusers` reproduces, by class name, and their step
#: rule (the Parallel twins share DDIM's and DDPM's maths).
SUPPORTED: dict[str, Kind] = {
    "DDIMScheduler": "ddim", "DDIMParallelScheduler": "ddim",
    "DDPMScheduler": "ddpm", "DDPMParallelScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
    "FlowMatchEulerDiscreteScheduler": "flow", "DPMSolverMultistepScheduler": "dpm",
}


def scheduler_from_any(scheduler: Any) -> tuple[Any, Kind]:
    """A fresh supported scheduler built from ``scheduler`` (an object or a config mapping), and
    its step rule.

    A config mapping names its class in ``_class_name`` (as ``scheduler_config.json`` does).
    We always rebuild from the config so ``set_timesteps`` never mutates the caller's object.
    """
    try:
        import diffusers
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("Schedule.from_diffusers needs diffusers: pip install 'deqkern[diffusers]'") from exc

    if isinstance(scheduler, diffusers.SchedulerMixin):
        name = type(scheduler).__name__
        config = dict(scheduler.config)
    elif hasattr(scheduler, "keys"):
        config = dict(scheduler)
        name = config.get("_class_name")
        if name is None:
            raise ValueError(
                f"scheduler: a config mapping must name its class in '_class_name' (one of {sorted(SUPPORTED)})"
            )
    else:
        raise TypeError(f"scheduler: expected a diffusers scheduler or its config dict, got {type(scheduler).__name__}")
    # a key listed in _use_default_values is rebuilt at its default, even when an owner (a
    # StableDiffusionPipeline sets clip_sample=False) changed it since: every value stands as it is
    config.pop("_use_default_values", None)
    if name not in SUPPORTED:
        raise UnsupportedSchedulerOption(
            f"scheduler class {name!r}: deqkern reproduces {sorted(SUPPORTED)} exactly; other schedulers "
            "(UniPC, Heun, DPM-Solver singlestep, ...) are refused"
        )
    cls = getattr(diffusers, name)
    return cls.from_config(config), SUPPORTED[name]
