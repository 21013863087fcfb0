"""Write a TINY AudioStory release: the official on-disk layout, key names and configuration keys,
with synthetic weights, so that the converter and every later stage meet what a real release has.

    python export/make_tiny_checkpoint.py [--out DIR] [--force] [--steps N] [--seed S]

What it writes (deterministically: fixed seeds, 2 torch threads):

1. the tiny LLM and its tokenizer (``export/tiny_llm.py``: trained on the synthetic story world and
   checked to write well-formed plans; cached apart, so the rest of the release can change without
   retraining) as the official release carries them: ``pytorch_model.bin`` with the LoRA-wrapped
   keys (``base + (alpha/r) B @ A == trained``; trained norms in ``modules_to_save.default``, ones in
   ``original_module``), the base folder ``Qwen2.5-tiny/`` with the base part's own weights (the
   official loader builds the base model from it before the checkpoint overwrites it), and
   ``tokenizer/added_tokens.json``;
2. the audio half (``export/tiny_audio.py``): bridge, DiT, duration embedder and T5 encoder in the
   checkpoint, seeded and given gains so that the audio hears its conditioning; the T5 folder that
   ``text_encoder_name`` names; the Oobleck VAE in ``Flux_detokenizer/``; a tiny Whisper encoder;
3. ``config.yaml`` with every key the official loading path reads, and ``Flux_detokenizer/config.json``.

What the official inference code would still refuse (by design, sizes): the VAE. It builds
``AutoencoderOobleck()`` with the default configuration and loads it strictly; ours is smaller and
described by ``Flux_detokenizer/vae_config.json``, which only this stack reads.

The output is cached by a content hash of these three scripts, ``tiny_story.py``, ``grammar.py``,
the TINY sizes, the arguments and the library versions (``<out>/.content-hash``).

Why this module is over 300 lines: the LLM and the audio half live in ``tiny_llm.py`` and
``tiny_audio.py``; what is left is the release's own format (the LoRA-wrapped keys, the base folder,
``config.yaml`` with every key the official loader reads), one description of one layout.
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

from audiostory_ensemble import tiny_story  # noqa: E402  (light imports only)
from audiostory_ensemble.model import grammar, layout  # noqa: E402
from audiostory_ensemble.model.config import TINY  # noqa: E402
from export import tiny_audio, tiny_llm  # noqa: E402

BASE_DIR_NAME = "Qwen2.5-tiny"
DEFAULT_SEED = 0
THREADS = 2
LORA_INIT_STD = 0.02
LIBRARIES = ("torch", "transformers", "tokenizers", "diffusers", "safetensors", "numpy")


# ---------------------------------------------------------------------------------------------
# Cache key (no heavy imports: "up to date" must answer in well under 2 s)
# ---------------------------------------------------------------------------------------------

def sources_digest(paths, parts: list[bytes], libraries) -> str:
    """sha256 over the files (name and bytes), ``parts`` and the installed versions of ``libraries``:
    the cache key of a release maker."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for part in parts:
        h.update(part)
    for lib in libraries:
        try:
            h.update(f"{lib}={metadata.version(lib)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{lib}=none".encode())
    return h.hexdigest()


def content_hash(steps: int, seed: int) -> str:
    here = Path(__file__).resolve().parent
    return sources_digest(
        (Path(__file__).resolve(), here / "tiny_llm.py", here / "tiny_audio.py", Path(tiny_story.__file__),
         Path(grammar.__file__)),
        [json.dumps(TINY.to_dict(), sort_keys=True).encode(),
         json.dumps({"steps": steps, "seed": seed}, sort_keys=True).encode()], LIBRARIES)


# ---------------------------------------------------------------------------------------------
# The LLM in the release's form
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


def base_folder_weights(release: dict, base_vocab: int) -> dict:
    """The base model's own weights (what ``AutoModelForCausalLM.from_pretrained`` of the base
    folder loads): the LoRA-free part of every projection, the original norms, the embedding rows
    of the base vocabulary; no ``lm_head`` (tied)."""
    p = layout.LLM_PREFIX
    out = {}
    for key, t in release.items():
        if not key.startswith(p) or ".lora_" in key or ".modules_to_save." in key or key.endswith("lm_head.weight"):
            continue
        k = key[len(p):].replace(".original_module.", ".")
        out[k] = t[:base_vocab].clone() if k == "model.embed_tokens.weight" else t.clone()
    return out


