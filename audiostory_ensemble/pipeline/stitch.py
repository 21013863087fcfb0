"""Collect streamed clips (in any order) and join them into the story.

Used by the client and by the ``audiostory_full`` model, so both stitch exactly alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from ..model.config import CROSSFADE_S, OUTPUT_SAMPLE_RATE
from ..model.post import _ramps as post_ramps
from ..model.post import crossfade, place_on_timeline, timeline_segment


@dataclass
class Clip:
    index: int
    caption: str
    audio: np.ndarray      # [2, T] at 32 kHz
    start_s: float
    duration_s: float
    is_last: bool
    plan: dict = field(default_factory=dict)   # the clip's PLAN entry (empty from old servers)
    encoded: bytes = b""   # CLIP_ENCODED: the clip as a file in the requested AUDIO_FORMAT (empty for pcm)
    mime: str = ""

    @classmethod
    def from_outputs(cls, get) -> "Clip":
        """A clip from a response's outputs (``get(name)`` -> array or None), as any client reads them."""
        from .. import interface as I

        plan, encoded, mime = get(I.CLIP_PLAN.name), get(I.CLIP_ENCODED.name), get(I.MIME_TYPE.name)
        audio = get(I.CLIP_AUDIO.name)          # not asked for: none
        text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
        return cls(int(get(I.CLIP_INDEX.name)[0]), text(get(I.CAPTION.name)[0]),
                   np.zeros((2, 0), np.float32) if audio is None else np.asarray(audio, dtype=np.float32),
                   float(get(I.CLIP_START_S.name)[0]),
                   float(get(I.CLIP_DURATION_S.name)[0]), bool(get(I.IS_LAST.name)[0]),
                   json.loads(plan[0]) if plan is not None else {},
                   bytes(encoded[0]) if encoded is not None else b"", text(mime[0]) if mime is not None else "")


@dataclass
class Story:
    audio: np.ndarray
    clips: list[Clip]
    sample_rate: int = OUTPUT_SAMPLE_RATE
    encoded: bytes = b""   # ``audiostory_full``'s AUDIO_ENCODED (AUDIO is then empty)
    mime: str = ""

    @property
    def plan(self) -> dict:
        """The whole plan (the ``PLAN`` output of ``audiostory_full``)."""
        timeline = bool(self.clips and self.clips[0].plan.get("timeline"))
        mode = self.clips[0].plan.get("mode") if self.clips else None
        return {"mode": mode or ("script" if timeline else "story"),
                "duration": round(self.audio.shape[1] / self.sample_rate, 6),
                "clips": [c.plan or {"index": c.index, "caption": c.caption, "start": c.start_s,
                                     "duration": c.duration_s} for c in self.clips]}

    def plan_json(self) -> str:
        return json.dumps(self.plan)

    @property
    def captions(self) -> list[str]:
        return [c.caption for c in self.clips]

    @property
    def starts(self) -> list[float]:
        return [c.start_s for c in self.clips]

    @property
    def durations(self) -> list[float]:
        return [c.duration_s for c in self.clips]


class StoryAssembler:
    """Clips may arrive out of order under load: the index is authoritative."""

    def __init__(self):
        self.clips: dict[int, Clip] = {}
        self.count: int | None = None     # known once the last clip arrived

    def add(self, index: int, caption: str, audio: np.ndarray, start_s: float, duration_s: float,
            is_last: bool, plan: dict | str | bytes | None = None) -> Clip:
        if index in self.clips:
            raise ValueError(f"clip {index} arrived twice")
        if isinstance(plan, (str, bytes)):
            plan = json.loads(plan)
        clip = Clip(index, caption, np.asarray(audio, dtype=np.float32), start_s, duration_s, is_last,
                    dict(plan or {}))
        self.clips[index] = clip
        if is_last:
            self.count = index + 1
        return clip

    def add_clip(self, clip: Clip) -> Clip:
        """A streamed :class:`Clip` (the client's), with its plan entry."""
        return self.add(clip.index, clip.caption, clip.audio, clip.start_s, clip.duration_s, clip.is_last, clip.plan)

    @property
    def complete(self) -> bool:
        return self.count is not None and all(i in self.clips for i in range(self.count))

    def finish(self, stream_ended: bool = True) -> Story:
        """Join the clips. A stream that ended without a clip marked last (the planner dropped a
        trailing clip cut by the token limit) ends with the highest index received."""
        if self.count is None and stream_ended and self.clips:
            self.count = max(self.clips) + 1
        if self.count is None:
            raise ValueError(f"no last clip among {len(self.clips)} received")
        missing = [i for i in range(self.count) if i not in self.clips]
        if missing:
            raise ValueError(f"clips {missing} of {self.count} never arrived")
        extra = sorted(i for i in self.clips if i >= self.count)
        if extra:
            raise ValueError(f"clips {extra} arrived after the last clip ({self.count - 1})")
        ordered = [self.clips[i] for i in range(self.count)]
        timeline = ordered[0].plan.get("timeline", 0)
        if timeline:   # script mode: every clip at its start, silence in the gaps
            # Times from the JSON plan (float64): CLIP_START_S is FP32, a fraction of a sample off.
            audio = place_on_timeline([c.audio for c in ordered], [float(c.plan["start"]) for c in ordered],
                                      [float(c.plan["duration"]) for c in ordered],
                                      [bool(c.plan.get("fade_in")) for c in ordered],
                                      [bool(c.plan.get("fade_out")) for c in ordered], float(timeline))
            return Story(audio, ordered)
        return Story(crossfade([c.audio for c in ordered], OUTPUT_SAMPLE_RATE), ordered)


