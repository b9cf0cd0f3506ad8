"""deqkern: diffusion sampling as one fixed point, solved in parallel.

    >>> import deqkern
    >>> sched = deqkern.Schedule.from_diffusers(ddim_scheduler, num_inference_steps=100)
    >>> res = deqkern.sample(unet, x_T, sched, solver="anderson", tol=1e-3)
    >>> res.x0, res.converged, res.rounds, res.model_evals

Importing deqkern imports only torch and numpy: diffusers, triton, matplotlib and cupy are
loaded on first use by the parts that need them.
"""
from deqkern.config import SolveConfig
from deqkern.sampling import ParallelSampler, SampleResult, SequentialSampler, sample, sample_sequential
from deqkern.errors import CaptureHazard, NonFiniteModelOutput, UnsupportedSchedulerOption
from deqkern.model import Guidance
from deqkern.pipelines import sample_pipeline
from deqkern.schedule import Schedule, X0Transform
from deqkern.solvers import AndersonConfig, PicardConfig, Solver, SolverFactory, register_solver, solver_names

__version__ = "0.1.0"

__all__ = [
    "AndersonConfig", "CaptureHazard", "Guidance", "NonFiniteModelOutput", "ParallelSampler", "PicardConfig",
    "SampleResult", "Schedule", "SequentialSampler", "SolveConfig", "Solver", "SolverFactory",
    "UnsupportedSchedulerOption", "X0Transform", "register_solver", "sample", "sample_pipeline", "sample_sequential",
    "solver_names",
]
