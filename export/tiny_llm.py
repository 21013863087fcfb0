"""The tiny AudioStory LLM: its tokenizer, its training on the synthetic story world, and the
check that it speaks the grammar. Cached by content, apart from the rest of the tiny release.

1. a byte-level BPE (Qwen2 pre-tokenizer) trained on ``audiostory_ensemble/tiny_story.py``'s story
   world, with Qwen2.5's 22 special tokens after it: the *base* tokenizer, saved with a Qwen2-style
   ``config.json`` / ``generation_config.json`` as the base LLM folder;
2. the 612 AudioStory tokens added in file order, and a TINY ``Qwen2ForCausalLM`` trained on
   instruction -> plan transcripts (loss on the assistant part only);
3. greedy decoding with the forced runs on held-out requests and the sample instructions must give
   well-formed plans whose durations sum to the requested total (90 % of the held-out ones, every
   sample), or the training is refused.

:func:`trained_llm` returns the result from ``<cache>/<content hash>/`` or builds it there; the hash
covers this file, ``tiny_story.py``, ``grammar.py``, the TINY LLM sizes, the arguments and the library
versions, so changing how the rest of the release is written never retrains the LLM.

Why this module is over 300 lines: the tokenizer, the training and the check make one cached
artifact under one content hash; split apart, a change to one could meet a stale cache of another.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from audiostory_ensemble import tiny_story
from audiostory_ensemble.model import grammar
from audiostory_ensemble.model.config import TINY

BPE_VOCAB = 800                # byte alphabet (256) + merges; the 22 specials come after
DEFAULT_STEPS = 600
BATCH = 32
LR = 3e-3
WARMUP = 30
NUM_HELD_OUT = 24
HELD_OUT_SEED = 20240917       # fixed: the held-out requests do not move with --seed
MAX_NEW_TOKENS = 400
REPETITION_PENALTY = 1.05      # Qwen2.5-Instruct generation_config (applied even when greedy)
LIBRARIES = ("torch", "transformers", "tokenizers", "numpy")
ADDED_TOKENS_FILE = "added_tokens.json"
WEIGHTS_FILE = "llm.safetensors"
REPORT_FILE = "verification.txt"


def content_hash(steps: int, seed: int) -> str:
    h = hashlib.sha256()
    for path in (Path(__file__).resolve(), Path(tiny_story.__file__), Path(grammar.__file__)):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    sizes = {"llm": TINY.to_dict()["llm"], "n": TINY.num_t5_tokens, "m": TINY.num_aud_tokens}
    h.update(json.dumps({"sizes": sizes, "steps": steps, "seed": seed}, sort_keys=True).encode())
    for lib in LIBRARIES:
        try:
            h.update(f"{lib}={metadata.version(lib)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{lib}=none".encode())
    return h.hexdigest()[:16]


@dataclass
class TrainedLLM:
    """A trained tiny LLM: the base folder (tokenizer and configs, no weights), the 612 added
    tokens with their ids, the trained state dict, and the verification tally."""
    folder: Path

    @property
    def base_dir(self) -> Path:
        return self.folder / "base"

    @property
    def added_tokens_path(self) -> Path:
        return self.folder / ADDED_TOKENS_FILE

    def state_dict(self) -> dict:
        from safetensors.torch import load_file
        return load_file(str(self.folder / WEIGHTS_FILE))

    def tokenizer(self):
        return load_full_tokenizer(self.base_dir, self.added_tokens_path)

    @property
    def vocab_size(self) -> int:
        return json.loads((self.base_dir / "config.json").read_text())["vocab_size"] + len(grammar.added_tokens())

    @property
    def report(self) -> str:
        return (self.folder / REPORT_FILE).read_text()


def trained_llm(cache: Path, steps: int = DEFAULT_STEPS, seed: int = 0, log=print) -> TrainedLLM:
    """The cached training result for ``(steps, seed)``, built on a miss (minutes)."""
    from safetensors.torch import save_file

    folder = Path(cache) / content_hash(steps, seed)
    if (folder / REPORT_FILE).is_file():
        return TrainedLLM(folder)
    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    base_tok, bpe_vocab, bpe_merges = train_base_tokenizer(seed)
    base_vocab = save_base_folder(base_tok, bpe_vocab, bpe_merges, tmp / "base")
    added = grammar.added_tokens()
    (tmp / ADDED_TOKENS_FILE).write_text(json.dumps({t: base_vocab + i for i, t in enumerate(added)}, indent=2) + "\n")
    tok = load_full_tokenizer(tmp / "base", tmp / ADDED_TOKENS_FILE)
    vocab_size = base_vocab + len(added)
    if len(tok) != vocab_size or tok.convert_tokens_to_ids(added[-1]) != vocab_size - 1:
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, expected {vocab_size}")
    log(f"tokenizer: {len(bpe_vocab)} BPE + {len(grammar.QWEN_SPECIAL_TOKENS)} specials = {base_vocab}; "
        f"+ {len(added)} added = {vocab_size}  ({time.time() - t0:.1f} s)")
    log(f"training {steps} steps x {BATCH} ...")
    model = train_llm(tok, vocab_size, steps, seed, log)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_FILE))
    lines, passed = [], True
    for (name, penalty), (ok, exact, total) in verify(model, tok, log).items():
        lines.append(f"  {name:8s} repetition_penalty {penalty}: {ok}/{total} well-formed with the right total "
                     f"({exact}/{total} exactly the trained plan)")
        if name == "held_out" and ok < 0.9 * total or name == "samples" and ok < total:
            passed = False
    report = "verification (greedy, forced runs):\n" + "\n".join(lines) + "\n"
    log(report, end="")
    if not passed:
        raise RuntimeError(f"the tiny LLM does not speak the grammar well enough; left in {tmp}")
    (tmp / REPORT_FILE).write_text(report)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    log(f"tiny LLM trained in {time.time() - t0:.0f} s -> {folder}")
    return TrainedLLM(folder)


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


def _legacy_merges(path: Path) -> None:
    """Rewrite BPE merges as ``"a b"`` strings: tokenizers >= 0.20 writes ``["a", "b"]`` pairs, which
    the 0.19 the official code pins cannot read (every version reads the string form)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    merges = data["model"]["merges"]
    pairs = [m.split(" ") if isinstance(m, str) else m for m in merges]
    if any(len(p) != 2 or " " in p[0] or " " in p[1] for p in pairs):
        raise RuntimeError("a BPE merge holds a space: it cannot be written in the string form")
    data["model"]["merges"] = [f"{a} {b}" for a, b in pairs]
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def save_base_folder(tok, vocab: dict, merges: list, folder: Path) -> int:
    """Tokenizer files, ``config.json`` and ``generation_config.json`` of the base LLM (the
    release adds its weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    bpe_size = len(vocab)
    base_vocab = bpe_size + len(grammar.QWEN_SPECIAL_TOKENS)
    tok.save(str(folder / "tokenizer.json"))
    _legacy_merges(folder / "tokenizer.json")
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
