"""The embedded digits model, its quality classifier, the offline loader and paper configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: E402

from deqkern.models import (  # noqa: E402
    CheckpointError,
    build_paper_unet,
    ddim_sample,
    digits_dataset,
    digits_labels,
    digits_quality,
    load_digits_classifier,
    load_digits_model,
    load_pretrained,
    paper_unet_config,
)


def _tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> tuple[Path, UNet2DModel]:
    """A pipeline-layout directory holding a tiny random UNet and a DDIM scheduler."""
    unet = _tiny_unet()
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(tmp_path / "scheduler")
    return tmp_path, unet


def test_shipped_model_loads_and_runs() -> None:
    unet, scheduler = load_digits_model()
    assert isinstance(unet, UNet2DModel) and not unet.training
    assert isinstance(scheduler, DDPMScheduler)
    cfg = scheduler.config
    assert (cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == (1000, "linear", 1e-4, 0.02)
    assert cfg.prediction_type == "epsilon" and cfg.clip_sample
    with torch.no_grad():
        out = unet(torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999])).sample
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()


def test_load_pretrained_round_trip(tiny_checkpoint: tuple[Path, UNet2DModel]) -> None:
    path, original = tiny_checkpoint
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        expected = original(x, t).sample
    for layout in (path, path / "unet"):  # pipeline dir, and model dir with sibling scheduler/
        unet, scheduler = load_pretrained(layout)
        assert isinstance(scheduler, DDIMScheduler)
        with torch.no_grad():
            torch.testing.assert_close(unet(x, t).sample, expected, rtol=0, atol=0)


def test_load_pretrained_dtype(tiny_checkpoint: tuple[Path, UNet2DModel]) -> None:
    unet, _ = load_pretrained(tiny_checkpoint[0], dtype=torch.float64)
    assert next(unet.parameters()).dtype == torch.float64


def test_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(CheckpointError, match="no-such-checkpoint.*does not exist"):
        load_pretrained(missing)
    assert issubclass(CheckpointError, ValueError)


def test_truncated_weights_raise(tiny_checkpoint: tuple[Path, UNet2DModel]) -> None:
    weights = tiny_checkpoint[0] / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors.*truncated"):
        load_pretrained(tiny_checkpoint[0])


def test_garbage_weights_raise(tiny_checkpoint: tuple[Path, UNet2DModel]) -> None:
    weights = tiny_checkpoint[0] / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_pretrained(tiny_checkpoint[0])


def test_missing_weights_and_unknown_scheduler(tiny_checkpoint: tuple[Path, UNet2DModel]) -> None:
    path = tiny_checkpoint[0]
    config = path / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace("DDIMScheduler", "EulerDiscreteScheduler"))
    with pytest.raises(CheckpointError, match="unsupported scheduler class 'EulerDiscreteScheduler'"):
        load_pretrained(path)
    config.write_text(config.read_text().replace("EulerDiscreteScheduler", "DDIMScheduler"))
    (path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        load_pretrained(path)


def test_mismatched_weights_raise(tiny_checkpoint: tuple[Path, UNet2DModel]) -> None:
    # A config asking for a wider network than the weights hold must not load half-random.
    config_path = tiny_checkpoint[0] / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = [8, 32]
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        load_pretrained(tiny_checkpoint[0])


def test_digits_dataset_split() -> None:
    train, test = digits_dataset("train"), digits_dataset("test")
    assert train.shape == (1500, 1, 8, 8) and test.shape == (297, 1, 8, 8)
    assert train.dtype == torch.float32
    assert train.min() == -1.0 and train.max() == 1.0
    assert digits_labels("test").shape == (297,)
    with pytest.raises(ValueError, match="split"):
        digits_dataset("val")


def test_classifier_accuracy_on_test_split() -> None:
    classifier = load_digits_classifier()
    with torch.no_grad():
        predicted = classifier(digits_dataset("test")).argmax(dim=-1)
    assert (predicted == digits_labels("test")).float().mean() > 0.9


def test_samples_are_digits_and_noise_is_not() -> None:
    unet, scheduler = load_digits_model()
    classifier = load_digits_classifier()
    gen = torch.Generator().manual_seed(0)
    samples = ddim_sample(unet, scheduler, 16, num_steps=25, generator=gen)
    sampled = digits_quality(samples, classifier)
    noise = digits_quality(torch.randn(16, 1, 8, 8, generator=gen), classifier)
    assert sampled["n"] == 16 and sum(sampled["class_histogram"]) == 16
    assert sampled["frac_confident"] >= noise["frac_confident"] + 0.5
    assert sampled["mean_confidence"] > 0.8


def test_paper_cifar10_size() -> None:
    config = paper_unet_config("ddpm-cifar10")
    assert config["block_out_channels"] == [128, 256, 256, 256]
    unet = build_paper_unet("ddpm-cifar10")
    params = sum(p.numel() for p in unet.parameters())
    assert abs(params - 35.7e6) < 0.3e6
    assert paper_unet_config("ddpm-lsun-church")["sample_size"] == 256
    assert paper_unet_config("ddpm-celeba")["sample_size"] == 64
    with pytest.raises(KeyError, match="ddpm-cifar10"):
        paper_unet_config("ddpm-imagenet")


def test_import_is_light() -> None:
    code = (
        "import sys, deqkern.models; "
        "heavy = [m for m in ('diffusers', 'safetensors', 'sklearn') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
