"""The embedded default model: a small DDPM UNet trained on scikit-learn's 8x8 digits.

Everything a CPU-only user needs to exercise the solvers on a *trained* network: the data
set with a fixed train/test split, the UNet and its noise schedule (shipped under
``deqkern/assets/digits``), a small classifier that scores how digit-like samples are,
a plain sequential DDIM sampler as the reference, and a PNG grid writer.

diffusers, safetensors, scikit-learn and Pillow are imported inside the functions.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deqkern.models.loading import CheckpointError, check_safetensors, load_pretrained

__all__ = [
    "DIGITS_ASSETS",
    "DIGITS_UNET_CONFIG",
    "DIGITS_SCHEDULER_CONFIG",
    "NUM_TRAIN",
    "DigitsClassifier",
    "build_digits_unet",
    "build_digits_scheduler",
    "digits_dataset",
    "digits_labels",
    "load_digits_model",
    "load_digits_classifier",
    "digits_quality",
    "ddim_sample",
    "save_sample_grid",
]

DIGITS_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "digits"
CLASSIFIER_FILE = "classifier.safetensors"

# Split rule: the first 1500 of load_digits' 1797 images (in their shipped order) train,
# the last 297 are held out (test / inversion targets). No RNG is involved, so the split
# is identical on every machine and scikit-learn version that ships the same file.
NUM_TRAIN = 1500

DIGITS_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    # Resolutions 8 -> 4 -> 2; self-attention at 4x4 and in the 2x2 mid block.
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": 32,
    # 32 groups would put a single channel in each group at width 32.
    "norm_num_groups": 8,
}

# The seed paper's (DDPM) schedule; DDIMScheduler.from_config reads it unchanged.
DIGITS_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
}


def build_digits_unet() -> torch.nn.Module:
    """A freshly initialised digits ``UNet2DModel`` (seed torch before calling)."""
    from diffusers import UNet2DModel

    return UNet2DModel(**DIGITS_UNET_CONFIG)


def build_digits_scheduler() -> Any:
    """The ``DDPMScheduler`` the digits model is trained with."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**DIGITS_SCHEDULER_CONFIG)


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 images as float32 in [-1, 1], shape [N, 1, 8, 8], and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the digits data set needs scikit-learn: pip install deqkern[train]"
        ) from exc
    bunch = load_digits()
    # Pixel values are counts 0..16 of set bits in 4x4 blocks of the original scans.
    images = (bunch.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]
    return images, bunch.target.astype(np.int64)


def _split_slice(split: str) -> slice:
    if split == "train":
        return slice(0, NUM_TRAIN)
    if split == "test":
        return slice(NUM_TRAIN, None)
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def digits_dataset(split: str = "train") -> torch.Tensor:
    """Digits images of one split as a float32 tensor [N, 1, 8, 8] in [-1, 1].

    ``"train"`` is the first `NUM_TRAIN` (1500) images, ``"test"`` the remaining 297.
    Raises ImportError (with the install hint) when scikit-learn is missing.
    """
    images, _ = _digits_arrays()
    return torch.from_numpy(images[_split_slice(split)].copy())


def digits_labels(split: str = "train") -> torch.Tensor:
    """Class labels (int64, 0..9) aligned with `digits_dataset` of the same split."""
    _, labels = _digits_arrays()
    return torch.from_numpy(labels[_split_slice(split)].copy())


class DigitsClassifier(nn.Module):
    """A small CNN (about 85K parameters) mapping [N, 1, 8, 8] images in [-1, 1] to 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 64),
            nn.SiLU(),
            nn.Dropout(0.2),
            nn.Linear(64, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class logits [N, 10]."""
        return self.head(self.features(images))


def load_digits_model(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.nn.Module, Any]:
    """Load the shipped digits ``(UNet2DModel, DDPMScheduler)``; see `load_pretrained`."""
    return load_pretrained(DIGITS_ASSETS, device=device, dtype=dtype)


