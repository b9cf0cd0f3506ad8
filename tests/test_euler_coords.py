"""Euler chains solved in their natural (variance-preserving) coordinates (issue 11's rounds).

Euler's latents are variance exploding, ``x = x0 + sigma eps``; ``x / c`` with ``c = sqrt(sigma^2 + 1)``
is the VP latent the model sees (DDIM's chain). The drift form's multiplier is 1 in those coordinates,
``L_k = c_{k+1} / c_k`` in the latents' own, and the solve's first guess is ``x_T``'s VP latent in every
row, ``x_T c_k / c_0`` (docs/math.md §3). Neither changes the fixed point.

Oracles: the sequential sampler (Picard with a stopping test nothing passes is it, to float64 rounding:
1e-12 relative L2); the drift scan written out by hand in VP coordinates (float64, 1e-12); the float64
reference of the scan for the Triton kernel (fp32 inputs, the bounds of tests/test_kernels.py); the x0
rule's documented bound for converged parallel solves (:func:`test_x0_bound.bound_ratio` <= 1).
"""
from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from test_kernels import RTOL_ROWS, RTOL_SUMS, check, dev, f64, ops, poisoned_allocations  # noqa: F401
from test_schedulers_parity import _make, check_parallel_within_bound, model

import deqkern
from deqkern.engine import Problem, SolveState
from deqkern.ops import reference

STEPS, SHAPE = 10, (2, 1, 4, 4)
PARALLEL_TOL = 1e-4
EULER = "EulerDiscreteScheduler"
EULER_A = "EulerAncestralDiscreteScheduler"
CHAINS = [
    (EULER, {}),
    (EULER, dict(use_karras_sigmas=True, prediction_type="v_prediction")),
    (EULER, dict(final_sigmas_type="sigma_min", timestep_spacing="trailing", prediction_type="sample")),
    (EULER_A, {}),
    (EULER_A, dict(prediction_type="v_prediction", beta_schedule="scaled_linear")),
]


def _case(cls_name: str, cfg: dict, seed: int = 0):
    """``(schedule, x_T, noise)``: float64 latents at the loop's scale (x ``init_noise_sigma``), and
    the ancestral chain's step noise (None for plain Euler)."""
    s = deqkern.Schedule.from_diffusers(_make(cls_name, cfg), STEPS)
    twin = _make(cls_name, cfg)
    twin.set_timesteps(STEPS)
    gen = torch.Generator().manual_seed(100 + seed)
    x_T = torch.randn(SHAPE, generator=gen, dtype=torch.float64) * float(twin.init_noise_sigma)
    noise = torch.randn(STEPS, *SHAPE, generator=gen, dtype=torch.float64) if s.is_stochastic else None
    return s, x_T, noise


def _vp_scale(cls_name: str, cfg: dict) -> torch.Tensor:
    """``[S+1]`` ``sqrt(sigma^2 + 1)`` from the scheduler's own sigmas (float64)."""
    twin = _make(cls_name, cfg)
    twin.set_timesteps(STEPS)
    return (twin.sigmas[: STEPS + 1].double() ** 2 + 1).sqrt()


@pytest.mark.parametrize("cls_name,cfg", CHAINS)
def test_drift_multiplier_is_the_coordinate_ratio(cls_name, cfg):
    """Drift form: ``L_k = c_{k+1} / c_k``; the scan form keeps ``L = A``; the model-input scale is
    ``1 / c_k`` (the same coordinates)."""
    s, _, _ = _case(cls_name, cfg)
    c = _vp_scale(cls_name, cfg)
    torch.testing.assert_close(s.coords, c, rtol=1e-15, atol=0)
    torch.testing.assert_close(s.packed(dtype=torch.float64)[:, 0], c[1:] / c[:-1], rtol=1e-15, atol=0)
    torch.testing.assert_close(s.step_inputs.scale, 1 / c[:-1], rtol=1e-15, atol=0)
    assert torch.equal(s.with_form("scan").packed(dtype=torch.float64)[:, 0], s.a_coef)


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler"])
def test_vp_chains_unchanged(name):
    """DDIM and DDPM latents are VP already: no coordinates, the drift form's L exactly 1."""
    s = deqkern.Schedule.from_diffusers(_make(name, {}), STEPS)
    assert s.coords is None
    assert bool((s.packed(dtype=torch.float64)[:, 0] == 1).all())


