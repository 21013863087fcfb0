"""Collect streamed clips (in any order) and join them into the story.

Used by the client and by the ``audiostory_full`` model, so both stitch exactly alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from ..model.config import OUTPUT_SAMPLE_RATE
from ..model.post import crossfade, place_on_timeline


@dataclass
class Clip:
    index: int
    caption: str
    audio: np.ndarray      # [2, T] at 32 kHz
    start_s: float
    duration_s: float
    is_last: bool
    plan: dict = field(default_factory=dict)   # the clip's PLAN entry (empty from old servers)


@dataclass
class Story:
    audio: np.ndarray
    clips: list[Clip]
    sample_rate: int = OUTPUT_SAMPLE_RATE

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
