"""The model interface: any ``model(x[N, ...], t[N], **kwargs) -> output``.

diffusers models (which return an object with ``.sample``) and tuple-returning models are
accepted directly. The solver calls the model on many (sample, timestep) rows at once; per-sample
conditioning tensors (``encoder_hidden_states`` ...) are gathered to the rows by sample index,
and classifier-free guidance doubles the row batch exactly as a diffusers pipeline does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from deqkern.errors import NonFiniteModelOutput

ModelFn = Callable[..., Any]


def model_output_tensor(out: Any) -> torch.Tensor:
    """The tensor inside a model's return value (``.sample``, first tuple item, or itself)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model: expected a tensor, a tuple or an object with .sample, got {type(out).__name__}")


@dataclass
class Guidance:
    """Classifier-free guidance: ``out = u + scale * (c - u)``.

    ``cond`` and ``uncond`` map keyword names (e.g. ``encoder_hidden_states``) to tensors with
    a leading dimension of 1 (shared) or the number of samples B (the negative prompt embeddings
    go in ``uncond``).
    """

    scale: float
    cond: Mapping[str, torch.Tensor]
    uncond: Mapping[str, torch.Tensor]

    def __post_init__(self) -> None:
        if set(self.cond) != set(self.uncond):
            raise ValueError(f"guidance: cond keys {sorted(self.cond)} and uncond keys {sorted(self.uncond)} differ")


@dataclass
class ModelEvaluator:
    """Calls the model on rows ``(x, t, sample index)``, in chunks of at most ``max_batch`` rows.

    ``max_batch`` counts model-batch rows (so a guided row costs two). Outputs are checked for
    NaN/inf; the error names the round and the timesteps at fault.
    """

    model: ModelFn
    model_kwargs: Mapping[str, torch.Tensor] = field(default_factory=dict)
    guidance: Guidance | None = None
    max_batch: int | None = None
    model_dtype: torch.dtype | None = None
    evaluations: int = 0

    def __post_init__(self) -> None:
        if self.max_batch is not None and (not isinstance(self.max_batch, int) or self.max_batch < 1):
            raise ValueError(f"max_batch: expected an int >= 1 or None, got {self.max_batch!r}")
        if self.guidance is not None and self.max_batch is not None and self.max_batch < 2:
            raise ValueError("max_batch: classifier-free guidance needs at least 2 rows per model call")

    def check_conditioning(self, batch: int) -> None:
        """Every conditioning tensor has a leading dim of 1 or ``batch``."""
        groups = [self.model_kwargs]
        if self.guidance is not None:
            groups += [self.guidance.cond, self.guidance.uncond]
        for group in groups:
            for name, value in group.items():
                if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] not in (1, batch):
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(
                        f"model_kwargs[{name!r}]: expected a tensor with leading dim 1 or {batch}, got {shape}"
                    )

    def __call__(self, x: torch.Tensor, t: torch.Tensor, sample_idx: torch.Tensor, round_index: int) -> torch.Tensor:
        """Model outputs for rows ``x[N, ...]`` at timesteps ``t[N]`` of samples ``sample_idx[N]``,
        checked: a non-finite output raises, naming ``round_index`` and the timesteps."""
        out = self.raw(x, t, sample_idx)
        rows = x.shape[0]
        bad = ~torch.isfinite(out.reshape(rows, -1)).all(dim=1)
        if bool(bad.any()):
            ts = sorted(set(t[bad].tolist()))
            raise NonFiniteModelOutput(f"model output is not finite in round {round_index} at timestep(s) {ts}")
        return out

    def raw(self, x: torch.Tensor, t: torch.Tensor, sample_idx: torch.Tensor) -> torch.Tensor:
        """Model outputs in ``x``'s dtype, unchecked and without host syncs (CUDA-graph safe)."""
        rows = x.shape[0]
        per_call = self.max_batch or rows
        if self.guidance is not None:
            per_call = max(1, per_call // 2)
        outs = [
            self._call_chunk(x[i : i + per_call], t[i : i + per_call], sample_idx[i : i + per_call])
            for i in range(0, rows, per_call)
        ]
        self.evaluations += rows
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return out.to(x.dtype)

    def _call_chunk(self, x: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        xin = x if self.model_dtype is None else x.to(self.model_dtype)
        kwargs = _gather(self.model_kwargs, idx)
        if self.guidance is None:
            return model_output_tensor(self.model(xin, t, **kwargs))
        g = self.guidance
        cond = {**kwargs, **_gather(g.cond, idx)}
        uncond = {**kwargs, **_gather(g.uncond, idx)}
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        out = model_output_tensor(self.model(torch.cat([xin, xin]), torch.cat([t, t]), **both))
        u, c = out.chunk(2)
        return u + g.scale * (c - u)


def _gather(kwargs: Mapping[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row conditioning: broadcast leading-dim-1 tensors, index per-sample ones."""
    out = {}
    for name, value in kwargs.items():
        if value.shape[0] == 1:
            out[name] = value.expand(idx.shape[0], *value.shape[1:])
        else:
            out[name] = value[idx.to(value.device)]
    return out
