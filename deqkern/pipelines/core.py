"""The drop-in framework: ``sample_pipeline(pipe, **kwargs)`` and the adapter registry.

One adapter per pipeline family knows the three family-specific parts of a pipeline's
``__call__``; everything else (binding the arguments, the schedule, the step noise, the solve,
progress, callbacks, the returned object) is here, shared:

1. ``prepare(pipe, call) -> Denoise``: the conditioning (the pipeline's own ``encode_prompt``...),
   ``pipe.scheduler.set_timesteps`` where the loop calls it, and the latents by the pipeline's
   own ``prepare_latents`` (the generator's first draws); the denoiser as ``model(x, t, **kw)``
   with classifier-free guidance as a :class:`~deqkern.Guidance` (one model call of 2x rows).
2. the solve (here): the chain ``Schedule.from_diffusers(pipe.scheduler, ...)``, the step noise
   drawn from the same generator in the loop's order (:func:`step_noise`), a
   :class:`~deqkern.ParallelSampler`.
3. ``decode(pipe, x0, call, denoise)``: what ``pipe(**call)`` returns from its final latents
   (the pipeline's VAE decode, safety checker, ``image_processor.postprocess``, output class).
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Mapping

import torch

from deqkern._diffusers import SUPPORTED, scheduler_from_any
from deqkern.config import SolveConfig
from deqkern.errors import UnsupportedSchedulerOption
from deqkern.model import Guidance, ModelFn
from deqkern.sampling import ParallelSampler, SampleResult
from deqkern.schedule import Schedule

#: sample_pipeline's own keywords: the solve's (:class:`~deqkern.SolveConfig` fields, ``config``)
#: and the model call's; every other keyword is the pipeline's
SOLVE_KEYWORDS = frozenset({f.name for f in fields(SolveConfig)} | {"config", "max_batch", "model_dtype"})


@dataclass
class Denoise:
    """One pipeline call made ready for the solve by an adapter's ``prepare``."""

    model: ModelFn  #: ``model(x[N, ...], t[N], **kwargs)`` (a diffusers model is accepted as is)
    latents: torch.Tensor  #: x_T as the pipeline's loop starts from it (``prepare_latents``' output)
    num_inference_steps: int
    generator: Any  #: the call's generator(s): the step noise is drawn from it after the latents
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  #: conditioning without guidance
    guidance: Guidance | None = None  #: classifier-free guidance (None: the call does not guide)
    #: further :meth:`deqkern.Schedule.from_diffusers` options (``eta`` where the step takes it, ...)
    schedule_kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: what ``callback_on_step_end`` may ask for besides ``latents``, as the pipeline's loop holds it
    callback_tensors: Mapping[str, Any] = field(default_factory=dict)
    #: the adapter's own values for ``decode`` (device, embeddings' dtype, ...)
    state: Mapping[str, Any] = field(default_factory=dict)
    #: the rows each step's noise is drawn for, when the loop steps more rows than it keeps (DiT
    #: steps its doubled guidance batch and keeps the first half); None: the latents' batch
    noise_batch: int | None = None
    #: applied to ``Schedule.from_diffusers``' chain when the loop's step is not the scheduler's own
    #: (DiT steps the scaled model input)
    adjust_schedule: Callable[[Schedule], Schedule] | None = None


class PipelineAdapter(ABC):
    """How one family of diffusers pipelines conditions, denoises and decodes (see the module doc).

    ``pipelines``: the class names it serves. ``honoured``: the ``pipe(...)`` arguments it
    reproduces; any other argument given a value other than its default raises. ``positional``:
    the arguments :func:`sample_pipeline` takes positionally, in order (none by default).
    """

    pipelines: ClassVar[tuple[str, ...]]
    honoured: ClassVar[frozenset[str]]
    positional: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def prepare(self, pipe: Any, call: dict[str, Any]) -> Denoise:
        """The call's conditioning, denoiser and latents (``call``: every ``pipe(...)`` argument)."""

    @abstractmethod
    def decode(self, pipe: Any, x0: torch.Tensor, call: dict[str, Any], denoise: Denoise) -> Any:
        """What ``pipe(**call)`` returns when its loop ends at latents ``x0``."""


_REGISTRY: dict[str, PipelineAdapter] = {}


def register_adapter(adapter: PipelineAdapter) -> PipelineAdapter:
    """Make ``sample_pipeline`` serve ``adapter.pipelines`` with ``adapter`` (the last one wins)."""
    if not isinstance(adapter, PipelineAdapter):
        raise TypeError(f"adapter: expected a PipelineAdapter instance, got {type(adapter).__name__}")
    for name in adapter.pipelines:
        _REGISTRY[name] = adapter
    return adapter


