"""Subtitles for the deaf and hard of hearing (SDH) -> a script-mode timeline (``SEGMENTS``).

SDH tracks already describe a film's sounds as timed cues: ``[door creaks]``, ``(dog barking)``,
``[THUNDER RUMBLING]``. This module reads such a track (SRT or WebVTT, through ``pysubs2``) and turns
it into the segments the server's script mode renders, by these rules (``CueRules`` holds the
options; the README's dubbing section states them for users):

1. **What becomes a caption.** Every ``[...]`` or ``(...)`` group in a cue is a sound description;
   a cue's descriptions are joined with ", " into its caption. Speaker labels (``JOHN:``,
   ``MAN 2:``, ``>>``) and dialogue dashes are dropped. Dialogue (text outside brackets) is dropped,
   or kept as ``someone says "..."`` with ``dialogue=True``. Lines marked with music notes (lyrics)
   are dropped, or kept as ``music`` / ``singing "..."`` with ``music=True``. A caption written
   in capitals only is lower-cased; whitespace is collapsed. A cue left with no caption is dropped.
2. **Order and the video's end.** Cues are taken in order of start time. A cue that starts at or
   after the end of the video is dropped; one that runs past it ends there.
3. **Overlapping or touching cues.** Two cues with the same caption that overlap or touch become
   one segment spanning both. Two cues with different captions that overlap: with
   ``overlap="merge"`` (default) they become one segment spanning both, the captions joined with
   ", " (both sounds are heard at once); with ``overlap="clip"`` the earlier one ends where the
   later one starts (what it had after the later one's end is dropped). Touching cues with
   different captions stay apart: the server crossfades them (when the second lasts 3 s or more).
4. **Short cues.** A segment shorter than ``min_duration_s`` (default 1 s) is, with
   ``short="widen"`` (default), lengthened at its end up to the next segment's start (or the video's
   end), then at its start back to the previous segment's end (or 0); one that still lasts less
   than the server's minimum (0.1 s) is dropped. With ``short="drop"`` it is dropped.
5. **Validation.** The result is checked with the server's own ``SEGMENTS`` validator; a refusal
   names the subtitle line(s) of the cue(s) behind the offending segment.

Line numbers are those of the cues' timing lines (``00:00:01,000 --> ...``), 1-based.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from audiostory_ensemble.pipeline.script import MIN_SEGMENT_S, ScriptError, parse_segments

OVERLAP_RULES = ("merge", "clip")
SHORT_RULES = ("widen", "drop")

_GROUP = re.compile(r"\[([^\]]*)\]|\(([^)]*)\)")
_SPEAKER = re.compile(r"^(?:>>+\s*|[A-Z0-9][A-Z0-9 .'\-]{0,40}:\s*)")
_DASH = re.compile(r"^[-\u2010-\u2015]\s*")
_NOTES = "\u266a\u266b\u266c\u266f#"          # ♪ ♫ ♬ ♯ and the '#' some tracks use for lyrics
_TIMING = re.compile(r"-->")


class SubtitleError(ValueError):
    """A subtitle file that cannot become a valid script; the message names the line and the rule."""


@dataclass(frozen=True)
class CueRules:
    dialogue: bool = False
    music: bool = False
    overlap: str = "merge"
    min_duration_s: float = 1.0
    short: str = "widen"

    def __post_init__(self):
        if self.overlap not in OVERLAP_RULES:
            raise ValueError(f"overlap must be one of {OVERLAP_RULES}, got {self.overlap!r}")
        if self.short not in SHORT_RULES:
            raise ValueError(f"short must be one of {SHORT_RULES}, got {self.short!r}")
        if not self.min_duration_s >= MIN_SEGMENT_S:
            raise ValueError(f"min_duration_s must be >= {MIN_SEGMENT_S} s (the server's minimum), "
                             f"got {self.min_duration_s}")


@dataclass(frozen=True)
class Cue:
    line: int          # the timing line's number in the file (0 when unknown)
    start: float       # seconds
    end: float
    text: str          # plain text, lines separated by "\n"


@dataclass(frozen=True)
class Dropped:
    line: int
    text: str
    reason: str


@dataclass
class _Span:
    start: float
    end: float
    caption: str
    lines: list[int] = field(default_factory=list)


@dataclass
class Script:
    """The derived timeline: ``segments`` (the ``SEGMENTS`` value), the cue lines behind each
    segment, and every cue that was dropped with the reason."""
    segments: list[dict]
    lines: list[list[int]]
    dropped: list[Dropped]

    def json(self) -> str:
        return json.dumps(self.segments)


def read_cues(path: str | Path | None = None, *, text: str | None = None) -> list[Cue]:
    """The cues of an SRT or WebVTT file (or its ``text``), in file order, as plain text."""
    import pysubs2

    if (path is None) == (text is None):
        raise ValueError("give a path or text")
    if text is None:
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            text = Path(path).read_text(encoding="latin-1")
    try:
        subs = pysubs2.SSAFile.from_string(text)
    except Exception as e:  # noqa: BLE001 - pysubs2 raises several types for unreadable files
        raise SubtitleError(f"{path or 'subtitles'}: not a subtitle file pysubs2 can read "
                            f"({type(e).__name__}: {e})") from None
    events = [e for e in subs if not e.is_comment]
    timing_lines = [i + 1 for i, line in enumerate(text.splitlines()) if _TIMING.search(line)]
    if len(timing_lines) != len(events):          # not SRT/VTT, or cues the reader merged: no lines
        timing_lines = [0] * len(events)
    return [Cue(n, e.start / 1000.0, e.end / 1000.0, e.plaintext) for n, e in zip(timing_lines, events)]


def _clean(s: str) -> str:
    s = " ".join(s.split()).strip(" ,;:-")
    return s.lower() if s and not any(ch.islower() for ch in s) else s


def caption_of(text: str, rules: CueRules = CueRules()) -> tuple[str | None, str]:
    """A cue's caption by rule 1, or ``(None, why it has none)``."""
    parts: list[str] = []
    had_dialogue = had_music = False
    for raw in text.splitlines():
        line = _DASH.sub("", raw.strip())
        if any(n in line for n in _NOTES[:4]) or line.startswith("#"):
            had_music = True
            if rules.music:
                words = _clean(re.sub(f"[{_NOTES}]", " ", _GROUP.sub(" ", line)))
                parts.append(f'singing "{words}"' if words else "music")
            continue
        for square, round_ in _GROUP.findall(line):
            desc = _clean(square or round_)
            if desc:
                parts.append(desc)
        rest = _SPEAKER.sub("", _GROUP.sub(" ", line).strip())
        rest = " ".join(rest.split())
        if rest.strip(" .,!?;:-\"'"):
            had_dialogue = True
            if rules.dialogue:
                parts.append(f'someone says "{rest}"')
    caption = ", ".join(dict.fromkeys(p for p in parts if p))
    if caption:
        return caption, ""
    if had_dialogue:
        return None, "dialogue only (keep it with dialogue=True / --dialogue)"
    if had_music:
        return None, "music only (keep it with music=True / --music)"
    return None, "no sound description"


