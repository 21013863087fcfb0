"""Write a TINY AudioStory release: the official on-disk layout and key names, synthetic weights.

    python export/make_tiny_checkpoint.py [--out DIR] [--force] [--steps N] [--seed S]

What it does (deterministically: fixed seeds, 2 torch threads):

1. trains a byte-level BPE (Qwen2 pre-tokenizer) on the synthetic story world of
   ``audiostory_ensemble/tiny_story.py`` and appends Qwen2.5's 22 special tokens: the *base*
   tokenizer, saved with a Qwen2-style ``config.json`` / ``generation_config.json`` as the base
   LLM folder ``Qwen2.5-tiny/`` (no weights there: the release's ``pytorch_model.bin`` carries
   every LLM weight, as the official release relies on for its LoRA / resized vocabulary);
2. adds the 612 AudioStory tokens in file order (``tokenizer/added_tokens.json``) and trains a
   TINY ``Qwen2ForCausalLM`` on instruction -> plan transcripts, loss on the assistant part only;
3. writes ``pytorch_model.bin`` with the official key names: the trained LLM split into a
   LoRA-wrapped form (``base + (alpha/r) B @ A == trained``; the trained norms in
   ``modules_to_save.default``, ones in ``original_module``), seeded random bridge, DiT,
   duration embedder and T5 encoder; the Oobleck VAE in ``Flux_detokenizer/``;
4. reloads the LLM from the written files (merging the LoRA as a converter must) and checks
   that greedy decoding of held-out requests gives well-formed plans whose durations sum to the
   requested total; the release is installed only if that passes.

The output is cached by a content hash of this script, ``tiny_story.py``, ``grammar.py``, the
TINY sizes, the arguments and the library versions (``<out>/.content-hash``).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from audiostory_ensemble import grammar, layout, tiny_story  # noqa: E402  (light imports only)
from audiostory_ensemble.config import TINY  # noqa: E402

BASE_DIR_NAME = "Qwen2.5-tiny"
BPE_VOCAB = 800                # byte alphabet (256) + merges; the 22 specials come after
DEFAULT_STEPS = 600
DEFAULT_SEED = 0
BATCH = 32
LR = 3e-3
WARMUP = 30
THREADS = 2
LORA_INIT_STD = 0.02
NUM_HELD_OUT = 24
HELD_OUT_SEED = 20240917       # fixed: the held-out requests do not move with --seed
MAX_NEW_TOKENS = 400
REPETITION_PENALTY = 1.05      # Qwen2.5-Instruct generation_config (applied even when greedy)
LIBRARIES = ("torch", "transformers", "tokenizers", "diffusers", "safetensors", "numpy")


# ---------------------------------------------------------------------------------------------
# Cache key (no heavy imports: "up to date" must answer in well under 2 s)
# ---------------------------------------------------------------------------------------------

def content_hash(steps: int, seed: int) -> str:
    h = hashlib.sha256()
    for path in (Path(__file__).resolve(), ROOT / "audiostory_ensemble" / "tiny_story.py",
                 ROOT / "audiostory_ensemble" / "grammar.py"):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(json.dumps(TINY.to_dict(), sort_keys=True).encode())
    h.update(json.dumps({"steps": steps, "seed": seed}, sort_keys=True).encode())
    for lib in LIBRARIES:
        try:
            h.update(f"{lib}={metadata.version(lib)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{lib}=none".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

def _bpe_corpus(seed: int, count: int = 4000) -> list[str]:
    """Plain text of prompts and plans (added/special tokens removed) for BPE training."""
    import random
    import re

    rng = random.Random(f"bpe-{seed}")
    specials = grammar.QWEN_SPECIAL_TOKENS + grammar.added_tokens()
    splitter = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
    texts = []
    for _ in range(count):
        caption, total, clips = tiny_story.make_story(rng)
        prompt, completion = tiny_story.transcript(caption, total, clips, rng.randrange(1 << 30), 1, 1)
        texts.extend(p for p in splitter.split(prompt + completion) if p)
    return texts


def train_base_tokenizer(seed: int):
    """Byte-level BPE with Qwen2's normaliser / pre-tokeniser / decoder, then the 22 specials."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # No special tokens in the trainer: they would take ids 0.. and count towards vocab_size.
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_bpe_corpus(seed), trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    vocab = bpe["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    assert len(vocab) <= BPE_VOCAB and sorted(vocab.values()) == list(range(len(vocab)))

    # The 22 specials right after the BPE vocabulary, in Qwen's order.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in grammar.QWEN_SPECIAL_TOKENS])
    for i, t in enumerate(grammar.QWEN_SPECIAL_TOKENS):
        if tok.token_to_id(t) != len(vocab) + i:
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {len(vocab) + i}")
    return tok, vocab, merges


def save_base_folder(tok, vocab: dict, merges: list, folder: Path) -> int:
    """Tokenizer files, ``config.json`` and ``generation_config.json`` of the base LLM."""
    folder.mkdir(parents=True, exist_ok=True)
    bpe_size = len(vocab)
    base_vocab = bpe_size + len(grammar.QWEN_SPECIAL_TOKENS)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=False) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tcfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(bpe_size + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                "single_word": False, "special": True}
            for i, t in enumerate(grammar.QWEN_SPECIAL_TOKENS)
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                                      "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
                                      "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                                      "<|video_pad|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": TINY.llm.max_position_embeddings,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
    ids = {t: bpe_size + i for i, t in enumerate(grammar.QWEN_SPECIAL_TOKENS)}
    llm = TINY.llm
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "hidden_act": "silu",
        "hidden_size": llm.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": llm.intermediate_size,
        "max_position_embeddings": llm.max_position_embeddings,
        "max_window_layers": llm.num_layers,
        "num_attention_heads": llm.num_heads,
        "num_hidden_layers": llm.num_layers,
        "num_key_value_heads": llm.num_kv_heads,
        "rms_norm_eps": llm.rms_norm_eps,
        "rope_theta": llm.rope_theta,
        "rope_scaling": None,
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": base_vocab,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen = {
        "bos_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "repetition_penalty": REPETITION_PENALTY,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
    }
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    return base_vocab


