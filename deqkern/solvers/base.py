"""Solver protocol and registry."""
from __future__ import annotations

from dataclasses import is_dataclass
from typing import Any, Callable, Protocol

import torch

from deqkern._config import config_from


class Solver(Protocol):
    """One solver instance per solve; buffers sized by the window, never by S."""

    #: Residual history ``[m, B, W, D]`` whose Gram row the scan op should fuse, or None.
    hist_f: torch.Tensor | None
    #: Optional, default False: its steps are plain Picard steps ``x <- G(x)``, the divergence
    #: fallback's own, so a growing residual is no reason to restart and there is no proposal to
    #: replace (:class:`deqkern.engine.DivergenceGuard`).
    picard: bool

    def update(
        self, x: torch.Tensor, g: torch.Tensor, f: torch.Tensor, f_sq: torch.Tensor,
        gram: torch.Tensor | None, live: torch.Tensor,
    ) -> torch.Tensor:
        """Next iterate ``[B, W, D]`` from ``x``, ``g``, ``f`` (``[B, W, D]``), ``f_sq`` and
        ``gram`` (``[B, W]``, ``[B, W, m]``) on the ``live`` rows (``[B, W]`` bool)."""

    def shift(self, delta: torch.Tensor) -> None:
        """Sample ``b``'s window slid forward by ``delta[b]`` rows."""


#: name -> (config dataclass, factory(config, B, W, D, device, dtype) -> Solver)
_REGISTRY: dict[str, tuple[type, Callable[..., Solver]]] = {}


def register_solver(name: str, config_cls: type, factory: Callable[..., Solver]) -> None:
    """Make ``sample(..., solver=name)`` build ``factory(config, B, W, D, device, dtype)``."""
    if not is_dataclass(config_cls):
        raise TypeError(f"config_cls: expected a dataclass, got {config_cls!r}")
    _REGISTRY[name] = (config_cls, factory)


def solver_names() -> list[str]:
    return sorted(_REGISTRY)


def get_solver(name: str, options: Any = None) -> tuple[Any, Callable[..., Solver]]:
    """The typed config and factory of solver ``name``; ``options`` is a config or a mapping."""
    if name not in _REGISTRY:
        raise ValueError(f"solver: unknown solver {name!r}; registered: {solver_names()}")
    config_cls, factory = _REGISTRY[name]
    return config_from(config_cls, options, "solver_options"), factory
