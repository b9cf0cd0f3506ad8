"""Kernel micro-benchmarks: ``pytest bench/ --benchmark-only`` (``--benchmark-disable``: run once).

Without CUDA the Triton kernels run under triton's CPU interpreter, which has to be switched on
before anything imports triton (triton reads ``TRITON_INTERPRET`` when a kernel is decorated), so
it is set here; the sizes are then tiny and the numbers only prove the benchmarks run. The
benchmarks check their outputs with the kernel tests' helpers (``tests/test_kernels.py``), so
``tests/`` goes on the import path.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

# every benchmark checks its output against the float64 reference first: no TF32
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # a shared small CPU: one thread, as the test suite
    torch.set_num_threads(1)
