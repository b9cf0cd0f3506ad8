"""Offline loading of diffusers UNet checkpoints and their noise schedulers.

Only local directories are accepted: a path is never treated as a Hub repository id, so
no network access can happen. diffusers and safetensors are imported inside the
functions so that ``import deqkern`` stays cheap.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "load_pretrained", "check_safetensors", "resolve_layout"]

# Model and scheduler classes this loader knows; anything else is refused with a clear
# message instead of being silently built as the wrong architecture.
_MODEL_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
_SCHEDULER_CLASSES = ("DDIMScheduler", "DDPMScheduler")
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_SCHEDULER_CONFIG = "scheduler_config.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or corrupt; the message names the path."""


def _read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, turning every way it can fail into a `CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_safetensors(path: Path) -> None:
    """Check that a ``.safetensors`` file is complete without reading its tensor data.

    The format is an 8-byte little-endian header length, a JSON header giving each
    tensor's byte range, then the data. A truncated download or copy leaves fewer bytes
    than the header promises, which diffusers would report with an obscure message.
    """
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: corrupt safetensors file ({size} bytes, no header)")
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if 8 + header_len > size:
            raise CheckpointError(
                f"{path}: corrupt safetensors file (header claims {header_len} bytes, "
                f"file holds {size})"
            )
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_end = max(
        (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
        default=0,
    )
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, header needs "
            f"{8 + header_len + data_end})"
        )


def resolve_layout(path: str | Path) -> tuple[Path, Path]:
    """Return ``(model_dir, scheduler_dir)`` for the layouts `load_pretrained` accepts.

    Accepted: a pipeline directory with ``unet/`` and ``scheduler/`` subfolders, or a model
    directory holding ``config.json`` whose scheduler config lies beside it
    (``scheduler_config.json``) or in a sibling ``scheduler/`` folder.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"{root}: checkpoint path does not exist")
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint path is not a directory")
    if (root / "unet" / "config.json").is_file():
        return root / "unet", root / "scheduler"
    if (root / "config.json").is_file():
        if (root / _SCHEDULER_CONFIG).is_file():
            return root, root
        return root, root.parent / "scheduler"
    raise CheckpointError(
        f"{root}: no diffusers layout found (expected unet/config.json or config.json)"
    )


def _weights_file(model_dir: Path) -> Path:
    """Find the weights file, validating it when it is safetensors."""
    for name in _WEIGHT_NAMES:
        candidate = model_dir / name
        if candidate.is_file():
            if candidate.suffix == ".safetensors":
                check_safetensors(candidate)
            return candidate
    raise CheckpointError(f"{model_dir}: no weights file (looked for {', '.join(_WEIGHT_NAMES)})")


def _load_model(model_dir: Path, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Build the UNet class named in ``config.json`` and load its weights strictly."""
    import diffusers
    from safetensors import SafetensorError

    class_name = _read_json(model_dir / "config.json").get("_class_name")
    if class_name not in _MODEL_CLASSES:
        raise CheckpointError(
            f"{model_dir / 'config.json'}: unsupported model class {class_name!r} "
            f"(supported: {', '.join(_MODEL_CLASSES)})"
        )
    weights = _weights_file(model_dir)
    model_cls = getattr(diffusers, class_name)
    try:
        model, info = model_cls.from_pretrained(
            model_dir,
            local_files_only=True,
            torch_dtype=dtype,
            use_safetensors=weights.suffix == ".safetensors",
            output_loading_info=True,
            # Without accelerate diffusers can only load eagerly and says so on every
            # call; asking for that up front keeps the log quiet.
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
        )
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise CheckpointError(f"{weights}: failed to load weights ({exc})") from exc
    # diffusers only warns about missing or unused tensors and keeps random values for
    # the missing ones; a half-initialised model is worse than an error here.
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        detail = "; ".join(f"{k}: {list(v)[:5]}" for k, v in bad.items()) or str(info["error_msgs"])
        raise CheckpointError(f"{weights}: weights do not match the config ({detail})")
    return model.to(device=device).eval()


def _load_scheduler(scheduler_dir: Path) -> Any:
    """Build the DDIM/DDPM scheduler named in ``scheduler_config.json``."""
    import diffusers

    config_path = scheduler_dir / _SCHEDULER_CONFIG
    config = _read_json(config_path)
    class_name = config.get("_class_name")
    if class_name not in _SCHEDULER_CLASSES:
        raise CheckpointError(
            f"{config_path}: unsupported scheduler class {class_name!r} "
            f"(supported: {', '.join(_SCHEDULER_CLASSES)})"
        )
    return getattr(diffusers, class_name).from_config(config)


def load_pretrained(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.nn.Module, Any]:
    """Load ``(unet, scheduler)`` from a local diffusers checkpoint, strictly offline.

    Args:
        path: a pipeline directory (``unet/`` + ``scheduler/``) or a model directory with
            ``config.json`` and weights; see `resolve_layout`.
        device: device to move the model to.
        dtype: parameter dtype of the returned model.

    Returns:
        The model in eval mode (``UNet2DModel`` or ``UNet2DConditionModel``, chosen by the
        config's ``_class_name``) and a ``DDIMScheduler`` or ``DDPMScheduler``.

    Raises:
        CheckpointError: the path is missing, the layout or a class is unknown, or a
            config or weights file is unreadable, truncated or does not match.
    """
    model_dir, scheduler_dir = resolve_layout(path)
    scheduler = _load_scheduler(scheduler_dir)
    model = _load_model(model_dir, device, dtype)
    return model, scheduler
