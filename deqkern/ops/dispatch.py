"""Choose the implementation of each op from the tensors it is given.

Until the Triton kernels land, every op resolves to the reference; ``backend_for`` is the
single decision point both the ops and the benchmarks ask.
"""
from __future__ import annotations

from typing import Literal

import torch

from deqkern.ops import reference

Backend = Literal["reference", "triton"]


def backend_for(t: torch.Tensor) -> Backend:
    """The backend that will run an op whose main operand is ``t``."""
    return "reference"


scan_residual = reference.scan_residual
anderson_weights = reference.anderson_weights
anderson_mix = reference.anderson_mix