def load_full_tokenizer(base_folder: Path, added_tokens_path: Path):
    """What the official ``init_tokenizer`` does: the base tokenizer + ``add_tokens`` in file order."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_folder))
    tok.add_tokens(list(json.loads(added_tokens_path.read_text()).keys()))
    return tok


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def held_out_requests() -> list[tuple[str, float, int]]:
    """(caption, total, lead seed) for the verification tally; never trained on."""
    import random

    rng = random.Random(HELD_OUT_SEED)
    seen = tiny_story.held_out_event_sequences()
    out = []
    while len(out) < NUM_HELD_OUT:
        caption, total, _ = tiny_story.make_story(rng)
        ev = tiny_story.events_of(caption)
        if ev in seen:
            continue
        seen.add(ev)
        out.append((caption, total, rng.randrange(1000)))
    return out


def excluded_event_sequences() -> set[tuple[str, ...]]:
    return tiny_story.held_out_event_sequences() | {tiny_story.events_of(c) for c, _, _ in held_out_requests()}


def make_batches(tok, steps: int, seed: int, n: int, m: int, excluded):
    """Yields (input_ids, attention_mask, labels) tensors, ``steps`` batches of ``BATCH``."""
    import random

    import torch

    rng = random.Random(f"train-{seed}")
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    for _ in range(steps):
        prompts, completions = [], []
        while len(prompts) < BATCH:
            caption, total, clips = tiny_story.make_story(rng)
            if tiny_story.events_of(caption) in excluded:
                continue
            p, c = tiny_story.transcript(caption, total, clips, rng.randrange(1 << 30), n, m)
            prompts.append(p)
            completions.append(c)
        p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        c_ids = tok(completions, add_special_tokens=False)["input_ids"]
        length = max(len(a) + len(b) for a, b in zip(p_ids, c_ids))
        ids = torch.full((BATCH, length), pad, dtype=torch.long)
        mask = torch.zeros((BATCH, length), dtype=torch.long)
        labels = torch.full((BATCH, length), -100, dtype=torch.long)
        for i, (a, b) in enumerate(zip(p_ids, c_ids)):
            ids[i, :len(a) + len(b)] = torch.tensor(a + b)
            mask[i, :len(a) + len(b)] = 1
            labels[i, len(a):len(a) + len(b)] = torch.tensor(b)   # assistant part only
        yield ids, mask, labels


def qwen2_config(vocab_size: int, tok):
    from transformers import Qwen2Config

    llm = TINY.llm
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=llm.hidden_size, num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
        intermediate_size=llm.intermediate_size, rope_theta=llm.rope_theta, rms_norm_eps=llm.rms_norm_eps,
        max_position_embeddings=llm.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )


def train_llm(tok, vocab_size: int, steps: int, seed: int, log=print):
    import math

    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(vocab_size, tok)).float()
    model.train()
    decay = [p for n_, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n_, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.98), eps=1e-8)

    def lr_at(step: int) -> float:
        if step < WARMUP:
            return LR * (step + 1) / WARMUP
        frac = (step - WARMUP) / max(1, steps - WARMUP)
        return LR * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    excluded = excluded_event_sequences()
    t0 = time.time()
    for step, (ids, mask, labels) in enumerate(make_batches(tok, steps, seed, TINY.num_t5_tokens,
                                                            TINY.num_aud_tokens, excluded)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss   # mean over assistant tokens
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  step {step:4d}/{steps}  loss {loss.item():.4f}  ({time.time() - t0:.0f} s)")
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# The release state dict
# ---------------------------------------------------------------------------------------------

def llm_release_tensors(trained: dict, seed: int) -> dict:
    """The trained Qwen2 state dict -> PEFT-wrapped keys (LoRA split, modules_to_save norms)."""
    import torch

    llm = TINY.llm
    scale = llm.lora_alpha / llm.lora_r
    gen = torch.Generator().manual_seed(seed + 7)
    out = {}
    p = layout.LLM_PREFIX
    out[p + "model.embed_tokens.weight"] = trained["model.embed_tokens.weight"].clone()
    for i in range(llm.num_layers):
        lp = f"model.layers.{i}."
        for proj in layout.LORA_TARGETS:
            sub = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"{lp}{sub}.{proj}"
            w = trained[key + ".weight"].double()
            a = torch.randn(llm.lora_r, w.shape[1], generator=gen, dtype=torch.float64) * LORA_INIT_STD
            b = torch.randn(w.shape[0], llm.lora_r, generator=gen, dtype=torch.float64) * LORA_INIT_STD
            a, b = a.float(), b.float()
            out[p + key + ".weight"] = (w - scale * (b.double() @ a.double())).float()
            if key + ".bias" in trained:
                out[p + key + ".bias"] = trained[key + ".bias"].clone()
            out[p + key + ".lora_A.default.weight"] = a
            out[p + key + ".lora_B.default.weight"] = b
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w = trained[f"{lp}{norm}.weight"]
            out[f"{p}{lp}{norm}.original_module.weight"] = torch.ones_like(w)
            out[f"{p}{lp}{norm}.modules_to_save.default.weight"] = w.clone()
    out[p + "model.norm.original_module.weight"] = torch.ones_like(trained["model.norm.weight"])
    out[p + "model.norm.modules_to_save.default.weight"] = trained["model.norm.weight"].clone()
    out[p + "lm_head.weight"] = trained["model.embed_tokens.weight"].clone()   # tied
    return out


def merged_llm_state(release: dict) -> dict:
    """Inverse of :func:`llm_release_tensors` (what a converter does): a plain Qwen2 state dict."""
    llm = TINY.llm
    scale = llm.lora_alpha / llm.lora_r
    p = layout.LLM_PREFIX
    out = {}
    for key, t in release.items():
        if not key.startswith(p):
            continue
        k = key[len(p):]
        if ".lora_A." in k or ".lora_B." in k or ".original_module." in k:
            continue
        if ".modules_to_save.default." in k:
            out[k.replace(".modules_to_save.default.", ".")] = t
        elif any(f".{proj}.weight" in k for proj in layout.LORA_TARGETS):
            stem = k[: -len(".weight")]
            a = release[p + stem + ".lora_A.default.weight"]
            b = release[p + stem + ".lora_B.default.weight"]
            out[k] = t + scale * (b @ a)
        else:
            out[k] = t
    return out


def other_release_tensors(seed: int) -> dict:
    """Seeded random bridge, DiT, fc, duration embedder and T5 encoder, with official keys."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    out = {}

    def add(prefix: str, module) -> None:
        for k, v in module.state_dict().items():
            out[prefix + k] = v.detach().clone().contiguous().float()

    h, d = TINY.llm.hidden_size, 1024
    torch.manual_seed(seed + 11)
    add(layout.PROJECTOR_PREFIX, torch.nn.Sequential(torch.nn.Linear(h, d), torch.nn.GELU(), torch.nn.Linear(d, d)))
    torch.manual_seed(seed + 12)
    add(layout.AUDIO_PROJECTOR_PREFIX,
        torch.nn.Sequential(torch.nn.Linear(h, d), torch.nn.GELU(), torch.nn.Linear(d, d)))
    torch.manual_seed(seed + 13)
    add(layout.FUSION_PREFIX, torch.nn.MultiheadAttention(d, TINY.bridge_heads))
    torch.manual_seed(seed + 14)
    add(layout.DIT_PREFIX, FluxTransformer2DModel(**TINY.dit.diffusers_kwargs()))
    torch.manual_seed(seed + 15)
    add(layout.FC_PREFIX, torch.nn.Sequential(torch.nn.Linear(d, TINY.dit.joint_attention_dim), torch.nn.ReLU()))
    torch.manual_seed(seed + 16)
    out[layout.DURATION_PREFIX + "time_positional_embedding.0.weights"] = torch.randn(128)
    lin = torch.nn.Linear(257, d)
    out[layout.DURATION_PREFIX + "time_positional_embedding.1.weight"] = lin.weight.detach().clone()
    out[layout.DURATION_PREFIX + "time_positional_embedding.1.bias"] = lin.bias.detach().clone()
    torch.manual_seed(seed + 17)
    add(layout.T5_PREFIX, T5EncoderModel(t5_config()))
    return out


