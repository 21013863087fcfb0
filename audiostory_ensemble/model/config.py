"""One schema for the model's sizes, names and shapes: the ``full`` and ``tiny`` configurations.

Everything later stages need (tensor shapes, sample rates, defaults, token counts) is read from
here. ``tiny`` shrinks widths and depths only: the latent stays 645 x 64, the VAE hop stays 2048
at 44.1 kHz stereo and the output is 32 kHz, so every stage moves real-sized tensors.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

# Sizes the official code fixes whatever the model size.
BRIDGE_DIM = 1024            # projector output, MHA fusion width, T5 width, joint attention dim
LATENT_CHANNELS = 64
LATENT_FRAMES = 645          # audio_seq_len: 645 * 2048 / 44100 = 29.95 s
VAE_HOP = 2048
VAE_SAMPLE_RATE = 44100
AUDIO_CHANNELS = 2
WAVE_SAMPLES = LATENT_FRAMES * VAE_HOP  # 1,320,960
OUTPUT_SAMPLE_RATE = 32000
ROPE_AXES = (16, 56, 56)
ATTENTION_HEAD_DIM = 128
MAX_DURATION_S = 30.0        # DurationEmbedder max_value; also the DiT window

# Request defaults (the reference's command-line defaults).
DEFAULT_TOTAL_DURATION_S = 50.0
DEFAULT_GUIDANCE = 4.0
DEFAULT_SEED = 0
MAX_SEED = 2**63 - 1          # seeds are int64, non-negative
DEFAULT_NUM_STEPS = 50
CROSSFADE_S = 3.0
MAX_NEW_TOKENS = 1600
# The plan's sampling (not in the official code, which is greedy): temperature 0 is greedy.
DEFAULT_PLAN_TEMPERATURE = 0.0
MAX_PLAN_TEMPERATURE = 2.0
DEFAULT_PLAN_TOP_P = 1.0
# How clip durations are set: as the LLM wrote them (the reference), or scaled to the request.
DURATION_POLICIES = ("model", "exact")
DEFAULT_DURATION_POLICY = "model"

# Audio continuation: the input is heard by a Whisper encoder (16 kHz mono log-mel, 100 frames/s,
# at most one 30 s window) and pooled to ``audio_tokens`` rows spliced into the LLM's prompt.
AUDIO_INPUT_SAMPLE_RATE = 16000
MAX_INPUT_AUDIO_S = 30.0
MIN_INPUT_AUDIO_S = 0.1


@dataclass(frozen=True)
class LLMConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    lora_r: int = 32
    lora_alpha: int = 32


@dataclass(frozen=True)
class DiTConfig:
    num_layers: int                 # double-stream (joint) blocks
    num_single_layers: int
    num_attention_heads: int
    attention_head_dim: int = ATTENTION_HEAD_DIM
    in_channels: int = LATENT_CHANNELS
    joint_attention_dim: int = BRIDGE_DIM
    pooled_projection_dim: int = BRIDGE_DIM
    audio_seq_len: int = LATENT_FRAMES
    max_duration: float = MAX_DURATION_S

    def diffusers_kwargs(self) -> dict:
        """Arguments for ``diffusers.FluxTransformer2DModel``."""
        return dict(
            patch_size=1,
            in_channels=self.in_channels,
            num_layers=self.num_layers,
            num_single_layers=self.num_single_layers,
            attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads,
            joint_attention_dim=self.joint_attention_dim,
            pooled_projection_dim=self.pooled_projection_dim,
            guidance_embeds=False,
            axes_dims_rope=ROPE_AXES,
        )


@dataclass(frozen=True)
class VAEConfig:
    """``diffusers.AutoencoderOobleck`` arguments; the default is the Stable Audio Open VAE."""
    encoder_hidden_size: int = 128
    downsampling_ratios: tuple = (2, 4, 4, 8, 8)
    channel_multiples: tuple = (1, 2, 4, 8, 16)
    decoder_channels: int = 128
    decoder_input_channels: int = LATENT_CHANNELS
    audio_channels: int = AUDIO_CHANNELS
    sampling_rate: int = VAE_SAMPLE_RATE

    def diffusers_kwargs(self) -> dict:
        d = dataclasses.asdict(self)
        d["downsampling_ratios"] = list(self.downsampling_ratios)
        d["channel_multiples"] = list(self.channel_multiples)
        return d


@dataclass(frozen=True)
class T5EncoderSize:
    """The Flan-T5 encoder whose encoding of "" is the unconditional branch (run once, offline)."""
    d_model: int = BRIDGE_DIM
    num_layers: int = 24
    num_heads: int = 16
    d_kv: int = 64
    d_ff: int = 2816
    vocab_size: int = 32128
    feed_forward_proj: str = "gated-gelu"
    pad_token_id: int = 0
    eos_token_id: int = 1


@dataclass(frozen=True)
class ModelConfig:
    name: str
    llm: LLMConfig
    dit: DiTConfig
    vae: VAEConfig
    t5: T5EncoderSize
    num_t5_tokens: int = 64          # N semantic bridging queries per clip
    num_aud_tokens: int = 8          # M residual bridging queries per clip
    t5_feature_scale: float = 10.0
    bridge_heads: int = 8
    audio_tokens: int = 0            # resampler rows per input audio; 0 = no audio encoder (text only)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        vae = dict(d["vae"])
        vae["downsampling_ratios"] = tuple(vae["downsampling_ratios"])
        vae["channel_multiples"] = tuple(vae["channel_multiples"])
        return cls(
            name=d["name"],
            llm=LLMConfig(**d["llm"]),
            dit=DiTConfig(**d["dit"]),
            vae=VAEConfig(**vae),
            t5=T5EncoderSize(**d["t5"]),
            **{k: d[k] for k in ("num_t5_tokens", "num_aud_tokens", "t5_feature_scale", "bridge_heads")},
            audio_tokens=int(d.get("audio_tokens", 0)),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


FULL = ModelConfig(
    name="full",
    llm=LLMConfig(hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2, intermediate_size=11008),
    dit=DiTConfig(num_layers=6, num_single_layers=18, num_attention_heads=8),
    vae=VAEConfig(),
    t5=T5EncoderSize(),
)

TINY = ModelConfig(
    name="tiny",
    llm=LLMConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=512,
                  rope_theta=10_000.0, max_position_embeddings=2048, lora_r=4, lora_alpha=8),
    dit=DiTConfig(num_layers=1, num_single_layers=2, num_attention_heads=1),
    vae=VAEConfig(encoder_hidden_size=4, decoder_channels=4),
    t5=T5EncoderSize(num_layers=1, num_heads=2, d_kv=32, d_ff=256, vocab_size=128),
    num_t5_tokens=8,
    num_aud_tokens=4,
    bridge_heads=8,
    audio_tokens=8,
)

CONFIGS = {"full": FULL, "tiny": TINY}


def get_config(name: str) -> ModelConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(CONFIGS)}") from None
