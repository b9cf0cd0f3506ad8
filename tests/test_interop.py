"""DLPack interop: arrays of other libraries in, the same kind out, zero-copy.

numpy speaks DLPack on CPU, so the logic is tested everywhere; cupy needs a GPU and the extra.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import deqkern


def test_numpy_in_numpy_out(gmm64, ddim):
    sched = deqkern.Schedule.from_diffusers(ddim, 10, eta=0.5)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 2, 4))
    noise = rng.standard_normal((10, 2, 2, 2, 4))
    with torch.no_grad():
        res = deqkern.sample(gmm64, x, sched, noise=noise, tol=1e-8, return_trajectory=True)
        ref = deqkern.sample_sequential(gmm64, torch.from_numpy(x), sched, torch.from_numpy(noise))
        seq = deqkern.sample_sequential(gmm64, x, sched, noise)
    assert isinstance(res.x0, np.ndarray) and isinstance(res.trajectory, np.ndarray) and isinstance(seq.x0, np.ndarray)
    assert np.allclose(res.x0, ref.x0.numpy(), rtol=1e-6, atol=1e-8)
    # zero-copy on the way in: the solver saw x's memory (trajectory row 0 is x_T itself)
    view = torch.from_dlpack(x)
    assert view.data_ptr() == x.__array_interface__["data"][0]


def test_non_array_is_refused(gmm64, ddim):
    sched = deqkern.Schedule.from_diffusers(ddim, 4)
    with pytest.raises(TypeError, match="x_T"):
        deqkern.sample(gmm64, [[0.0] * 16], sched)


@pytest.mark.gpu
def test_cupy_roundtrip(ddim):
    cp = pytest.importorskip("cupy", reason="cupy extra not installed")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from gmm import GMMDenoiser

    model = GMMDenoiser(ddim.alphas_cumprod, (2, 2, 4)).cuda()
    sched = deqkern.Schedule.from_diffusers(ddim, 10)
    x = cp.random.standard_normal((1, 2, 2, 4), dtype=cp.float32)
    with torch.no_grad():
        res = deqkern.sample(model, x, sched, tol=1e-5)
        ref = deqkern.sample_sequential(model, torch.from_dlpack(x), sched)
    assert isinstance(res.x0, cp.ndarray)
    assert float(cp.linalg.norm(res.x0 - cp.from_dlpack(ref.x0)) / cp.linalg.norm(res.x0)) < 1e-4
