"""Convert an AudioStory release (official layout) into the parts this stack serves.

    python export/convert_checkpoint.py --model tiny [--release DIR] [--out DIR]

Writes (see ``audiostory_ensemble/model/layout.py``): an HF Qwen2 folder with the LoRA merged, the trained
norms, the resized vocabulary and the tokenizer (for vLLM and transformers); bridge, DiT and VAE
weights under our module names; and the unconditional tokens (the Flan-T5 encoding of "" padded
to N, computed once here from the T5 weights inside the checkpoint, so T5 never runs when serving).

Every key of ``pytorch_model.bin`` is accounted for: an unconsumed or missing key is an error that
names it. Skipped when the sources and this converter are unchanged (``manifest.json``).

Why this module is over 300 lines: one converter for the whole release, on purpose. A single
``KeyLedger`` goes through every part (LLM, bridge, DiT, T5, audio encoder, VAE) so that a key no
part consumed is an error; the parts are functions in the order the release is read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from audiostory_ensemble.model import layout
from audiostory_ensemble.model.config import ModelConfig, get_config

CONVERTER_VERSION = 3


class ConversionError(RuntimeError):
    pass


class KeyLedger:
    """Hands out state-dict entries and remembers which were taken."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state
        self.taken: set[str] = set()

    def take(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise ConversionError(f"missing key in pytorch_model.bin: {key}")
        self.taken.add(key)
        return self.state[key]

    def take_first(self, *keys: str) -> torch.Tensor:
        for key in keys:
            if key in self.state:
                return self.take(key)
        raise ConversionError(f"missing key in pytorch_model.bin: {keys[0]} (also tried {keys[1:]})")

    def take_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {k[len(prefix):]: v for k, v in self.state.items() if k.startswith(prefix)}
        if not out:
            raise ConversionError(f"no keys with prefix {prefix!r} in pytorch_model.bin")
        self.taken.update(prefix + k for k in out)
        return out

    def take_renamed(self, prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
        """Every key under each release prefix, renamed to our prefix (``{ours: release}``)."""
        return {ours + k: v for ours, prefix in prefixes.items() for k, v in self.take_prefix(prefix).items()}

    def check_all_taken(self) -> None:
        left = sorted(set(self.state) - self.taken)
        if left:
            shown = ", ".join(left[:10]) + (f" … ({len(left)} in all)" if len(left) > 10 else "")
            raise ConversionError(f"unconsumed keys in pytorch_model.bin: {shown}")


def _load_strict(module: torch.nn.Module, state: dict, what: str) -> None:
    result = module.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {result.missing_keys[:8]}")
    if result.unexpected_keys:
        problems.append(f"unexpected {result.unexpected_keys[:8]}")
    if problems:
        raise ConversionError(f"{what}: " + "; ".join(problems))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _source_fingerprint(release: Path, model: str) -> dict:
    files = sorted(p for p in release.rglob("*") if p.is_file() and p.name != ".content-hash")
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(release)}:{st.st_size}:{int(st.st_mtime)}".encode())
    h.update(Path(__file__).read_bytes())
    return {"model": model, "sources": h.hexdigest(), "converter_version": CONVERTER_VERSION}


# ---------------------------------------------------------------------------------------------
# The LLM: LoRA merge, trained norms, resized vocabulary
# ---------------------------------------------------------------------------------------------

def release_config_keys(hydra: dict) -> list[str]:
    """Every key of ``config.yaml`` against ``layout.RELEASE_CONFIG_KEYS``: the keys walked (a
    listed key with a mapping value counts as one); an unknown key or section is an error."""
    unknown = sorted(set(hydra) - set(layout.RELEASE_CONFIG_SECTIONS))
    if unknown:
        raise ConversionError(f"config.yaml: unknown section(s) {unknown}; the converter reads "
                              f"{list(layout.RELEASE_CONFIG_SECTIONS)}")
    walked: list[str] = []

    def walk(node, path: str, training: bool) -> None:
        if path in layout.RELEASE_CONFIG_KEYS:
            walked.append(path)
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key), training)
        elif isinstance(node, list) and training:
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]", training)
        elif not training:
            raise ConversionError(f"config.yaml: unknown key {path}; known keys are listed in "
                                  "audiostory_ensemble/model/layout.py (RELEASE_CONFIG_KEYS)")

    for section, node in hydra.items():
        # train_dataset is the training pipeline: only N and M are read, everything else is ignored.
        walk(node, section, training=section == "train_dataset")
    return walked