def supported_pipelines() -> list[str]:
    """The pipeline class names :func:`sample_pipeline` serves."""
    return sorted(_REGISTRY)


def adapter_for(pipe: Any) -> PipelineAdapter:
    """The adapter of ``pipe``'s exact class (a subclass may change ``__call__``, so no MRO walk)."""
    name = type(pipe).__name__
    if name not in _REGISTRY:
        raise TypeError(f"pipe: {name} is not supported by deqkern.sample_pipeline; supported: {supported_pipelines()}")
    return _REGISTRY[name]


def bind_call(pipe: Any, adapter: PipelineAdapter, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every argument of ``pipe.__call__`` (the given ones over the defaults); unknown names,
    extra positional arguments and unreproduced options raise, naming them."""
    name = type(pipe).__name__
    params = {p.name: p for p in inspect.signature(type(pipe).__call__).parameters.values()
              if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if len(args) > len(adapter.positional):
        raise TypeError(f"sample_pipeline: {name} takes {len(adapter.positional)} positional argument(s) "
                        f"{list(adapter.positional)} after pipe, got {len(args)}; pass the others by keyword")
    given = dict(zip(adapter.positional, args))
    for key, value in kwargs.items():
        if key in given:
            raise TypeError(f"sample_pipeline: got multiple values for argument {key!r}")
        given[key] = value
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise TypeError(f"sample_pipeline: {name}.__call__ has no argument(s) {unknown}; deqkern's own are "
                        f"{sorted(SOLVE_KEYWORDS | {'return_solve'})}")
    for key, value in given.items():
        if key not in adapter.honoured and not _is_default(value, params[key].default):
            raise ValueError(f"{key}: {name}'s option is not reproduced by deqkern.sample_pipeline (leave it at its "
                             f"default {params[key].default!r}); reproduced: {sorted(adapter.honoured)}")
    return {key: given.get(key, p.default) for key, p in params.items()}


def _is_default(value: Any, default: Any) -> bool:
    if value is default:
        return True
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return False
    try:
        return bool(value == default)
    except (TypeError, ValueError, RuntimeError):  # an array-like without a single truth value
        return False


def step_accepts(pipe: Any, name: str) -> bool:
    """Whether ``pipe.scheduler.step`` takes ``name`` (as a pipeline's ``prepare_extra_step_kwargs`` asks)."""
    return name in inspect.signature(pipe.scheduler.step).parameters


def step_noise(pipe: Any, schedule: Schedule, latents: torch.Tensor, generator: Any,
               batch: int | None = None) -> torch.Tensor | None:
    """``[S, *latents.shape]``: the noise each ``pipe.scheduler.step`` of the loop draws from
    ``generator``, in loop order (zeros where a step draws none); None for a deterministic chain.
    With ``batch``, each step draws for that many rows and the first ``latents.shape[0]`` are kept.

    DDIM (eta > 0) and Euler ancestral draw every step, DDPM at timesteps > 0, flow matching
    (``stochastic_sampling``) and DPM-Solver's SDE variants every step in float32 (the latter
    also at a final step whose noise scale is 0); each in the model output's shape (the
    latents'), as their ``step`` does.
    """
    from diffusers.utils.torch_utils import randn_tensor

    if not schedule.is_stochastic:
        return None
    name = type(pipe.scheduler).__name__
    kind = SUPPORTED.get(name)
    if kind not in ("ddim", "ddpm", "euler_a", "flow", "dpm"):
        raise UnsupportedSchedulerOption(f"{name}: sample_pipeline does not know the order of its noise draws")
    dtype = torch.float32 if kind in ("flow", "dpm") else latents.dtype
    shape, rows = (batch or latents.shape[0], *latents.shape[1:]), latents.shape[0]
    draws = [
        torch.zeros_like(latents) if kind == "ddpm" and int(t) == 0
        else randn_tensor(shape, generator=generator, device=latents.device, dtype=dtype)[:rows].to(latents.dtype)
        for t in schedule.timesteps
    ]
    return torch.stack(draws)


def set_timesteps(pipe: Any, num_inference_steps: int, device: Any, **kwargs: Any) -> None:
    """``pipe.scheduler.set_timesteps`` as the pipeline's loop calls it before ``prepare_latents``
    (an Euler scheduler's ``init_noise_sigma``, which scales the latents, depends on it)."""
    pipe.scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)


def sample_pipeline(pipe: Any, *args: Any, return_solve: bool = False, **kwargs: Any) -> Any:
    """``pipe(**kwargs)``, with the denoising loop solved in parallel by deqkern.

    Takes the pipeline's own arguments (by keyword; DDIM/DDPM pipelines also ``batch_size,
    num_inference_steps`` positionally) and deqkern's: ``solver``, ``tol``, ``window``,
    ``max_iters``, ``stop``, ``form``, ``solver_options``, ``execution``, ``rounds_per_graph``,
    ``extrapolate``, ``config`` (a :class:`~deqkern.SolveConfig`), ``max_batch``, ``model_dtype``.
    Returns what the pipeline returns (its output class, ``output_type`` "pil" by default, a
    tuple with ``return_dict=False``) from the same generator draws in the same order: the latents
    by the pipeline's ``prepare_latents``, then each step's noise in loop order. The solve's
    :class:`~deqkern.SampleResult` is the output's attribute ``deqkern`` (not on a tuple);
    ``return_solve=True`` returns ``(output, result)`` instead.

    ``callback_on_step_end`` is called after the solve, once per step in loop order with that
    step's solved latents: it may read them and interrupt (``pipe._interrupt = True``: the output
    is then the latents of that step, as the pipeline's loop leaves them); a callback that returns
    changed tensors raises (the steps after it were solved without the change). The progress bar
    follows ``pipe.set_progress_bar_config`` and counts steps every sample has frozen, with the
    rounds so far; it is updated every round under eager execution, at the end otherwise.
    """
    adapter = adapter_for(pipe)
    solve_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in SOLVE_KEYWORDS}
    call = bind_call(pipe, adapter, args, kwargs)
    scheduler_from_any(pipe.scheduler)  # an unsupported scheduler fails before any work
    callback = call.get("callback_on_step_end")
    pipe._interrupt = False
    with torch.no_grad():  # as the pipeline's __call__
        den = adapter.prepare(pipe, call)
        schedule = Schedule.from_diffusers(pipe.scheduler, den.num_inference_steps, **den.schedule_kwargs)
        if den.adjust_schedule is not None:
            schedule = den.adjust_schedule(schedule)
        noise = step_noise(pipe, schedule, den.latents, den.generator, den.noise_batch)
        res = _sampler(pipe, den, schedule, solve_kw)(
            den.latents, noise, progress=dict(getattr(pipe, "_progress_bar_config", {})),
            return_trajectory=callback is not None, model_kwargs=den.model_kwargs, guidance=den.guidance,
        )
        x0 = res.x0 if callback is None else _replay_callbacks(pipe, call, den, schedule, res)
        out = adapter.decode(pipe, x0, call, den)
    pipe.maybe_free_model_hooks()
    if not isinstance(out, tuple):
        out.deqkern = res
    return (out, res) if return_solve else out


