"""Exceptions raised by deqkern. Each names the argument or option at fault."""
from __future__ import annotations


class UnsupportedSchedulerOption(ValueError):
    """A scheduler configuration that deqkern cannot reproduce exactly.

    We refuse instead of approximating: a parallel solve must converge to the *same*
    trajectory as the scheduler's own ``step()``.
    """


class NonFiniteModelOutput(FloatingPointError):
    """The model returned NaN or inf; the message names the round and the timestep."""


class CaptureHazard(RuntimeError):
    """Work that a CUDA graph cannot replay faithfully: a host sync, or a call that dispatches
    different ops, shapes, scalars or buffers from the captured one (see
    :func:`deqkern.graph_audit.audit_replay`)."""
