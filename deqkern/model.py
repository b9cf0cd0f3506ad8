"""The model interface: any ``model(x[N, ...], t[N], **kwargs) -> output``.

diffusers models (which return an object with ``.sample``) and tuple-returning models are
accepted directly. The solver calls the model on many (sample, timestep) rows at once; per-sample
conditioning tensors (``encoder_hidden_states``, also inside nested dicts such as
``added_cond_kwargs``) are gathered to the rows by sample index, other values (``cross_attention_kwargs
={"scale": 0.5}``) are passed through unchanged, and classifier-free guidance doubles the row batch
exactly as a diffusers pipeline does.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from deqkern.errors import NonFiniteModelOutput

ModelFn = Callable[..., Any]

#: the ``model_dtype`` names accepted besides a ``torch.dtype``
MODEL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64}


def model_output_tensor(out: Any) -> torch.Tensor:
    """The tensor inside a model's return value (``.sample``, first tuple item, or itself)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model: expected a tensor, a tuple or an object with .sample, got {type(out).__name__}")


def resolve_model_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``model_dtype`` as a floating ``torch.dtype`` (or None): a dtype or one of :data:`MODEL_DTYPES`' names."""
    if value is None or (isinstance(value, torch.dtype) and value.is_floating_point):
        return value
    if isinstance(value, str) and value in MODEL_DTYPES:
        return MODEL_DTYPES[value]
    raise ValueError(f"model_dtype: expected None, a floating torch.dtype or one of {sorted(MODEL_DTYPES)}, "
                     f"got {value!r}")


def _check_mapping(value: Any, name: str) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name}: expected a mapping of keyword names to values, got {type(value).__name__}")


