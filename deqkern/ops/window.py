"""Window helpers the engine, the solvers and the adjoint use at run time: the chain step per row,
the live-row mask, the window slide, the linear scan and the one-hot Picard weights.

Kept apart from :mod:`deqkern.ops.reference`, the kernels' contract (which builds on these), so
the run-time code depends on this small module and not on the contract.
"""
from __future__ import annotations

import torch

from deqkern.schedule import X0Transform


def step_rows(
    x: torch.Tensor, out: torch.Tensor, z: torch.Tensor | None, coef: torch.Tensor, transform: X0Transform,
    ms: torch.Tensor | None = None, u_prev: torch.Tensor | None = None,
) -> torch.Tensor:
    """One chain step per row: ``cx x + co out + c0 f(px x + po out) [+ c1 u_prev] + sigma z``.

    ``x``, ``out``, ``z``, ``u_prev``: ``[..., D]``; ``coef``: ``[..., 7]``; ``ms``: ``[..., 4]``
    (:data:`deqkern.schedule.MULTISTEP_FIELDS`), with ``u_prev`` the previous step's converted output
    (:func:`converted_rows`) in a multistep chain. The x0 transform acts per row.
    """
    c = coef.to(x.dtype).unsqueeze(-1)
    _, cx, co, c0, px, po, sigma = c.unbind(-2)
    y = cx * x + co * out
    if transform.kind != "none":
        y = y + c0 * _transformed_x0(px * x + po * out, transform)
    if ms is not None:
        y = y + ms[..., :1].to(x.dtype) * u_prev
    if z is not None:
        y = y + sigma * z
    return y


def converted_rows(
    x: torch.Tensor, out: torch.Tensor, coef: torch.Tensor, ms: torch.Tensor, transform: X0Transform
) -> torch.Tensor:
    """A multistep step's converted model output per row, ``u = ux x + uo out + uf f(px x + po out)``
    (the x0 or noise prediction the next step reads, docs/math.md §1.1). Shapes as :func:`step_rows`."""
    m = ms.to(x.dtype).unsqueeze(-1)
    _, ux, uo, uf = m.unbind(-2)
    u = ux * x + uo * out
    if transform.kind != "none":
        c = coef.to(x.dtype).unsqueeze(-1)
        u = u + uf * _transformed_x0(c[..., 4, :] * x + c[..., 5, :] * out, transform)
    return u


def _transformed_x0(x0: torch.Tensor, transform: X0Transform) -> torch.Tensor:
    """``f(x0)`` of ``[..., D]`` rows, the transform acting per row."""
    lead = x0.shape[:-1]
    return transform.apply(x0.reshape(-1, x0.shape[-1])).reshape(*lead, x0.shape[-1])


def row_mask(n_rows: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, W]`` bool: row ``j`` of sample ``b`` is live iff ``j < n_rows[b]``."""
    return torch.arange(width, device=n_rows.device).unsqueeze(0) < n_rows.unsqueeze(1)


class RowSlide:
    """One round's window slide, ``t[b, j] <- t[b, j + delta[b]]`` for every per-row tensor of
    the window, with a fill past the end. The gather index is built once per round and applied
    to each tensor (each build is four small kernels; a round slides up to nine tensors)."""

    def __init__(self, delta: torch.Tensor, width: int) -> None:
        idx = torch.arange(width, device=delta.device).unsqueeze(0) + delta.unsqueeze(1)
        self.inside = idx < width  # [B, W]
        self.idx = idx.clamp(max=width - 1)
        self.b = torch.arange(delta.shape[0], device=delta.device).unsqueeze(1)

    def apply(self, t: torch.Tensor, fill: float) -> None:
        """Slide ``t`` ``[B, W, ...]`` in place (any strides, e.g. a permuted view)."""
        inside = self.inside.view(*self.inside.shape, *[1] * (t.ndim - 2))
        t.copy_(torch.where(inside, t[self.b, self.idx], fill))


def linear_scan(anchor: torch.Tensor, mult: torch.Tensor, inc: torch.Tensor, unit: bool | None = None) -> torch.Tensor:
    """``g_j = mult_j g_{j-1} + inc_j`` for ``j = 0 .. W-1``, ``g_{-1} = anchor``.

    ``anchor``: ``[B, D]``; ``mult``: ``[B, W]``; ``inc``: ``[B, W, D]``. ``unit``: every ``mult``
    is 1 (the drift form: a cumulative sum); ``None`` inspects ``mult``, which syncs with the host.
    """
    if unit is None:
        unit = bool((mult == 1).all())
    if unit:
        return anchor.unsqueeze(1) + torch.cumsum(inc, dim=1)
    g = torch.empty_like(inc)
    prev = anchor
    for j in range(inc.shape[1]):
        prev = mult[:, j].unsqueeze(-1) * prev + inc[:, j]
        g[:, j] = prev
    return g


def residual_scan(anchor: torch.Tensor, mult: torch.Tensor, x: torch.Tensor, s: torch.Tensor,
                  unit: bool | None = None) -> torch.Tensor:
    """The scan of a round, ``g_j = L_j (g_{j-1} - x_j) + s_j`` for ``j = 0 .. W-1``, ``g_{-1} =
    anchor``, in that order: the difference first, which is small on a row near convergence, so the
    step's output ``s_j`` keeps its own precision where the latents dwarf it. Summing ``s_j - L_j
    x_j`` first rounds ``s_j`` away: in float32 a step that shrinks its latent 1e8-fold lost its
    output whole, even in a window of one row (tests/test_x0_bound_harsh.py:
    test_float32_step_output_survives_large_latents).

    ``anchor``: ``[B, D]``; ``mult``: ``[B, W]``; ``x``, ``s``: ``[B, W, D]``. ``unit``: every
    ``mult`` is 1 (the drift form); ``None`` inspects ``mult``, which syncs with the host. With unit
    multipliers ``g_j - s_j = g_{j-1} - x_j`` sums the differences ``s_{j-1} - x_j`` (``s_{-1}`` =
    the anchor), each small near convergence: one cumulative sum instead of a loop over the rows.
    """
    if unit is None:
        unit = bool((mult == 1).all())
    if unit:
        before = torch.cat([anchor.unsqueeze(1), s[:, :-1]], dim=1)
        return torch.cumsum(before - x, dim=1) + s
    g = torch.empty_like(s)
    prev = anchor
    for j in range(s.shape[1]):
        prev = mult[:, j].unsqueeze(-1) * (prev - x[:, j]) + s[:, j]
        g[:, j] = prev
    return g


def one_hot(index: torch.Tensor, m: int, dtype: torch.dtype) -> torch.Tensor:
    """``[..., m]`` rows with a 1 at ``index`` (plain Picard weights). Not ``F.one_hot``: off
    CUDA it checks the index range with a host sync, and this runs inside captured rounds."""
    return (torch.arange(m, device=index.device) == index.unsqueeze(-1)).to(dtype)
