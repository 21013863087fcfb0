"""The Oobleck VAE decoder (Stable Audio Open VAE) as an export-friendly eager module.

Input layout: ``latent [B, 645, 64]`` -- the DiT's own output layout, so the flow loop's result
feeds the decoder directly; the transpose to the VAE's channel-first ``[B, 64, 645]`` (the
reference's ``latents.transpose(2, 1)``) happens inside the graph.
Output: ``wave [B, 2, 645 * 2048 = 1,320,960]`` at 44.1 kHz.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderOobleck
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm
from torch.nn.utils.weight_norm import remove_weight_norm as _remove_old_weight_norm

from .config import ModelConfig


def _weight_norm_hooks(module: nn.Module):
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, WeightNorm)]


class VAEDecoder(nn.Module):
    """Holds the whole ``AutoencoderOobleck`` as ``self.vae`` so the official state dict (encoder
    and decoder keys, ``model.safetensors``) loads strictly; only ``decode`` is used."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vae = AutoencoderOobleck(**cfg.vae.diffusers_kwargs())
        self.vae.use_slicing = False
        self.vae.use_tiling = False     # the reference decodes the 645 frames in one go
        self._weight_norm_removed = False

    def load_official_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Strict load of the official VAE weights (``weight_g``/``weight_v`` keys).

        Works before or after ``remove_weight_norm()``: afterwards the ``weight_g``/``weight_v``
        pairs are folded into plain ``weight`` tensors with the same formula the hook uses.
        """
        if self._weight_norm_removed:
            sd = dict(sd)
            for key in [k for k in sd if k.endswith(".weight_g")]:
                prefix = key[: -len("weight_g")]
                g, v = sd.pop(prefix + "weight_g"), sd.pop(prefix + "weight_v")
                sd[prefix + "weight"] = torch._weight_norm(v, g, 0)
        self.vae.load_state_dict(sd, strict=True)

    def remove_weight_norm(self) -> int:
        """Folds weight norm into plain weights everywhere (old-style hooks, and parametrizations
        should a future diffusers switch); outputs are unchanged. Returns the number removed."""
        n = 0
        for module in self.vae.modules():
            for hook in _weight_norm_hooks(module):
                _remove_old_weight_norm(module, hook.name)
                n += 1
            if parametrize.is_parametrized(module):
                for name in list(module.parametrizations.keys()):
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                    n += 1
        self._weight_norm_removed = True
        return n

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """``latent [B, 645, 64] -> wave [B, 2, 1320960]``."""
        return self.vae.decode(latent.transpose(1, 2)).sample
