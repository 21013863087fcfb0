"""AudioStory's tokens, prompt and output grammar, and a parser that never crashes.

The LLM writes, after the ``<|think|>`` prefill::

    {reasoning}<|/think|>
    <|gen|>{caption}<timestamp>{seconds}</timestamp><t5><t5_00000>…<t5_{N-1}></t5><aud><aud_00000>…<aud_{M-1}></aud><|/gen|>   (× K)
    <|im_end|>

The ``<t5_i>`` / ``<aud_i>`` runs are forced (the model only chooses to open them). The hidden
states at the positions whose *input* is a ``<t5_i>`` (N semantic queries) or an ``<aud_i>``
(M residual queries) are the bridging queries handed to the audio decoder.

Token ids are always taken from the tokenizer (the tiny tokenizer's ids differ from the release's).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

# Qwen2.5's own special tokens, in id order after the byte-level BPE vocabulary (151643…151664).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]

NUM_T5_TOKEN_NAMES = 100
NUM_AUD_TOKEN_NAMES = 501


def added_tokens() -> list[str]:
    """The 612 AudioStory tokens in the release's file order (added after Qwen's vocabulary)."""
    return (
        ["</t5>", "<video_padding>", "<timestamp>", "</timestamp>", "<t5>"]
        + [f"<t5_{i:05d}>" for i in range(NUM_T5_TOKEN_NAMES)]
        + ["<aud>", "</aud>"]
        + [f"<aud_{i:05d}>" for i in range(NUM_AUD_TOKEN_NAMES)]
        + ["<|gen|>", "<|/gen|>", "<|think|>", "<|/think|>"]
    )


def t5_run_text(n: int) -> str:
    """``<t5><t5_00000>…<t5_{n-1}></t5>``: the forced run of the N semantic queries."""
    return "<t5>" + "".join(f"<t5_{i:05d}>" for i in range(n)) + "</t5>"


def aud_run_text(m: int) -> str:
    """``<aud><aud_00000>…<aud_{m-1}></aud>``: the forced run of the M residual queries (also the
    placeholder block a continuation's audio rows replace)."""
    return "<aud>" + "".join(f"<aud_{i:05d}>" for i in range(m)) + "</aud>"


def clip_text(caption: str, seconds: str, n: int, m: int) -> str:
    """One clip as the model writes it: ``<|gen|>{caption}<timestamp>{seconds}</timestamp>``, the
    two query runs, ``<|/gen|>``."""
    return f"<|gen|>{caption}<timestamp>{seconds}</timestamp>{t5_run_text(n)}{aud_run_text(m)}<|/gen|>"


# Every token a caller's text must not spell: the tokenizer splits them out of plain text as the
# model's own ChatML and plan tokens, so text holding one could forge a turn or a plan. Longest first,
# so that ``<t5_00001>`` is named rather than a shorter token it contains.
CONTROL_TOKENS = tuple(sorted(set(added_tokens()) | set(QWEN_SPECIAL_TOKENS), key=len, reverse=True))


def control_token_in(text: str) -> str | None:
    """The first control token (longest first) that ``text`` contains, or None for plain text."""
    return next((t for t in CONTROL_TOKENS if t in text), None)

# The reference's lead phrases; one is chosen per request by ``random.seed(seed)`` + ``choice``.
LEAD_PHRASES = [
    "Create a long-form audio composition that explores ",
    "I'd like an extended audio track with rich details of ",
    "Craft an immersive soundscape that slowly unfolds ",
    "Please produce a comprehensive recording capturing every aspect of ",
    "Generate a detailed, drawn-out audio that brings to life ",
    "Let's design a textured audio piece highlighting the nuances of ",
    "Kindly fashion a lengthy audio journey through ",
    "Devise a long-form audio narrative of ",
    "Develop a gradually developing audio with meticulous attention to ",
    "Imagine and produce a vivid audio experience of ",
    "Construct a detailed soundscape that tells the story of ",
    "Please generate a sustained audio track filled with ",
    "Produce an in-depth, multi-layered audio that portrays ",
    "Design a descriptive audio capturing the essence of ",
    "Create a nuanced, extended audio that conveys ",
    "I'd like to commission a long-form audio depicting ",
    "Fashion a richly detailed audio recording of ",
    "Propose a detailed, immersive audio that showcases ",
    "Generate an elaborate audio piece focusing on ",
    "Develop a comprehensive audio that fully represents ",
]

SYSTEM_MESSAGE = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
USER_TEMPLATE = "<|im_start|>user\n{instruction}<|im_end|>\n"
ASSISTANT_PREFILL = "<|im_start|>assistant\n<|think|>"


def choose_lead(seed: int) -> str:
    """The lead phrase the reference picks for ``seed`` (a private RNG: the global one is untouched)."""
    return random.Random(seed).choice(LEAD_PHRASES)


def build_instruction(caption: str, total_duration: float, seed: int = 0) -> str:
    """``lead + caption`` stripped, then the duration sentence; a float prints as ``50.0``."""
    whole = (choose_lead(seed) + caption).strip()
    return f"{whole} The total duration is {float(total_duration)} seconds."


def build_prompt(instruction: str) -> str:
    """ChatML built by hand (not ``apply_chat_template``), ending in the ``<|think|>`` prefill."""
    return SYSTEM_MESSAGE + USER_TEMPLATE.format(instruction=instruction) + ASSISTANT_PREFILL


@dataclass(frozen=True)
class TokenIds:
    """Every id the pipeline needs, resolved from a tokenizer once."""
    im_end: int
    endoftext: int
    t5_open: int
    t5_close: int
    t5_run: tuple[int, ...]       # <t5_00000> … <t5_{N-1}>
    aud_open: int
    aud_close: int
    aud_run: tuple[int, ...]      # <aud_00000> … <aud_{M-1}>
    gen_open: int
    gen_close: int
    think_open: int
    think_close: int
    timestamp_open: int
    timestamp_close: int

    @property
    def n(self) -> int:
        return len(self.t5_run)

    @property
    def m(self) -> int:
        return len(self.aud_run)

    @property
    def stop_ids(self) -> tuple[int, int]:
        return (self.im_end, self.endoftext)

    def forced_t5(self) -> list[int]:
        """What follows the model's ``<t5>``: the N query tokens and ``</t5>``."""
        return [*self.t5_run, self.t5_close]

    def forced_aud(self) -> list[int]:
        return [*self.aud_run, self.aud_close]

    @classmethod
    def from_tokenizer(cls, tokenizer, n: int, m: int) -> "TokenIds":
        def one(tok: str) -> int:
            ids = tokenizer.convert_tokens_to_ids([tok])
            tid = ids[0]
            if tid is None or tid == getattr(tokenizer, "unk_token_id", None):
                raise ValueError(f"tokenizer has no token {tok!r}")
            return int(tid)

        if not (1 <= n <= NUM_T5_TOKEN_NAMES and 1 <= m <= NUM_AUD_TOKEN_NAMES):
            raise ValueError(f"N={n} must be in [1,{NUM_T5_TOKEN_NAMES}] and M={m} in [1,{NUM_AUD_TOKEN_NAMES}]")
        return cls(
            im_end=one("<|im_end|>"), endoftext=one("<|endoftext|>"),
            t5_open=one("<t5>"), t5_close=one("</t5>"),
            t5_run=tuple(one(f"<t5_{i:05d}>") for i in range(n)),
            aud_open=one("<aud>"), aud_close=one("</aud>"),
            aud_run=tuple(one(f"<aud_{i:05d}>") for i in range(m)),
            gen_open=one("<|gen|>"), gen_close=one("<|/gen|>"),
            think_open=one("<|think|>"), think_close=one("<|/think|>"),
            timestamp_open=one("<timestamp>"), timestamp_close=one("</timestamp>"),
        )


# --------------------------------------------------------------------------------------------
# The plan grammar: what the generate engine may write next (constrained decoding)
# --------------------------------------------------------------------------------------------
#
# The engine is called in parts (``llm/plan_tokens.py``): the runs after ``<t5>`` and ``<aud>`` are
# forced, not generated, so each part starts in one of three places and has its own grammar, in
# llguidance's Lark syntax. Added tokens are named by id (``<[id]>``): ids come from the loaded
# tokenizer (the release's ``added_tokens.json`` gives some names one id twice). The guidance
# backend treats every added token as special, which a text terminal can never spell: text below
# is text, with no ChatML or plan token in it.
#
# What the grammars exclude that the parser would accept: plan tokens inside the reasoning or a
# caption (a ``<|gen|>`` before ``<|/think|>``, a ``<t5>`` in a caption); a plan with no
# ``<|/think|>`` or with none of its clips; text other than white space between ``<|/think|>`` or a
# ``<|/gen|>`` and what follows; a duration other than a plain positive decimal (``1e1``, ``+5``,
# ``5_0``, ``0``, ``inf``); a stop before the first clip; and runs past the bounds below. The bounds
# make every part end: a model that wants a token the grammar forbids (``</timestamp>`` with no
# ``<timestamp>`` before it) writes text instead, and without a bound it can write text until the
# token budget runs out, leaving no clip. At a bound the next token of the clip is forced.
MAX_REASONING_CHARS = 4000    # about the whole token budget of English text
MAX_CAPTION_CHARS = 256       # a caption is a sound event's description
MAX_TAIL_CHARS = 64           # text between </timestamp> and <t5> (the parser adds it to the caption)
MAX_SPACE_CHARS = 8           # white space between the plan's parts
MAX_NUMBER_DIGITS = 6         # on each side of the decimal point

PLAN_START = "start"          # the first part, after the <|think|> prefill
PLAN_AFTER_T5 = "after_t5"    # after the forced <t5_*> run: the clip's <aud>
PLAN_AFTER_AUD = "after_aud"  # after the forced <aud_*> run: <|/gen|>, then another clip or the end
PLAN_PARTS = (PLAN_START, PLAN_AFTER_T5, PLAN_AFTER_AUD)

# A positive decimal: a non-zero digit before the point, or one after it; spaces around are read.
_D = f"[0-9]{{0,{MAX_NUMBER_DIGITS}}}"
_POSITIVE_NUMBER = f"/[ ]{{0,2}}({_D}[1-9]{_D}(\\.{_D})?|{_D}\\.{_D}[1-9]{_D})[ ]{{0,2}}/"


def plan_grammar(tok: "TokenIds", part: str) -> str:
    """The Lark grammar (llguidance) of one generate part; ``part`` is one of :data:`PLAN_PARTS`.

    - start: reasoning text, ``<|/think|>``, then the first clip up to its ``<t5>``;
    - after_t5: ``<aud>``;
    - after_aud: ``<|/gen|>``, then the next clip up to its ``<t5>``, or ``<|im_end|>`` /
      ``<|endoftext|>``.

    A clip is ``<|gen|>`` caption ``<timestamp>`` number ``</timestamp>`` [text] ``<t5>``; the
    engine stops at ``<t5>``, ``<aud>`` and the stop tokens, so each part ends where the grammar does.
    Text runs are bounded (``MAX_*``); text never holds an added token.
    """
    def t(i: int) -> str:
        return f"<[{int(i)}]>"

    clip = (f"clip: {t(tok.gen_open)} CAPTION? {t(tok.timestamp_open)} NUMBER {t(tok.timestamp_close)} TAIL? "
            f"{t(tok.t5_open)}")
    terminals = [f"REASONING: /(?s:.){{1,{MAX_REASONING_CHARS}}}/", f"CAPTION: /(?s:.){{1,{MAX_CAPTION_CHARS}}}/",
                 f"TAIL: /(?s:.){{1,{MAX_TAIL_CHARS}}}/", f"SPACE: /[ \\t\\r\\n]{{1,{MAX_SPACE_CHARS}}}/",
                 f"NUMBER: {_POSITIVE_NUMBER}"]
    if part == PLAN_START:
        rules = [f"start: REASONING? {t(tok.think_close)} SPACE? clip", clip]
    elif part == PLAN_AFTER_T5:
        rules = [f"start: {t(tok.aud_open)}"]
    elif part == PLAN_AFTER_AUD:
        rules = [f"start: {t(tok.gen_close)} SPACE? (clip | {t(tok.im_end)} | {t(tok.endoftext)})", clip]
    else:
        raise ValueError(f"plan grammar part must be one of {PLAN_PARTS}, got {part!r}")
    return "\n".join(rules + terminals) + "\n"


def plan_part(tok: "TokenIds", generated: Sequence[int]) -> str:
    """Which grammar the next generate part needs, from what is there so far (generated + forced)."""
    if not generated:
        return PLAN_START
    if generated[-1] == tok.t5_close:
        return PLAN_AFTER_T5
    if generated[-1] == tok.aud_close:
        return PLAN_AFTER_AUD
    raise ValueError("a generate part resumes only at the start or after a forced run")


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

# How a plan failure reads to a client: the model failed, not the server. Served as UNKNOWN (never
# INTERNAL); streams carry no status, so the client reads it from these words (model_failed).
MODEL_FAILED = "the model wrote no usable plan"


def model_failed(message: str) -> bool:
    """The error message says the model's output, not the server, failed the request."""
    return MODEL_FAILED in message


class PlanError(ValueError):
    """The generated text does not hold a usable plan. ``text`` is the decoded output, for logs."""

    def __init__(self, message: str, text: str = ""):
        super().__init__(message)
        self.text = text


class NoClipError(PlanError):
    """Not a single complete clip was generated."""


@dataclass(frozen=True)
class ClipSpan:
    """One complete clip, with positions relative to the start of the generated ids."""
    index: int
    caption: str                  # timestamp tag removed, stripped
    duration: float               # seconds, as the LLM wrote it
    gen_pos: int                  # position of <|gen|>
    t5_pos: int                   # first <t5_00000> position (N positions follow)
    aud_pos: int                  # first <aud_00000> position (M positions follow)
    end_pos: int                  # position of </aud>


@dataclass
class Plan:
    reasoning: str
    clips: list[ClipSpan]
    dropped: list[str] = field(default_factory=list)   # why trailing clips were dropped
    finished: bool = False        # a stop token (or the end of the clips) was seen

    @property
    def total_duration(self) -> float:
        return sum(c.duration for c in self.clips)


def split_timestamp(text: str) -> tuple[str, float | None]:
    """The reference's rule: the first ``<timestamp>…</timestamp>`` is cut out and parsed."""
    start = text.find("<timestamp>")
    end = text.find("</timestamp>")
    if start == -1 or end == -1 or end < start:
        return text.strip(), None
    inner = text[start + len("<timestamp>"):end]
    content = (text[:start] + text[end + len("</timestamp>"):]).strip()
    try:
        return content, float(inner.strip())
    except ValueError:
        return content, None


def _index(ids: Sequence[int], value: int, start: int, stop: int | None = None) -> int:
    stop = len(ids) if stop is None else stop
    for i in range(start, stop):
        if ids[i] == value:
            return i
    return -1


def parse_clip_at(ids: Sequence[int], g: int, tok: TokenIds, decode: Callable[[Sequence[int]], str],
                  index: int) -> tuple[ClipSpan | None, str]:
    """Parse the clip whose ``<|gen|>`` is at ``g``. Returns (clip, "") or (None, reason)."""
    n, m = tok.n, tok.m
    t5 = _index(ids, tok.t5_open, g + 1)
    nxt = _index(ids, tok.gen_open, g + 1)
    if t5 == -1 or (nxt != -1 and nxt < t5):
        return None, f"clip {index}: no <t5> after its caption"
    if list(ids[t5 + 1:t5 + 2 + n]) != tok.forced_t5():
        return None, f"clip {index}: incomplete <t5> run"
    aud = t5 + n + 2
    if aud >= len(ids) or ids[aud] != tok.aud_open:
        return None, f"clip {index}: no <aud> after </t5>"
    if list(ids[aud + 1:aud + 2 + m]) != tok.forced_aud():
        return None, f"clip {index}: incomplete <aud> run"
    caption, duration = split_timestamp(decode(ids[g + 1:t5]))
    if duration is None:
        return None, f"clip {index}: missing or unreadable <timestamp>"
    if not (duration == duration) or duration in (float("inf"), float("-inf")) or duration <= 0:
        return None, f"clip {index}: duration {duration} is not a positive number"
    return ClipSpan(index, caption, duration, g, t5 + 1, aud + 1, aud + m + 1), ""


def parse_plan(ids: Sequence[int], tok: TokenIds, decode: Callable[[Sequence[int]], str]) -> Plan:
    """Parse generated ids (without the prompt) into clips.

    - A trailing clip that is incomplete (cut by the token limit) is dropped and reported.
    - A malformed clip followed by more clips is an error (:class:`PlanError`): the plan is not
      what the model meant, and silently skipping a middle clip would shift the story.
    - No complete clip at all raises :class:`NoClipError`.
    """
    ids = list(ids)
    stop = len(ids)
    finished = False
    for i, t in enumerate(ids):
        if t in tok.stop_ids:
            stop, finished = i, True
            break
    body = ids[:stop]
    think_end = _index(body, tok.think_close, 0)
    reasoning = decode(body[:think_end]) if think_end != -1 else decode(body[:_first_gen(body, tok)])
    starts = [i for i, t in enumerate(body) if t == tok.gen_open]
    clips: list[ClipSpan] = []
    dropped: list[str] = []
    for k, g in enumerate(starts):
        clip, why = parse_clip_at(body, g, tok, decode, k)
        if clip is not None:
            clips.append(clip)
            continue
        if k == len(starts) - 1:
            dropped.append(why + (" (cut by the token limit)" if not finished else ""))
        else:
            raise PlanError(f"malformed plan: {why}", text=decode(body))
    if not clips:
        reason = "; ".join(dropped) if dropped else "no <|gen|> clip in the output"
        raise NoClipError(f"the LLM wrote no complete clip ({reason})", text=decode(body))
    return Plan(reasoning=reasoning.strip(), clips=clips, dropped=dropped, finished=finished)


def _first_gen(ids: Sequence[int], tok: TokenIds) -> int:
    i = _index(ids, tok.gen_open, 0)
    return len(ids) if i == -1 else i
