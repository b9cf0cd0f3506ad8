"""Solver protocol and registry.

A solver is registered under a name with :func:`register_solver` and then picked with
``sample(..., solver=name, solver_options=...)``. The engine builds one instance per solve with the
registered factory and, every round, calls :meth:`Solver.update` with the live rows' iterate, map
value and residual, then :meth:`Solver.shift` with how far each window slid.
"""
from __future__ import annotations

from dataclasses import is_dataclass
from typing import Any, Callable, Protocol

import torch

from deqkern._config import config_from


class Solver(Protocol):
    """One solver instance per solve; buffers sized by the window, never by S.

    Required: :meth:`update` and :meth:`shift`. Optional members, which the engine reads with
    ``getattr`` and a default:

    * ``gram_history() -> Tensor | None`` (default: None): a residual history ``hist_f`` ``[m, B,
      W, D]``; the scan op then fuses ``gram[b, j, k] = <f[b, j], hist_f[k, b, j]>`` into its pass
      and hands it to :meth:`update` (without it ``gram`` is None);
    * ``picard: bool`` (default False): its steps are plain Picard steps ``x <- G(x)``, the
      divergence fallback's own, so a growing residual is no reason to restart and there is no
      proposal to replace (:class:`deqkern.engine.DivergenceGuard`);
    * ``fallbacks``: a 0-d integer tensor or int, reported as ``info["fallbacks"]`` (how often the
      solver fell back to a plain step).
    """

    def update(
        self, x: torch.Tensor, g: torch.Tensor, f: torch.Tensor, f_sq: torch.Tensor,
        gram: torch.Tensor | None, live: torch.Tensor,
    ) -> torch.Tensor:
        """Next iterate ``[B, W, D]`` from ``x``, ``g``, ``f`` (``[B, W, D]``), ``f_sq`` and
        ``gram`` (``[B, W]``, ``[B, W, m]``) on the ``live`` rows (``[B, W]`` bool)."""

    def shift(self, delta: torch.Tensor) -> None:
        """Sample ``b``'s window slid forward by ``delta[b]`` rows."""


#: The factory a solver registers: ``factory(config, B, W, D, device, dtype) -> Solver``.
SolverFactory = Callable[[Any, int, int, int, torch.device, torch.dtype], Solver]

#: name -> (config dataclass, factory)
_REGISTRY: dict[str, tuple[type, SolverFactory]] = {}


def register_solver(name: str, config_cls: type, factory: SolverFactory) -> None:
    """Make ``sample(..., solver=name, solver_options=...)`` build a :class:`Solver`.

    ``config_cls``: a dataclass of the solver's options (``solver_options`` is one, or a mapping
    of its fields; validate in ``__post_init__``). ``factory(config, B, W, D, device, dtype)``:
    one solver for ``B`` samples of windows of ``W`` rows of ``D`` latent elements, its state on
    ``device`` in ``dtype`` (the solve state's dtype). A second registration of ``name`` replaces
    the first.
    """
    if not is_dataclass(config_cls):
        raise TypeError(f"config_cls: expected a dataclass, got {config_cls!r}")
    _REGISTRY[name] = (config_cls, factory)


def solver_names() -> list[str]:
    return sorted(_REGISTRY)


def get_solver(name: str, options: Any = None) -> tuple[Any, SolverFactory]:
    """The typed config and factory of solver ``name``; ``options`` is a config or a mapping."""
    if name not in _REGISTRY:
        raise ValueError(f"solver: unknown solver {name!r}; registered: {solver_names()}")
    config_cls, factory = _REGISTRY[name]
    return config_from(config_cls, options, "solver_options"), factory
