"""The bridge: LLM hidden states of one clip's bridging queries -> the DiT's conditioning tokens.

Follows the reference *inference* path (AudioStory ``generate_T5_audtoken_attn_multi_audio`` and
``inference.py``): the two projector outputs are not scaled; the semantic tokens attend (query)
to the residual tokens (key = value) in a sequence-first ``nn.MultiheadAttention`` without masks,
and only the residual sum is divided by ``t5_feature_scale`` once. (Training divides twice; that
path is deliberately not reproduced.)
"""

from __future__ import annotations

import torch
from torch import nn

from .config import BRIDGE_DIM


def _mlp2x_gelu(in_dim: int, out_dim: int = BRIDGE_DIM) -> nn.Sequential:
    # State-dict keys: ``0.weight``, ``0.bias``, ``2.weight``, ``2.bias`` (index 1 is the GELU).
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class Bridge(nn.Module):
    """``forward(sem [K,N,H], res [K,M,H]) -> cond [K,N,1024]``.

    Submodule names match the reference checkpoint: ``projector``, ``audio_projector`` and
    ``fusion`` (the reference's ``multihead_attention``: embed 1024, ``heads`` heads, bias,
    sequence-first, no dropout).
    """

    def __init__(self, llm_hidden: int, heads: int, feature_scale: float):
        super().__init__()
        self.projector = _mlp2x_gelu(llm_hidden)
        self.audio_projector = _mlp2x_gelu(llm_hidden)
        self.fusion = nn.MultiheadAttention(BRIDGE_DIM, num_heads=heads)  # batch_first=False
        self.feature_scale = float(feature_scale)

    def forward(self, sem: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        t5 = self.projector(sem)                       # [K, N, 1024]
        aud = self.audio_projector(res)                # [K, M, 1024]
        q = t5.transpose(0, 1)                         # [N, K, 1024]
        kv = aud.transpose(0, 1)                       # [M, K, 1024]
        attn = self.fusion(q, kv, kv, need_weights=False)[0].transpose(0, 1)
        return (t5 + attn) / self.feature_scale