@pytest.mark.parametrize("cls_name,cfg", CHAINS)
def test_drift_scan_is_the_drift_in_vp_coordinates(cls_name, cfg):
    """One round's scan in the latents' coordinates equals, scaled back, the plain drift scan
    ``h_{k+1} = h_k + (s_k - x_k) / c`` written out in VP coordinates (``h = g / c``)."""
    s, x_T, noise = _case(cls_name, cfg)
    gen = torch.Generator().manual_seed(5)
    b, d = SHAPE[0], x_T[0].numel()
    c = s.coords
    # an iterate: each row at its own scale, perturbed
    xw = (x_T.reshape(b, 1, d) * (c / c[0]).view(1, -1, 1)
          + 0.3 * torch.randn(b, STEPS + 1, d, generator=gen, dtype=torch.float64))
    xw[:, 0] = x_T.reshape(b, d)
    e = torch.randn(b, STEPS, d, generator=gen, dtype=torch.float64)
    z = None if noise is None else noise.reshape(STEPS, b, d).transpose(0, 1)
    coef = s.packed(dtype=torch.float64).unsqueeze(0).expand(b, -1, -1)
    n = torch.full((b,), STEPS, dtype=torch.int64)
    got = reference.scan_residual(xw, e, z, coef, n, s.transform).g
    steps = reference.step_rows(xw[:, :-1], e, z, coef, s.transform)
    h = xw[:, 0] / c[0]
    want = torch.empty_like(got)
    for k in range(STEPS):
        h = h + steps[:, k] / c[k + 1] - xw[:, k] / c[k]
        want[:, k] = h * c[k + 1]
    assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("cls_name,cfg", CHAINS[:1] + CHAINS[3:4])
def test_start_is_x_T_in_vp_coordinates(cls_name, cfg):
    """Without a warm start every row starts at ``x_T c_k / c_0``; a warm start ``init`` is kept as given."""
    s, x_T, _ = _case(cls_name, cfg)
    b, d = SHAPE[0], x_T[0].numel()
    kw = dict(coef=s.packed(dtype=torch.float64), timesteps=s.timesteps, noise_var=s.noise_var, noise=None,
              transform=s.transform, shape=x_T.shape, width=4, tol=1e-3, stop="x0", max_iters=STEPS, form="drift",
              coords=s.coords)
    st = SolveState.start(Problem(init=None, **kw), x_T, return_trajectory=False)
    want = x_T.reshape(b, 1, d) * (s.coords[:5] / s.coords[0]).view(1, -1, 1)
    assert rel_err(st.xw, want) < 1e-15
    init = torch.randn(STEPS + 1, b, d, dtype=torch.float64)
    st = SolveState.start(Problem(init=init, **kw), x_T, return_trajectory=False)
    assert torch.equal(st.xw, init[:5].transpose(0, 1))


@pytest.mark.parametrize("execution", ["eager", "static"])
@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("cls_name,cfg", CHAINS[:2] + CHAINS[3:4])
def test_exact_picard_is_the_sequential_chain(cls_name, cfg, window, execution):
    """Picard with a stopping test nothing passes freezes one row per round: after S rounds x0 is the
    sequential chain's to float64 rounding (1e-12), whatever L and the start."""
    s, x_T, noise = _case(cls_name, cfg)
    seq = deqkern.sample_sequential(model, x_T, s, noise=noise, execution="eager").x0
    res = deqkern.sample(model, x_T, s, solver="picard", tol=1e-300, window=window, noise=noise, stop="relative",
                         execution=execution)
    assert res.rounds == STEPS and rel_err(res.x0, seq) < 1e-12


@pytest.mark.parametrize("cls_name,cfg", CHAINS)
def test_parallel_within_bound(cls_name, cfg):
    """Picard and Anderson, full window and window 3, eager and static: converged, x0 within the x0
    rule's bound of the sequential sampler's."""
    s, x_T, noise = _case(cls_name, cfg, seed=1)
    check_parallel_within_bound(model, x_T, s, noise, PARALLEL_TOL)