def _sampler(pipe: Any, den: Denoise, schedule: Schedule, solve_kw: dict[str, Any]) -> ParallelSampler:
    """The sampler the pipe keeps (``pipe._deqkern_sampler``) when this call's model, chain,
    guidance on/off and options are the last call's, so its workspaces (and captured CUDA graphs)
    are reused with this call's conditioning; else a new one, kept in its place."""
    key = (id(den.model), type(pipe.scheduler).__name__, repr(sorted(dict(pipe.scheduler.config).items())),
           den.num_inference_steps, repr(sorted(den.schedule_kwargs.items())), den.guidance is None,
           repr(sorted(solve_kw.items())))
    kept = getattr(pipe, "_deqkern_sampler", None)
    if kept is not None and kept[0] == key:
        return kept[1]
    sampler = ParallelSampler(den.model, schedule, model_kwargs=den.model_kwargs, guidance=den.guidance,
                              cache_size=1, **solve_kw)
    pipe._deqkern_sampler = (key, sampler)
    return sampler


def _replay_callbacks(
    pipe: Any, call: dict[str, Any], den: Denoise, schedule: Schedule, res: SampleResult
) -> torch.Tensor:
    """Call ``callback_on_step_end`` per step on the solved trajectory; the latents the loop ends
    with (earlier when the callback interrupts)."""
    callback = call["callback_on_step_end"]
    names = getattr(callback, "tensor_inputs", None) or call.get("callback_on_step_end_tensor_inputs") or ["latents"]
    ts = schedule.timesteps if schedule.step_inputs is None else schedule.step_inputs.timesteps
    traj = res.trajectory
    for i in range(schedule.num_steps):
        latents = traj[i + 1]
        values = {k: latents if k == "latents" else den.callback_tensors[k] for k in names}
        returned = callback(pipe, i, ts[i], dict(values)) or {}
        changed = [k for k, v in returned.items() if k in values and v is not values[k]
                   and not (isinstance(v, torch.Tensor) and torch.equal(v, values[k]))]
        if changed:
            raise ValueError(f"callback_on_step_end: changed {changed} at step {i}; sample_pipeline solves every step "
                             "at once, so it can honour a callback that reads and interrupts, not one that edits")
        if getattr(pipe, "_interrupt", False):
            return latents
    return traj[-1]
