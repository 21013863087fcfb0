"""On-disk layouts: the official AudioStory release, and what our converter writes.

Official release (the tiny checkpoint maker writes the same layout, every file the official
inference code opens, with the keys it reads — ``RELEASE_CONFIG_KEYS`` below)::

    <release>/config.yaml                    Hydra config: tokenizer, llm_model (LoRA), agent_model,
                                             seedx_dit_model_cfg, train_dataset.datapipes[0].num_{t5,aud}_out_tokens
    <release>/pytorch_model.bin              one state dict of the whole model (keys below)
    <release>/tokenizer/added_tokens.json    the 612 AudioStory tokens, added in file order
    <release>/Flux_detokenizer/config.json   the DiT config (TangoFlux keys); ``text_encoder_name``
                                             names the Flan-T5 folder (tokenizer and config; the
                                             weights the converter uses are in pytorch_model.bin)
    <release>/Flux_detokenizer/model.safetensors   the Oobleck VAE (weight-normed)
    <release>/Flux_detokenizer/vae_config.json     only for a non-default VAE (tiny)
    <release>/whisper_encoder/              only with audio understanding (not in the official
                                             text-to-audio release; the tiny release has one): a
                                             transformers Whisper encoder (config.json,
                                             model.safetensors, preprocessor_config.json)
    <release>/<base LLM folder>/             Qwen2.5 base: config.json, weights, tokenizer files,
                                             generation_config.json (named in config.yaml)

Paths in ``config.yaml`` and ``Flux_detokenizer/config.json`` are relative to the release folder
(the official code opens them as given: run it from inside the release, ``--model_path $PWD
--tangoflux_model Flux_detokenizer``). The one thing of the tiny release the official code cannot
load as shipped is its VAE: it builds ``AutoencoderOobleck()`` with the default configuration
(encoder width 128, decoder channels 128) and loads strictly, while the tiny VAE has widths 4 and
4, described by ``vae_config.json``.

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

# ---- config.yaml: every key the official loading path reads, and what the converter does with it
# ("use": read; "check": must hold the value the conversion assumes; "ignore": no effect on
# inference, with the reason). Keys not listed inside these sections are refused; so are
# top-level sections not listed in RELEASE_CONFIG_SECTIONS. train_dataset is the training pipeline:
# only datapipes[0]'s N and M are read, the rest is ignored.
RELEASE_CONFIG_SECTIONS = ("tokenizer", "llm_model", "agent_model", "seedx_dit_model_cfg", "train_dataset",
                           "whisper_encoder")
RELEASE_CONFIG_KEYS = {
    "tokenizer._target_": "ignore: the official tokenizer factory; the converter builds the same tokenizer",
    "tokenizer.pretrained_model_path": "use: the base tokenizer and the base LLM's config",
    "tokenizer.add_tokens_path": "use: the AudioStory tokens, added in file order",
    "llm_model._target_": "ignore: the official PEFT factory",
    "llm_model.model._target_": "ignore: transformers' loader of the base model",
    "llm_model.model.pretrained_model_name_or_path": "check: the same base folder as the tokenizer's",
    "llm_model.model_id": "check: absent (a saved PEFT adapter instead of a LoRA config is not supported)",
    "llm_model.vocab_size": "check: the tokenizer's length and the embedding rows",
    "llm_model.peft_config._target_": "ignore: peft.LoraConfig",
    "llm_model.peft_config._convert_": "ignore: Hydra's conversion mode",
    "llm_model.peft_config.r": "use: the LoRA scale alpha / r",
    "llm_model.peft_config.lora_alpha": "use: the LoRA scale alpha / r",
    "llm_model.peft_config.lora_dropout": "ignore: training only",
    "llm_model.peft_config.task_type": "ignore: CAUSAL_LM",
    "llm_model.peft_config.target_modules": "check: the seven projections the merge covers",
    "llm_model.peft_config.modules_to_save": "check: the three norms whose trained copies are used",
    "llm_model.peft_config.bias": "check: 'none' (LoRA biases are not merged)",
    "llm_model.peft_config.fan_in_fan_out": "check: false (the merge is B @ A)",
    "llm_model.peft_config.init_lora_weights": "ignore: initialisation",
    "llm_model.peft_config.inference_mode": "ignore: training flag",
    "agent_model._target_": "ignore: AudioStory_llm.from_pretrained",
    "agent_model.t5_feature_scale": "use: the bridge's output scale",
    "agent_model.model_dims": "check: the LLM's hidden size",
    "agent_model.input_resampler": "ignore: not used at inference",
    "agent_model.output_resampler": "ignore: not used at inference",
    "agent_model.whisper_resampler_llava": "use: the audio encoder's resampler (token_num, widths)",
    "agent_model.audio_feature_scale": "ignore: training only",
    "agent_model.target_audio_type": "ignore: training only",
    "agent_model.lm_loss_scale": "ignore: training only",
    "agent_model.t5_rec_loss_scale": "ignore: training only",
    "agent_model.audio_rec_loss_scale": "ignore: training only",
    "agent_model.add_patch_pos": "check: false (patch positions belong to the image resampler)",
    "agent_model.vit_down": "ignore: image path",
    "agent_model.mse": "ignore: training only",
    "seedx_dit_model_cfg._target_": "ignore: AudioStory_unified (its fusion is fixed: MHA 1024, 8 heads)",
    "seedx_dit_model_cfg.rec_loss_type": "ignore: training only",
    "seedx_dit_model_cfg.model_dims": "ignore: unused by the official class",
    "seedx_dit_model_cfg.lm_loss_scale": "ignore: training only",
    "seedx_dit_model_cfg.dit_loss_scale": "ignore: training only",
    "seedx_dit_model_cfg.rec_loss_scale": "ignore: training only",
    "train_dataset.datapipes[0].num_t5_out_tokens": "use: N, semantic queries per clip",
    "train_dataset.datapipes[0].num_aud_out_tokens": "use: M, residual queries per clip",
    "whisper_encoder.pretrained_model_path": "use: the audio encoder's folder (ours; not in the text-to-audio release)",
}

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
MANIFEST = "manifest.json"   # what wrote a folder (converted checkpoint, export) and from what

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Everything generated. AUDIOSTORY_BUILD moves it: the numpy-2 test run keeps its artefacts apart.
BUILD = Path(os.environ["AUDIOSTORY_BUILD"]).resolve() if os.environ.get("AUDIOSTORY_BUILD") else PROJECT_ROOT / "build"


def release_dir(model: str) -> Path:
    return BUILD / "checkpoints" / model / "release"


def converted_dir(model: str) -> Path:
    return BUILD / "checkpoints" / model / "converted"


def export_dir(model: str) -> Path:
    return BUILD / "export" / model
