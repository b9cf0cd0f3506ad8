"""Triton kernels of the per-round ops, one kernel family per module (shipped as ``deqkern.kernels``).

``scan_residual`` (scan + residual + norms + Anderson Gram row), ``anderson_solve`` (batched
bordered systems), ``anderson_mix`` (next iterate from the history); ``_launch`` holds the launch
heuristics and ``aot`` the ahead-of-time compile check. Nothing is imported here: importing a
kernel module imports triton. The launchers are in :mod:`deqkern.ops.triton_ops`; the ops route
through :mod:`deqkern.ops.dispatch`.
"""
