"""Picard (fixed-point) iteration ``x <- x + beta (G(x) - x)``: with beta = 1 it reproduces the
sequential chain exactly after S rounds (the map is lower-triangular, docs/math.md §2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from deqkern.solvers.base import register_solver


@dataclass(frozen=True)
class PicardConfig:
    damping: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.damping <= 1:
            raise ValueError(f"damping: expected 0 < damping <= 1, got {self.damping}")


class PicardSolver:
    def __init__(self, config: PicardConfig) -> None:
        self.beta = config.damping
        self.picard = self.beta == 1.0

    def update(self, x, g, f, f_sq, gram, live):  # noqa: D401 - protocol method
        return g if self.beta == 1.0 else x + self.beta * f

    def shift(self, delta: torch.Tensor) -> None:
        """Picard keeps no state across rounds."""


register_solver("picard", PicardConfig, lambda cfg, *shape: PicardSolver(cfg))