# The audio-understanding path (continuation): a tiny Whisper encoder and the resampler. The
# official text-to-audio release has neither; this layout (a transformers Whisper folder beside
# the LLM, resampler keys in pytorch_model.bin) is ours and documented in layout.py.
TINY_WHISPER = dict(d_model=64, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=128,
                    decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=128,
                    num_mel_bins=80, max_source_positions=1500, vocab_size=64,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)


def write_whisper_encoder(folder: Path, seed: int) -> dict:
    """A seeded random tiny Whisper encoder folder; returns the resampler's release tensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    folder.mkdir(parents=True)
    cfg = WhisperConfig(**TINY_WHISPER)
    cfg.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=cfg.num_mel_bins).save_pretrained(folder)
    torch.manual_seed(seed + 31)
    enc = WhisperEncoder(cfg)
    save_file({k: v.detach().clone().contiguous().float() for k, v in enc.state_dict().items()},
              str(folder / "model.safetensors"))
    torch.manual_seed(seed + 32)
    d, h = cfg.d_model, TINY.llm.hidden_size
    proj = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.GELU(), torch.nn.Linear(h, h))
    return {layout.AUDIO_RESAMPLER_PREFIX + "aud_projector." + k: v.detach().clone().contiguous().float()
            for k, v in proj.state_dict().items()}


def t5_config():
    from transformers import T5Config

    t = TINY.t5
    return T5Config(vocab_size=t.vocab_size, d_model=t.d_model, d_kv=t.d_kv, d_ff=t.d_ff, num_layers=t.num_layers,
                    num_heads=t.num_heads, feed_forward_proj=t.feed_forward_proj, pad_token_id=t.pad_token_id,
                    eos_token_id=t.eos_token_id, decoder_start_token_id=t.pad_token_id, dropout_rate=0.0)


def vae_state(seed: int) -> dict:
    import torch
    from diffusers import AutoencoderOobleck

    torch.manual_seed(seed + 21)
    vae = AutoencoderOobleck(**TINY.vae.diffusers_kwargs())
    return {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}


def state_digest(sd: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].contiguous()
        h.update(k.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# config.yaml and Flux_detokenizer/
# ---------------------------------------------------------------------------------------------

def release_config_yaml(vocab_size: int) -> str:
    import yaml

    cfg = {
        "tokenizer": {
            "_target_": "src.models.tokenizer.init_qwen_tokenizer.init_tokenizer",
            "pretrained_model_path": BASE_DIR_NAME,
            "add_tokens_path": layout.RELEASE_ADDED_TOKENS,
        },
        "llm_model": {
            "_target_": "src.models.mllm.peft_models.get_peft_model_with_resize_embedding",
            "model": {
                "_target_": "transformers.AutoModelForCausalLM.from_pretrained",
                "pretrained_model_name_or_path": BASE_DIR_NAME,
            },
            "peft_config": {
                "_target_": "peft.LoraConfig",
                "_convert_": "object",
                "r": TINY.llm.lora_r,
                "lora_alpha": TINY.llm.lora_alpha,
                "lora_dropout": 0.05,
                "target_modules": ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
                "modules_to_save": ["input_layernorm", "post_attention_layernorm", "norm"],
                "task_type": "CAUSAL_LM",
            },
            "vocab_size": vocab_size,
        },
        "agent_model": {
            "_target_": "src.models.mllm.modeling_audiostory_llm.AudioStory_llm.from_pretrained",
            "t5_feature_scale": float(TINY.t5_feature_scale),
            "model_dims": TINY.llm.hidden_size,
            "whisper_resampler_llava": {
                "_target_": "src.models.tokenizer.modeling_whisper.Whisper_Resampler_llava",
                "token_num": TINY.audio_tokens,
                "ori_embed_dim": TINY_WHISPER["d_model"],
                "tgt_embed_dim": TINY.llm.hidden_size,
            },
        },
        "whisper_encoder": {"pretrained_model_path": layout.RELEASE_WHISPER_DIR},
        "train_dataset": {
            "datapipes": [{
                "num_t5_out_tokens": TINY.num_t5_tokens,
                "num_aud_out_tokens": TINY.num_aud_tokens,
            }],
        },
    }
    head = ("# Synthetic TINY AudioStory release written by export/make_tiny_checkpoint.py.\n"
            "# Paths are relative to this folder.\n")
    return head + yaml.safe_dump(cfg, sort_keys=False)


def dit_config_json() -> dict:
    d = TINY.dit
    return {
        "num_layers": d.num_layers,
        "num_single_layers": d.num_single_layers,
        "in_channels": d.in_channels,
        "attention_head_dim": d.attention_head_dim,
        "num_attention_heads": d.num_attention_heads,
        "joint_attention_dim": d.joint_attention_dim,
        "audio_seq_len": d.audio_seq_len,
        "max_duration": d.max_duration,
        # The tiny T5 encoder is not a hub model: its weights are in pytorch_model.bin under
        # tangoflux.text_encoder., its sizes below and in audiostory_ensemble.config.TINY.t5.
        "text_encoder_name": "tiny-flan-t5 (weights in pytorch_model.bin)",
        "text_encoder_config": t5_config().to_diff_dict(),
    }


# ---------------------------------------------------------------------------------------------
# Verification: greedy decoding with the forced runs
# ---------------------------------------------------------------------------------------------

def greedy_plan_ids(model, prompt_ids: list[int], tok_ids: grammar.TokenIds, max_new_tokens: int = MAX_NEW_TOKENS,
                    repetition_penalty: float = 1.0) -> list[int]:
    """Greedy decoding with a KV cache; ``<t5>`` / ``<aud>`` are followed by their forced runs.

    ``repetition_penalty`` follows transformers' rule (every token already in prompt or output:
    a positive logit is divided by it, a negative one multiplied).
    """
    import torch

    seq = list(prompt_ids)
    gen: list[int] = []
    feed = list(prompt_ids)
    past = None
    with torch.no_grad():
        while len(gen) < max_new_tokens:
            out = model(input_ids=torch.tensor([feed]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].clone()
            if repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(seq)))
                s = logits[seen]
                logits[seen] = torch.where(s < 0, s * repetition_penalty, s / repetition_penalty)
            nxt = int(torch.argmax(logits))
            feed = [nxt]
            if nxt == tok_ids.t5_open:
                feed += tok_ids.forced_t5()
            elif nxt == tok_ids.aud_open:
                feed += tok_ids.forced_aud()
            gen += feed
            seq += feed
            if nxt in tok_ids.stop_ids:
                break
    return gen


def check_plan(tok, tok_ids, gen_ids: list[int], total: float, expected=None) -> tuple[bool, bool, str]:
    """(ok, exact, detail): ok = finished plan, >= 2 clips, durations sum to ``total``."""
    decode = lambda ids: tok.decode(list(ids), skip_special_tokens=False)  # noqa: E731
    try:
        plan = grammar.parse_plan(gen_ids, tok_ids, decode)
    except grammar.PlanError as e:
        return False, False, f"parse error: {e}"
    durs = [c.duration for c in plan.clips]
    ok = (plan.finished and not plan.dropped and len(plan.clips) >= 2
          and round(sum(durs) * 10) == round(total * 10))
    exact = expected is not None and [(c.caption, c.duration) for c in plan.clips] == \
        [(c.caption, c.duration) for c in expected]
    return ok, exact, f"{len(plan.clips)} clips {durs} sum {sum(durs):.1f} / {total}"


def verify(model, tok, log=print) -> dict:
    n, m = TINY.num_t5_tokens, TINY.num_aud_tokens
    tok_ids = grammar.TokenIds.from_tokenizer(tok, n, m)
    result = {}
    cases = [(c, t, s, tiny_story.clips_for(tiny_story.events_of(c), t)) for c, t, s in held_out_requests()]
    samples = [(c, t, 0, tiny_story.sample_clips(i)) for i, (c, t) in enumerate(tiny_story.SAMPLE_INSTRUCTIONS)]
    for penalty in (1.0, REPETITION_PENALTY):
        for name, group in (("held_out", cases), ("samples", samples)):
            ok_count = exact_count = 0
            for caption, total, seed, expected in group:
                prompt = grammar.build_prompt(grammar.build_instruction(caption, total, seed))
                ids = tok(prompt, add_special_tokens=False)["input_ids"]
                gen = greedy_plan_ids(model, ids, tok_ids, repetition_penalty=penalty)
                ok, exact, detail = check_plan(tok, tok_ids, gen, total, expected)
                ok_count += ok
                exact_count += exact
                if not ok:
                    log(f"  FAIL ({name}, penalty {penalty}): {caption!r} {total}: {detail}")
            result[(name, penalty)] = (ok_count, exact_count, len(group))
    return result


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def build(out: Path, steps: int, seed: int, digest: str) -> int:
    import torch

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.time()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        return _build_into(tmp, out, steps, seed, digest, t_start)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build_into(tmp: Path, out: Path, steps: int, seed: int, digest: str, t_start: float) -> int:
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2ForCausalLM


    # 1. tokenizers and base folder
    base_tok, bpe_vocab, bpe_merges = train_base_tokenizer(seed)
    bpe_size = len(bpe_vocab)
    base_vocab = save_base_folder(base_tok, bpe_vocab, bpe_merges, tmp / BASE_DIR_NAME)
    added = grammar.added_tokens()
    (tmp / "tokenizer").mkdir()
    (tmp / layout.RELEASE_ADDED_TOKENS).write_text(
        json.dumps({t: base_vocab + i for i, t in enumerate(added)}, indent=2) + "\n")
    tok = load_full_tokenizer(tmp / BASE_DIR_NAME, tmp / layout.RELEASE_ADDED_TOKENS)
    vocab_size = base_vocab + len(added)
    if len(tok) != vocab_size or tok.convert_tokens_to_ids(added[-1]) != vocab_size - 1:
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, expected {vocab_size}")
    print(f"tokenizer: {bpe_size} BPE + {len(grammar.QWEN_SPECIAL_TOKENS)} specials = {base_vocab}; "
          f"+ {len(added)} added = {vocab_size}  ({time.time() - t_start:.1f} s)")

    # 2. train the LLM
    print(f"training {steps} steps x {BATCH} ...")
    model = train_llm(tok, vocab_size, steps, seed)
    t_train = time.time()
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # 3. the release state dict
    sd = llm_release_tensors(trained, seed)
    sd.update(other_release_tensors(seed))
    sd.update(write_whisper_encoder(tmp / layout.RELEASE_WHISPER_DIR, seed))
    digest_sd = state_digest(sd)
    torch.save(sd, tmp / layout.RELEASE_WEIGHTS)
    (tmp / layout.RELEASE_CONFIG).write_text(release_config_yaml(vocab_size))
    (tmp / "Flux_detokenizer").mkdir()
    (tmp / layout.RELEASE_DIT_CONFIG).write_text(json.dumps(dit_config_json(), indent=2) + "\n")
    vae = vae_state(seed)
    save_file(vae, str(tmp / layout.RELEASE_VAE_WEIGHTS))
    (tmp / layout.RELEASE_VAE_CONFIG).write_text(json.dumps(TINY.vae.diffusers_kwargs(), indent=2) + "\n")
    digest_vae = state_digest(vae)

    # 4. reload from the written files, merge as a converter would, and verify
    reloaded = torch.load(tmp / layout.RELEASE_WEIGHTS, map_location="cpu", weights_only=True)
    merged = merged_llm_state(reloaded)
    max_err = max(float((merged[k] - trained[k]).abs().max()) for k in trained)
    check = Qwen2ForCausalLM(qwen2_config(vocab_size, tok)).float().eval()
    missing, unexpected = check.load_state_dict(merged, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"merged state dict mismatch: missing {missing}, unexpected {unexpected}")
    print(f"LoRA merge round trip: max |merged - trained| = {max_err:.2e}")
    full_tok = load_full_tokenizer(tmp / BASE_DIR_NAME, tmp / layout.RELEASE_ADDED_TOKENS)
    res = verify(check, full_tok)
    lines = []
    passed = True
    for (name, penalty), (ok, exact, total) in res.items():
        lines.append(f"  {name:8s} repetition_penalty {penalty}: {ok}/{total} well-formed with the right total "
                     f"({exact}/{total} exactly the trained plan)")
        if name == "held_out" and ok < 0.9 * total or name == "samples" and ok < total:
            passed = False

    made_by = (
        "SYNTHETIC tiny AudioStory release, made by export/make_tiny_checkpoint.py - not a trained AudioStory.\n"
        "Only the LLM is trained (on a synthetic story world); bridge, DiT, T5 and VAE are seeded random.\n"
        f"steps={steps} seed={seed} content-hash={digest}\n"
        f"pytorch_model.bin state sha256={digest_sd}\n"
        f"Flux_detokenizer/model.safetensors state sha256={digest_vae}\n"
        "verification (greedy, forced runs):\n" + "\n".join(lines) + "\n"
    )
    (tmp / "MADE_BY.txt").write_text(made_by)
    print(made_by, end="")
    if not passed:
        print(f"FAILED: the tiny LLM does not speak the grammar well enough; left in {tmp}", file=sys.stderr)
        return 1
    (tmp / ".content-hash").write_text(digest + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    for k, v in sizes.items():
        print(f"  {v:>12,d}  {k}")
    print(f"wrote {out} in {time.time() - t_start:.0f} s (training {t_train - t_start:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=layout.release_dir("tiny"))
    ap.add_argument("--force", action="store_true", help="rebuild even if the content hash matches")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="LLM training steps")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = ap.parse_args(argv)
    out = args.out.resolve()
    digest = content_hash(args.steps, args.seed)
    marker = out / ".content-hash"

    def up_to_date() -> bool:
        return not args.force and marker.exists() and marker.read_text().strip() == digest

    if up_to_date():
        print(f"{out}: up to date")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time (a test session and `make` may race); the loser finds it up to date.
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if up_to_date():
            print(f"{out}: up to date")
            return 0
        return build(out, args.steps, args.seed, digest)


if __name__ == "__main__":
    sys.exit(main())
