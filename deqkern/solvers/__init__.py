"""Fixed-point solvers over the window of every sample, behind one registry.

A solver sees, each round, the current iterate ``x``, the map's value ``g = G(x)`` and the
residual ``f = g - x`` of the live rows and returns the next iterate; the engine freezes the
converged prefix and slides the window, telling the solver through :meth:`Solver.shift`.
New solvers register with :func:`register_solver`.
"""
from deqkern.solvers.anderson import AndersonConfig, AndersonSolver
from deqkern.solvers.base import Solver, SolverFactory, get_solver, register_solver, solver_names
from deqkern.solvers.picard import PicardConfig, PicardSolver

__all__ = [
    "AndersonConfig", "AndersonSolver", "PicardConfig", "PicardSolver", "Solver", "SolverFactory",
    "get_solver", "register_solver", "solver_names",
]
