"""When a listener needs each clip: the deadlines the step scheduler serves.

A story plays from the moment its first clip is delivered. Clip 0 is due as early as possible (at
the story's arrival: it is late from the start, and earliest-deadline-first serves it before any
later clip that still has time). Clip k ≥ 1 is due when playback reaches its start on the story's
timeline (``ClipMeta.start_s``: the plan's durations and crossfades, or the script's placement
with its gaps), counted from the first clip's delivery; until that delivery, from the story's
arrival, which is earlier than it can be (a deadline only moves later once it is known).

A clip delivered after it was due is a stall: the listener hears silence for the difference, and
playback (so every later deadline) moves back by as much. The clock keeps that account per story,
bounded: a story is forgotten after its last clip, or when ``max_stories`` newer ones came.
"""

from __future__ import annotations

from collections import OrderedDict

from .records import ClipMeta


class PlaybackClock:
    def __init__(self, max_stories: int = 4096):
        self.max_stories = max_stories
        # plan id -> wall time playback reaches the timeline's 0 s: the first clip's delivery,
        # moved back by every stall since.
        self._origin: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._origin)

    def due(self, meta: ClipMeta) -> float:
        """Wall time (``time.time()``) by which the listener needs ``meta``'s clip."""
        if meta.index == 0:
            return meta.arrival
        return self._origin.get(meta.plan_id, meta.arrival) + meta.start_s

    def delivered(self, meta: ClipMeta, at: float) -> float:
        """Record the clip's delivery at ``at``; returns the seconds of silence it caused (0 when
        it came in time, or before the first clip, when nothing plays yet). The first clip's
        delivery starts the story's playback."""
        silence = 0.0
        if meta.index == 0:
            origin = at
        elif meta.plan_id not in self._origin:
            return 0.0
        else:
            origin = self._origin[meta.plan_id]
            silence = max(0.0, at - (origin + meta.start_s))
            origin += silence
        if meta.is_last:
            self._origin.pop(meta.plan_id, None)
            return silence
        self._origin[meta.plan_id] = origin
        self._origin.move_to_end(meta.plan_id)
        while len(self._origin) > self.max_stories:
            self._origin.popitem(last=False)
        return silence

    def forget(self, plan_id: str) -> None:
        self._origin.pop(plan_id, None)
