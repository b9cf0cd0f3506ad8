"""The peer algorithms, run on *our* model, noise and chain so that only the solver differs.

* :func:`run_paradigms` — a faithful port of the denoising loop of diffusers'
  ``StableDiffusionParadigmsPipeline`` (deprecated) for an unconditional UNet: Picard iteration
  on a sliding window of ``parallel`` steps, diffusers' own ``DDIMParallelScheduler`` /
  ``DDPMParallelScheduler.batch_step_no_noise``, the drift form, pre-drawn noise, and the
  noise-scaled stopping rule ``||dx||^2 / (D var_t) <= tol^2`` (max over the batch).
* :func:`run_deq_ddim` — DEQ-DDIM's Anderson solver (locuslab/deq-ddim,
  ``functions/ddim_anderson.py``) as its scripts run it: the scan form, every latent initialised
  at x_T, separate mixing weights per (sample, timestep) row, m=5, an *absolute* ridge 1e-3,
  beta=1, at most 15 map evaluations (50 for stochastic chains), and a global stopping test
  ``||G(X) - X|| / ||G(X)|| < 1e-3``; it returns the last mixed iterate.
* :func:`run_torchdeq` — ``torchdeq.solver.anderson_solver`` with its defaults (m=6,
  lam=1e-4 absolute, tau=1, at most 50 evaluations, lowest-residual iterate) on our full-chain
  map :class:`ChainMap`; only the stopping rule is set to the benchmark's relative tolerance.

Each returns an :class:`Outcome`; the runner times it and compares it with the oracle.
diffusers and torchdeq are imported inside the functions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from deqkern.model import ModelEvaluator
from deqkern.ops import scan_residual
from deqkern.schedule import Schedule

#: Called once per round with the current x0 estimate ``[B, ...]`` (for per-round error curves).
RoundHook = Callable[[torch.Tensor], None]


@dataclass
class Outcome:
    """What a solve produced; ``residuals[r][b]`` is ``||G(X) - X|| / ||G(X)||`` of sample b
    over the rows evaluated in round r (the same definition deqkern reports)."""

    x0: torch.Tensor
    rounds: int
    model_evals: int
    converged: bool
    residuals: list[list[float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class SolverUnsupported(RuntimeError):
    """The solver cannot run this configuration at all (the message says why)."""


def _rel_residual(new: torch.Tensor, old: torch.Tensor) -> list[float]:
    """Per-sample ``||new - old|| / ||new||``; ``new``/``old`` are ``[B, rows, D]``."""
    num = (new - old).double().flatten(1).norm(dim=1)
    den = new.double().flatten(1).norm(dim=1).clamp(min=1e-300)
    return (num / den).tolist()


class ChainMap:
    """One full-window fixed-point map ``G(X)`` over all S latents of every sample (docs/math.md §2-§3).

    ``X``: ``[B, S, D]`` iterates of positions 1..S (x_{S-1} .. x_0 in the paper's indexing);
    every call is ONE model batch of B*S rows followed by :func:`deqkern.ops.scan_residual`, in the
    schedule's form (``drift`` or ``scan``). ``calls`` counts evaluations of G.
    """

    def __init__(self, model: Any, schedule: Schedule, x_T: torch.Tensor, noise: torch.Tensor | None,
                 max_batch: int | None = None) -> None:
        schedule.refuse_multistep("ChainMap")
        self.schedule = schedule
        self.ev = ModelEvaluator(model, {}, None, max_batch, inputs=schedule.step_inputs)
        self.shape = x_T.shape
        b, s = x_T.shape[0], schedule.num_steps
        self.dim = x_T[0].numel()
        dev, dt = x_T.device, x_T.dtype
        self.anchor = x_T.reshape(b, 1, self.dim)
        self.coef = schedule.packed(dev, dt).unsqueeze(0).expand(b, s, -1)
        self.t = schedule.timesteps.to(dev).repeat(b)
        self.rows_b = torch.arange(b, device=dev).repeat_interleave(s)
        self.z = None if noise is None else noise.reshape(s, b, self.dim).transpose(0, 1)
        self.n = torch.full((b,), s, device=dev, dtype=torch.int64)
        self.calls = 0

    @property
    def steps(self) -> int:
        return self.schedule.num_steps

    def initial(self) -> torch.Tensor:
        """Every latent at x_T (DEQ-DDIM's initialisation), ``[B, S, D]``."""
        return self.anchor.expand(-1, self.steps, -1).clone()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, s = self.shape[0], self.steps
        xw = torch.cat([self.anchor, x.reshape(b, s, self.dim)], dim=1)
        rows = xw[:, :s].reshape(b * s, *self.shape[1:])
        e = self.ev(rows, self.t, self.rows_b, round_index=self.calls).reshape(b, s, self.dim)
        self.calls += 1
        return scan_residual(xw, e, self.z, self.coef, self.n, self.schedule.transform).g

    def x0(self, x: torch.Tensor) -> torch.Tensor:
        """The x_0 row of an iterate, shaped like x_T."""
        return x.reshape(self.shape[0], self.steps, self.dim)[:, -1].reshape(self.shape)


# ---------------------------------------------------------------------------------- ParaDiGMS
def paradigms_known_bugs(
    scheduler_config: dict, kind: str, steps: int, parallel: int, device: torch.device
) -> list[str]:
    """The open ParaDiGMS bugs (peers.md), each with whether it bites in this configuration."""
    from diffusers import DDIMScheduler

    notes = []
    if kind == "ddim":
        final = float(DDIMScheduler.from_config(scheduler_config).final_alpha_cumprod)
        bites = final != 1.0
        notes.append(f"final alpha hard-coded to 1.0 in batch_step_no_noise (scheduler's is {final:.6g}): "
                     f"{'BITES' if bites else 'does not bite'}")
        # With the final alpha 1.0 the last step's posterior variance is 0, so the scaled
        # tolerance of x_{S-1} is infinite: it only passes as the first failing row (+1 round).
        notes.append("posterior variance 0 at the last step: x_{S-1} can never pass the noise rule, "
                     "it is accepted only as the window's first failing row (costs up to one round)")
    else:
        spacing = scheduler_config.get("timestep_spacing", "leading")
        bites = spacing != "leading"
        notes.append(f"DDPM batched step uses a fixed stride num_train // S (spacing {spacing!r}): "
                     f"{'BITES' if bites else 'does not bite'}")
    if parallel == 1:
        notes.append("parallel=1 does not reproduce sequential DDIM (open issue): window is 1 here")
    if device.type == "cuda":
        notes.append("cumsum on CUDA is not deterministic: repeated runs may differ in the last bits")
    return notes


@torch.no_grad()
def run_paradigms(
    model: Any, scheduler_config: dict, kind: str, schedule: Schedule, x_T: torch.Tensor,
    noise: torch.Tensor | None, parallel: int = 10, tolerance: float = 0.1, eta: float = 0.0,
    max_batch: int | None = None, on_round: RoundHook | None = None,
) -> Outcome:
    """ParaDiGMS' sliding-window Picard loop (pipeline_stable_diffusion_paradigms.py, "7.
    Denoising loop"), unconditional, with ``noise[j]`` as the pre-drawn base noise of step j."""
    from diffusers import DDIMParallelScheduler, DDPMParallelScheduler

    if kind not in ("ddim", "ddpm"):
        raise SolverUnsupported(
            f"n/a for {kind}: ParaDiGMS' batched step (batch_step_no_noise) exists only in diffusers' "
            "DDIMParallelScheduler and DDPMParallelScheduler (picard-win runs its algorithm on any chain)"
        )
    if kind == "ddim" and eta != 0.0:
        raise SolverUnsupported(
            "DDIMParallelScheduler.batch_step_no_noise asserts eta == 0 (DDIM with eta > 0 unsupported)"
        )
    cls = DDIMParallelScheduler if kind == "ddim" else DDPMParallelScheduler
    scheduler = cls.from_config(scheduler_config)
    steps = schedule.num_steps
    device = x_T.device
    scheduler.set_timesteps(steps, device=device)
    if not torch.equal(scheduler.timesteps.cpu().to(torch.int64), schedule.timesteps):
        raise SolverUnsupported(f"{cls.__name__} timesteps differ from the chain's: {scheduler.timesteps.tolist()}")
    extra_step_kwargs = {"eta": eta} if kind == "ddim" else {}
    ev = ModelEvaluator(model, {}, None, max_batch)
    batch = x_T.shape[0]
    sample_idx_all = torch.arange(batch, device=device)

    parallel = min(parallel, steps)
    begin_idx, end_idx = 0, parallel
    buffer = torch.stack([x_T] * (steps + 1))
    noise_array = torch.zeros_like(buffer)
    if not scheduler._is_ode_scheduler:
        for j in range(steps):
            noise_array[j] = (scheduler._get_variance(scheduler.timesteps[j]) ** 0.5) * noise[j]
    inverse_variance_norm = 1.0 / torch.tensor(
        [scheduler._get_variance(scheduler.timesteps[j]) for j in range(steps)] + [0]
    ).to(device)
    latent_dim = noise_array[0, 0].numel()
    inverse_variance_norm = inverse_variance_norm[:, None] / latent_dim
    scaled_tolerance = tolerance**2

    rounds = 0
    residuals: list[list[float]] = []
    while begin_idx < steps:
        parallel_len = end_idx - begin_idx
        block_latents = buffer[begin_idx:end_idx]
        block_t = scheduler.timesteps[begin_idx:end_idx, None].repeat(1, batch)
        latent_model_input = scheduler.scale_model_input(block_latents, block_t)
        model_output = ev(
            latent_model_input.flatten(0, 1), block_t.flatten(0, 1), sample_idx_all.repeat(parallel_len), rounds
        )
        block_latents_denoise = scheduler.batch_step_no_noise(
            model_output=model_output, timesteps=block_t.flatten(0, 1), sample=block_latents.flatten(0, 1),
            **extra_step_kwargs,
        ).reshape(block_latents.shape)
        delta = block_latents_denoise - block_latents
        cumulative_delta = torch.cumsum(delta, dim=0)
        cumulative_noise = torch.cumsum(noise_array[begin_idx:end_idx], dim=0)
        if scheduler._is_ode_scheduler:
            cumulative_noise = 0
        block_latents_new = buffer[begin_idx][None,] + cumulative_delta + cumulative_noise
        old = buffer[begin_idx + 1 : end_idx + 1]
        cur_error = torch.linalg.norm((block_latents_new - old).reshape(parallel_len, batch, -1), dim=-1).pow(2)
        error_ratio = cur_error * inverse_variance_norm[begin_idx + 1 : end_idx + 1]
        # pad so that "everything passed" points one past the window
        error_ratio = torch.nn.functional.pad(error_ratio, (0, 0, 0, 1), value=1e9)
        any_error_at_time = torch.max(error_ratio > scaled_tolerance, dim=1).values.int()
        ind = torch.argmax(any_error_at_time).item()
        new_begin_idx = begin_idx + min(1 + ind, parallel)
        new_end_idx = min(new_begin_idx + parallel, steps)
        residuals.append(_rel_residual(block_latents_new.transpose(0, 1), old.transpose(0, 1)))
        buffer[begin_idx + 1 : end_idx + 1] = block_latents_new
        buffer[end_idx : new_end_idx + 1] = buffer[end_idx][None,]
        rounds += 1
        if on_round is not None:
            on_round(buffer[-1])
        begin_idx, end_idx = new_begin_idx, new_end_idx
    return Outcome(
        x0=buffer[-1], rounds=rounds, model_evals=ev.evaluations, converged=True, residuals=residuals,
        notes=paradigms_known_bugs(dict(scheduler_config), kind, steps, parallel, device),
    )


# ---------------------------------------------------------------------------------- DEQ-DDIM
@dataclass(frozen=True)
class DeqDdimConfig:
    """DEQ-DDIM's hard-coded settings (``fp_implicit_iters_anderson``); ``max_evals`` counts
    evaluations of G including the two Picard start-up ones (its ``max_iter``)."""

    history: int = 5
    ridge: float = 1e-3
    damping: float = 1.0
    max_evals: int = 15
    max_evals_stochastic: int = 50
    tol: float = 1e-3


@torch.no_grad()
def run_deq_ddim(gmap: ChainMap, config: DeqDdimConfig = DeqDdimConfig(), on_round: RoundHook | None = None) -> Outcome:
    """DEQ-DDIM's ``anderson``: rows are (sample, timestep) pairs, each with its own weights."""
    if gmap.schedule.form != "scan":
        raise ValueError("DEQ-DDIM solves the scan form; pass a ChainMap built on schedule.with_form('scan')")
    b, s, d = gmap.shape[0], gmap.steps, gmap.dim
    m, lam, beta = config.history, config.ridge, config.damping
    max_iter = config.max_evals_stochastic if gmap.schedule.is_stochastic else config.max_evals
    rows = b * s
    dev, dt = gmap.anchor.device, gmap.anchor.dtype
    X = torch.zeros(rows, m, d, device=dev, dtype=dt)
    F = torch.zeros(rows, m, d, device=dev, dtype=dt)
    H = torch.zeros(rows, m + 1, m + 1, device=dev, dtype=dt)
    y = torch.zeros(rows, m + 1, 1, device=dev, dtype=dt)

    def g(x_rows: torch.Tensor) -> torch.Tensor:
        return gmap(x_rows.reshape(b, s, d)).reshape(rows, d)

    residuals: list[list[float]] = []

    def record(x_rows: torch.Tensor, g_rows: torch.Tensor) -> None:
        residuals.append(_rel_residual(g_rows.reshape(b, s, d), x_rows.reshape(b, s, d)))
        if on_round is not None:
            on_round(gmap.x0(x_rows))

    X[:, 0] = gmap.initial().reshape(rows, d)
    F[:, 0] = g(X[:, 0])
    record(X[:, 0], F[:, 0])
    X[:, 1] = F[:, 0]
    F[:, 1] = g(X[:, 1])
    record(X[:, 1], F[:, 1])
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    y[:, 0] = 1
    converged = False
    k = 1
    for k in range(2, max_iter):
        n = min(k, m)
        G = F[:, :n] - X[:, :n]
        H[:, 1 : n + 1, 1 : n + 1] = torch.bmm(G, G.transpose(1, 2)) + lam * torch.eye(n, dtype=dt, device=dev)[None]
        alpha = torch.linalg.solve(H[:, : n + 1, : n + 1], y[:, : n + 1])[:, 1 : n + 1, 0]
        X[:, k % m] = beta * (alpha[:, None] @ F[:, :n])[:, 0] + (1 - beta) * (alpha[:, None] @ X[:, :n])[:, 0]
        F[:, k % m] = g(X[:, k % m])
        record(X[:, k % m], F[:, k % m])
        normalized = (F[:, k % m] - X[:, k % m]).norm().item() / (1e-5 + F[:, k % m].norm()).item()
        if normalized < config.tol:
            converged = True
            break
    # DEQ-DDIM returns the mixed iterate X (not G(X)), gathered at the x_0 rows.
    return Outcome(
        x0=gmap.x0(X[:, k % m]), rounds=gmap.calls, model_evals=gmap.ev.evaluations, converged=converged,
        residuals=residuals,
    )


# ---------------------------------------------------------------------------------- torchdeq
@torch.no_grad()
def run_torchdeq(gmap: ChainMap, tol: float, on_round: RoundHook | None = None, **solver_kwargs: Any) -> Outcome:
    """``torchdeq.solver.anderson_solver`` on the whole chain of each sample (batch dim = samples,
    so one mixing vector per sample). ``solver_kwargs`` override torchdeq's defaults."""
    from torchdeq.solver import anderson_solver

    residuals: list[list[float]] = []

    def f(x: torch.Tensor) -> torch.Tensor:
        gx = gmap(x)
        residuals.append(_rel_residual(gx, x.reshape(gx.shape)))
        if on_round is not None:
            on_round(gmap.x0(gx))  # torchdeq returns G(X) values, not the mixed iterates
        return gx

    kwargs = {"stop_mode": "rel", "tol": tol, **solver_kwargs}
    x_star, _, info = anderson_solver(f, gmap.initial(), **kwargs)
    rel = info["rel_lowest"]
    return Outcome(
        x0=gmap.x0(x_star), rounds=gmap.calls, model_evals=gmap.ev.evaluations,
        converged=bool((rel < tol).all()), residuals=residuals,
        notes=[f"lowest relative residual per sample {[float(f'{v:.3g}') for v in rel.tolist()]}"],
    )
