"""Shared fixtures: tiny models and schedulers (CPU, seconds)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Tier 2 kernel tests run Triton under its CPU interpreter, which triton decides when it is first
# imported (diffusers imports it too). Import the dispatch first — it reads TRITON_INTERPRET once,
# so every other test keeps the reference on CPU — then set the variable before anything can
# import triton. On CUDA the same kernel tests run compiled.
# A pytest-xdist worker inherits the variable the controller's conftest set: drop it before the
# dispatch reads it, or every test would run interpreted kernels (40x slower).
_SET_HERE = "DEQKERN_TESTS_SET_TRITON_INTERPRET"
if os.environ.get(_SET_HERE):
    os.environ.pop("TRITON_INTERPRET", None)
import deqkern.ops.dispatch  # noqa: E402,F401  (order matters: see above)

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ[_SET_HERE] = "1"

sys.path.insert(0, str(Path(__file__).parent))

# Tiny models: one thread is fastest and avoids oversubscribing a shared 2-core machine.
torch.set_num_threads(1)
# Tests compare with float64 references: no TF32 on a GPU (cuDNN convolutions default to it)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

from gmm import GMMDenoiser  # noqa: E402

# Hypothesis profiles (tests/test_contract.py gives each property a share of max_examples):
# "ci", the default, is reproducible and runs the contract suite in a few minutes on one core;
# "deep" (--hypothesis-profile=deep) runs over 20,000 examples. Solve times vary with the drawn
# chain, so no deadline; drawn chains are large by design, so no too_slow/data_too_large checks.
_PROFILE = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, max_examples=50, print_blob=True, **_PROFILE)
settings.register_profile("deep", max_examples=2700, **_PROFILE)
if settings.get_current_profile_name() == "default":  # not when --hypothesis-profile chose one already
    settings.load_profile("ci")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ||a - b|| / ||b||, computed in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.fixture
def ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)


@pytest.fixture
def gmm64(ddim):
    return GMMDenoiser(ddim.alphas_cumprod, (2, 2, 4), dtype=torch.float64)


def tiny_unet(seed: int = 0):
    """A random-weight diffusers UNet2DModel on 1x8x8 latents (~40k params)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()


def digits_chain(steps: int, scheduler: str = "ddim"):
    """The embedded, trained digits UNet and an S-step DDIM or DDPM chain from its scheduler's
    config, x0 clipping off (a random model converges too easily to test stopping rules)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    import deqkern
    from deqkern.models import load_digits_model

    unet, sched = load_digits_model()
    cls = DDIMScheduler if scheduler == "ddim" else DDPMScheduler
    return unet, deqkern.Schedule.from_diffusers(cls.from_config(sched.config, clip_sample=False), steps)
