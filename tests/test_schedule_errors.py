"""Bad arguments to the schedule constructors and X0Transform: each an error naming the argument,
raised where it is passed (not late inside torch, nor blamed on something else)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deqkern.schedule import Schedule, X0Transform

AC = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "bogus"}, r"^kind: expected 'none', 'clip' or 'threshold', got 'bogus'"),
    ({"kind": "clip", "clip_range": -1.0}, r"^clip_range: expected a finite number > 0"),
    ({"kind": "clip", "clip_range": float("inf")}, r"^clip_range: "),
    ({"kind": "threshold", "ratio": 2.0}, r"^ratio: expected a finite number in \[0, 1\]"),
    ({"kind": "threshold", "max_value": 0.0}, r"^max_value: expected a finite number > 0"),
])
def test_x0_transform_refuses_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        X0Transform(**kwargs)


def test_threshold_ratio_is_refused_before_quantile():
    """``ratio=2`` used to pass construction and fail inside ``torch.quantile`` at the first step."""
    with pytest.raises(ValueError, match="^ratio: "):
        Schedule.ddim(AC, [999, 499], transform=X0Transform("threshold", ratio=2.0))


@pytest.mark.parametrize("final", [0.0, -0.5, 1.5, float("nan")])
def test_bad_final_alpha_cumprod_is_named(final):
    """It was reported as a non-finite coefficient of a zero-SNR schedule."""
    with pytest.raises(ValueError, match=r"^final_alpha_cumprod: expected a finite number in \(0, 1\]") as exc:
        Schedule.ddim(AC, [999, 499], final_alpha_cumprod=final)
    assert "zero-SNR" not in str(exc.value)


@pytest.mark.parametrize("make", [Schedule.ddim, Schedule.ddpm])
def test_empty_timesteps_report_the_length_not_a_dtype(make):
    with pytest.raises(ValueError, match=r"^timesteps: expected a non-empty 1-D tensor") as exc:
        make(AC, [])
    assert "dtype" not in str(exc.value)


def test_bool_timesteps_are_refused():
    with pytest.raises(ValueError, match="^timesteps: expected integer training timesteps, got dtype torch.bool"):
        Schedule.ddim(AC, [True, False])


@pytest.fixture(scope="module")
def ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)


@pytest.mark.parametrize("steps", [np.int64(10), np.int32(10), torch.tensor(10)])
def test_integer_scalars_of_numpy_and_torch_are_step_counts(ddim, steps):
    """A chain length from numpy/torch arithmetic is the same chain as the Python int."""
    s = Schedule.from_diffusers(ddim, steps)
    ref = Schedule.from_diffusers(ddim, 10)
    assert s.num_steps == 10 and torch.equal(s.timesteps, ref.timesteps) and torch.equal(s.cx, ref.cx)


@pytest.mark.parametrize("steps", [True, np.bool_(True), torch.tensor(True), 10.0, "10", 0])
def test_bools_floats_and_zero_are_not_step_counts(ddim, steps):
    """``True`` used to be taken as one step."""
    with pytest.raises(ValueError, match=r"^num_inference_steps: expected an integer >= 1"):
        Schedule.from_diffusers(ddim, steps)


def test_bad_sigma_names_its_step_and_neighbours_only():
    """A repeated sigma in a 1000-step chain: the error names the step and its neighbourhood, not
    every sigma (a DPM-Solver config of 1000 steps once printed 1001 values)."""
    sig = torch.cat([torch.linspace(10.0, 0.1, 1000, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    sig[501] = sig[500]
    ts = torch.arange(999, -1, -1)
    with pytest.raises(ValueError, match=r"sigmas: step 501 has sigma .* \(steps 499\.\. of 1001: \[") as err:
        Schedule.dpm_solver(sig, ts)
    assert len(str(err.value)) < 400
