"""On-disk layouts: the official AudioStory release, and what our converter writes.

Official release (the tiny checkpoint maker writes the same layout)::

    <release>/config.yaml                    Hydra config: tokenizer, llm_model (LoRA), agent_model,
                                             train_dataset.datapipes[0].num_{t5,aud}_out_tokens
    <release>/pytorch_model.bin              one state dict of the whole model (keys below)
    <release>/tokenizer/added_tokens.json    the 612 AudioStory tokens, added in file order
    <release>/Flux_detokenizer/config.json   the DiT config (TangoFlux keys)
    <release>/Flux_detokenizer/model.safetensors   the Oobleck VAE (weight-normed)
    <release>/Flux_detokenizer/vae_config.json     only for a non-default VAE (tiny)
    <release>/whisper_encoder/              only with audio understanding (not in the official
                                             text-to-audio release; the tiny release has one): a
                                             transformers Whisper encoder (config.json,
                                             model.safetensors, preprocessor_config.json)
    <release>/<base LLM folder>/             Qwen2.5 base: config.json, tokenizer files,
                                             generation_config.json (named in config.yaml)

Converted (``export/convert_checkpoint.py`` writes, every later stage reads)::

    <converted>/model_config.json            our ModelConfig (sizes, N, M, feature scale)
    <converted>/llm/                         HF Qwen2 folder for vLLM and transformers: LoRA merged,
                                             trained norms, resized vocab, tokenizer, generation config
    <converted>/bridge.safetensors           Bridge state dict (projector, audio_projector, fusion)
    <converted>/dit.safetensors              AudioDiT state dict (transformer, fc, duration_embedder)
    <converted>/uncond_tokens.safetensors    {"uncond_tokens": [N, 1024]}: T5("") padded to N
    <converted>/vae.safetensors              AutoencoderOobleck state dict (weight norm kept)
    <converted>/vae_config.json              AutoencoderOobleck config
    <converted>/audio_encoder/               the Whisper encoder folder (only with audio understanding)
    <converted>/audio_resampler.safetensors  Linear . GELU . Linear after the time pooling (idem)
    <converted>/manifest.json                source hashes and the versions that wrote it
"""

from __future__ import annotations

import os
from pathlib import Path

# ---- official state-dict prefixes (pytorch_model.bin) --------------------------------------
LLM_PREFIX = "seedx.llm.base_model.model."          # + "model.layers.{i}..." / "lm_head.weight"
PROJECTOR_PREFIX = "seedx.projector."               # Linear(H,1024) . GELU . Linear(1024,1024)
AUDIO_PROJECTOR_PREFIX = "seedx.audio_projector."
FUSION_PREFIX = "multihead_attention."              # nn.MultiheadAttention(1024, 8)
DIT_PREFIX = "tangoflux.transformer."               # diffusers FluxTransformer2DModel
FC_PREFIX = "tangoflux.fc."                         # Sequential(Linear(1024,1024), ReLU)
DURATION_PREFIX = "tangoflux.duration_emebdder."    # (sic) time_positional_embedding.{0.weights,1.*}
T5_PREFIX = "tangoflux.text_encoder."               # transformers T5EncoderModel
AUDIO_RESAMPLER_PREFIX = "seedx.whisper_resampler_llava."   # avg pool (no weights) . aud_projector.{0,2}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SAVED_NORMS = ("input_layernorm", "post_attention_layernorm", "norm")

# ---- official files --------------------------------------------------------------------------
RELEASE_CONFIG = "config.yaml"
RELEASE_WEIGHTS = "pytorch_model.bin"
RELEASE_ADDED_TOKENS = "tokenizer/added_tokens.json"
RELEASE_DIT_CONFIG = "Flux_detokenizer/config.json"
RELEASE_VAE_WEIGHTS = "Flux_detokenizer/model.safetensors"
RELEASE_VAE_CONFIG = "Flux_detokenizer/vae_config.json"
RELEASE_WHISPER_DIR = "whisper_encoder"

# ---- converted files -------------------------------------------------------------------------
MODEL_CONFIG = "model_config.json"
LLM_DIR = "llm"
BRIDGE_WEIGHTS = "bridge.safetensors"
DIT_WEIGHTS = "dit.safetensors"
UNCOND_WEIGHTS = "uncond_tokens.safetensors"
VAE_WEIGHTS = "vae.safetensors"
VAE_CONFIG = "vae_config.json"
AUDIO_ENCODER_DIR = "audio_encoder"
AUDIO_RESAMPLER_WEIGHTS = "audio_resampler.safetensors"
MANIFEST = "manifest.json"

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Everything generated. AUDIOSTORY_BUILD moves it: the numpy-2 test run keeps its artefacts apart.
BUILD = Path(os.environ["AUDIOSTORY_BUILD"]).resolve() if os.environ.get("AUDIOSTORY_BUILD") else PROJECT_ROOT / "build"


def release_dir(model: str) -> Path:
    return BUILD / "checkpoints" / model / "release"


def converted_dir(model: str) -> Path:
    return BUILD / "checkpoints" / model / "converted"


def export_dir(model: str) -> Path:
    return BUILD / "export" / model
