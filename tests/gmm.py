"""An exactly-known denoiser for tests: the optimal epsilon-predictor of a Gaussian mixture.

For data x0 ~ sum_k (1/K) N(mu_k, s^2 I) and x_t = sqrt(a) x0 + sqrt(1-a) eps, the posterior
mean is E[x0 | x_t] = sum_k w_k(x_t) (mu_k + s^2 sqrt(a) / (a s^2 + 1 - a) (x_t - sqrt(a) mu_k))
with w = softmax_k(-||x_t - sqrt(a) mu_k||^2 / (2 (a s^2 + 1 - a))), and eps = (x_t - sqrt(a) E[x0]) /
sqrt(1 - a). It behaves like a trained denoiser (nonlinear, contractive in the right places),
is smooth (autograd and gradcheck work) and costs nothing.
"""
from __future__ import annotations

import torch


class GMMDenoiser(torch.nn.Module):
    def __init__(self, alphas_cumprod: torch.Tensor, shape: tuple[int, ...], k: int = 4, s: float = 0.3,
                 seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = 1
        for n in shape:
            d *= n
        self.shape = shape
        self.register_buffer("ac", alphas_cumprod.to(dtype))
        self.register_buffer("mu", (torch.randn(k, d, generator=g, dtype=torch.float64) * 0.7).to(dtype))
        self.s2 = s * s
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        n = x.shape[0]
        a = self.ac[t.long().expand(n)].to(x.dtype).view(n, 1)
        xf = x.reshape(n, -1)
        sa = a.sqrt()
        v = a * self.s2 + 1 - a
        diff = xf.unsqueeze(1) - sa.unsqueeze(1) * self.mu.unsqueeze(0)  # [n, K, D]
        logits = -(diff.square().sum(-1)) / (2 * v)
        w = torch.softmax(logits, dim=1)
        post = self.mu.unsqueeze(0) + (self.s2 * sa / v).unsqueeze(1) * diff
        x0 = (w.unsqueeze(-1) * post).sum(1)
        eps = (xf - sa * x0) / (1 - a).sqrt()
        return eps.reshape(x.shape)
