"""Launch heuristics shared by the launchers in :mod:`deqkern.ops.triton_ops` and the AOT check.

No autotuning: a launch configuration is a pure function of the shapes and the device's SM count,
so the same call always runs the same binary (deterministic results, safe to capture in a CUDA
graph, and the AOT check in :mod:`deqkern.kernels.aot` compiles exactly what can be launched).
Pure Python: importing this module does not import triton.
"""
from __future__ import annotations

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
