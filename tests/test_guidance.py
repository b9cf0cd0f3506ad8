"""Classifier-free guidance parity: deqkern's guided sampling equals a hand-written guided loop.

Oracle: the loop a diffusers pipeline runs — the batch doubled as [uncond; cond], ``e = u + s (c - u)``,
then ``DDIMScheduler.step`` (with the same pre-drawn ``variance_noise`` when eta > 0). Model: a tiny
random-weight ``UNet2DConditionModel`` (cross_attention_dim 8), per-sample cond embeddings and a shared
(leading dim 1) uncond embedding.

Bounds (relative L2 of x0):
* float64, sequential: 1e-6 — the same model calls; diffusers' ``step`` computes its coefficients from
  its float32 ``alphas_cumprod`` in float32 even for float64 samples, deqkern in float64 from the same
  float32 alphas, so the two differ by float32 rounding of the coefficients (~1e-7 relative, measured
  2e-8);
* float64, parallel with ``tol=1e-9``: 1e-6 against the hand loop (the coefficient rounding above)
  and 1e-7 against deqkern's own sequential chain — a passing row is within ``tol`` of its map value; the
  error of x0 is a short sum of such residuals, 100x margin for the chain's amplification;
* float32, parallel ``tol=1e-5``: 1e-4 (float32 rounding of the model ~1e-6 relative, plus ``tol``);
* ``max_batch`` chunking vs one call: 1e-10 in float64 (the same rows, split into several calls).
"""
from __future__ import annotations

import pytest
import torch
from conftest import rel_err

import deqkern

S = 8
B = 2
SCALE = 4.0


def _unet(dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=8,
    ).eval()
    # nn.Module.double()/float() rather than diffusers' .to(dtype), which warns about fp32 modules
    return unet.double() if dtype == torch.float64 else unet


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)


def _problem(dtype: torch.dtype, eta: float):
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(B, 1, 8, 8, generator=g).to(dtype)
    cond = torch.randn(B, 3, 8, generator=g).to(dtype)  # one prompt embedding per sample
    uncond = torch.randn(1, 3, 8, generator=g).to(dtype)  # the shared "empty prompt"
    noise = torch.randn(S, B, 1, 8, 8, generator=g).to(dtype) if eta else None
    return x_T, cond, uncond, noise


@torch.no_grad()
def _hand_loop(unet, x_T, cond, uncond, eta, noise):
    """The guided DDIM loop as a diffusers pipeline writes it."""
    sched = _scheduler()
    sched.set_timesteps(S)
    x = x_T
    emb = torch.cat([uncond.expand(B, -1, -1), cond])
    for k, t in enumerate(sched.timesteps):
        out = unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample
        u, c = out.chunk(2)
        e = u + SCALE * (c - u)
        z = None if noise is None else noise[k]
        x = sched.step(e, t, x, eta=eta, variance_noise=z).prev_sample
    return x


def _guidance(cond, uncond):
    return deqkern.Guidance(SCALE, cond={"encoder_hidden_states": cond}, uncond={"encoder_hidden_states": uncond})


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_guided_sequential_and_parallel_match_hand_loop_float64(eta):
    unet = _unet(torch.float64)
    x_T, cond, uncond, noise = _problem(torch.float64, eta)
    ref = _hand_loop(unet, x_T, cond, uncond, eta, noise)
    sched = deqkern.Schedule.from_diffusers(_scheduler(), S, eta=eta)
    guidance = _guidance(cond, uncond)
    with torch.no_grad():
        seq = deqkern.sample_sequential(unet, x_T, sched, noise, guidance=guidance)
        par = deqkern.sample(unet, x_T, sched, tol=1e-9, noise=noise, guidance=guidance)
    assert rel_err(seq.x0, ref) <= 1e-6
    assert par.all_converged
    for b in range(B):
        assert rel_err(par.x0[b], seq.x0[b]) <= 1e-7
        assert rel_err(par.x0[b], ref[b]) <= 1e-6


@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_guided_parallel_float32(solver):
    unet = _unet(torch.float32)
    x_T, cond, uncond, _ = _problem(torch.float32, 0.0)
    ref = _hand_loop(unet, x_T, cond, uncond, 0.0, None)
    sched = deqkern.Schedule.from_diffusers(_scheduler(), S)
    with torch.no_grad():
        par = deqkern.sample(unet, x_T, sched, solver=solver, tol=1e-5, guidance=_guidance(cond, uncond))
    assert par.all_converged and rel_err(par.x0, ref) <= 1e-4


@pytest.mark.parametrize("max_batch", [2, 6, 7])
def test_guided_max_batch_chunking(max_batch):
    """A round of B*S guided rows (2*B*S model rows) split into chunks of ``max_batch`` model rows
    (odd sizes included) gives the same result, sequential and parallel, windowed or not."""
    unet = _unet(torch.float64)
    x_T, cond, uncond, _ = _problem(torch.float64, 0.0)
    ref = _hand_loop(unet, x_T, cond, uncond, 0.0, None)
    sched = deqkern.Schedule.from_diffusers(_scheduler(), S)
    guidance = _guidance(cond, uncond)
    with torch.no_grad():
        whole = deqkern.sample(unet, x_T, sched, tol=1e-9, guidance=guidance, window=5)
        chunked = deqkern.sample(unet, x_T, sched, tol=1e-9, guidance=guidance, window=5, max_batch=max_batch)
        seq = deqkern.sample_sequential(unet, x_T, sched, guidance=guidance, max_batch=max_batch)
    assert chunked.rounds == whole.rounds
    assert rel_err(chunked.x0, whole.x0) <= 1e-10
    assert rel_err(seq.x0, ref) <= 1e-6
    assert rel_err(chunked.x0, seq.x0) <= 1e-7


def test_guidance_scale_one_is_conditional_model():
    """scale 1 reduces to the conditional model alone: guided == unguided with cond as model_kwargs."""
    unet = _unet(torch.float64)
    x_T, cond, uncond, _ = _problem(torch.float64, 0.0)
    sched = deqkern.Schedule.from_diffusers(_scheduler(), S)
    with torch.no_grad():
        guided = deqkern.sample_sequential(unet, x_T, sched, guidance=deqkern.Guidance(
            1.0, cond={"encoder_hidden_states": cond}, uncond={"encoder_hidden_states": uncond}))
        plain = deqkern.sample_sequential(unet, x_T, sched, model_kwargs={"encoder_hidden_states": cond})
    assert rel_err(guided.x0, plain.x0) <= 1e-10