def load_digits_classifier(
    device: str | torch.device = "cpu",
    path: str | Path | None = None,
) -> DigitsClassifier:
    """Load the shipped quality classifier (or one saved at ``path``) in eval mode."""
    from safetensors.torch import load_file

    weights = Path(path) if path is not None else DIGITS_ASSETS / CLASSIFIER_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: classifier weights not found")
    check_safetensors(weights)
    model = DigitsClassifier()
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise CheckpointError(f"{weights}: weights do not match DigitsClassifier ({exc})") from exc
    return model.to(device).eval()


@torch.no_grad()
def digits_quality(
    images: torch.Tensor,
    classifier: DigitsClassifier | None = None,
    threshold: float = 0.9,
) -> dict[str, Any]:
    """Score how digit-like a batch of images is with the quality classifier.

    Args:
        images: [N, 1, 8, 8] in [-1, 1] (values outside are clamped, as the classifier
            only ever saw in-range pixels).
        classifier: defaults to the shipped one.
        threshold: max-softmax probability that counts as a confident prediction.

    Returns:
        ``{"n", "mean_confidence", "frac_confident", "class_histogram"}``: the mean max
        softmax probability, the fraction with max probability >= ``threshold`` and the
        count of argmax predictions per class 0..9.
    """
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(f"expected images of shape [N, 1, 8, 8], got {tuple(images.shape)}")
    model = classifier if classifier is not None else load_digits_classifier()
    param = next(model.parameters())
    x = images.detach().to(device=param.device, dtype=param.dtype).clamp(-1.0, 1.0)
    probs = model(x).softmax(dim=-1)
    confidence, predicted = probs.max(dim=-1)
    return {
        "n": int(images.shape[0]),
        "mean_confidence": float(confidence.mean()),
        "frac_confident": float((confidence >= threshold).float().mean()),
        "class_histogram": torch.bincount(predicted.cpu(), minlength=10).tolist(),
    }


@torch.no_grad()
def ddim_sample(
    unet: torch.nn.Module,
    scheduler: Any,
    num_samples: int,
    num_steps: int = 100,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """Plain sequential DDIM sampling with diffusers' ``DDIMScheduler.step`` (the reference).

    Args:
        unet: an epsilon-prediction ``UNet2DModel``.
        scheduler: any scheduler whose config DDIM can read (e.g. the shipped DDPM one);
            a fresh ``DDIMScheduler`` is built from it so the caller's object is untouched.
        num_samples: batch size.
        num_steps: number of DDIM steps.
        generator: CPU generator for the initial noise (and for ``eta > 0``).
        eta: DDIM stochasticity; 0 is the deterministic sampler.

    Returns:
        Samples [num_samples, C, H, W] on the model's device.
    """
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(num_steps)
    param = next(unet.parameters())
    size = unet.config.sample_size
    shape = (num_samples, unet.config.in_channels, size, size)
    # Noise is drawn on the CPU so a seed gives the same samples on every device.
    x = torch.randn(shape, generator=generator).to(device=param.device, dtype=param.dtype)
    for t in ddim.timesteps:
        eps = unet(x, t).sample
        x = ddim.step(eps, t, x, eta=eta, generator=generator).prev_sample
    return x


def save_sample_grid(
    images: torch.Tensor,
    path: str | Path,
    num_cols: int = 8,
    scale: int = 8,
    pad: int = 1,
) -> Path:
    """Write images in [-1, 1] ([N, 1, H, W]) as a grey PNG grid upscaled with nearest.

    Grid cells are separated by ``pad`` (pre-upscale) pixels of mid grey so that
    neighbouring digits do not merge.
    """
    from PIL import Image

    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, _, h, w = pixels.shape
    num_rows = -(-n // num_cols)
    grid = np.full(
        (num_rows * (h + pad) + pad, num_cols * (w + pad) + pad), 128, dtype=np.uint8
    )
    for i in range(n):
        r, c = divmod(i, num_cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top : top + h, left : left + w] = pixels[i, 0].numpy()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    big = np.kron(grid, np.ones((scale, scale), dtype=np.uint8))
    Image.fromarray(big).save(out)  # 2-D uint8 -> greyscale "L"
    return out
