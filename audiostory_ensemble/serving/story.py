"""The front door's story loop as a state machine, without Triton.

``audiostory_stream`` runs a story as streams: the plan's (one response per clip from ``llm``) and,
for each planned clip, the clip's (``bridge`` then ``dit_sampler``). Every response, stream end and
idle tick becomes an event here; :class:`StoryLoop` says what to do with it (start a clip's stream,
send a clip to the client, stop the story and why), and the model does it. The model classifies
responses (error, plan entry, clip, empty) because that needs ``pb_utils``; nothing else is decided
there.
"""

from __future__ import annotations

from dataclasses import dataclass

PLAN = "plan"          # the tag of the plan's stream; clip streams are tagged "clip<k>"

# What a response is (the model tells): a plan entry, a clip, an error, or an empty response
# (a stream's final flag).
ENTRY, CLIP, ERROR, EMPTY = "entry", "clip", "error", "empty"


@dataclass(frozen=True)
class Action:
    kind: str                 # "start_clip" | "send" | "stop" | "wait"
    tag: str = ""             # start_clip: the new clip stream's tag
    reason: str = ""          # stop: "done" | "cancelled" | "timeout" | "error"
    message: str = ""         # stop with "error"/"timeout": what the client is told


WAIT = Action("wait")


class StoryLoop:
    """The story's state: open streams, clips started, why it stopped (once)."""

    def __init__(self, llm: str, sampler: str, timeout_s: float, started_at: float):
        self.llm, self.sampler = llm, sampler
        self.timeout_s = timeout_s
        self.deadline = started_at + timeout_s
        self.open_streams = 1          # the plan's; one more per clip
        self.clips = 0
        self.stopped: Action | None = None

    def _stop(self, reason: str, message: str = "") -> Action:
        self.stopped = Action("stop", reason=reason, message=message)
        return self.stopped

    def idle(self, now: float, cancelled: bool) -> Action:
        """No event within the poll interval: a client that went away, or the story's timeout."""
        if cancelled:
            return self._stop("cancelled")
        if now > self.deadline:
            return self._stop("timeout", f"story not finished within story_timeout_s = {self.timeout_s:g} s; "
                                         "cancelled")
        return WAIT

    def stream_ended(self) -> Action:
        self.open_streams -= 1
        return self._stop("done") if self.open_streams == 0 else WAIT

    def response(self, tag: str, kind: str, cancelled: bool = False, error: str = "") -> Action:
        """A response on stream ``tag``: a plan entry starts a clip stream, a clip goes to the
        client (unless the client has gone), an error stops the story with the stage named."""
        if kind == ERROR:
            stage = self.llm if tag == PLAN else self.sampler
            return self._stop("error", error if stage in error else f"{stage}: {error}")
        if kind == ENTRY and tag == PLAN:
            self.open_streams += 1
            self.clips += 1
            return Action("start_clip", tag=f"clip{self.clips - 1}")
        if kind == CLIP and tag != PLAN:
            return self._stop("cancelled") if cancelled else Action("send")
        return WAIT