class StoryStream:
    """The story in order as its clips land (in any order): after each clip, the part of the story
    that no later clip can change, equal sample for sample to :meth:`StoryAssembler.finish`.

    Joined clips (story, continuation): everything but the last ``int(CROSSFADE_S * sr)`` samples
    of the clips so far, which the next clip fades in over (or follows, if it is shorter than the
    fade: either way the samples before stay as they are). Script mode: every clip at its start on
    the timeline, so the story is final up to where the latest clip's slot ends (its fade into the
    next clip excepted: segments are sorted and never overlap), and to the timeline's end once the
    last clip is in. The arithmetic is :func:`post.crossfade`'s and :func:`post.place_on_timeline`'s,
    operation for operation, on the same samples."""

    def __init__(self, sr: int = OUTPUT_SAMPLE_RATE, transition_s: float = CROSSFADE_S):
        self.sr, self.transition_s = sr, transition_s
        self.ts = max(0, int(transition_s * sr))
        self.waiting: dict[int, Clip] = {}
        self.next = 0                 # the next clip index to join
        self.count: int | None = None
        self.emitted = 0              # samples handed out
        self.pending = np.zeros((2, 0), np.float32)   # samples after ``emitted`` that may still change
        self.joined = 0               # joined mode: the running result's length (emitted + pending)
        self.timeline = 0.0

    @property
    def done(self) -> bool:
        return self.count is not None and self.next >= self.count

    def add(self, clip: Clip) -> np.ndarray:
        """A clip (any order): returns the story's samples that became final, ``[C, n]`` (n may be 0)."""
        if clip.index in self.waiting or clip.index < self.next:
            raise ValueError(f"clip {clip.index} arrived twice")
        if self.count is not None and clip.index >= self.count:
            raise ValueError(f"clip {clip.index} arrived after the last clip ({self.count - 1})")
        self.waiting[clip.index] = clip
        if clip.is_last:
            self.count = clip.index + 1
        out = []
        while self.next in self.waiting:
            c = self.waiting.pop(self.next)
            if self.next == 0:
                self.timeline = float(c.plan.get("timeline", 0) or 0)
            self.next += 1
            out.append(self._place(c) if self.timeline else self._join(c))
        if self.done:
            out.append(self._flush())
        return _concat(out, self.pending.shape[0])

    def finish(self) -> np.ndarray:
        """The stream ended: whatever is still held (a story whose last clip was not marked last
        ends with the highest index received, as :meth:`StoryAssembler.finish`)."""
        if self.waiting:
            missing = [i for i in range(self.next, max(self.waiting)) if i not in self.waiting]
            raise ValueError(f"clips {missing or [self.next]} never arrived")
        if self.count is None:
            self.count = self.next
        return self._flush() if self.next or self.pending.shape[1] else np.zeros((2, 0), np.float32)

    def _flush(self) -> np.ndarray:
        if self.timeline:
            total = int(round(self.timeline * self.sr))
            self._extend(total)
            return self._emit(total)
        return self._emit(self.emitted + self.pending.shape[1])

    # joined (crossfade) -----------------------------------------------------------------------
    def _join(self, c: Clip) -> np.ndarray:
        a = np.asarray(c.audio, dtype=np.float32)
        a = a[None] if a.ndim == 1 else a
        ts = self.ts
        hard = self.next == 1 or ts == 0 or self.joined < ts or a.shape[1] < ts   # post.crossfade's rule
        if hard:       # the first clip, or a plain join (either side shorter than the fade)
            self.pending = np.concatenate([self.pending, a], axis=1)
        else:
            fade_out, fade_in = post_ramps(ts)
            merged = self.pending[:, -ts:] * fade_out + a[:, :ts] * fade_in
            self.pending = np.concatenate([self.pending[:, :-ts], merged, a[:, ts:]], axis=1)
        self.joined += a.shape[1] - (0 if hard else ts)
        return self._emit(self.emitted + max(0, self.pending.shape[1] - ts))

    # script mode (timeline) -------------------------------------------------------------------
    def _extend(self, end: int) -> None:
        have = self.emitted + self.pending.shape[1]
        if end > have:
            self.pending = np.concatenate([self.pending, np.zeros((self.pending.shape[0], end - have), np.float32)],
                                          axis=1)

    def _place(self, c: Clip) -> np.ndarray:
        n_total = int(round(self.timeline * self.sr))
        s0, s_end, seg = timeline_segment(c.audio, float(c.plan["start"]), float(c.plan["duration"]),
                                          bool(c.plan.get("fade_in")), bool(c.plan.get("fade_out")), self.sr,
                                          self.transition_s, self.pending.shape[0])
        if s0 < self.emitted:
            raise ValueError(f"clip {c.index} starts at sample {s0}, before the story's final part ({self.emitted})")
        end = min(s0 + seg.shape[1], n_total)
        if end > s0:
            self._extend(end)
            self.pending[:, s0 - self.emitted:end - self.emitted] += seg[:, : end - s0]
        return self._emit(max(self.emitted, min(s_end, n_total)))

    def _emit(self, upto: int) -> np.ndarray:
        k = upto - self.emitted
        if k <= 0:
            return np.zeros((self.pending.shape[0], 0), np.float32)
        out, self.pending = self.pending[:, :k], self.pending[:, k:]
        self.emitted = upto
        return np.ascontiguousarray(out)


def _concat(parts: list[np.ndarray], channels: int) -> np.ndarray:
    parts = [p for p in parts if p.shape[1]]
    if not parts:
        return np.zeros((channels or 2, 0), np.float32)
    return parts[0] if len(parts) == 1 else np.ascontiguousarray(np.concatenate(parts, axis=1))
