"""Model inversion through the fixed point (GitHub issue 5).

    >>> from deqkern.inversion import invert, sample_with_implicit_grad
    >>> res = invert(unet, target, sched, method="implicit", lr=0.05, time_budget=30)
    >>> res.x_T, res.reconstruction, res.loss, res.curve

* :func:`sample_with_implicit_grad` — ``x0`` of the chain as a differentiable function of ``x_T``
  and the step noise; backward = exact implicit gradient (the adjoint solved in parallel) or
  DEQ-DDIM's phantom gradient.
* :func:`invert` — optimise ``x_T`` so the chain reproduces a target; methods ``"implicit"``,
  ``"phantom"``, ``"sequential_backprop"``, ``"ddim_encode"``.
"""
from deqkern.inversion.adjoint import (
    AdjointSolution, ChainVJP, GradConfig, RecomputeVJP, phantom_gradient, solve_adjoint,
)
from deqkern.inversion.baselines import ddim_encode, sequential_chain
from deqkern.inversion.function import ImplicitStats, sample_with_implicit_grad
from deqkern.inversion.optimize import METHODS, InversionResult, InversionStep, InvertConfig, invert, mse

__all__ = [
    "METHODS", "AdjointSolution", "ChainVJP", "GradConfig", "ImplicitStats", "InversionResult", "InversionStep",
    "InvertConfig", "RecomputeVJP", "ddim_encode", "invert", "mse", "phantom_gradient", "sample_with_implicit_grad",
    "sequential_chain", "solve_adjoint",
]
