"""Compile every Triton kernel ahead of time for sm_80 and sm_90 on a machine without a GPU.

    python -m deqkern.kernels.aot [--out bench/results/aot_cpu.json]

For each launch configuration the launchers can produce (the block sizes of
:mod:`deqkern.kernels._launch`, history lengths, dtypes), lowers the kernel through Triton to a
cubin with the ptxas bundled in the triton wheel, and reads the registers per thread and the local
memory (spills) from the cubin with the bundled ``cuobjdump`` (``n_spills`` = local bytes / 4,
the same unit as ``CompiledKernel.n_spills``, which triton 3.9 only fills in when it loads the
binary on a GPU). Prints a table, writes it as JSON, exits 1 if any configuration spills.

The configurations are typical *contiguous* calls, as the JIT would specialize them: unit strides
(arguments ``stride_<tensor>_<dim>``) are compile-time 1, pointers and the row strides of the
``[.., D]`` tensors 16-divisible (D a multiple of 16). Must run without ``TRITON_INTERPRET``
(under the interpreter ``@triton.jit`` returns Python functions, which cannot be compiled).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget

from deqkern.kernels._launch import (
    MAX_BLOCK_D, MAX_BLOCK_W, MIN_BLOCK_D, SCAN_STAGES, next_pow2, num_warps_for, scan_block_d,
)
from deqkern.kernels.round_status import STOP_CODES
from deqkern.ops.reference import SECANT_SAFETY

ARCHS = (80, 90)
#: Scalar arguments typed by name: sizes and element strides are 32-bit integers, as the JIT passes
#: a Python int below 2**31. Every other scalar must carry a Triton type annotation.
_INT_ARGS = re.compile(r"^(stride_\w+|W|D|S)$")


@dataclass(frozen=True)
class Config:
    """One launch configuration of one kernel."""

    module: str  #: module under deqkern.kernels
    kernel: str  #: the @triton.jit function in it
    label: str
    pointers: dict[str, str]  #: pointer argument -> Triton element type ("fp32", "i64", ...)
    constexprs: dict[str, object]
    num_warps: int
    unit: tuple[str, ...] = ()  #: stride arguments equal to 1 (specialized away, as the JIT does)
    aligned: tuple[str, ...] = ()  #: integer arguments divisible by 16


def _scan_config(dtype: str, block: int, m: int, clip: bool, has_z: bool, multistep: bool = False) -> Config:
    acc = "fp64" if dtype == "fp64" else "fp32"
    label = f"{dtype} BLOCK_D={block} m={m} clip={int(clip)} z={int(has_z)}" + (" multistep" if multistep else "")
    return Config(
        "scan_residual", "_scan_residual_kernel", label,
        pointers={"xw_ptr": dtype, "e_ptr": dtype, "z_ptr": dtype, "coef_ptr": dtype, "nrows_ptr": "i64",
                  "hist_ptr": dtype, "g_ptr": dtype, "f_ptr": dtype, "part_ptr": acc, "ms_ptr": dtype,
                  "u0_ptr": dtype},
        constexprs={"HAS_Z": has_z, "CLIP": clip, "MULTISTEP": multistep, "M": m, "M_PAD": next_pow2(max(m, 1)),
                    "ACC": tl.float64 if dtype == "fp64" else tl.float32, "BLOCK_D": block,
                    "NUM_STAGES": SCAN_STAGES},
        num_warps=num_warps_for(block),
        unit=("stride_xw_d", "stride_e_d", "stride_z_d", "stride_coef_c", "stride_nrows_b", "stride_hist_d",
              "stride_g_d", "stride_f_d", "stride_part_c", "stride_ms_c", "stride_u0_d"),
        aligned=("D", "stride_xw_b", "stride_xw_j", "stride_e_b", "stride_e_j", "stride_z_b", "stride_z_j",
                 "stride_hist_k", "stride_hist_b", "stride_hist_j", "stride_g_b", "stride_g_j", "stride_f_b",
                 "stride_f_j", "stride_u0_b"),
    )


def _solve_config(m: int) -> Config:
    return Config(
        "anderson_solve", "_anderson_solve_kernel", f"fp64 m={m}",
        pointers={"gram_ptr": "fp64", "valid_ptr": "i1", "newest_ptr": "i64", "alpha_ptr": "fp64", "ok_ptr": "i8"},
        constexprs={"M": m, "NP": next_pow2(m + 1)}, num_warps=1,
        unit=("stride_gram_j", "stride_valid_k", "stride_newest_r", "stride_alpha_k", "stride_ok_r"),
    )


def _mix_config(dtype: str, out: str, block: int, m: int) -> Config:
    return Config(
        "anderson_mix", "_anderson_mix_kernel", f"{dtype}->{out} BLOCK_D={block} m={m}",
        pointers={"hx_ptr": dtype, "hf_ptr": dtype, "alpha_ptr": "fp64", "out_ptr": out},
        constexprs={"M": m, "ACC": tl.float64 if dtype == "fp64" else tl.float32, "BLOCK_D": block},
        num_warps=num_warps_for(block), unit=("stride_hx_d", "stride_hf_d", "stride_alpha_k", "stride_out_d"),
        aligned=("D", "stride_hx_k", "stride_hx_b", "stride_hx_j", "stride_hf_k", "stride_hf_b", "stride_hf_j",
                 "stride_out_b", "stride_out_j"),
    )


def _commit_config(dtype: str, out: str, block: int, has_init: bool, extrap: bool = False,
                   coords: bool = False, ahead: bool = False, noise: bool = False) -> Config:
    return Config(
        "commit_window", "_commit_window_kernel",
        f"{dtype}->{out} BLOCK_D={block} init={int(has_init)}" + (" extrap" if extrap else "")
        + (" coords" if coords else "") + (" ahead" if ahead else "") + (" noise" if noise else ""),
        pointers={"xw_ptr": dtype, "mixed_ptr": dtype, "g_ptr": dtype, "delta_ptr": "i64", "nrows_ptr": "i64",
                  "k0_ptr": "i64", "init_ptr": dtype, "out_ptr": out, "coords_ptr": dtype, "e_ptr": dtype,
                  "coef_ptr": dtype, "z_ptr": dtype},
        constexprs={"HAS_INIT": has_init, "HAS_OUT": True, "EXTRAP": extrap, "COORDS": coords, "AHEAD": ahead,
                    "NOISE": noise, "BLOCK_D": block},
        num_warps=num_warps_for(block),
        unit=("stride_xw_d", "stride_mixed_d", "stride_g_d", "stride_delta_b", "stride_nrows_b", "stride_k0_b",
              "stride_init_d", "stride_out_d", "stride_coords_p", "stride_e_d", "stride_coef_f", "stride_z_d"),
        aligned=("D", "stride_xw_b", "stride_xw_j", "stride_mixed_b", "stride_mixed_j", "stride_g_b", "stride_g_j",
                 "stride_init_p", "stride_init_b", "stride_out_b", "stride_out_j"),
    )


def _status_config(acc: str, stop: str, block: int, floor: bool = False, past: bool = False) -> Config:
    return Config(
        "round_status", "_round_status_kernel",
        f"{acc} stop={stop} BLOCK_W={block}" + (" floor" if floor else "") + (" past" if past else ""),
        pointers={"f_ptr": acc, "g_ptr": acc, "bad_ptr": acc, "t_ptr": "i64", "nrows_ptr": "i64", "k0_ptr": "i64",
                  "rounds_ptr": "i64", "var_ptr": "fp64", "delta_ptr": "i64", "worst_ptr": "fp64", "log_ptr": "fp64",
                  "done_ptr": "i64", "badt_ptr": "i64", "mult_ptr": acc, "spent_ptr": "fp64", "gain_ptr": "fp64",
                  "dev_ptr": "fp64", "floor_ptr": "fp64", "past_ptr": "fp64"},
        constexprs={"STOP": STOP_CODES[stop], "ACC": tl.float64 if acc == "fp64" else tl.float32, "BLOCK_W": block,
                    "SAFETY": SECANT_SAFETY, "HAS_FLOOR": floor, "HAS_PAST": past},
        num_warps=num_warps_for(block),
        unit=("stride_t_j", "stride_nrows_b", "stride_k0_b", "stride_delta_b", "stride_worst_b", "stride_log_b",
              "stride_done_b", "stride_badt_r", "stride_past_b"),
    )


def configs() -> list[Config]:
    """Every block size the heuristics can pick for the lightest and the heaviest variant of each
    kernel in fp32, and the low-precision and fp64 variants at their largest block."""
    blocks = [MIN_BLOCK_D << i for i in range((MAX_BLOCK_D // MIN_BLOCK_D).bit_length())]
    elem_bytes = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}

    def scan_max_block(dtype: str, m: int, has_z: bool) -> int:
        # the largest block the launcher can pick: its shared-memory budget's, for a large latent
        return scan_block_d(1 << 20, 1, 2 + has_z + m, elem_bytes[dtype], None)

    out = []
    for m, heavy in ((0, False), (8, True)):
        largest = scan_max_block("fp32", m, heavy)
        out.extend(_scan_config("fp32", block, m, heavy, heavy) for block in blocks if block <= largest)
    # a multistep chain's variant carries one more row of registers: the heaviest one, every block
    out.extend(_scan_config("fp32", block, 8, True, True, True) for block in blocks
               if block <= scan_max_block("fp32", 8, True))
    for dtype in ("fp16", "bf16", "fp64"):
        out.append(_scan_config(dtype, scan_max_block(dtype, 8, True), 8, True, True))
        out.append(_scan_config(dtype, scan_max_block(dtype, 8, True), 8, True, True, True))
    out.extend(_solve_config(m) for m in range(1, 9))
    for block in blocks:
        out.append(_mix_config("fp32", "fp32", block, 8))
    out.append(_mix_config("fp32", "fp16", MAX_BLOCK_D, 8))
    out.append(_mix_config("bf16", "bf16", MAX_BLOCK_D, 8))
    out.append(_mix_config("fp64", "fp64", MAX_BLOCK_D, 8))
    for block in blocks:
        out.append(_commit_config("fp32", "fp32", block, True))
    out.append(_commit_config("fp32", "fp16", MAX_BLOCK_D, False))
    out.append(_commit_config("fp32", "fp16", MAX_BLOCK_D, False, extrap=True))
    out.append(_commit_config("fp32", "fp16", MAX_BLOCK_D, False, extrap=True, coords=True))  # Euler chains
    out.append(_commit_config("fp32", "fp16", MAX_BLOCK_D, False, ahead=True))  # one-step affine windows
    out.append(_commit_config("fp32", "fp16", MAX_BLOCK_D, False, ahead=True, noise=True))  # ... stochastic
    out.append(_commit_config("fp64", "fp64", MAX_BLOCK_D, True))
    for stop in STOP_CODES:  # the engine passes the x0 rule its charge past the window
        out.extend(_status_config("fp32", stop, block, past=stop == "x0") for block in (16, MAX_BLOCK_W))
        out.append(_status_config("fp64", stop, MAX_BLOCK_W, past=stop == "x0"))
    out.append(_status_config("fp32", "x0", MAX_BLOCK_W, floor=True, past=True))  # half-precision models
    return out


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local-memory bytes per thread) of the cubin's kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    match = re.search(r"REG:(\d+) .*LOCAL:(\d+)", text)
    if match is None:
        raise RuntimeError(f"cuobjdump: no resource usage in\n{text}")
    return int(match.group(1)), int(match.group(2))


def compile_config(cfg: Config, cc: int) -> dict[str, object]:
    """Compile ``cfg`` for compute capability ``cc``; registers, spills and shared memory."""
    fn = getattr(importlib.import_module(f"deqkern.kernels.{cfg.module}"), cfg.kernel)
    signature, constexprs, attrs = {}, dict(cfg.constexprs), {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr or name in cfg.unit:
            signature[name] = "constexpr"
            constexprs.setdefault(name, 1)
        elif name in cfg.pointers:
            signature[name] = "*" + cfg.pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif param.annotation_type:
            signature[name] = param.annotation_type
        elif _INT_ARGS.match(name):
            signature[name] = "i32"
            if name in cfg.aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            # An unannotated float would compile as fp32 here and on the GPU, but run as float64 in
            # the CPU interpreter: the tests would pass on a CPU and the GPU would round it.
            raise TypeError(
                f"{cfg.kernel}: scalar argument {name!r} needs a Triton type annotation (tl.float64 for "
                "a float) or an integer name (stride_*, W, D, S)"
            )
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": cfg.num_warps})
    regs, local = _resource_usage(compiled.asm["cubin"])
    return {
        "kernel": cfg.kernel, "config": cfg.label, "sm": cc, "num_warps": cfg.num_warps,
        "n_regs": regs, "n_spills": local // 4, "shared_bytes": compiled.metadata.shared,
        # loads software-pipelined through shared memory (the scan kernel's row loop)
        "cp_async": "cp.async" in compiled.asm["ptx"],
    }


def run() -> dict[str, object]:
    """Compile every configuration for every architecture; the JSON-ready report."""
    if knobs.runtime.interpret:
        raise SystemExit("deqkern.kernels.aot: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    rows = [compile_config(cfg, cc) for cfg in configs() for cc in ARCHS]
    return {
        "what": "registers/spills per thread of every Triton kernel config, compiled AOT on a CPU machine",
        "date": datetime.date.today().isoformat(),
        "triton": triton.__version__,
        "ptxas": str(knobs.nvidia.ptxas.version),
        "rows": rows,
    }


def format_table(report: dict[str, object]) -> str:
    """One line per (configuration, architecture)."""
    lines = [
        f"{'kernel':<24} {'config':<36} {'sm':>3} {'warps':>5} {'regs':>5} {'spills':>6} {'smem':>6} "
        f"{'pipelined':>9}"
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['kernel']:<24} {r['config']:<36} {r['sm']:>3} {r['num_warps']:>5} {r['n_regs']:>5} "
            f"{r['n_spills']:>6} {r['shared_bytes']:>6} {str(r['cp_async']):>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/aot_cpu.json", help="where to write the JSON report")
    args = parser.parse_args(argv)
    report = run()
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(format_table(report))
    print(f"written to {path}")
    return 1 if any(r["n_spills"] for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
