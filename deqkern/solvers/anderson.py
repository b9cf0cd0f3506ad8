"""Anderson acceleration (type II) over the solver window (docs/math.md §4.2).

History lives in a ring of ``m`` slots shared by all rows; each row also has an *age* (how many
of the newest slots belong to it), because rows enter the window as it slides and a row may only
mix iterates of its own position. Two mixing granularities:

* ``mixing="row"`` — separate weights per (sample, timestep) row, as DEQ-DDIM does;
* ``mixing="sample"`` — one weight vector per sample over all its rows with full history
  (rows that entered the window too recently to have it take a damped Picard step);
* ``mixing="triangular"`` — triangular Anderson (ParaTAA, Tang et al. 2024): the map is
  lower-triangular, so row i's least squares uses the residual rows 0..i only — its Gram matrix
  is the prefix sum of the per-row Gram blocks. Rows enter the window at its end, so ages never
  increase along a window and row i's valid slots are valid for every row of its prefix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from deqkern.ops import anderson_mix, anderson_weights
from deqkern.ops.window import RowSlide, one_hot
from deqkern.solvers.base import register_solver


@dataclass(frozen=True)
class AndersonConfig:
    """``history`` m (<= 8 for the fused kernels), ``damping`` beta, relative ``ridge`` lambda.

    Defaults chosen by ``python -m deqkern.bench --steps 25 100 1000`` (bench/results/README.md,
    "Rounds to sequential accuracy").
    """

    history: int = 2
    damping: float = 1.0
    ridge: float = 1e-3
    mixing: Literal["row", "sample", "triangular"] = "triangular"
    #: safeguard: a row whose residual grew by more than this factor since the last round drops
    #: its history and takes a plain (damped) Picard step; None disables the restart
    restart: float | None = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.history, int) or not 1 <= self.history <= 8:
            raise ValueError(f"history: expected an int in [1, 8], got {self.history!r}")
        if not 0 < self.damping <= 1:
            raise ValueError(f"damping: expected 0 < damping <= 1, got {self.damping}")
        if not self.ridge >= 0:
            raise ValueError(f"ridge: expected >= 0, got {self.ridge}")
        if self.restart is not None and not self.restart > 0:
            raise ValueError(f"restart: expected a growth factor > 0 or None, got {self.restart}")
        if self.mixing not in ("row", "sample", "triangular"):
            raise ValueError(f"mixing: expected 'row', 'sample' or 'triangular', got {self.mixing!r}")


class AndersonSolver:
    """Anderson state for B samples x W rows. Every update is in place and free of host syncs
    (the ring slot lives on the device), so rounds can be captured in a CUDA graph."""

    def __init__(self, config: AndersonConfig, batch: int, width: int, dim: int, device, dtype) -> None:
        m = config.history
        self.cfg = config
        self.hist_x = torch.zeros(m, batch, width, dim, device=device, dtype=dtype)
        self.hist_f = torch.zeros(m, batch, width, dim, device=device, dtype=dtype)
        self.gram = torch.zeros(batch, width, m, m, device=device, dtype=torch.float64)
        self.age = torch.zeros(batch, width, device=device, dtype=torch.int64)
        self.slot_round = torch.full((m,), -(2**40), device=device, dtype=torch.int64)
        self.count = torch.zeros((), device=device, dtype=torch.int64)
        self.prev_f_sq = torch.full((batch, width), float("inf"), device=device, dtype=torch.float64)
        #: live problems whose bordered system was singular (fell back to Picard), all rounds
        self.fallbacks = torch.zeros((), device=device, dtype=torch.int64)

    def gram_history(self) -> torch.Tensor:
        """The residual history whose Gram row the scan fuses (the ``gram`` of :meth:`update`)."""
        return self.hist_f

    def update(self, x, g, f, f_sq, gram, live):
        m = self.cfg.history
        slot = torch.remainder(self.count, m).view(1)
        f_sq = f_sq.to(torch.float64)
        # Gram row of the new residual against the history *before* the slot is overwritten;
        # the overwritten slot's entry becomes <f, f>.
        row = gram.to(torch.float64).index_copy(-1, slot, f_sq.unsqueeze(-1))
        self.gram.index_copy_(2, slot, row.unsqueeze(2))
        self.gram.index_copy_(3, slot, row.unsqueeze(3))
        self.hist_x.index_copy_(0, slot, x.unsqueeze(0))
        self.hist_f.index_copy_(0, slot, f.unsqueeze(0))
        self.slot_round.index_copy_(0, slot, self.count.view(1))
        age = torch.where(live, (self.age + 1).clamp(max=m), self.age)
        if self.cfg.restart is not None:
            grew = live & (f_sq > self.cfg.restart**2 * self.prev_f_sq)
            age = torch.where(grew, torch.ones_like(age), age)
            self.prev_f_sq.copy_(torch.where(live, f_sq, self.prev_f_sq))
        self.age.copy_(age)
        valid = (self.count - self.slot_round).view(1, 1, m) < self.age.unsqueeze(-1)
        newest = slot.expand(self.age.shape)
        if self.cfg.mixing in ("row", "triangular"):
            gram = self.gram
            if self.cfg.mixing == "triangular":
                gram = torch.cumsum(self.gram * live[..., None, None], dim=1)
            alpha, ok = anderson_weights(gram.flatten(0, 1), valid.flatten(0, 1), newest.flatten(), self.cfg.ridge)
            alpha = alpha.view(*self.age.shape, m)
            self.fallbacks.add_((~ok.view(self.age.shape) & live).sum())
        else:
            alpha = self._sample_weights(valid, newest, live)
        self.count.add_(1)
        return anderson_mix(self.hist_x, self.hist_f, alpha, self.cfg.damping)

    def _sample_weights(self, valid, newest, live):
        m = self.cfg.history
        oldest = torch.where(live, self.age, torch.zeros_like(self.age)).amax(dim=1, keepdim=True)
        full = live & (self.age == oldest)
        h = (self.gram * full[..., None, None]).sum(1)
        # every full row of a sample has the same valid slots: take them from its first full row
        first = full.to(torch.int64).argmax(dim=1)
        v = valid[torch.arange(valid.shape[0], device=valid.device), first]
        a, ok = anderson_weights(h, v, newest[:, 0], self.cfg.ridge)
        self.fallbacks.add_((~ok & live.any(1)).sum())
        picard = one_hot(newest, m, a.dtype)
        return torch.where(full.unsqueeze(-1), a.unsqueeze(1), picard)

    def shift(self, delta: torch.Tensor) -> None:
        slide = RowSlide(delta, self.age.shape[1])
        # rows past the window's end start empty: age 0 marks their history slots invalid
        slide.apply(self.hist_x.permute(1, 2, 0, 3), 0.0)  # [m, B, W, D] as [B, W, m, D]
        slide.apply(self.hist_f.permute(1, 2, 0, 3), 0.0)
        slide.apply(self.gram, 0.0)
        slide.apply(self.age, 0)
        slide.apply(self.prev_f_sq, float("inf"))


register_solver("anderson", AndersonConfig, AndersonSolver)