def state_digest(sd: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].contiguous()
        h.update(k.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Configuration files
# ---------------------------------------------------------------------------------------------

def release_config_yaml(vocab_size: int, model=TINY, base_dir: str = BASE_DIR_NAME, audio_encoder: bool = True,
                        made_by: str = "make_tiny_checkpoint.py") -> str:
    """Every key the official loading path reads (``evaluate/inference.py``): ``tokenizer``,
    ``llm_model``, ``agent_model`` (with the resampler arguments its ``from_pretrained`` requires),
    ``seedx_dit_model_cfg`` and ``train_dataset.datapipes[0]``'s N and M; and, with
    ``audio_encoder``, ours for the audio encoder, which the official text-to-audio release does
    not have (without it the resampler entry is empty, as the official release's)."""
    import yaml

    whisper = {
        "_target_": "src.models.tokenizer.modeling_whisper.Whisper_Resampler_llava",
        "token_num": model.audio_tokens,
        "ori_embed_dim": tiny_audio.TINY_WHISPER["d_model"],
        "tgt_embed_dim": model.llm.hidden_size,
    } if audio_encoder else None
    cfg = {
        "tokenizer": {
            "_target_": "src.models.tokenizer.init_qwen_tokenizer.init_tokenizer",
            "pretrained_model_path": base_dir,
            "add_tokens_path": layout.RELEASE_ADDED_TOKENS,
        },
        "llm_model": {
            "_target_": "src.models.mllm.peft_models.get_peft_model_with_resize_embedding",
            "model": {
                "_target_": "transformers.AutoModelForCausalLM.from_pretrained",
                "pretrained_model_name_or_path": base_dir,
            },
            "peft_config": {
                "_target_": "peft.LoraConfig",
                "_convert_": "object",
                "r": model.llm.lora_r,
                "lora_alpha": model.llm.lora_alpha,
                "lora_dropout": 0.05,
                "target_modules": ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
                "modules_to_save": ["input_layernorm", "post_attention_layernorm", "norm"],
                "task_type": "CAUSAL_LM",
            },
            "vocab_size": vocab_size,
        },
        "agent_model": {
            "_target_": "src.models.mllm.modeling_audiostory_llm.AudioStory_llm.from_pretrained",
            "t5_feature_scale": float(model.t5_feature_scale),
            "model_dims": model.llm.hidden_size,
            "input_resampler": None,          # unused at inference; required arguments
            "output_resampler": None,
            "whisper_resampler_llava": whisper,
        },
        "seedx_dit_model_cfg": {
            "_target_": "src.models.mllm.modeling_audiostory_unified.AudioStory_unified",
        },
        "whisper_encoder": {"pretrained_model_path": layout.RELEASE_WHISPER_DIR},
        "train_dataset": {
            "datapipes": [{
                "num_t5_out_tokens": model.num_t5_tokens,
                "num_aud_out_tokens": model.num_aud_tokens,
            }],
        },
    }
    if not audio_encoder:
        del cfg["whisper_encoder"]
    head = (f"# Synthetic {model.name.upper()} AudioStory release written by export/{made_by}.\n"
            "# Paths are relative to this folder: the official inference code opens them as given, so run\n"
            "# it from inside this folder (--model_path $PWD --tangoflux_model Flux_detokenizer).\n")
    return head + yaml.safe_dump(cfg, sort_keys=False)


def dit_config_json(model=TINY, t5_dir: str = tiny_audio.T5_DIR) -> dict:
    d = model.dit
    return {
        "num_layers": d.num_layers,
        "num_single_layers": d.num_single_layers,
        "in_channels": d.in_channels,
        "attention_head_dim": d.attention_head_dim,
        "num_attention_heads": d.num_attention_heads,
        "joint_attention_dim": d.joint_attention_dim,
        "audio_seq_len": d.audio_seq_len,
        "max_duration": d.max_duration,
        "text_encoder_name": t5_dir,   # relative to the release folder, like config.yaml's paths
    }


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

    # 1. the LLM (cached) and its tokenizer
    llm = tiny_llm.trained_llm(out.parent / "llm-cache", steps, seed)
    shutil.copytree(llm.base_dir, tmp / BASE_DIR_NAME)
    (tmp / "tokenizer").mkdir()
    shutil.copy(llm.added_tokens_path, tmp / layout.RELEASE_ADDED_TOKENS)
    tok = tiny_llm.load_full_tokenizer(tmp / BASE_DIR_NAME, tmp / layout.RELEASE_ADDED_TOKENS)
    vocab_size = llm.vocab_size
    trained = llm.state_dict()
    model = Qwen2ForCausalLM(tiny_llm.qwen2_config(vocab_size, tok)).float().eval()
    model.load_state_dict(trained, strict=False)
    t_llm = time.time()

    # 2. the release state dict: the LLM in LoRA form, the audio half with its gains
    sd = llm_release_tensors(trained, seed)
    base_vocab = vocab_size - len(grammar.added_tokens())
    save_file({k: v.contiguous() for k, v in base_folder_weights(sd, base_vocab).items()},
              str(tmp / BASE_DIR_NAME / "model.safetensors"), metadata={"format": "pt"})
    sem_mean, res_mean = tiny_audio.hidden_state_means(model, tok, seed)
    sd.update(tiny_audio.audio_release_tensors(seed, sem_mean, res_mean))
    sd.update(tiny_audio.write_whisper_encoder(tmp / layout.RELEASE_WHISPER_DIR, seed))
    tiny_audio.write_t5_folder(tmp / tiny_audio.T5_DIR, sd)
    digest_sd = state_digest(sd)
    torch.save(sd, tmp / layout.RELEASE_WEIGHTS)
    (tmp / layout.RELEASE_CONFIG).write_text(release_config_yaml(vocab_size))
    (tmp / "Flux_detokenizer").mkdir()
    (tmp / layout.RELEASE_DIT_CONFIG).write_text(json.dumps(dit_config_json(), indent=2) + "\n")
    vae = tiny_audio.vae_state(seed)
    save_file(vae, str(tmp / layout.RELEASE_VAE_WEIGHTS))
    (tmp / layout.RELEASE_VAE_CONFIG).write_text(json.dumps(TINY.vae.diffusers_kwargs(), indent=2) + "\n")
    digest_vae = state_digest(vae)

    # 3. reload from the written files, merge as a converter would: the LLM that was verified
    reloaded = torch.load(tmp / layout.RELEASE_WEIGHTS, map_location="cpu", weights_only=True)
    merged = merged_llm_state(reloaded)
    max_err = max(float((merged[k] - trained[k]).abs().max()) for k in trained)
    check = Qwen2ForCausalLM(tiny_llm.qwen2_config(vocab_size, tok)).float().eval()
    missing, unexpected = check.load_state_dict(merged, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"merged state dict mismatch: missing {missing}, unexpected {unexpected}")
    if max_err > 1e-5:
        raise RuntimeError(f"LoRA merge round trip: max |merged - trained| = {max_err:.2e} > 1e-5")
    print(f"LoRA merge round trip: max |merged - trained| = {max_err:.2e}")

    made_by = (
        "SYNTHETIC tiny AudioStory release, made by export/make_tiny_checkpoint.py - not a trained AudioStory.\n"
        "Only the LLM is trained (on a synthetic story world); bridge, DiT, T5 and VAE are seeded random,\n"
        "with gains that make the audio follow its conditioning (export/tiny_audio.py).\n"
        f"steps={steps} seed={seed} content-hash={digest}\n"
        f"pytorch_model.bin state sha256={digest_sd}\n"
        f"Flux_detokenizer/model.safetensors state sha256={digest_vae}\n" + llm.report
    )
    (tmp / "MADE_BY.txt").write_text(made_by)
    print(made_by, end="")
    (tmp / ".content-hash").write_text(digest + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    for k, v in sizes.items():
        print(f"  {v:>12,d}  {k}")
    print(f"wrote {out} in {time.time() - t_start:.0f} s (the LLM {t_llm - t_start:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=layout.release_dir("tiny"))
    ap.add_argument("--force", action="store_true", help="rebuild even if the content hash matches")
    ap.add_argument("--steps", type=int, default=tiny_llm.DEFAULT_STEPS, help="LLM training steps")
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
