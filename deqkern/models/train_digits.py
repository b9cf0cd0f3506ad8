"""Train the embedded digits diffusion model and its quality classifier on the CPU.

Usage::

    python -m deqkern.models.train_digits --out DIR [--steps N] [--seed S] [--grid PNG]

Writes ``DIR/unet/`` (EMA weights, safetensors), ``DIR/scheduler/``,
``DIR/classifier.safetensors`` and ``DIR/training_metadata.json``. With the defaults and one
torch thread this takes roughly 10-15 minutes on a laptop-class core; the shipped
``deqkern/assets/digits`` was produced by exactly this command with its defaults.
Runs are deterministic for a given seed, torch version and thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from deqkern.models.digits import (
    CLASSIFIER_FILE,
    DIGITS_UNET_CONFIG,
    NUM_TRAIN,
    DigitsClassifier,
    build_digits_scheduler,
    build_digits_unet,
    ddim_sample,
    digits_dataset,
    digits_labels,
    digits_quality,
    save_sample_grid,
)

METADATA_FILE = "training_metadata.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the ones the shipped assets used."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--steps", type=int, default=6000, help="UNet optimiser steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--classifier-epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--grid", type=Path, default=None, help="also write a sample grid PNG")
    parser.add_argument("--log-every", type=int, default=500)
    return parser.parse_args(argv)


def _lr_factor(step: int, total: int, warmup: int = 200, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor`` times the peak rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for ema_p, p in zip(ema.parameters(), model.parameters()):
        ema_p.lerp_(p, 1.0 - decay)


@torch.no_grad()
def denoising_loss(
    unet: torch.nn.Module, scheduler: Any, images: torch.Tensor, seed: int, repeats: int = 4
) -> float:
    """Epsilon-MSE over ``repeats`` noisings of ``images`` with fixed noise and timesteps."""
    gen = torch.Generator().manual_seed(seed)
    x0 = images.repeat(repeats, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
    pred = unet(scheduler.add_noise(x0, noise, t), t).sample
    return float(F.mse_loss(pred, noise))


def train_unet(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Epsilon-prediction MSE training with AdamW; returns the EMA model, scheduler, stats."""
    torch.manual_seed(args.seed)
    unet = build_digits_unet().train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    scheduler = build_digits_scheduler()
    images = digits_dataset("train")
    # A private generator makes batches, noise and timesteps independent of model init.
    gen = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, args.steps))
    num_t = scheduler.config.num_train_timesteps
    recent: list[float] = []
    start = time.perf_counter()
    for step in range(args.steps):
        x0 = images[torch.randint(0, images.shape[0], (args.batch_size,), generator=gen)]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, num_t, (args.batch_size,), generator=gen)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        # Warm-up of the decay lets the EMA track the fast early progress.
        _ema_update(ema, unet, min(args.ema_decay, (1 + step) / (10 + step)))
        recent = (recent + [loss.item()])[-200:]
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - start
            print(f"step {step + 1}/{args.steps} loss(avg200) {sum(recent) / len(recent):.4f} "
                  f"lr {sched.get_last_lr()[0]:.2e} {elapsed:.0f}s", flush=True)
    wall = time.perf_counter() - start
    stats = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "ema_decay": args.ema_decay,
        "final_loss_avg_last_200_steps": sum(recent) / len(recent),
        "ema_loss_train_split": denoising_loss(ema, scheduler, images, seed=1234),
        "ema_loss_test_split": denoising_loss(ema, scheduler, digits_dataset("test"), seed=1234),
        "train_wall_time_s": wall,
        "param_count": sum(p.numel() for p in ema.parameters()),
    }
    return ema, scheduler, stats