@pytest.mark.parametrize("cls_name,cfg", [CHAINS[0], CHAINS[3]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scan_kernel_matches_reference(ops, cls_name, cfg, dtype):
    """The Triton scan (interpreted on CPU) with an Euler chain's drift multipliers ``c_{k+1} / c_k``
    against the float64 reference, outputs poisoned; a window at k0 = 3 with a dead row and several
    D-blocks. fp32: the bounds of tests/test_kernels.py; fp64: 1e-12."""
    s, _, noise = _case(cls_name, cfg)
    gen = torch.Generator().manual_seed(11)
    b, width, dim, k0 = 2, 6, 300, 3
    pos = torch.arange(k0, k0 + width).clamp(max=STEPS - 1)
    scale = (s.coords[k0: k0 + width + 1] / s.coords[k0]).view(1, -1, 1)
    args = dict(
        xw=(scale * torch.randn(b, 1, dim, generator=gen, dtype=torch.float64) * 5).to(dtype),
        e=torch.randn(b, width, dim, generator=gen, dtype=torch.float64).to(dtype),
        z=None if noise is None else torch.randn(b, width, dim, generator=gen, dtype=torch.float64).to(dtype),
        coef=s.packed(dtype=dtype)[pos].unsqueeze(0).expand(b, -1, -1).contiguous(),
        n_rows=torch.tensor([width, width - 2]), hist_f=torch.randn(2, b, width, dim, generator=gen).to(dtype),
    )
    with poisoned_allocations():
        got = ops.scan_residual(**dev(args), transform=s.transform, block_d=128)
    want = reference.scan_residual(**f64(args), transform=s.transform)
    rows, sums = (RTOL_ROWS, RTOL_SUMS) if dtype == torch.float32 else (1e-12, 1e-12)
    for name, rtol in (("g", rows), ("f", rows), ("f_sq", sums), ("g_sq", sums), ("gram", sums)):
        check(name, getattr(got, name), getattr(want, name), rtol)
    # the multipliers are live: the unit drift scan differs
    unit = reference.scan_residual(**f64(args), transform=s.transform, drift=True)
    assert float((unit.g - want.g).abs().max()) > 1e-3


def test_bad_coords_name_the_position():
    s, _, _ = _case(EULER, {})
    from dataclasses import replace

    bad = s.coords.clone()
    bad[4] = 0.0
    with pytest.raises(ValueError, match="coords: expected finite positive scales, got 0.0 at position 4"):
        replace(s, coords=bad)
    with pytest.raises(ValueError, match=r"coords: expected float64 of shape \(11,\)"):
        replace(s, coords=s.coords[:-1])


def _commit_case(seed: int, extrapolate: bool):
    """A commit's inputs in VP coordinates (``y``), every (delta, n) corner: a finished sample,
    one live row (the anchor as the previous row), all rows accepted, a window past S."""
    s, _, _ = _case(EULER, {})
    gen = torch.Generator().manual_seed(seed)
    batch, width, dim = 5, 4, 37
    n = torch.tensor([0, 1, 4, 3, 2])
    delta = torch.tensor([0, 0, 4, 1, 2])
    k0 = torch.tensor([2, 5, 0, 3, STEPS - 2])  # the last window: positions up to S + 2, clamped to S
    y = dict(xw=torch.randn(batch, width + 1, dim, generator=gen, dtype=torch.float64),
             mixed=torch.randn(batch, width, dim, generator=gen, dtype=torch.float64),
             g=torch.randn(batch, width, dim, generator=gen, dtype=torch.float64))
    return s.coords, dict(delta=delta, n_rows=n, k0=k0, extrapolate=extrapolate), y


def _at(coords: torch.Tensor, k0: torch.Tensor, first: int, rows: int) -> torch.Tensor:
    """``[B, rows, 1]`` ``coords`` at positions ``k0 + first + i``, clamped to S."""
    pos = (k0.unsqueeze(1) + first + torch.arange(rows)).clamp(max=coords.numel() - 1)
    return coords[pos].unsqueeze(-1)


@pytest.mark.parametrize("extrapolate", [False, True])
def test_entering_rows_continue_in_vp_coordinates(extrapolate):
    """With ``coords`` the commit of latents ``x = c y`` is the plain commit of the VP latents ``y``,
    scaled back at the rows' new positions (float64, 1e-14): entering rows are copied or
    extrapolated in VP coordinates, the other rows move as they are."""
    coords, kw, y = _commit_case(3, extrapolate)
    k0, width = kw["k0"], y["g"].shape[1]
    x = dict(xw=y["xw"] * _at(coords, k0, 0, width + 1), mixed=y["mixed"] * _at(coords, k0, 1, width),
             g=y["g"] * _at(coords, k0, 1, width))
    coords_free = {k: v.clone() for k, v in x.items()}
    reference.commit_window(**y, **kw)
    reference.commit_window(**x, **kw, coords=coords)
    want = y["xw"] * _at(coords, k0 + kw["delta"] * (kw["n_rows"] > 0), 0, width + 1)
    assert rel_err(x["xw"], want) < 1e-14
    # coords are live: the unscaled commit differs on entering rows
    reference.commit_window(**coords_free, **kw)
    assert rel_err(coords_free["xw"], want) > 1e-3


@pytest.mark.parametrize("extrapolate", [False, True])
def test_commit_kernel_with_coords_matches_reference(ops, extrapolate):
    """The Triton commit (interpreted on CPU) with ``coords`` == the reference, fp32, outputs
    poisoned, the next model input in fp16; within 1e-6 (a GPU may fuse the scaling into FMAs)."""
    coords, kw, y = _commit_case(4, extrapolate)
    args = {**{k: v.float() for k, v in y.items()}, **kw, "coords": coords.float()}
    want = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    width, dim = y["g"].shape[1:]
    want_out = torch.full((5, width, dim), float("nan"), dtype=torch.float16)
    reference.commit_window(**want, out=want_out)
    got = dev(args)
    got_out = torch.full((5, width, dim), float("nan"), dtype=torch.float16, device=want_out.device)
    with poisoned_allocations():
        ops.commit_window(**got, out=got_out.to(got["xw"].device))
    check("xw", got["xw"], want["xw"], 1e-6)
    check("out", got_out, want_out, 1e-3)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_commit_with_coords_needs_k0(ops, impl):
    coords, kw, y = _commit_case(5, True)
    args = {**{k: v.float() for k, v in y.items()}, **kw, "k0": None, "coords": coords.float()}
    with pytest.raises(ValueError, match="k0: required with coords"):
        (reference if impl == "reference" else ops).commit_window(**dev(args))
