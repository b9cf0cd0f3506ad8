"""Per-round x0 error curves: how far each solver's current x0 estimate is from the oracle.

deqkern's solve reports only its final x0, so :class:`TraceSolver` wraps any registered solver
(through the public :func:`deqkern.register_solver`) and reads the x0 row of every proposal. The
wrapper changes nothing in the solve: it forwards every call and only copies one row per sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from deqkern.solvers import get_solver, register_solver, solver_names

TRACE_SOLVER = "_bench_trace"


class ErrorTrace:
    """Collects per-round, per-sample relative errors ``||x0_est - x0_ref|| / ||x0_ref||``.

    Call it with each round's x0 estimate ``[B, ...]`` (NaN rows where a sample has no estimate
    yet, e.g. while its window has not reached x_0).
    """

    def __init__(self, reference: torch.Tensor) -> None:
        self.ref = reference.detach().double().flatten(1)
        self.ref_norm = self.ref.norm(dim=1).clamp(min=1e-300)
        #: ``errors[r][b]``: error of sample b after round r+1 (NaN: no estimate)
        self.errors: list[list[float]] = []

    def __call__(self, x0: torch.Tensor) -> None:
        est = x0.detach().to(self.ref.device).double().flatten(1)
        self.errors.append(((est - self.ref).norm(dim=1) / self.ref_norm).tolist())

    def worst_per_round(self) -> list[float]:
        """Max over samples per round (NaN when some sample has no estimate)."""
        return [max(r) if not any(math.isnan(v) for v in r) else float("nan") for r in self.errors]

    def rounds_to(self, target: float) -> list[int | None]:
        """Per sample: the first round (1-based) whose estimate is within ``target``, or None."""
        out: list[int | None] = []
        for b in range(self.ref.shape[0]):
            hit = next((r + 1 for r, errs in enumerate(self.errors) if errs[b] <= target), None)
            out.append(hit)
        return out


@dataclass(frozen=True)
class TraceConfig:
    """Run solver ``inner`` (with ``options``) and report each round's x0 estimate to ``hook``."""

    inner: str
    options: Any
    steps: int
    hook: Callable[[torch.Tensor], None]


class TraceSolver:
    """Forwards to the inner solver; after each round hands ``hook`` the x0 estimate the engine
    would return if stopped now (the last live row when the window reaches x_0, else NaN)."""

    def __init__(self, config: TraceConfig, batch: int, width: int, dim: int, device, dtype) -> None:
        inner_config, factory = get_solver(config.inner, config.options)
        self.inner = factory(inner_config, batch, width, dim, device, dtype)
        self.cfg = config
        self.k0 = torch.zeros(batch, dtype=torch.int64, device=device)
        self.est = torch.full((batch, dim), float("nan"), device=device, dtype=dtype)
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def hist_f(self) -> torch.Tensor | None:
        return self.inner.hist_f

    @property
    def fallbacks(self) -> Any:
        return getattr(self.inner, "fallbacks", 0)

    def update(self, x, g, f, f_sq, gram, live):
        out = self.inner.update(x, g, f, f_sq, gram, live)
        n = live.sum(1)
        b = torch.arange(n.shape[0], device=n.device)
        last = (n - 1).clamp(min=0)
        self._last = (n, out[b, last].clone(), g[b, last].clone())
        return out

    def shift(self, delta: torch.Tensor) -> None:
        self.inner.shift(delta)
        n, proposal, g_last = self._last
        # when every live row froze (delta == n) the engine keeps G(X) for the x0 row
        value = torch.where((delta == n).unsqueeze(1), g_last, proposal)
        at_end = (n > 0) & (self.k0 + n == self.cfg.steps)
        unknown = torch.full_like(self.est, float("nan"))
        self.est = torch.where(at_end.unsqueeze(1), value, torch.where((n == 0).unsqueeze(1), self.est, unknown))
        self.k0 = self.k0 + delta
        self.cfg.hook(self.est)


def ensure_registered() -> str:
    """Register the tracing wrapper once; returns its solver name."""
    if TRACE_SOLVER not in solver_names():
        register_solver(TRACE_SOLVER, TraceConfig, TraceSolver)
    return TRACE_SOLVER