def _shift_augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-image random translation by up to one pixel, padding with background (-1)."""
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    shifted = torch.stack(
        [padded[:, :, dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]
    )
    choice = torch.randint(0, shifted.shape[0], (images.shape[0],), generator=gen)
    return shifted[choice, torch.arange(images.shape[0])]


def _outliers(images: torch.Tensor, scheduler: Any, gen: torch.Generator) -> torch.Tensor:
    """Non-digits the classifier must be unsure about, one per image in ``images``.

    A random third each of: Gaussian noise with a random scale; digits diffused to
    t >= 500, where the noise dominates (signal scale < 0.3); near-constant images.
    Without them the CNN is confidently wrong on noise and calls a blank image a "1",
    so the quality score could not tell failed samples from good ones.
    """
    n = images.shape[0]
    shape = images.shape
    noise = (0.3 + 1.2 * torch.rand(n, 1, 1, 1, generator=gen)) * torch.randn(shape, generator=gen)
    t = torch.randint(500, scheduler.config.num_train_timesteps, (n,), generator=gen)
    diffused = scheduler.add_noise(images, torch.randn(shape, generator=gen), t)
    level = 2 * torch.rand(n, 1, 1, 1, generator=gen) - 1
    constant = level + 0.1 * torch.randn(shape, generator=gen)
    kind = torch.randint(0, 3, (n, 1, 1, 1), generator=gen)
    mixed = torch.where(kind == 0, noise, torch.where(kind == 1, diffused, constant))
    return mixed.clamp(-1.0, 1.0)


def train_classifier(args: argparse.Namespace) -> tuple[DigitsClassifier, float]:
    """Train the quality classifier on the train split; return it and its test accuracy.

    Cross-entropy on (shift-augmented) digits plus outlier exposure: cross-entropy to the
    uniform distribution on `_outliers`.
    """
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 2)
    model = DigitsClassifier().train()
    scheduler = build_digits_scheduler()
    images, labels = digits_dataset("train"), digits_labels("train")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-3)
    for _ in range(args.classifier_epochs):
        order = torch.randperm(images.shape[0], generator=gen)
        for batch in order.split(64):
            digits = _shift_augment(images[batch], gen)
            logits = model(torch.cat([digits, _outliers(digits, scheduler, gen)]))
            digit_logits, outlier_logits = logits.split(len(batch))
            loss = F.cross_entropy(digit_logits, labels[batch])
            loss = loss - 0.5 * outlier_logits.log_softmax(dim=-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        predicted = model(digits_dataset("test")).argmax(dim=-1)
    accuracy = float((predicted == digits_labels("test")).float().mean())
    return model, accuracy


def quality_report(
    unet: torch.nn.Module,
    scheduler: Any,
    classifier: DigitsClassifier,
    seed: int,
    num_samples: int = 256,
    num_steps: int = 100,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Classifier quality of DDIM samples next to baselines: noise, shuffled and real digits."""
    gen = torch.Generator().manual_seed(seed + 3)
    start = time.perf_counter()
    samples = ddim_sample(unet, scheduler, num_samples, num_steps, generator=gen)
    sample_wall = time.perf_counter() - start
    noise = torch.randn(num_samples, 1, 8, 8, generator=gen)
    test = digits_dataset("test")
    # Real test digits with their pixels permuted: the right ink statistics but no
    # shape, and (unlike Gaussian noise) never shown to the classifier as an outlier.
    flat = test.flatten(1)
    perms = torch.stack([torch.randperm(flat.shape[1], generator=gen) for _ in range(flat.shape[0])])
    shuffled = flat.gather(1, perms).view_as(test)
    report = {
        f"ddim{num_steps}_samples": digits_quality(samples, classifier),
        "gaussian_noise": digits_quality(noise, classifier),
        "pixel_shuffled_test_images": digits_quality(shuffled, classifier),
        "real_test_images": digits_quality(test, classifier),
        "sampling_wall_time_s": sample_wall,
        "seed": seed + 3,
    }
    return report, samples


def _versions() -> dict[str, str]:
    import diffusers
    import safetensors
    import sklearn

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "safetensors": safetensors.__version__,
        "scikit-learn": sklearn.__version__,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Train, evaluate and write everything under ``--out``."""
    from safetensors.torch import save_file

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    total_start = time.perf_counter()

    unet, scheduler, unet_stats = train_unet(args)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")

    classifier, accuracy = train_classifier(args)
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()},
              str(out / CLASSIFIER_FILE))

    quality, samples = quality_report(unet, scheduler, classifier, args.seed)
    if args.grid is not None:
        save_sample_grid(samples[:64], args.grid)

    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    metadata = {
        "command": "python -m deqkern.models.train_digits " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "torch_threads": args.threads,
        "dataset": {
            "source": "sklearn.datasets.load_digits (8x8, values 0..16 scaled to [-1, 1])",
            "split": f"train = first {NUM_TRAIN} images in shipped order, test = the rest",
            "num_train": NUM_TRAIN,
            "num_test": int(digits_dataset("test").shape[0]),
        },
        "unet": {**unet_stats, "config": DIGITS_UNET_CONFIG, "weights_bytes": weights.stat().st_size,
                 "weights": "EMA, float32 safetensors"},
        "classifier": {
            "param_count": sum(p.numel() for p in classifier.parameters()),
            "epochs": args.classifier_epochs,
            "test_accuracy": accuracy,
        },
        "quality": quality,
        "total_wall_time_s": time.perf_counter() - total_start,
        "versions": _versions(),
    }
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"classifier_test_accuracy": accuracy, "quality": quality}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
