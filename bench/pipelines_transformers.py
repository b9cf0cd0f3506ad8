"""The transformer pipelines end to end: ``sample_pipeline(pipe, **kw)`` against ``pipe(**kw)``.

For the tiny offline DiT, PixArt-alpha, SD3 and Flux pipelines of ``tests/tiny_pipes2.py`` (random
weights: the rounds say how the solve behaves on these chains, not on trained models) and each
step count: the pipeline's transformer calls (S, or 2 S for Flux's true CFG) against deqkern's
rounds (one call per round, of 2 x window x batch rows under guidance), the model rows per round,
and the largest pixel difference of the images (``output_type="np"``, in [0, 1]).

    python bench/pipelines_transformers.py --steps 25 50 --tol 1e-3 --out bench/results/pipelines_transformers_cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import deqkern  # noqa: E402
import tiny_pipes2  # noqa: E402

#: each family's pipeline and a guided call (a prompt per sample and a negative prompt where it has one)
FAMILIES: dict[str, tuple[Any, dict[str, Any]]] = {
    "dit": (tiny_pipes2.tiny_dit, dict(class_labels=[3, 977], guidance_scale=4.0)),
    "pixart-alpha": (tiny_pipes2.tiny_pixart, dict(
        prompt=["a photo of a cat", "a red dog"], negative_prompt="blurry", guidance_scale=4.5,
        use_resolution_binning=False, max_sequence_length=8, clean_caption=False)),
    "sd3": (tiny_pipes2.tiny_sd3, dict(prompt=["a photo of a cat", "a red dog"], negative_prompt="blurry",
                                       guidance_scale=5.0, max_sequence_length=8)),
    "flux": (tiny_pipes2.tiny_flux, dict(prompt=["a photo of a cat", "a red dog"], negative_prompt="blurry",
                                         true_cfg_scale=3.0, guidance_scale=3.5, height=8, width=8,
                                         max_sequence_length=8)),
}


def run(family: str, steps: int, tol: float) -> dict[str, Any]:
    """One family at one step count: the pipeline, then deqkern, from generators of the same seed."""
    build, kw = FAMILIES[family]
    pipe = build()
    calls: list[int] = []
    pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    kw = {**kw, "num_inference_steps": steps, "output_type": "np"}
    start = time.perf_counter()
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0))
    ref_wall, ref_calls = time.perf_counter() - start, len(calls)
    start = time.perf_counter()
    ours = deqkern.sample_pipeline(pipe, **kw, generator=torch.Generator().manual_seed(0), tol=tol)
    res = ours.deqkern
    return {
        "family": family, "steps": steps, "tol": tol, "pipeline_calls": ref_calls,
        "rounds": res.rounds, "deqkern_calls": len(calls) - ref_calls, "model_rows": res.model_evals,
        "rows_per_round": res.model_evals / res.rounds, "converged": res.all_converged,
        "max_pixel_diff": float(np.abs(ours.images - ref.images).max()),
        "pipeline_wall_s": ref_wall, "deqkern_wall_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for family in args.families:
        for steps in args.steps:
            rows.append(run(family, steps, args.tol))
            print(json.dumps(rows[-1]))
    if args.out is not None:
        report = {"study": "pipelines_transformers", "device": "cpu (1 thread)", "torch": torch.__version__,
                  "date": time.strftime("%Y-%m-%d"),
                  "command": "python " + " ".join(sys.argv), "rows": rows}
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
