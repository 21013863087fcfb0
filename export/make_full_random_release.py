"""Write a FULL-SIZE AudioStory release with seeded random weights, in the official layout, so
that conversion, export and serving at the real size can run before (and without) the real weights.

    python export/make_full_random_release.py [--out build/checkpoints/full/release] [--seed S] [--force]

Nothing in it is trained; every size is the released model's (``model/config.py`` FULL):

- ``Qwen2.5-3B-Instruct/``: the base folder the official loader builds the LLM from — Qwen2.5-3B-Instruct's
  ``config.json`` (151,936 embedding rows) and ``generation_config.json``, and a byte-level BPE
  tokenizer of Qwen2's size: 151,643 entries (a BPE learnt on the tiny story world, the rest
  unreachable filler entries), then Qwen's 22 special tokens at 151,643–151,664, so that the 612
  AudioStory tokens take their real ids (``</t5>`` 151,665 … ``<|/think|>`` 152,276); its weights in
  two bf16 safetensors shards with an index, as the real folder ships them;
- ``pytorch_model.bin``: the LLM in the PEFT-wrapped form (LoRA r 32 on the seven projections, the
  saved norms, the embedding resized to 152,277 rows, ``lm_head`` tied) in bfloat16, and the audio
  half (bridge, 517 M-parameter DiT, fc, duration embedder, the Flan-T5-large encoder) in float32;
- ``tokenizer/added_tokens.json``, ``config.yaml``, ``Flux_detokenizer/config.json`` (the DiT's),
  ``Flux_detokenizer/model.safetensors`` (the default Oobleck VAE, weight-normed) and the
  ``flan-t5-large/`` folder ``text_encoder_name`` names. No Whisper encoder: the official
  text-to-audio release has none.

The LLM's weights are drawn N(0, 0.02) (Qwen's ``initializer_range``), norms near one; the audio
half keeps its modules' own initialisation. The release is written to a temporary folder and moved
into place, and skipped when ``<out>/.content-hash`` matches; a folder this script did not write (a
real release) is never replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from audiostory_ensemble.model import grammar, layout  # noqa: E402  (light imports only)
from audiostory_ensemble.model.config import FULL  # noqa: E402

BASE_DIR_NAME = "Qwen2.5-3B-Instruct"
T5_DIR = "flan-t5-large"
QWEN_BPE_VOCAB = 151_643          # Qwen2's byte-level BPE entries; the 22 specials follow
QWEN_EMBED_ROWS = 151_936         # the base model's embedding rows (padded past the tokenizer)
INIT_STD = 0.02                   # Qwen2.5's initializer_range
SHARDS = 2
DEFAULT_SEED = 0
THREADS = 2
MARKER = ".content-hash"
LIBRARIES = ("torch", "transformers", "tokenizers", "diffusers", "safetensors")


def content_hash(seed: int) -> str:
    from export.make_tiny_checkpoint import sources_digest

    here = Path(__file__).resolve().parent
    return sources_digest(
        (Path(__file__).resolve(), here / "tiny_llm.py", here / "tiny_audio.py", here / "make_tiny_checkpoint.py",
         Path(grammar.__file__)),
        [json.dumps(FULL.to_dict(), sort_keys=True).encode(), f"seed={seed}".encode()], LIBRARIES)


# ---------------------------------------------------------------------------------------------
# The base folder: Qwen2.5-3B-Instruct's configuration and a tokenizer of its size
# ---------------------------------------------------------------------------------------------

def qwen_sized_tokenizer(seed: int):
    """The tiny story world's BPE padded with unreachable entries to Qwen2's 151,643, then the
    22 specials: every id the AudioStory tokens and the chat template use is the real one."""
    from tokenizers import AddedToken, Tokenizer, models

    from export import tiny_llm

    learnt, vocab, merges = tiny_llm.train_base_tokenizer(seed)
    vocab = dict(vocab)
    i = 0
    while len(vocab) < QWEN_BPE_VOCAB:
        vocab.setdefault(f"<|fill_{i}|>", len(vocab))   # no merge reaches it: never produced
        i += 1
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.normalizer = learnt.normalizer
    tok.pre_tokenizer = learnt.pre_tokenizer
    tok.decoder = learnt.decoder
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in grammar.QWEN_SPECIAL_TOKENS])
    for k, t in enumerate(grammar.QWEN_SPECIAL_TOKENS):
        if tok.token_to_id(t) != QWEN_BPE_VOCAB + k:
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {QWEN_BPE_VOCAB + k}")
    return tok, vocab, merges


def qwen_config() -> dict:
    """Qwen2.5-3B-Instruct's ``config.json`` (the sizes from ``FULL``)."""
    llm = FULL.llm
    return {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0,
        "bos_token_id": QWEN_BPE_VOCAB, "eos_token_id": QWEN_BPE_VOCAB + 2, "hidden_act": "silu",
        "hidden_size": llm.hidden_size, "initializer_range": INIT_STD, "intermediate_size": llm.intermediate_size,
        "max_position_embeddings": llm.max_position_embeddings, "max_window_layers": 70, "model_type": "qwen2",
        "num_attention_heads": llm.num_heads, "num_hidden_layers": llm.num_layers,
        "num_key_value_heads": llm.num_kv_heads, "rms_norm_eps": llm.rms_norm_eps, "rope_theta": llm.rope_theta,
        "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": QWEN_EMBED_ROWS,
        # As the released file has it; without it transformers takes the folder for a Mistral one
        # and warns of a wrong pre-tokenizer regex.
        "transformers_version": "4.43.1",
    }


