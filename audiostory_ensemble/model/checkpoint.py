"""Load the parts of a converted checkpoint (see ``layout.py``) as eager modules."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import layout
from .config import ModelConfig
from .grammar import TokenIds


class CheckpointError(RuntimeError):
    pass


@dataclass
class Converted:
    root: Path

    @cached_property
    def config(self) -> ModelConfig:
        return ModelConfig.load(self.root / layout.MODEL_CONFIG)

    @property
    def llm_dir(self) -> Path:
        return self.root / layout.LLM_DIR

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(self.llm_dir)

    @cached_property
    def token_ids(self) -> TokenIds:
        return TokenIds.from_tokenizer(self.tokenizer, self.config.num_t5_tokens, self.config.num_aud_tokens)

    def _weights(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.root / name))

    def bridge(self):
        from .bridge import Bridge
        cfg = self.config
        module = Bridge(cfg.llm.hidden_size, cfg.bridge_heads, cfg.t5_feature_scale)
        module.load_state_dict(self._weights(layout.BRIDGE_WEIGHTS), strict=True)
        return module.eval()

    def dit(self):
        from .dit import AudioDiT
        module = AudioDiT(self.config)
        module.load_state_dict(self._weights(layout.DIT_WEIGHTS), strict=True)
        return module.eval()

    def uncond_tokens(self) -> torch.Tensor:
        return self._weights(layout.UNCOND_WEIGHTS)["uncond_tokens"]

    def guided_step(self):
        from .dit import GuidedEulerStep
        return GuidedEulerStep(self.dit(), self.uncond_tokens()).eval()

    def vae(self, remove_weight_norm: bool = False):
        from .vae import VAEDecoder
        module = VAEDecoder(self.config)
        module.load_official_state_dict(self._weights(layout.VAE_WEIGHTS))
        if remove_weight_norm:
            module.remove_weight_norm()
        return module.eval()


def load_converted(model_or_path: str | Path) -> Converted:
    """``"tiny"``/``"full"`` (the default build location) or a converted folder."""
    p = Path(model_or_path)
    root = p if (p / layout.MODEL_CONFIG).exists() else layout.converted_dir(str(model_or_path))
    if not (root / layout.MODEL_CONFIG).exists():
        raise CheckpointError(
            f"no converted checkpoint at {root}: run `make convert MODEL={model_or_path}` first")
    return Converted(root)
