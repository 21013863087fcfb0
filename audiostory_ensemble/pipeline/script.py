"""Script mode (video dubbing): the caller gives the timeline, the LLM is teacher-forced through it.

``SEGMENTS`` is a JSON list of ``{"start": s, "end": s, "caption": "..."}`` (seconds). The plan is
not generated: after the ``<|think|>`` prefill the assistant turn is forced to

    <|/think|><|gen|>{caption}<timestamp>{end-start}</timestamp><t5>…</t5><aud>…</aud><|/gen|> … <|im_end|>

and one pooling pass over prompt + forced ids yields every clip's bridging hidden states (the model
writes no reasoning: there is nothing for it to decide). Rendering is **timeline-exact**:

- clip k is placed at ``round(start_k * 32000)``; the story is ``max(TOTAL_DURATION if given,
  last end)`` long; gaps (and a lead-in before the first segment) are silence;
- two segments that touch (the next starts where this one ends, within half a sample at 32 kHz)
  and whose second is at least the crossfade (3 s) long are crossfaded as the reference joins
  clips: the first is rendered 3 s longer and fades out over the second's first 3 s while the
  second fades in, so the boundary lands on the given time; otherwise the join is hard;
- a segment that does not fit the DiT's window (29.95 s, counting the 3 s tail when it is
  crossfaded into the next) is split into the fewest equal parts of at most window - 3 s; the
  parts share the caption and are crossfaded into one another.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ..model.config import CROSSFADE_S, OUTPUT_SAMPLE_RATE, VAE_SAMPLE_RATE, WAVE_SAMPLES
from ..model.grammar import clip_text, control_token_in
from ..model.post import render_seconds

WINDOW_S = WAVE_SAMPLES / VAE_SAMPLE_RATE      # what one DiT clip can hold: 29.95 s
MIN_SEGMENT_S = 0.1
MAX_SEGMENTS = 64
MAX_CAPTION_BYTES = 512


class ScriptError(ValueError):
    """A bad ``SEGMENTS`` value; the message names the segment and the rule."""


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    caption: str

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class ScriptClip:
    """One clip to render: a segment, or one part of a split segment."""
    index: int
    segment: int           # which input segment it renders
    caption: str
    start_s: float
    duration_s: float
    fade_in: bool          # crossfaded from the previous clip
    fade_out: bool         # rendered CROSSFADE_S longer, crossfaded into the next clip

    @property
    def render_s(self) -> float:
        return render_seconds(self.duration_s, self.fade_out)


def _number(seg: dict, key: str, i: int) -> float:
    v = seg.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ScriptError(f"SEGMENTS[{i}].{key} must be a number of seconds, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ScriptError(f"SEGMENTS[{i}].{key} must be finite, got {v}")
    return v


def parse_segments(raw: str, max_total_s: float) -> list[Segment]:
    """Validate ``SEGMENTS`` JSON: a non-empty list, sorted, non-overlapping, finite, captions given."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ScriptError(f"SEGMENTS is not valid JSON: {e}") from None
    if not isinstance(data, list) or not data:
        raise ScriptError('SEGMENTS must be a non-empty JSON list of {"start": s, "end": s, "caption": "..."}')
    if len(data) > MAX_SEGMENTS:
        raise ScriptError(f"SEGMENTS has {len(data)} segments; the limit is {MAX_SEGMENTS}")
    out: list[Segment] = []
    for i, seg in enumerate(data):
        if not isinstance(seg, dict):
            raise ScriptError(f"SEGMENTS[{i}] must be an object with start, end and caption")
        unknown = sorted(set(seg) - {"start", "end", "caption"})
        if unknown:
            raise ScriptError(f"SEGMENTS[{i}] has unknown field(s) {unknown}; allowed: start, end, caption")
        start, end = _number(seg, "start", i), _number(seg, "end", i)
        caption = seg.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise ScriptError(f"SEGMENTS[{i}].caption must be non-empty text")
        caption = caption.strip()
        if len(caption.encode("utf-8")) > MAX_CAPTION_BYTES:
            raise ScriptError(f"SEGMENTS[{i}].caption is longer than {MAX_CAPTION_BYTES} bytes")
        bad = control_token_in(caption)
        if bad is not None:
            raise ScriptError(f"SEGMENTS[{i}].caption must not contain the model's control token {bad!r}")
        if start < 0:
            raise ScriptError(f"SEGMENTS[{i}].start must be >= 0, got {start}")
        if end - start < MIN_SEGMENT_S:
            raise ScriptError(f"SEGMENTS[{i}] must last at least {MIN_SEGMENT_S} s (end > start), "
                              f"got start {start}, end {end}")
        if out and start < out[-1].end - 0.5 / OUTPUT_SAMPLE_RATE:
            which = "starts before the previous one" if start < out[-1].start else "overlaps the previous one"
            raise ScriptError(f"SEGMENTS[{i}] {which} (start {start} < previous end {out[-1].end}); "
                              "segments must be sorted and must not overlap")
        if end > max_total_s:
            raise ScriptError(f"SEGMENTS[{i}].end is {end} s; the story limit is {max_total_s} s")
        out.append(Segment(start, end, caption))
    return out


