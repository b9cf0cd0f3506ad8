"""Launch heuristics and argument checks shared by the launchers (each in its kernel's module) and
the AOT check, and the two notes every kernel relies on.

No autotuning: a launch configuration is a pure function of the shapes and the device's SM count,
so the same call always runs the same binary (deterministic results, safe to capture in a CUDA
graph, and the AOT check in :mod:`deqkern.kernels.aot` compiles exactly what can be launched).
Importing this module does not import triton (only :func:`acc_dtype` does, when a launcher calls it).

**fp64 scalars.** Every float scalar argument of a kernel is annotated ``tl.float64``: unannotated,
a Python float reaches a GPU kernel as fp32 but stays float64 in the CPU interpreter, which would
hide the GPU's rounding from the tests. Inside the kernel ``tl.full([], x, ACC)`` rounds it once
for fp32 kernels (an fp64 operand would promote their math to fp64) and keeps it exact for fp64
ones, compiled or interpreted (``tl.cast`` would round through fp32 there). The AOT check refuses
an unannotated float scalar.

**Interpreter quirks.** The CPU interpreter of triton 3.9 mis-types ``tensor & scalar_bool`` and
crashes on scalar bool ``|``: the kernels write such masks as bounds (``offs < tl.where(c, D, 0)``)
and 0/1 flags as int32, and count failures in an int32 instead of or-ing bools.

Stride arguments are named ``stride_<tensor>_<dim>`` (element strides, passed as they are: no input
is made contiguous).
"""
from __future__ import annotations

import contextlib

import torch

#: Smallest / largest block of latent elements one program of a streaming kernel owns: 128 fp32
#: is one warp with one 16-byte vector per thread, 1024 is 4 warps with two vectors per thread
#: (registers per configuration: bench/results/aot_cpu.json).
MIN_BLOCK_D = 128
MAX_BLOCK_D = 1024
#: Programs per SM the streaming kernels aim for: enough independent row chains per SM to keep
#: loads in flight while each program walks its rows sequentially.
PROGRAMS_PER_SM = 8
#: ``num_stages`` of the scan kernel's row loop: Triton software-pipelines it (cp.async into shared
#: memory, checked in the PTX), keeping the loads of the next rows in flight during the current
#: row's arithmetic and reductions; 3 stages buffer 2 rows.
SCAN_STAGES = 3
#: Shared memory (bytes) one scan program may spend on those buffers: a quarter of an A100 SM
#: (164 KB), so at least 4 programs fit per SM on sm_80 and sm_90.
SCAN_SMEM_BUDGET = 40 * 1024


def next_pow2(n: int) -> int:
    """Smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 << max(n - 1, 0).bit_length()


def num_warps_for(block: int) -> int:
    """One warp per 256 elements (8 fp32 per thread, two 16-byte vectors), 1 to 8 warps."""
    return max(1, min(8, block // 256))


def block_d_for(d: int, programs_per_block: int, sm_count: int | None) -> int:
    """Block size over the latent dimension ``d`` of a streaming kernel.

    ``programs_per_block``: programs launched per D-block (the other grid axes). Starts from the
    largest useful block and halves it while the grid has fewer than ``PROGRAMS_PER_SM *
    sm_count`` programs; ``sm_count=None`` (the CPU interpreter, where every program is a Python
    loop) keeps the largest block.
    """
    block = min(MAX_BLOCK_D, max(MIN_BLOCK_D, next_pow2(d)))
    if sm_count is None:
        return block
    target = PROGRAMS_PER_SM * sm_count
    while block > MIN_BLOCK_D and programs_per_block * -(-d // block) < target:
        block //= 2
    return block


def scan_block_d(d: int, batch: int, tiles: int, elem_bytes: int, sm_count: int | None) -> int:
    """Block size of the scan kernel: :func:`block_d_for` over ``batch`` programs per D-block,
    halved while the pipeline buffers, ``(SCAN_STAGES - 1) * tiles * block * elem_bytes``, exceed
    ``SCAN_SMEM_BUDGET``. ``tiles``: ``[BLOCK_D]`` rows loaded per step (x, e, z?, m history rows)."""
    block = block_d_for(d, batch, sm_count)
    while block > MIN_BLOCK_D and (SCAN_STAGES - 1) * tiles * block * elem_bytes > SCAN_SMEM_BUDGET:
        block //= 2
    return block


#: Largest block of window rows one program of the status kernel holds; wider windows loop.
MAX_BLOCK_W = 1024


def status_block_w(width: int) -> int:
    """Rows per step of the status kernel's loop over a window of ``width`` rows: the whole
    window up to ``MAX_BLOCK_W`` (at least 16, the smallest useful tile)."""
    return min(MAX_BLOCK_W, max(16, next_pow2(width)))


#: Largest Anderson history the kernels take (the ``[m, BLOCK_D]`` Gram tile of the scan kernel
#: and the ``[16, 16]`` system tile of the solve kernel are sized for it).
MAX_HISTORY = 8
#: Grid axes 1 and 2 of a CUDA launch hold at most 65535 programs.
MAX_GRID_YZ = 65535
#: Accumulation dtype per data dtype: fp32 for every low-precision input, fp64 keeps fp64 exact.
_ACC = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32,
        torch.float64: torch.float64}


def acc_dtype(name: str, t: torch.Tensor):
    """``(triton dtype, torch dtype)`` the kernels accumulate ``t``'s dtype in; a TypeError naming
    ``name`` for a non-float dtype."""
    if t.dtype not in _ACC:
        raise TypeError(f"{name}: expected float16/bfloat16/float32/float64, got {t.dtype}")
    import triton.language as tl  # here, not at the top: the heuristics above stay triton-free

    acc = _ACC[t.dtype]
    return (tl.float64 if acc == torch.float64 else tl.float32), acc


def check_tensor(
    name: str, t: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor, same_dtype: bool = True
) -> None:
    """``t`` has ``shape``, lives on ``like``'s device and (if ``same_dtype``) has its dtype."""
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected a tensor on {like.device}, got {t.device}")
    if same_dtype and t.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype}, got {t.dtype}")


def pick_block(name: str, block: int | None, heuristic) -> int:
    """``block`` if given (a power of two >= 16, as ``tl.arange`` needs), else ``heuristic()``."""
    if block is None:
        return heuristic()
    if block < 16 or block & (block - 1):
        raise ValueError(f"{name}: expected a power of two >= 16, got {block}")
    return block


def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device; None under the CPU interpreter."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def on_device(device: torch.device):
    """Triton launches on the *current* CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