def _touch(a: float, b: float) -> bool:
    return abs(a - b) < 5e-4       # the files count in milliseconds


def script_from_cues(cues: list[Cue], length_s: float, rules: CueRules = CueRules()) -> Script:
    """Rules 1-5: the ``SEGMENTS`` for a video ``length_s`` seconds long."""
    dropped: list[Dropped] = []
    spans: list[_Span] = []
    for cue in sorted(cues, key=lambda c: c.start):
        caption, why = caption_of(cue.text, rules)
        if caption is None:
            dropped.append(Dropped(cue.line, cue.text, why))
            continue
        if cue.start >= length_s:
            dropped.append(Dropped(cue.line, cue.text, f"starts at {cue.start:g} s, at or after the "
                                                         f"video's end ({length_s:g} s)"))
            continue
        span = _Span(max(cue.start, 0.0), min(cue.end, length_s), caption, [cue.line])
        prev = spans[-1] if spans else None
        if prev is not None and (span.start < prev.end or _touch(span.start, prev.end)) \
                and (span.caption == prev.caption or (span.start < prev.end and rules.overlap == "merge")):
            prev.end = max(prev.end, span.end)
            if span.caption not in prev.caption.split(", "):
                prev.caption = f"{prev.caption}, {span.caption}"
            prev.lines += span.lines
            continue
        if prev is not None and span.start < prev.end:        # overlap, clip rule
            prev.end = span.start
            if prev.end - prev.start < MIN_SEGMENT_S:
                spans.pop()
                dropped.append(Dropped(prev.lines[0], prev.caption,
                                       f"clipped to {prev.end - prev.start:.3f} s by the overlapping "
                                       f"cue at line {cue.line}"))
        spans.append(span)
    kept: list[_Span] = []
    for i, span in enumerate(spans):
        if span.end - span.start < rules.min_duration_s:
            if rules.short == "drop":
                dropped.append(Dropped(span.lines[0], span.caption,
                                       f"shorter than {rules.min_duration_s:g} s (short='drop')"))
                continue
            limit = spans[i + 1].start if i + 1 < len(spans) else length_s
            span.end = min(span.start + rules.min_duration_s, max(limit, span.end))
            if span.end - span.start < rules.min_duration_s:
                floor = kept[-1].end if kept else 0.0
                span.start = max(span.end - rules.min_duration_s, min(floor, span.start))
            if span.end - span.start < MIN_SEGMENT_S:
                dropped.append(Dropped(span.lines[0], span.caption,
                                       f"no room to widen it to {MIN_SEGMENT_S:g} s between its neighbours"))
                continue
        kept.append(span)
    segments = [{"start": round(s.start, 3), "end": min(round(s.end, 3), length_s), "caption": s.caption}
                for s in kept]
    script = Script(segments, [s.lines for s in kept], dropped)
    if not segments:
        reasons = sorted({d.reason for d in dropped})
        raise SubtitleError(f"no cue describes a sound ({len(cues)} cue(s); dropped: {'; '.join(reasons) or 'none'})")
    validate(script, length_s)
    return script


def validate(script: Script, length_s: float) -> None:
    """The server's own ``SEGMENTS`` validator; a refusal is reported at the cue's line."""
    try:
        parse_segments(script.json(), max(length_s, script.segments[-1]["end"]))
    except ScriptError as e:
        m = re.search(r"SEGMENTS\[(\d+)\]", str(e))
        if m is None:
            raise SubtitleError(f"the script derived from the subtitles is refused: {e}") from None
        lines = script.lines[int(m.group(1))]
        where = "line " + ", ".join(str(n) for n in lines) if any(lines) else f"segment {m.group(1)}"
        raise SubtitleError(f"cue at {where}: {e}") from None


def script_from_file(path: str | Path, length_s: float, rules: CueRules = CueRules()) -> Script:
    try:
        return script_from_cues(read_cues(path), length_s, rules)
    except SubtitleError as e:
        raise SubtitleError(f"{path}: {e}") from None