def check_release_config(hydra: dict, cfg: ModelConfig) -> None:
    """The "check" entries of ``layout.RELEASE_CONFIG_KEYS``: values the conversion relies on."""
    llm = hydra["llm_model"]
    peft = llm.get("peft_config") or {}
    problems = []
    if llm.get("model_id") is not None or not peft:
        problems.append("llm_model must carry a peft_config (a saved adapter in model_id is not supported)")
    base = (llm.get("model") or {}).get("pretrained_model_name_or_path")
    if base != hydra["tokenizer"]["pretrained_model_path"]:
        problems.append(f"llm_model.model.pretrained_model_name_or_path {base!r} is not the tokenizer's base folder "
                        f"{hydra['tokenizer']['pretrained_model_path']!r}")
    if sorted(peft.get("target_modules", [])) != sorted(layout.LORA_TARGETS):
        problems.append(f"peft_config.target_modules {peft.get('target_modules')} are not the seven projections")
    if list(peft.get("modules_to_save", [])) != list(layout.SAVED_NORMS):
        problems.append(f"peft_config.modules_to_save {peft.get('modules_to_save')} are not {list(layout.SAVED_NORMS)}")
    if peft.get("bias", "none") != "none" or peft.get("fan_in_fan_out", False):
        problems.append("peft_config.bias must be 'none' and fan_in_fan_out false")
    agent = hydra.get("agent_model") or {}
    if int(agent.get("model_dims", cfg.llm.hidden_size)) != cfg.llm.hidden_size:
        problems.append(f"agent_model.model_dims {agent.get('model_dims')} != LLM hidden size {cfg.llm.hidden_size}")
    if agent.get("add_patch_pos", False):
        problems.append("agent_model.add_patch_pos must be false")
    if problems:
        raise ConversionError("config.yaml: " + "; ".join(problems))


