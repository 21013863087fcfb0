"""The front door's story loop as a state machine, without Triton.

``audiostory_stream`` runs a story as streams: the plan's (one response per clip from ``llm``) and,
for each planned clip, the clip's (``bridge`` then ``dit_sampler``). Every response, stream end and
idle tick becomes an event here; :class:`StoryLoop` says what to do with it (start a clip's stream,
send a clip to the client, stop the story and why), and the model does it. The model classifies
responses (error, plan entry, clip, empty) because that needs ``pb_utils``; nothing else is decided
there.

A stage that dies ends the stories that were waiting on it, as UNAVAILABLE naming the stage: the
plan's stream waits on ``llm``, a clip's stream on ``dit_sampler`` (which calls the DiT step and
the VAE), and a dead decoupled stage never answers, so the loop also reads the stage board at every
idle tick (a stage whose restart count moved since the story began has lost the story's requests).
"""

from __future__ import annotations

from dataclasses import dataclass

from .stages import Stage, StageDown, down_stage

PLAN = "plan"          # the tag of the plan's stream; clip streams are tagged "clip<k>"

# What a response is (the model tells): a plan entry, a clip, an error, or an empty response
# (a stream's final flag).
ENTRY, CLIP, ERROR, EMPTY = "entry", "clip", "error", "empty"


@dataclass(frozen=True)
class Action:
    kind: str                 # "start_clip" | "send" | "stop" | "wait"
    tag: str = ""             # start_clip: the new clip stream's tag
    reason: str = ""          # stop: "done" | "cancelled" | "timeout" | "error" | "unavailable"
    message: str = ""         # stop with "error"/"timeout"/"unavailable": what the client is told
    stage: str = ""           # stop with "unavailable": the stage that is down


WAIT = Action("wait")


class StoryLoop:
    """The story's state: open streams, clips started, why it stopped (once)."""

    def __init__(self, llm: str, sampler: str, timeout_s: float, started_at: float,
                 stages: dict[str, Stage] | None = None):
        self.llm, self.sampler = llm, sampler
        self.timeout_s = timeout_s
        self.deadline = started_at + timeout_s
        self.plan_open = True          # the plan's stream
        self.clips_open = 0            # the clips' streams
        self.clips = 0
        self.stopped: Action | None = None
        # The restart count of each stage the story's open streams wait on, as the oldest opened.
        self.restarts: dict[str, int] = {}
        self._baseline(llm, stages)

    def _baseline(self, name: str, stages: dict[str, Stage] | None) -> None:
        if stages and name in stages:
            self.restarts[name] = stages[name].restarts

    def _stop(self, reason: str, message: str = "", stage: str = "") -> Action:
        self.stopped = Action("stop", reason=reason, message=message, stage=stage)
        return self.stopped

    def idle(self, now: float, cancelled: bool, stages: dict[str, Stage] | None = None) -> Action:
        """No event within the poll interval: a client that went away, a stage that died under an
        open stream (``stages``: the board), or the story's timeout."""
        if cancelled:
            return self._stop("cancelled")
        for name, waiting in ((self.llm, self.plan_open), (self.sampler, self.clips_open > 0)):
            s = (stages or {}).get(name)
            if waiting and s is not None and (not s.up or s.restarts != self.restarts.get(name, s.restarts)):
                return self._stop("unavailable", str(StageDown(name, s.reason or "it died", lost=True)), name)
        if now > self.deadline:
            return self._stop("timeout", f"story not finished within story_timeout_s = {self.timeout_s:g} s; "
                                         "cancelled")
        return WAIT

    def stream_ended(self, tag: str) -> Action:
        if tag == PLAN:
            self.plan_open = False
        else:
            self.clips_open -= 1
        return self._stop("done") if not self.plan_open and self.clips_open <= 0 else WAIT

    def response(self, tag: str, kind: str, cancelled: bool = False, error: str = "",
                 stages: dict[str, Stage] | None = None) -> Action:
        """A response on stream ``tag``: a plan entry starts a clip stream, a clip goes to the
        client (unless the client has gone), an error stops the story with the stage named
        (UNAVAILABLE when the error says a stage is down). ``stages``: the board, when it is read."""
        if kind == ERROR:
            down = down_stage(error)
            if down is not None:
                message = error if f"stage {down} is down" in error else str(StageDown(down, error, lost=True))
                return self._stop("unavailable", message, down)
            stage = self.llm if tag == PLAN else self.sampler
            return self._stop("error", error if error.startswith(f"{stage}:") else f"{stage}: {error}")
        if kind == ENTRY and tag == PLAN:
            if self.clips_open == 0:
                self._baseline(self.sampler, stages)
            self.clips_open += 1
            self.clips += 1
            return Action("start_clip", tag=f"clip{self.clips - 1}")
        if kind == CLIP and tag != PLAN:
            return self._stop("cancelled") if cancelled else Action("send")
        return WAIT
