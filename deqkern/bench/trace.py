"""Per-round x0 error curves: how far each solver's current x0 estimate is from the oracle.

deqkern's solve hands its x0 estimate to ``on_round`` after every round; the peers' loops in
:mod:`deqkern.bench.peers` do the same. :class:`ErrorTrace` is that hook.
"""
from __future__ import annotations

import math

import torch


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
