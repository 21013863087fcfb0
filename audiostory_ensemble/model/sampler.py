"""Flow-matching schedule, initial noise and the plain loop over ``GuidedEulerStep``.

The served loop is :mod:`audiostory_ensemble.serving.scheduler` (every clip in flight stepped in one
engine call, each at its own sigma); :func:`sample_latent` is the same update for one batch in
lockstep, the yardstick the scheduler and the exported step graph are checked against. The
reference pipeline keeps its own loop on diffusers' scheduler, as the official code runs it.

Reproduces TangoFlux/AudioStory ``inference_flow*``: ``FlowMatchEulerDiscreteScheduler`` (shift 1,
1000 train steps) with ``sigmas = linspace(1, 1/n, n)``, Euler updates, CFG on ``[uncond; cond]``.

Timestep note: the reference passes ``t / 1000`` with ``t = sigma * 1000`` (float32) as the
timestep while the Euler update uses ``sigma``; we pass ``sigma`` for both. For the default 50
steps these are bit-identical; for some other step counts a few steps differ by 1 ulp.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import DEFAULT_NUM_STEPS, DEFAULT_SEED, LATENT_CHANNELS, LATENT_FRAMES, MAX_SEED


def flow_sigmas(num_steps: int = DEFAULT_NUM_STEPS) -> torch.Tensor:
    """``[num_steps + 1]`` float32: ``linspace(1, 1/n, n)`` (as float32, shift 1) then a final 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    return torch.cat([torch.from_numpy(s), torch.zeros(1, dtype=torch.float32)])


def initial_noise(seed: int = DEFAULT_SEED) -> torch.Tensor:
    """``[1, 645, 64]`` float32 standard normal from a private CPU generator.

    Equals ``torch.manual_seed(seed); torch.randn(1, 645, 64)`` without touching the global RNG.
    The reference re-seeds (seed 0) before every clip, so every clip starts from this tensor.
    """
    seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63-1], got {seed}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(1, LATENT_FRAMES, LATENT_CHANNELS, generator=gen, dtype=torch.float32)


def _per_row(value, batch: int, device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)
    return t.expand(batch).contiguous() if t.numel() == 1 else t


@torch.no_grad()
def sample_latent(step, cond: torch.Tensor, duration, guidance, num_steps: int = DEFAULT_NUM_STEPS,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """Runs the full flow loop: ``cond [B,N,1024]`` -> latent ``[B,645,64]``.

    ``duration``/``guidance``: scalars or ``[B]``. ``noise``: ``[1 or B, 645, 64]``; default is
    ``initial_noise(0)`` for every row (the reference's per-clip re-seeding).
    """
    batch, device = cond.shape[0], cond.device
    if noise is None:
        noise = initial_noise(DEFAULT_SEED)
    x = noise.to(device=device, dtype=torch.float32).expand(batch, -1, -1).contiguous()
    duration = _per_row(duration, batch, device)
    guidance = _per_row(guidance, batch, device)
    sigmas = flow_sigmas(num_steps).to(device)
    for i in range(num_steps):
        x = step(x, cond, duration, sigmas[i].expand(batch), sigmas[i + 1].expand(batch), guidance)
    return x
