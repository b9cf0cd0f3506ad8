"""Model loading: the embedded digits model, local diffusers checkpoints, paper UNet sizes.

Importing this package only imports torch; diffusers, safetensors and scikit-learn are
imported by the functions that need them.
"""

from deqkern.models.digits import (
    DigitsClassifier,
    ddim_sample,
    digits_dataset,
    digits_labels,
    digits_quality,
    load_digits_classifier,
    load_digits_model,
    save_sample_grid,
)
from deqkern.models.loading import CheckpointError, load_pretrained
from deqkern.models.paper_configs import build_paper_unet, paper_unet_config

__all__ = [
    "CheckpointError",
    "DigitsClassifier",
    "build_paper_unet",
    "ddim_sample",
    "digits_dataset",
    "digits_labels",
    "digits_quality",
    "load_digits_classifier",
    "load_digits_model",
    "load_pretrained",
    "paper_unet_config",
    "save_sample_grid",
]