@dataclass
class Guidance:
    """Classifier-free guidance: ``g = u + scale * (c - u)``; with ``rescale = r > 0`` (diffusers'
    ``guidance_rescale``, its ``rescale_noise_cfg``: Lin et al. 2023, section 3.4) each row's
    ``g`` is pulled towards the conditional output's standard deviation,
    ``out = r * g * std(c) / std(g) + (1 - r) * g`` (std over a row's elements, unbiased).

    ``cond`` and ``uncond`` map keyword names (e.g. ``encoder_hidden_states``) to tensors with
    a leading dimension of 1 (shared) or the number of samples B (the negative prompt embeddings
    go in ``uncond``), or to nested dicts of such tensors (``added_cond_kwargs``). One model call
    sees both halves, concatenated uncond then cond, so a key's tensors must agree beyond the
    leading dim and its non-tensor values must be equal.
    """

    scale: float
    cond: Mapping[str, Any]
    uncond: Mapping[str, Any]
    rescale: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Real) or not math.isfinite(self.scale):
            raise ValueError(f"guidance.scale: expected a finite number, got {self.scale!r}")
        if isinstance(self.rescale, bool) or not isinstance(self.rescale, numbers.Real) or not (
                math.isfinite(self.rescale) and self.rescale >= 0):
            raise ValueError(f"guidance.rescale: expected a finite number >= 0, got {self.rescale!r}")
        _check_mapping(self.cond, "guidance.cond")
        _check_mapping(self.uncond, "guidance.uncond")
        _check_halves(self.cond, self.uncond, "")

    def combine(self, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The guided output of the unconditional and conditional outputs ``u``, ``c`` (``[R, ...]``)."""
        guided = u + self.scale * (c - u)
        if self.rescale == 0:
            return guided
        dims = list(range(1, c.ndim))
        rescaled = guided * (c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        return self.rescale * rescaled + (1 - self.rescale) * guided

    @property
    def rounding_gain(self) -> float:
        """How many times a model's own rounding the guided output carries, before any rescale:
        ``max(1, sqrt((1 - s)^2 + s^2))``, 9.92 at ``s = 7.5``. A half-precision model rounds ``u``
        and ``c`` independently (different conditioning, different arithmetic), each by about
        ``eps`` times its norm, and the guided output weighs them by ``1 - s`` and ``s``; it
        scales the tolerance floor of a guided half model (:func:`deqkern.sampling.tol_floor`).
        The rescale's factor (below 1 where guidance widens the output) is left out: the floor
        stays at least what the model's rounding gives."""
        return max(1.0, math.hypot(1.0 - self.scale, self.scale))

    def rounding_scale(self, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``[R]`` float64: per row, the norm of the output whose rounding the guided output
        carries, ``sqrt(((1 - s) ||u||)^2 + (s ||c||)^2)`` (see :attr:`rounding_gain`) times the
        rescale's factor ``r std(c) / std(g) + 1 - r``: it stands for ``||e||`` in the rounding
        floor of the x0 rule (:func:`deqkern.ops.reference.rounding_floor`)."""
        nu, nc = (torch.linalg.vector_norm(v.flatten(1), dim=1, dtype=torch.float64) for v in (u, c))
        scale = torch.hypot((1.0 - self.scale) * nu, self.scale * nc)
        if self.rescale == 0:
            return scale
        u64, c64 = (v.flatten(1).to(torch.float64) for v in (u, c))
        factor = c64.std(dim=1) / (u64 + self.scale * (c64 - u64)).std(dim=1)
        return scale * (self.rescale * factor + 1 - self.rescale)


def _check_halves(cond: Mapping[str, Any], uncond: Mapping[str, Any], path: str) -> None:
    """``cond`` and ``uncond`` can be concatenated key by key (``path``: the keys above, for errors)."""
    if set(cond) != set(uncond):
        raise ValueError(f"guidance: cond{path} keys {sorted(cond)} and uncond{path} keys {sorted(uncond)} differ")
    for key, c in cond.items():
        u, where = uncond[key], f"{path}[{key!r}]"
        if isinstance(c, Mapping) and isinstance(u, Mapping):
            _check_halves(c, u, where)
        elif isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor):
            if c.ndim == 0 or u.ndim == 0 or c.shape[1:] != u.shape[1:]:
                raise ValueError(f"guidance.cond{where} {tuple(c.shape)} and guidance.uncond{where} {tuple(u.shape)}: "
                                 "expected the same shape beyond the leading (sample) dim")
        elif isinstance(c, (torch.Tensor, Mapping)) or isinstance(u, (torch.Tensor, Mapping)) or c != u:
            raise ValueError(f"guidance.cond{where} and guidance.uncond{where}: one model call sees both, so "
                             f"expected two tensors, two dicts or equal other values, got {c!r} and {u!r}")


@dataclass(frozen=True)
class StepInputs:
    """What the model receives at each step when that is not ``(x[k], timesteps[k])``: the
    diffusers loop's ``model(scale_model_input(x, t), t)`` with a per-step input scale and a
    float timestep (Euler: ``x / sqrt(sigma_k^2 + 1)`` and ``t_k`` interpolated between training
    timesteps; flow matching: scale 1 and ``t_k = 1000 sigma_k``).

    The chain then labels its rows by step position ``k`` (the int64 ``t`` the kernels and the
    solver's bookkeeping carry, :attr:`deqkern.Schedule.timesteps`), and the evaluator maps a label
    to the model's input: ``x * scale[k]`` and ``timesteps[k]``.
    """

    timesteps: torch.Tensor  #: [S] the timestep the model gets at step k, in the scheduler's dtype
    scale: torch.Tensor | None  #: [S] float64 model-input scale (None: 1, nothing multiplied)
    #: per (device, dtype) copies, made on first use: inside a captured CUDA graph a copy from the
    #: host would be a sync
    _on: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        s = self.timesteps.shape
        if self.timesteps.ndim != 1 or not bool(torch.isfinite(self.timesteps.double()).all()):
            raise ValueError(f"step_inputs.timesteps: expected a finite 1-D tensor, got shape {tuple(s)}")
        if self.scale is not None and (self.scale.shape != s or self.scale.dtype != torch.float64
                                       or not bool((self.scale > 0).all() & torch.isfinite(self.scale).all())):
            raise ValueError(f"step_inputs.scale: expected finite positive float64 of shape {tuple(s)}, "
                             f"got {self.scale.dtype} {tuple(self.scale.shape)}")

    def apply(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x * scale[labels], timesteps[labels])`` for rows ``x[N, ...]`` labelled by step position."""
        key = (x.device, x.dtype)
        if key not in self._on:
            scale = None if self.scale is None else self.scale.to(x.device, x.dtype)
            self._on[key] = (self.timesteps.to(x.device), scale)
        ts, scale = self._on[key]
        if scale is not None:
            x = x * scale[labels].reshape(-1, *[1] * (x.ndim - 1))
        return x, ts[labels]


@dataclass
class ModelEvaluator:
    """Calls the model on rows ``(x, t, sample index)``: one model call per round, or chunks of
    at most ``max_batch`` model-batch rows.

    ``max_batch`` and ``evaluations`` count model-batch rows: under classifier-free guidance a
    latent row is two model rows (uncond and cond). Outputs must have the input's shape and are
    checked for NaN/inf; the error names the round and the timesteps at fault. With ``inputs``
    (a schedule's :class:`StepInputs`) the ``t`` it is called with are step positions, mapped to
    the model's scaled input and timestep here, so every caller feeds the model alike.
    """

    model: ModelFn
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    guidance: Guidance | None = None
    max_batch: int | None = None
    model_dtype: torch.dtype | str | None = None
    evaluations: int = 0
    inputs: StepInputs | None = None

    def __post_init__(self) -> None:
        _check_mapping(self.model_kwargs, "model_kwargs")
        if self.guidance is not None and not isinstance(self.guidance, Guidance):
            raise TypeError(f"guidance: expected a deqkern.Guidance or None, got {type(self.guidance).__name__}")
        if self.max_batch is not None and (not isinstance(self.max_batch, int) or self.max_batch < 1):
            raise ValueError(f"max_batch: expected an int >= 1 or None, got {self.max_batch!r}")
        if self.guidance is not None and self.max_batch is not None and self.max_batch < 2:
            raise ValueError("max_batch: classifier-free guidance needs at least 2 rows per model call")
        self.model_dtype = resolve_model_dtype(self.model_dtype)

    @property
    def rows_per_latent(self) -> int:
        """Model-batch rows per latent row: 2 under classifier-free guidance, else 1."""
        return 1 if self.guidance is None else 2

    def check_conditioning(self, batch: int) -> None:
        """Every conditioning tensor, also in nested dicts, has a leading dim of 1 or ``batch``."""
        _check_leading(self.model_kwargs, batch, "model_kwargs")
        if self.guidance is not None:
            _check_leading(self.guidance.cond, batch, "guidance.cond")
            _check_leading(self.guidance.uncond, batch, "guidance.uncond")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, sample_idx: torch.Tensor, round_index: int) -> torch.Tensor:
        """Model outputs for rows ``x[N, ...]`` at timesteps ``t[N]`` of samples ``sample_idx[N]``,
        checked: a non-finite output raises, naming ``round_index`` and the timesteps."""
        out = self.raw(x, t, sample_idx)
        rows = x.shape[0]
        bad = ~torch.isfinite(out.reshape(rows, -1)).all(dim=1)
        if bool(bad.any()):
            ts = sorted(set(t[bad].tolist()))
            what = "timestep(s)" if self.inputs is None else "step(s)"
            raise NonFiniteModelOutput(f"model output is not finite in round {round_index} at {what} {ts}")
        return out

    def raw(self, x: torch.Tensor, t: torch.Tensor, sample_idx: torch.Tensor,
            rounding: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Model outputs in ``x``'s dtype, unchecked for NaN and without host syncs (CUDA-graph safe).
        ``rounding``: also return ``[N]`` float64 the norm each row's rounding scales with, ``||e||``
        or under guidance :meth:`Guidance.rounding_scale` (the x0 rule's rounding floor of a
        half-precision model)."""
        rows = x.shape[0]
        if self.inputs is not None:
            x, t = self.inputs.apply(x, t)
        per_call = rows if self.max_batch is None else self.max_batch // self.rows_per_latent
        chunks = [
            self._call_chunk(x[i : i + per_call], t[i : i + per_call], sample_idx[i : i + per_call], rounding)
            for i in range(0, rows, per_call)
        ]
        self.evaluations += rows * self.rows_per_latent
        outs, scales = zip(*chunks)
        out = (torch.cat(outs) if len(outs) > 1 else outs[0]).to(x.dtype)
        return (out, torch.cat(scales)) if rounding else out

    def _call_chunk(self, x: torch.Tensor, t: torch.Tensor, idx: torch.Tensor,
                    rounding: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One model call's outputs and, if ``rounding``, their rows' rounding scales (:meth:`raw`)."""
        xin = x if self.model_dtype is None else x.to(self.model_dtype)
        if self.guidance is None:
            kwargs = gather_rows(self.model_kwargs, idx)
            return self.finish(_checked_shape(model_output_tensor(self.model(xin, t, **kwargs)), xin.shape), rounding)
        return self.finish(self.guided_rows((xin, t, idx), (xin, t, idx)), rounding)

    def finish(self, out: torch.Tensor, rounding: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A model batch ``out`` (under guidance: the uncond rows, then as many cond rows) as the
        rows' outputs, guided where guidance is set, and, if ``rounding``, their rounding scales."""
        if self.guidance is None:
            return out, row_norms(out) if rounding else None
        u, c = out.chunk(2)
        return self.guidance.combine(u, c), self.guidance.rounding_scale(u, c) if rounding else None

    def guided_rows(self, uncond: tuple[torch.Tensor, ...], cond: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The raw guided model batch: one call on uncond rows ``(x, t, sample_idx)`` then cond rows
        (either may be empty: :mod:`deqkern.distributed` splits the doubled batch across ranks)."""
        g = self.guidance
        kw = [{**gather_rows(self.model_kwargs, half[2]), **gather_rows(extra, half[2])}
              for half, extra in ((uncond, g.uncond), (cond, g.cond))]
        x, t = torch.cat([uncond[0], cond[0]]), torch.cat([uncond[1], cond[1]])
        return _checked_shape(model_output_tensor(self.model(x, t, **_concat(*kw))), x.shape)


def row_norms(out: torch.Tensor) -> torch.Tensor:
    """``[N]`` float64 per-row L2 norms of ``out`` ``[N, ...]``."""
    return torch.linalg.vector_norm(out.flatten(1), dim=1, dtype=torch.float64)


def _checked_shape(out: torch.Tensor, expected: torch.Size) -> torch.Tensor:
    # shapes are host metadata: this check costs no sync and is safe inside a captured graph
    if out.shape != expected:
        raise ValueError(f"model: expected an output of the input's shape {tuple(expected)}, got {tuple(out.shape)}")
    return out


def _check_leading(kwargs: Mapping[str, Any], batch: int, path: str) -> None:
    """Tensors under ``kwargs`` (recursively) have a leading dim of 1 or ``batch``; other values pass."""
    for name, value in kwargs.items():
        where = f"{path}[{name!r}]"
        if isinstance(value, Mapping):
            _check_leading(value, batch, where)
        elif isinstance(value, torch.Tensor) and (value.ndim == 0 or value.shape[0] not in (1, batch)):
            raise ValueError(f"{where}: expected a tensor with leading dim 1 or {batch}, got {tuple(value.shape)}")


def gather_rows(kwargs: Mapping[str, Any], idx: torch.Tensor) -> dict[str, Any]:
    """Per-row conditioning: broadcast leading-dim-1 tensors, index per-sample ones, recurse into
    dicts and pass any other value through."""
    out: dict[str, Any] = {}
    for name, value in kwargs.items():
        if isinstance(value, Mapping):
            out[name] = gather_rows(value, idx)
        elif not isinstance(value, torch.Tensor):
            out[name] = value
        elif value.shape[0] == 1:
            out[name] = value.expand(idx.shape[0], *value.shape[1:])
        else:
            out[name] = value[idx.to(value.device)]
    return out


def _concat(uncond: Mapping[str, Any], cond: Mapping[str, Any]) -> dict[str, Any]:
    """The guided batch's keywords: tensors concatenated uncond then cond, dicts recursively,
    other values (equal in both, see :class:`Guidance`) once."""
    out: dict[str, Any] = {}
    for name, c in cond.items():
        u = uncond[name]
        if isinstance(c, Mapping):
            out[name] = _concat(u, c)
        elif isinstance(c, torch.Tensor):
            out[name] = torch.cat([u, c])
        else:
            out[name] = c
    return out