def _touches(a_end: float, b_start: float) -> bool:
    return abs(b_start - a_end) * OUTPUT_SAMPLE_RATE < 0.5


def plan_clips(segments: list[Segment], crossfade_s: float = CROSSFADE_S,
               window_s: float = WINDOW_S) -> list[ScriptClip]:
    """The clips to render, split where a segment does not fit the window, with their joins."""
    parts: list[tuple[int, str, float, float]] = []   # (segment, caption, start, duration)
    for i, seg in enumerate(segments):
        nxt = segments[i + 1] if i + 1 < len(segments) else None
        tail = crossfade_s if nxt is not None and _touches(seg.end, nxt.start) else 0.0
        d = seg.duration
        n = 1 if d + tail <= window_s else math.ceil(d / (window_s - crossfade_s))
        for j in range(n):
            parts.append((i, seg.caption, seg.start + d * j / n, d / n))
    clips: list[ScriptClip] = []
    for k, (seg, caption, start, dur) in enumerate(parts):
        prev = parts[k - 1] if k else None
        nxt = parts[k + 1] if k + 1 < len(parts) else None
        fade_in = prev is not None and _touches(prev[2] + prev[3], start) and dur >= crossfade_s
        fade_out = nxt is not None and _touches(start + dur, nxt[2]) and nxt[3] >= crossfade_s
        clips.append(ScriptClip(k, seg, caption, start, dur, fade_in, fade_out))
    return clips


def format_seconds(d: float) -> str:
    """How a forced ``<timestamp>`` reads: the shortest form of ``d`` to 1/100 s (``12.5``, ``3.0``)."""
    return str(round(float(d), 2))


def forced_text(clips: list[ScriptClip], n: int, m: int) -> str:
    """The assistant's forced turn after ``<|think|>``, ``<|im_end|>`` included."""
    body = "".join(clip_text(c.caption, format_seconds(c.duration_s), n, m) for c in clips)
    return "<|/think|>" + body + "<|im_end|>"


def default_instruction(captions: list[str]) -> str:
    """The caption the instruction is built from when the request has no ``INSTRUCTION``: the
    captions in order (the parts of a split segment once), joined by ", then "."""
    out: list[str] = []
    for c in captions:
        c = c.strip().rstrip(".")
        if not out or out[-1] != c:
            out.append(c)
    return ", then ".join(out) + "."


def instruction_caption(instruction: str, clips: list[ScriptClip]) -> str:
    """What the instruction is built from: ``INSTRUCTION`` if given, else the clips' captions."""
    return instruction.strip() or default_instruction([c.caption for c in clips])


def story_length(segments: list[Segment], total_duration: float | None) -> float:
    """The timeline's length: the last segment's end, or ``TOTAL_DURATION`` when given and longer."""
    end = segments[-1].end
    return end if total_duration is None else max(end, float(total_duration))
