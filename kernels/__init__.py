"""Triton kernels of the per-round ops, one kernel and its launcher per module (shipped as
``deqkern.kernels``).

The five kernels, in the order a round runs them:

- ``scan_residual``: scan + residual + row norms + Anderson Gram row (launcher ``scan_residual``);
- ``anderson_solve``: the batched bordered Anderson systems (launcher ``anderson_weights``);
- ``anderson_mix``: the next iterate from the history (launcher ``anderson_mix``);
- ``round_status``: the stopping test and the round's bookkeeping (launcher ``round_status``);
- ``commit_window``: freeze the accepted rows and slide the windows (launcher ``commit_window``).

``_launch`` holds the launch heuristics, the shared argument checks and the notes on fp64 scalars
and the CPU interpreter; ``aot`` is the ahead-of-time compile check. The contract of every kernel
is :mod:`deqkern.ops.reference`; :mod:`deqkern.ops.dispatch` picks reference or Triton. Nothing
is imported here: importing a kernel module imports triton.
"""

#: The kernel modules (``deqkern.kernels.<name>``), each defining ``_<name>_kernel``.
KERNEL_MODULES = ("scan_residual", "anderson_solve", "anderson_mix", "round_status", "commit_window")