def convert_llm(ledger: KeyLedger, hydra: dict, release: Path, out: Path) -> dict:
    from transformers import AutoTokenizer

    llm_cfg = hydra["llm_model"]
    peft = llm_cfg["peft_config"]
    r, alpha = int(peft["r"]), float(peft["lora_alpha"])
    scale = alpha / r
    base_dir = release / hydra["tokenizer"]["pretrained_model_path"]
    base_config = json.loads((base_dir / "config.json").read_text())

    # Tokenizer: the base tokenizer plus the AudioStory tokens in file order.
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    added = json.loads((release / hydra["tokenizer"]["add_tokens_path"]).read_text())
    tokenizer.add_tokens(list(added))
    vocab = len(tokenizer)
    expected_vocab = int(llm_cfg.get("vocab_size", vocab))
    if vocab != expected_vocab:
        raise ConversionError(f"tokenizer has {vocab} tokens but config.yaml says vocab_size={expected_vocab}")

    p = layout.LLM_PREFIX
    state: dict[str, torch.Tensor] = {}
    layer_ids = sorted({int(m.group(1)) for k in ledger.state
                        if (m := re.match(re.escape(p) + r"model\.layers\.(\d+)\.", k))})
    if len(layer_ids) != base_config["num_hidden_layers"]:
        raise ConversionError(f"found {len(layer_ids)} LLM layers, base config has {base_config['num_hidden_layers']}")
    for i in layer_ids:
        lp = f"{p}model.layers.{i}."
        for proj in layout.LORA_TARGETS:
            sub = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            stem = f"{lp}{sub}.{proj}."
            base = ledger.take_first(stem + "weight", stem + "base_layer.weight")
            a = ledger.take(stem + "lora_A.default.weight").float()
            b = ledger.take(stem + "lora_B.default.weight").float()
            merged = (base.float() + scale * (b @ a)).to(base.dtype)
            state[f"model.layers.{i}.{sub}.{proj}.weight"] = merged
            if (stem + "bias") in ledger.state or (stem + "base_layer.bias") in ledger.state:
                bias = ledger.take_first(stem + "bias", stem + "base_layer.bias")
                state[f"model.layers.{i}.{sub}.{proj}.bias"] = bias
        for norm in ("input_layernorm", "post_attention_layernorm"):
            ledger.take(f"{lp}{norm}.original_module.weight")
            state[f"model.layers.{i}.{norm}.weight"] = ledger.take(f"{lp}{norm}.modules_to_save.default.weight")
    ledger.take(f"{p}model.norm.original_module.weight")
    state["model.norm.weight"] = ledger.take(f"{p}model.norm.modules_to_save.default.weight")
    embed = ledger.take(f"{p}model.embed_tokens.weight")
    lm_head = ledger.take(f"{p}lm_head.weight")
    for k in [k for k in ledger.state if k.startswith(p) and k.endswith("rotary_emb.inv_freq")]:
        ledger.take(k)  # a buffer some versions persisted; recomputed from the config
    if embed.shape[0] != vocab:
        raise ConversionError(f"embed_tokens has {embed.shape[0]} rows, tokenizer has {vocab} tokens")
    state["model.embed_tokens.weight"] = embed
    tied = torch.equal(embed, lm_head)
    if not tied:
        state["lm_head.weight"] = lm_head

    llm_dir = out / layout.LLM_DIR
    llm_dir.mkdir(parents=True, exist_ok=True)
    config = dict(base_config)
    config.update(vocab_size=vocab, tie_word_embeddings=tied, architectures=["Qwen2ForCausalLM"],
                  torch_dtype=str(embed.dtype).replace("torch.", ""))
    (llm_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in state.items()}, str(llm_dir / "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.save_pretrained(llm_dir)
    if (base_dir / "generation_config.json").exists():
        shutil.copy(base_dir / "generation_config.json", llm_dir / "generation_config.json")
    return config


# ---------------------------------------------------------------------------------------------
# Bridge, DiT, T5 (uncond tokens), VAE
# ---------------------------------------------------------------------------------------------

# Our module's prefix -> the release's, for the parts whose weights are only renamed.
BRIDGE_PREFIXES = {"projector.": layout.PROJECTOR_PREFIX, "audio_projector.": layout.AUDIO_PROJECTOR_PREFIX,
                   "fusion.": layout.FUSION_PREFIX}
DIT_PREFIXES = {"transformer.": layout.DIT_PREFIX, "fc.": layout.FC_PREFIX,
                "duration_embedder.": layout.DURATION_PREFIX}


def t5_folder(release: Path) -> Path | None:
    """The folder ``text_encoder_name`` names, when the release carries it (a hub name such as
    ``google/flan-t5-large`` is not a folder: the sizes are then the configuration's)."""
    name = json.loads((release / layout.RELEASE_DIT_CONFIG).read_text()).get("text_encoder_name")
    folder = release / name if name else None
    return folder if folder is not None and (folder / "config.json").is_file() else None


@torch.no_grad()
def uncond_tokens(ledger: KeyLedger, cfg: ModelConfig, folder: Path | None = None) -> torch.Tensor:
    """T5 encoding of "" padded to N, with its attention mask, not masked after: the official
    ``encode_text_classifier_free_full_tokens``. The ids come from the T5 folder's tokenizer when
    the release has one (``</s>`` then pads), the weights from the checkpoint."""
    from transformers import T5Config, T5EncoderModel

    t5 = cfg.t5
    model = T5EncoderModel(T5Config(
        d_model=t5.d_model, num_layers=t5.num_layers, num_heads=t5.num_heads, d_kv=t5.d_kv,
        d_ff=t5.d_ff, vocab_size=t5.vocab_size, feed_forward_proj=t5.feed_forward_proj,
        pad_token_id=t5.pad_token_id, eos_token_id=t5.eos_token_id, dropout_rate=0.0,
        is_encoder_decoder=False, use_cache=False,
    ))
    state = ledger.take_prefix(layout.T5_PREFIX)
    _load_strict(model, {k: v.float() for k, v in state.items()}, "text_encoder")
    model.eval()
    n = cfg.num_t5_tokens
    if folder is not None:
        from transformers import AutoTokenizer
        enc = AutoTokenizer.from_pretrained(folder)([""], max_length=n, padding="max_length", truncation=True,
                                                    return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
    else:
        ids = torch.full((1, n), t5.pad_token_id, dtype=torch.long)
        ids[0, 0] = t5.eos_token_id
        mask = torch.zeros((1, n), dtype=torch.long)
        mask[0, 0] = 1
    return model(input_ids=ids, attention_mask=mask).last_hidden_state[0].float().contiguous()


def convert_audio_encoder(ledger: KeyLedger, hydra: dict, release: Path, out: Path, cfg: ModelConfig) -> ModelConfig:
    """The audio-understanding path, when the release has it: the Whisper folder is copied, the
    resampler's projector saved; ``audio_tokens`` set. Half of it (weights without the encoder,
    or the reverse) is an error, never a silent text-only model."""
    from audiostory_ensemble.llm.audio_input import AudioEncoder

    has = any(k.startswith(layout.AUDIO_RESAMPLER_PREFIX) for k in ledger.state)
    resampler = ledger.take_prefix(layout.AUDIO_RESAMPLER_PREFIX) if has else {}
    spec = (hydra.get("agent_model") or {}).get("whisper_resampler_llava")
    encoder = (hydra.get("whisper_encoder") or {}).get("pretrained_model_path")
    present = [bool(resampler), bool(spec), bool(encoder)]
    if not any(present):
        return replace(cfg, audio_tokens=0)
    if not all(present):
        raise ConversionError("incomplete audio encoder: resampler weights, agent_model.whisper_resampler_llava "
                              f"and whisper_encoder must come together (found {present})")
    if int(spec["tgt_embed_dim"]) != cfg.llm.hidden_size:
        raise ConversionError(f"resampler tgt_embed_dim {spec['tgt_embed_dim']} != LLM width {cfg.llm.hidden_size}")
    src = release / encoder
    shutil.copytree(src, out / layout.AUDIO_ENCODER_DIR)
    save_file({k: v.float().contiguous() for k, v in resampler.items()}, str(out / layout.AUDIO_RESAMPLER_WEIGHTS))
    # Load once: every weight present, the shapes agree.
    AudioEncoder(out / layout.AUDIO_ENCODER_DIR, out / layout.AUDIO_RESAMPLER_WEIGHTS, int(spec["token_num"]))
    return replace(cfg, audio_tokens=int(spec["token_num"]))


def derive_config(base: ModelConfig, hydra: dict, release: Path) -> ModelConfig:
    """Our ModelConfig with N, M, scale, LLM and DiT sizes read from the release."""
    pipe = hydra["train_dataset"]["datapipes"][0]
    agent = hydra.get("agent_model", {})
    peft = hydra["llm_model"]["peft_config"]
    base_dir = release / hydra["tokenizer"]["pretrained_model_path"]
    q = json.loads((base_dir / "config.json").read_text())
    flux = json.loads((release / layout.RELEASE_DIT_CONFIG).read_text())
    llm = replace(
        base.llm, hidden_size=q["hidden_size"], num_layers=q["num_hidden_layers"],
        num_heads=q["num_attention_heads"], num_kv_heads=q.get("num_key_value_heads", q["num_attention_heads"]),
        intermediate_size=q["intermediate_size"], rope_theta=float(q.get("rope_theta", base.llm.rope_theta)),
        rms_norm_eps=float(q.get("rms_norm_eps", base.llm.rms_norm_eps)),
        max_position_embeddings=int(q.get("max_position_embeddings", base.llm.max_position_embeddings)),
        lora_r=int(peft["r"]), lora_alpha=int(peft["lora_alpha"]),
    )
    dit = replace(
        base.dit, num_layers=flux.get("num_layers", base.dit.num_layers),
        num_single_layers=flux.get("num_single_layers", base.dit.num_single_layers),
        num_attention_heads=flux.get("num_attention_heads", base.dit.num_attention_heads),
        attention_head_dim=flux.get("attention_head_dim", base.dit.attention_head_dim),
        audio_seq_len=flux.get("audio_seq_len", base.dit.audio_seq_len),
        max_duration=float(flux.get("max_duration", base.dit.max_duration)),
    )
    t5 = base.t5
    folder = t5_folder(release)
    if folder is not None:
        tc = json.loads((folder / "config.json").read_text())
        t5 = replace(t5, **{k: tc[k] for k in ("d_model", "num_layers", "num_heads", "d_kv", "d_ff", "vocab_size",
                                                "feed_forward_proj", "pad_token_id", "eos_token_id") if k in tc})
    vae = base.vae
    vae_cfg_path = release / layout.RELEASE_VAE_CONFIG
    if vae_cfg_path.exists():
        v = json.loads(vae_cfg_path.read_text())
        vae = replace(vae, **{k: (tuple(x) if isinstance(x, list) else x) for k, x in v.items()
                              if k in vae.__dataclass_fields__})
    cfg = replace(
        base, llm=llm, dit=dit, vae=vae, t5=t5,
        num_t5_tokens=int(pipe["num_t5_out_tokens"]), num_aud_tokens=int(pipe["num_aud_out_tokens"]),
        t5_feature_scale=float(agent.get("t5_feature_scale", base.t5_feature_scale)),
    )
    if dit.audio_seq_len != base.dit.audio_seq_len:
        raise ConversionError(f"audio_seq_len {dit.audio_seq_len}: this stack serves {base.dit.audio_seq_len} "
                              "latent frames")
    return cfg


def convert(release: Path, out: Path, model: str, force: bool = False) -> Path:
    release, out = Path(release), Path(out)
    if not (release / layout.RELEASE_CONFIG).exists():
        raise ConversionError(f"{release / layout.RELEASE_CONFIG} not found: "
                              f"is {release} an AudioStory release folder?")
    fingerprint = _source_fingerprint(release, model)
    manifest_path = out / layout.MANIFEST
    if not force and manifest_path.exists():
        if json.loads(manifest_path.read_text()).get("fingerprint") == fingerprint:
            print(f"convert: {out} is up to date")
            return out

    from diffusers import AutoencoderOobleck

    from audiostory_ensemble.model.bridge import Bridge
    from audiostory_ensemble.model.dit import AudioDiT

    hydra = yaml.safe_load((release / layout.RELEASE_CONFIG).read_text())
    release_config_keys(hydra)
    cfg = derive_config(get_config(model), hydra, release)
    check_release_config(hydra, cfg)
    # mmap: tensors are read from the file as they are used, so a 10 GB checkpoint is never held twice
    # (the merged LLM is the one copy made); peak memory at full size is in deploy/README.md.
    state = torch.load(release / layout.RELEASE_WEIGHTS, map_location="cpu", weights_only=True, mmap=True)
    ledger = KeyLedger(state)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    convert_llm(ledger, hydra, release, out)

    bridge_state = ledger.take_renamed(BRIDGE_PREFIXES)
    _load_strict(Bridge(cfg.llm.hidden_size, cfg.bridge_heads, cfg.t5_feature_scale), bridge_state, "bridge")
    save_file({k: v.contiguous() for k, v in bridge_state.items()}, str(out / layout.BRIDGE_WEIGHTS))

    dit_state = ledger.take_renamed(DIT_PREFIXES)
    _load_strict(AudioDiT(cfg), dit_state, "dit")
    save_file({k: v.contiguous() for k, v in dit_state.items()}, str(out / layout.DIT_WEIGHTS))

    uncond = uncond_tokens(ledger, cfg, t5_folder(release))
    save_file({"uncond_tokens": uncond}, str(out / layout.UNCOND_WEIGHTS))
    cfg = convert_audio_encoder(ledger, hydra, release, out, cfg)
    ledger.check_all_taken()

    from safetensors.torch import load_file
    vae_state = load_file(str(release / layout.RELEASE_VAE_WEIGHTS))
    _load_strict(AutoencoderOobleck(**cfg.vae.diffusers_kwargs()), vae_state, "vae")
    shutil.copy(release / layout.RELEASE_VAE_WEIGHTS, out / layout.VAE_WEIGHTS)
    (out / layout.VAE_CONFIG).write_text(json.dumps(cfg.vae.diffusers_kwargs(), indent=2) + "\n")

    cfg.save(out / layout.MODEL_CONFIG)
    import diffusers
    import transformers
    manifest = {
        "fingerprint": fingerprint,
        "release": str(release),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "diffusers": diffusers.__version__},
        "keys_consumed": len(ledger.taken),
        "files": {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"convert: wrote {out} ({len(ledger.taken)} keys consumed)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="base size schema: tiny or full")
    ap.add_argument("--release", default=None, help="official-layout folder (default: build/checkpoints/MODEL/release)")
    ap.add_argument("--out", default=None, help="output folder (default: build/checkpoints/MODEL/converted)")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    release = Path(args.release) if args.release else layout.release_dir(args.model)
    out = Path(args.out) if args.out else layout.converted_dir(args.model)
    try:
        convert(release, out, args.model, force=args.force)
    except ConversionError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
