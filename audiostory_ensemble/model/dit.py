"""The flow DiT (TangoFlux / AudioStory ``Flux_T5``) as export-friendly eager modules.

* ``DurationEmbedder``: the reference's ``duration_emebdder`` (sic), renamed here.
* ``AudioDiT``: diffusers' ``FluxTransformer2DModel`` plus ``fc`` (pooled projection) and the
  duration embedder. Rotary embeddings and position ids are constants (non-persistent buffers);
  diffusers' own ``forward`` runs unchanged.
* ``GuidedEulerStep``: one classifier-free-guided Euler step, the unit that is exported/served.

State-dict names: ``transformer.*``, ``fc.0.*``, ``duration_embedder.time_positional_embedding.*``
(the reference checkpoint spells the last prefix ``duration_emebdder``).
"""

from __future__ import annotations

import math

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from .config import BRIDGE_DIM, ModelConfig


class FourierFeatures(nn.Module):
    """TangoFlux ``StableAudioPositionalEmbedding``: ``t -> [t, sin(2 pi t w), cos(2 pi t w)]``."""

    def __init__(self, dim: int = 256):
        super().__init__()
        assert dim % 2 == 0
        self.weights = nn.Parameter(torch.randn(dim // 2))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = t[..., None]                                            # [B, 1]
        freqs = t * self.weights[None] * 2 * math.pi                # same op order as the reference
        return torch.cat([t, freqs.sin(), freqs.cos()], dim=-1)     # [B, dim + 1]


class DurationEmbedder(nn.Module):
    """``forward(duration [B]) -> [B, 1, 1024]`` (clamp to [0, max], / max, Fourier, Linear)."""

    def __init__(self, max_duration: float, dim: int = BRIDGE_DIM, internal_dim: int = 256,
                 min_duration: float = 0.0):
        super().__init__()
        self.min_duration = float(min_duration)
        self.max_duration = float(max_duration)
        self.dim = dim
        self.time_positional_embedding = nn.Sequential(
            FourierFeatures(internal_dim), nn.Linear(internal_dim + 1, dim))

    def forward(self, duration: torch.Tensor) -> torch.Tensor:
        x = duration.clamp(self.min_duration, self.max_duration)
        x = (x - self.min_duration) / (self.max_duration - self.min_duration)
        x = x.to(self.time_positional_embedding[1].weight.dtype)
        return self.time_positional_embedding(x).view(-1, 1, self.dim)


class ConstantRotaryEmbedding(nn.Module):
    """Stands in for ``transformer.pos_embed``: returns precomputed (cos, sin), ignoring ``ids``.

    The position ids never change (text: N+1 zeros; audio frame i: (i, i, i)), so the tables are
    computed once with diffusers' own ``FluxPosEmbed`` (float64 on CPU, cast to float32, exactly
    what diffusers returns) and kept as non-persistent buffers. This keeps float64 and the
    per-call trigonometry out of the exported graph.
    """

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        self.register_buffer("cos", cos.to(torch.float32).contiguous(), persistent=False)
        self.register_buffer("sin", sin.to(torch.float32).contiguous(), persistent=False)

    def forward(self, ids: torch.Tensor | None = None):
        return self.cos, self.sin


class AudioDiT(nn.Module):
    """Transformer + ``fc`` + duration embedder, built from a ``ModelConfig``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_text_tokens = cfg.num_t5_tokens          # N
        self.audio_seq_len = cfg.dit.audio_seq_len        # 645
        self.transformer = FluxTransformer2DModel(**cfg.dit.diffusers_kwargs())
        self.fc = nn.Sequential(nn.Linear(BRIDGE_DIM, cfg.dit.joint_attention_dim), nn.ReLU())
        self.duration_embedder = DurationEmbedder(cfg.dit.max_duration, BRIDGE_DIM)

        # Position ids as the reference builds them (its 3-D [bsz, L, 3] ids are reduced to [0] by
        # diffusers, so 2-D is equivalent); text first (N + 1 incl. the duration token), then audio.
        txt_ids = torch.zeros(self.num_text_tokens + 1, 3, dtype=torch.float32)
        img_ids = torch.arange(self.audio_seq_len, dtype=torch.float32)[:, None].repeat(1, 3)
        self.register_buffer("txt_ids", txt_ids, persistent=False)
        self.register_buffer("img_ids", img_ids, persistent=False)

        with torch.no_grad():
            cos, sin = self.transformer.pos_embed(torch.cat([txt_ids, img_ids], dim=0))
        self.transformer.pos_embed = ConstantRotaryEmbedding(cos, sin)

    def condition(self, cond: torch.Tensor, duration: torch.Tensor):
        """``cond [B,N,1024], duration [B] -> (tokens [B,N+1,1024], pooled [B,1024])``.

        pooled is taken over the N conditioning tokens before the duration token is appended.
        The reference uses ``torch.nanmean``; the bridge never produces NaN, so ``mean`` is the
        same value and exports cleanly.
        """
        pooled = self.fc(cond.mean(dim=1))
        tokens = torch.cat([cond, self.duration_embedder(duration).to(cond.dtype)], dim=1)
        return tokens, pooled

    def velocity(self, x: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor,
                 sigma: torch.Tensor) -> torch.Tensor:
        """``x [B,645,64], tokens [B,N+1,1024], pooled [B,1024], sigma [B] -> v [B,645,64]``.

        ``timestep=sigma``: diffusers multiplies by 1000 inside.
        """
        return self.transformer(
            hidden_states=x,
            encoder_hidden_states=tokens,
            pooled_projections=pooled,
            timestep=sigma,
            img_ids=self.img_ids,
            txt_ids=self.txt_ids,
            guidance=None,
            return_dict=False,
        )[0]


class GuidedEulerStep(nn.Module):
    """One CFG + flow-matching Euler step; batch is the only dynamic dimension.

    ``forward(x [B,645,64], cond [B,N,1024], duration [B], sigma [B], sigma_next [B],
    guidance [B]) -> x_next [B,645,64]``

    One transformer call on the doubled batch ``[uncond rows; cond rows]``; both halves carry the
    same duration token (as in the reference). The unconditional states (T5 encoding of "",
    precomputed offline) are the persistent buffer ``uncond_tokens [N,1024]``.

    Guidance: the reference enables CFG only when ``guidance > 1`` and otherwise uses the plain
    conditional velocity; that rule is applied per row with ``torch.where`` (no Python branching).
    """

    def __init__(self, dit: AudioDiT, uncond_tokens: torch.Tensor | None = None):
        super().__init__()
        self.dit = dit
        n = dit.num_text_tokens
        if uncond_tokens is None:
            uncond_tokens = torch.zeros(n, BRIDGE_DIM)
        if tuple(uncond_tokens.shape) != (n, BRIDGE_DIM):
            raise ValueError(f"uncond_tokens must be [{n}, {BRIDGE_DIM}], got {tuple(uncond_tokens.shape)}")
        self.register_buffer("uncond_tokens", uncond_tokens.detach().to(torch.float32).clone())

    def forward(self, x: torch.Tensor, cond: torch.Tensor, duration: torch.Tensor,
                sigma: torch.Tensor, sigma_next: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        dit = self.dit
        tokens_c, pooled_c = dit.condition(cond, duration)
        duration_token = tokens_c[:, -1:, :]                                     # [B,1,1024]
        uncond = self.uncond_tokens.to(cond.dtype)
        uncond = uncond[None].expand(cond.shape[0], -1, -1)                     # [B,N,1024]
        tokens_u = torch.cat([uncond, duration_token], dim=1)
        pooled_u = dit.fc(uncond.mean(dim=1))

        v = dit.velocity(
            torch.cat([x, x], dim=0),
            torch.cat([tokens_u, tokens_c], dim=0),
            torch.cat([pooled_u, pooled_c], dim=0),
            torch.cat([sigma, sigma], dim=0),
        )
        b = x.shape[0]
        v_u, v_c = v[:b], v[b:]     # slicing, not chunk(): chunk() makes torch.export pin the batch
        g = guidance[:, None, None].to(v.dtype)
        v = torch.where(g > 1, v_u + g * (v_c - v_u), v_c)
        return x + (sigma_next - sigma)[:, None, None].to(x.dtype) * v
