"""``python -m deqkern.bench --pipeline sd-tiny``: a drop-in pipeline end to end.

A tiny Stable Diffusion pipeline built offline (:mod:`deqkern.bench.tiny_pipes`: random weights,
32x32 images) is run by diffusers (``pipe(**kw)``) and by ``deqkern.sample_pipeline(pipe, **kw)``
with the same prompts, negative prompts, guidance and seed. Reported per chain length: the
solve's rounds, the UNet's calls and rows per call (with guidance a round is ONE call of
2 x window x batch rows), and the images' difference (max abs and PSNR, pixels in [0, 1]).
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

PIPELINES = ("sd-tiny",)
PROMPTS = ["a cat", "a hat", "a cab", "a bat", "a mat", "a rat", "a vat", "a tab"]


class CallCounter:
    """Counts the UNet's forward calls and the rows of each (a forward pre-hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.rows: list[int] = []
        self._handle = module.register_forward_pre_hook(lambda _m, args: self.rows.append(int(args[0].shape[0])))

    def close(self) -> None:
        self._handle.remove()


def _compare(pipe: Any, steps: int, batch: int, seed: int, solve: dict[str, Any]) -> dict[str, Any]:
    """One chain length: diffusers' pipeline against sample_pipeline on the same call."""
    import deqkern

    kw = dict(prompt=(PROMPTS * batch)[:batch], negative_prompt=["dog"] * batch, num_inference_steps=steps,
              guidance_scale=5.0, output_type="np")
    counter = CallCounter(pipe.unet)
    start = time.perf_counter()
    ref = pipe(**kw, generator=torch.Generator().manual_seed(seed)).images
    ref_wall, ref_calls = time.perf_counter() - start, len(counter.rows)
    counter.rows.clear()
    start = time.perf_counter()
    out = deqkern.sample_pipeline(pipe, **kw, generator=torch.Generator().manual_seed(seed), **solve)
    wall = time.perf_counter() - start
    counter.close()
    res, diff = out.deqkern, abs(out.images - ref)
    mse = float((diff**2).mean())
    return {
        "steps": steps, "batch": batch, "window": res.info["window"], "tol": res.info["tol"],
        "rounds": res.rounds, "converged": res.all_converged, "model_calls": len(counter.rows),
        "rows_per_call_max": max(counter.rows), "rows_per_call": counter.rows, "model_rows": res.model_evals,
        "pipeline_calls": ref_calls, "pipeline_rows": ref_calls * 2 * batch,
        "image_max_abs_diff": float(diff.max()), "psnr_db": math.inf if mse == 0 else 10 * math.log10(1 / mse),
        "wall_s": wall, "pipeline_wall_s": ref_wall,
    }


def run(name: str, steps: list[int], batch: int, seed: int, solve: dict[str, Any]) -> dict[str, Any]:
    """The comparison for pipeline ``name`` (one of :data:`PIPELINES`) at each chain length."""
    from deqkern.bench.tiny_pipes import sd_pipeline

    with tempfile.TemporaryDirectory() as tokenizer_dir:
        pipe = sd_pipeline(Path(tokenizer_dir))
    torch.manual_seed(seed)
    return {"pipeline": name, "scheduler": type(pipe.scheduler).__name__, "guidance_scale": 5.0,
            "results": [_compare(pipe, s, batch, seed, solve) for s in steps]}


def format_table(report: dict[str, Any]) -> str:
    head = (f"{report['pipeline']} ({report['scheduler']}, guidance {report['guidance_scale']}): deqkern."
            "sample_pipeline vs the pipeline, same seed\n"
            f"{'S':>5} {'batch':>5} {'window':>6} {'rounds':>6} {'calls':>5} {'rows/call':>9} "
            f"{'pipe calls':>10} {'max|dimg|':>10} {'PSNR dB':>8}")
    rows = [f"{r['steps']:>5} {r['batch']:>5} {r['window']:>6} {r['rounds']:>6} {r['model_calls']:>5} "
            f"{r['rows_per_call_max']:>9} {r['pipeline_calls']:>10} {r['image_max_abs_diff']:>10.2e} "
            f"{r['psnr_db']:>8.1f}" for r in report["results"]]
    return "\n".join([head, *rows])


def main(args: Any, argv: list[str] | None) -> int:
    """The ``--pipeline`` run: the table on stdout and ``<out>/pipeline_<name>.json`` (or ``--json``)."""
    import sys

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    solve = {"tol": args.tol, "window": args.window, "max_iters": args.max_iters, "max_batch": args.max_batch}
    report = run(args.pipeline, args.steps, args.batch, args.seed, solve)
    report["command"] = "python -m deqkern.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    print(format_table(report))
    path = args.json or args.out / f"pipeline_{args.pipeline}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return 0