def write_base_folder(folder: Path, seed: int) -> int:
    """Tokenizer files, config and generation config; returns the base tokenizer's length."""
    from export import tiny_llm

    tok, vocab, merges = qwen_sized_tokenizer(seed)
    tiny_llm.save_base_folder(tok, vocab, merges, folder)       # tokenizer files (+ tiny configs, replaced)
    (folder / "config.json").write_text(json.dumps(qwen_config(), indent=2, sort_keys=True) + "\n")
    eos, pad = QWEN_BPE_VOCAB + 2, QWEN_BPE_VOCAB
    gen = {"bos_token_id": pad, "do_sample": True, "eos_token_id": [eos, pad], "pad_token_id": pad,
           "repetition_penalty": tiny_llm.REPETITION_PENALTY, "temperature": 0.7, "top_k": 20, "top_p": 0.8}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text())
    tcfg["model_max_length"] = 131072
    tcfg_path.write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
    return QWEN_BPE_VOCAB + len(grammar.QWEN_SPECIAL_TOKENS)


def write_added_tokens(path: Path, base_vocab: int) -> int:
    """``tokenizer/added_tokens.json``: the 612 AudioStory tokens in file order, with the ids they
    take after the base vocabulary; returns the resized vocabulary's size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    added = grammar.added_tokens()
    path.write_text(json.dumps({t: base_vocab + i for i, t in enumerate(added)}, indent=2) + "\n")
    return base_vocab + len(added)


# ---------------------------------------------------------------------------------------------
# The LLM: PEFT-wrapped keys in bfloat16
# ---------------------------------------------------------------------------------------------

def llm_release_tensors(vocab_size: int, seed: int) -> dict:
    """The release's LLM keys (``seedx.llm.base_model.model.*``), drawn layer by layer."""
    import torch

    llm = FULL.llm
    gen = torch.Generator().manual_seed(seed + 1)
    bf16 = torch.bfloat16

    def normal(*shape, std: float = INIT_STD):
        return (torch.randn(*shape, generator=gen) * std).to(bf16)

    p = layout.LLM_PREFIX
    hd = llm.hidden_size // llm.num_heads
    outs = {"q_proj": llm.num_heads * hd, "k_proj": llm.num_kv_heads * hd, "v_proj": llm.num_kv_heads * hd,
            "o_proj": llm.hidden_size, "gate_proj": llm.intermediate_size, "up_proj": llm.intermediate_size,
            "down_proj": llm.hidden_size}
    ins = {k: llm.hidden_size for k in outs} | {"down_proj": llm.intermediate_size}
    out = {}
    embed = normal(vocab_size, llm.hidden_size)
    out[p + "model.embed_tokens.weight"] = embed
    for i in range(llm.num_layers):
        lp = f"{p}model.layers.{i}."
        for proj in layout.LORA_TARGETS:
            sub = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"{lp}{sub}.{proj}"
            out[key + ".weight"] = normal(outs[proj], ins[proj])
            if proj in ("q_proj", "k_proj", "v_proj"):
                out[key + ".bias"] = normal(outs[proj])
            out[key + ".lora_A.default.weight"] = normal(llm.lora_r, ins[proj])
            out[key + ".lora_B.default.weight"] = normal(outs[proj], llm.lora_r)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{lp}{norm}.original_module.weight"] = torch.ones(llm.hidden_size, dtype=bf16)
            out[f"{lp}{norm}.modules_to_save.default.weight"] = (1 + normal(llm.hidden_size).float()).to(bf16)
    out[p + "model.norm.original_module.weight"] = torch.ones(llm.hidden_size, dtype=bf16)
    out[p + "model.norm.modules_to_save.default.weight"] = (1 + normal(llm.hidden_size).float()).to(bf16)
    out[p + "lm_head.weight"] = embed     # tied: one storage, saved once
    return out


def write_base_weights(folder: Path, release: dict) -> None:
    """The base folder's weights (LoRA-free projections, original norms, the embedding's first
    151,936 rows), in bf16 shards with ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    p = layout.LLM_PREFIX
    base = {}
    for key, t in release.items():
        if not key.startswith(p) or ".lora_" in key or ".modules_to_save." in key or key.endswith("lm_head.weight"):
            continue
        k = key[len(p):].replace(".original_module.", ".")
        base[k] = t[:QWEN_EMBED_ROWS] if k == "model.embed_tokens.weight" else t
    keys = sorted(base, key=lambda k: (k != "model.embed_tokens.weight", k))
    total = sum(base[k].numel() * base[k].element_size() for k in keys)
    shards: list[list[str]] = [[]]
    size = 0
    for k in keys:
        if size > total / SHARDS and len(shards) < SHARDS:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += base[k].numel() * base[k].element_size()
    weight_map = {}
    for n, names in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: base[k].contiguous() for k in names}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def build(out: Path, seed: int, digest: str) -> int:
    import torch
    from safetensors.torch import save_file

    from export import make_tiny_checkpoint, tiny_audio

    torch.set_num_threads(THREADS)
    t0 = time.time()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    timings = {}
    try:
        base = tmp / BASE_DIR_NAME
        base_vocab = write_base_folder(base, seed)
        vocab_size = write_added_tokens(tmp / layout.RELEASE_ADDED_TOKENS, base_vocab)
        timings["tokenizer_s"] = time.time() - t0

        t = time.time()
        sd = llm_release_tensors(vocab_size, seed)
        write_base_weights(base, sd)
        timings["llm_s"] = time.time() - t

        t = time.time()
        sd.update(tiny_audio.audio_release_tensors(seed, None, None, cfg=FULL, gains=False))
        tiny_audio.write_t5_folder(tmp / T5_DIR, sd, FULL.t5)
        timings["audio_s"] = time.time() - t

        t = time.time()
        torch.save(sd, tmp / layout.RELEASE_WEIGHTS)
        timings["save_s"] = time.time() - t
        params = {"llm": sum(v.numel() for k, v in sd.items() if k.startswith(layout.LLM_PREFIX)
                             and not k.endswith("lm_head.weight")),
                  "dit": sum(v.numel() for k, v in sd.items() if k.startswith(layout.DIT_PREFIX)),
                  "t5_encoder": sum(v.numel() for k, v in sd.items() if k.startswith(layout.T5_PREFIX))}
        del sd
        (tmp / layout.RELEASE_CONFIG).write_text(make_tiny_checkpoint.release_config_yaml(
            vocab_size, FULL, BASE_DIR_NAME, audio_encoder=False, made_by=Path(__file__).name))
        (tmp / "Flux_detokenizer").mkdir()
        (tmp / layout.RELEASE_DIT_CONFIG).write_text(
            json.dumps(make_tiny_checkpoint.dit_config_json(FULL, T5_DIR), indent=2) + "\n")
        save_file(tiny_audio.vae_state(seed, FULL.vae, gains=False), str(tmp / layout.RELEASE_VAE_WEIGHTS))

        made_by = ("SYNTHETIC full-size AudioStory release with seeded RANDOM weights, made by "
                   f"export/{Path(__file__).name} - not AudioStory-3B. Sizes and layout only.\n"
                   f"seed={seed} content-hash={digest}\nparameters: {json.dumps(params)}\n")
        (tmp / "MADE_BY.txt").write_text(made_by)
        (tmp / MARKER).write_text(digest + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    for k, v in sizes.items():
        print(f"  {v:>14,d}  {k}")
    print(made_by, end="")
    print(f"wrote {out} ({sum(sizes.values()) / 2**30:.1f} GiB) in {time.time() - t0:.0f} s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=layout.release_dir("full"))
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--force", action="store_true", help="rebuild even if the content hash matches")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    digest = content_hash(args.seed)
    marker = out / MARKER
    if out.exists() and not marker.exists():
        print(f"{out} holds a release this script did not write (no {MARKER}); not replacing it. "
              "Give another --out.", file=sys.stderr)
        return 2
    if not args.force and marker.exists() and marker.read_text().strip() == digest:
        print(f"{out}: up to date")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    return build(out, args.seed, digest)


if __name__ == "__main__":
    sys.exit(main())
