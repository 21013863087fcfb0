"""The front door's story, without Triton: what each event means and how the story runs.

``audiostory_stream`` runs a story as streams: the plan's (one response per clip from ``llm``) and,
for each planned clip, the clip's (``bridge`` then ``dit_sampler``). :class:`StoryRunner` opens
them through the stage clients it is handed (Triton's BLS in the model; fakes in the tests), turns
every response, stream end and idle tick into an event for :class:`StoryLoop`, and does what the
loop says (start a clip's stream, send a clip to the client, stop). The loop decides once why a
story stopped; :meth:`Action.ending` turns that into what the client is told and which counter
moves.

A stage that dies ends the stories that were waiting on it, as UNAVAILABLE naming the stage: the
plan's stream waits on ``llm``, a clip's stream on ``dit_sampler`` (which calls the DiT step and
the VAE), and a dead decoupled stage never answers, so the loop also reads the stage board at every
idle tick (a stage whose restart count moved since the story began has lost the story's requests).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import Enum
from typing import Any, Awaitable, Callable, Iterable, Protocol

from ..model.grammar import model_failed
from ..runtime.loop import DaemonCalls
from ..runtime.stages import Stage, StageDown, down_stage, over_capacity

PLAN = "plan"          # the tag of the plan's stream; clip streams are tagged "clip<k>"


class Kind(str, Enum):
    """What a stage's response is (the stage client tells)."""
    ENTRY = "entry"        # a plan entry (llm)
    CLIP = "clip"          # a finished clip (dit_sampler)
    ERROR = "error"
    EMPTY = "empty"        # a stream's final flag


ENTRY, CLIP, ERROR, EMPTY = Kind.ENTRY, Kind.CLIP, Kind.ERROR, Kind.EMPTY


class Do(str, Enum):
    START_CLIP = "start_clip"
    SEND = "send"
    STOP = "stop"
    WAIT = "wait"


class Reason(str, Enum):
    DONE = "done"
    CANCELLED = "cancelled"        # by the client (or a caller that stopped taking responses)
    TIMEOUT = "timeout"
    ERROR = "error"
    UNAVAILABLE = "unavailable"    # a stage is down
    OVERLOADED = "overloaded"      # a stage refused the story: it could not play it without stalling


class Code(str, Enum):
    """The error a story ends with, as the client reads it (Triton's codes)."""
    UNAVAILABLE = "UNAVAILABLE"    # retry later: a stage is down
    UNKNOWN = "UNKNOWN"            # the model's plan was unusable, not the server
    INTERNAL = "INTERNAL"


@dataclass(frozen=True)
class Ending:
    """What the front door does once a story stopped: the error to send (none for done or
    cancelled), whether the stages still holding work get the story's cancel, whether the
    stream ends with an empty final response, and which counter moves."""
    message: str = ""
    code: Code | None = None
    cancel: bool = False
    final_response: bool = True
    counter: str = ""              # "cancelled" | "timed_out" | "unavailable" | "overloaded" | ""


@dataclass(frozen=True)
class Action:
    kind: Do
    tag: str = ""                  # START_CLIP: the new clip stream's tag
    reason: Reason | None = None   # STOP: why
    message: str = ""              # STOP for ERROR, TIMEOUT, UNAVAILABLE: what the client is told
    stage: str = ""                # STOP for UNAVAILABLE: the stage that is down

    def ending(self) -> Ending:
        """The one place a stop becomes the client's error, the cancel fan-out and a counter."""
        r = self.reason
        if r is Reason.DONE:
            return Ending()
        if r is Reason.CANCELLED:
            return Ending(cancel=True, counter="cancelled")
        if r is Reason.UNAVAILABLE:
            return Ending(self.message, Code.UNAVAILABLE, cancel=True, final_response=False, counter="unavailable")
        if r is Reason.OVERLOADED:
            return Ending(self.message, Code.UNAVAILABLE, cancel=True, final_response=False, counter="overloaded")
        code = Code.UNKNOWN if model_failed(self.message) else Code.INTERNAL
        return Ending(self.message, code, cancel=True, final_response=False,
                      counter="timed_out" if r is Reason.TIMEOUT else "")


WAIT = Action(Do.WAIT)


class StoryLoop:
    """The story's state: its open streams and the clips it started."""

    def __init__(self, llm: str, sampler: str, timeout_s: float, started_at: float,
                 stages: dict[str, Stage] | None = None):
        self.llm, self.sampler = llm, sampler
        self.timeout_s = timeout_s
        self.deadline = started_at + timeout_s
        self.plan_open = True          # the plan's stream
        self.clips_open = 0            # the clips' streams
        self.clips = 0
        # The restart count of each stage the story's open streams wait on, as the oldest opened.
        self.restarts: dict[str, int] = {}
        self._baseline(llm, stages)

    def _baseline(self, name: str, stages: dict[str, Stage] | None) -> None:
        if stages and name in stages:
            self.restarts[name] = stages[name].restarts

    def _stop(self, reason: Reason, message: str = "", stage: str = "") -> Action:
        return Action(Do.STOP, reason=reason, message=message, stage=stage)

    def idle(self, now: float, cancelled: bool, stages: dict[str, Stage] | None = None) -> Action:
        """No event within the poll interval: a client that went away, a stage that died under an
        open stream (``stages``: the board), or the story's timeout."""
        if cancelled:
            return self._stop(Reason.CANCELLED)
        for name, waiting in ((self.llm, self.plan_open), (self.sampler, self.clips_open > 0)):
            s = (stages or {}).get(name)
            if waiting and s is not None and (not s.up or s.restarts != self.restarts.get(name, s.restarts)):
                return self._stop(Reason.UNAVAILABLE, str(StageDown(name, s.reason or "it died", lost=True)), name)
        if now > self.deadline:
            return self._stop(Reason.TIMEOUT, f"story not finished within story_timeout_s = {self.timeout_s:g} s; "
                                         "cancelled")
        return WAIT

    def stream_ended(self, tag: str) -> Action:
        if tag == PLAN:
            self.plan_open = False
        else:
            self.clips_open -= 1
        return self._stop(Reason.DONE) if not self.plan_open and self.clips_open <= 0 else WAIT

    def response(self, tag: str, kind: Kind, cancelled: bool = False, error: str = "",
                 stages: dict[str, Stage] | None = None) -> Action:
        """A response on stream ``tag``: a plan entry starts a clip stream, a clip goes to the
        client (unless the client has gone), an error stops the story with the stage named
        (UNAVAILABLE when the error says a stage is down). ``stages``: the board, when it is read."""
        if kind == ERROR:
            if over_capacity(error):       # refused, not down: the stage takes the story's cancel too
                return self._stop(Reason.OVERLOADED, error)
            down = down_stage(error)
            if down is not None:
                message = error if f"stage {down} is down" in error else str(StageDown(down, error, lost=True))
                return self._stop(Reason.UNAVAILABLE, message, down)
            stage = self.llm if tag == PLAN else self.sampler
            return self._stop(Reason.ERROR, error if error.startswith(f"{stage}:") else f"{stage}: {error}")
        if kind == ENTRY and tag == PLAN:
            if self.clips_open == 0:
                self._baseline(self.sampler, stages)
            self.clips_open += 1
            self.clips += 1
            return Action(Do.START_CLIP, tag=f"clip{self.clips - 1}")
        if kind == CLIP and tag != PLAN:
            return self._stop(Reason.CANCELLED) if cancelled else Action(Do.SEND)
        return WAIT


class StageClients(Protocol):
    """What a story runner needs of the stages, for one story. Blocking stream iterators run on
    daemon threads (a stream to a stage that died never ends); the rest on the event loop."""
    llm: str                   # the stages' names, as errors and the board name them
    sampler: str

    def plan(self) -> Iterable[Any]: ...                     # the plan's responses (blocking)
    async def bridge(self, entry: Any) -> Any: ...           # a plan entry's conditioning; raises
    def render(self, cond: Any) -> Iterable[Any]: ...        # the clip's responses (blocking)
    def kind(self, response: Any) -> tuple[Kind, str]: ...   # what a response is, and its error text
    async def send(self, response: Any) -> bool: ...         # a clip to the client; False: not taken
    async def fail(self, message: str, code: Code) -> None: ...   # the story's error, final
    async def finish(self) -> None: ...                      # the empty final response
    async def cancel(self, stages: list[str]) -> None: ...   # the story's cancel to these stages
    def cancelled(self) -> bool: ...                         # the client cancelled or left
    def stages(self) -> dict[str, Stage] | None: ...         # the stage board (None: no board)


class StageError(RuntimeError):
    """A stage's stream or call failed (the message names what failed)."""


def _stage_error(e: Exception) -> StageError:
    return e if isinstance(e, StageError) else StageError(f"{type(e).__name__}: {e}")


class StoryRunner:
    """One story over its stage clients: plan → bridge → render for each clip, clips to the client
    as they land, then the ending :meth:`Action.ending` decides. ``calls`` runs the blocking
    streams; ``counted(name)`` is told the ending's counter."""

    def __init__(self, clients: StageClients, calls: DaemonCalls, timeout_s: float, poll_s: float = 0.05,
                 counted: Callable[[str], None] = lambda name: None, log: Callable[[str], None] = lambda m: None):
        self.clients, self.calls = clients, calls
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.counted, self.log = counted, log
        self.caller_gone = False       # a response was not taken: send nothing more
        self._work: list[Awaitable] = []

    async def run(self) -> Action:
        """Runs the story to its end; returns why it stopped (after the client was told)."""
        stop = await self._loop()
        end = stop.ending()
        c = self.clients
        if end.message:                 # never after the caller went: that stop is a cancel
            await c.fail(end.message, end.code)
        if end.counter:
            self.counted(end.counter)
        if end.cancel:       # the stages still alive stop the story's work
            board = c.stages() or {}
            await c.cancel([s for s in (c.llm, c.sampler) if s != stop.stage and (s not in board or board[s].up)])
        if end.final_response and not self.caller_gone:
            await c.finish()
        # The stages' streams end once they have stopped; wait for them (bounded after a stop that
        # was not the end; a stream to a stage that died is not waited for: nobody will end it).
        unavailable = stop.reason is Reason.UNAVAILABLE
        timeout = 1.0 if unavailable else (60.0 if end.cancel else None)
        _, pending = await asyncio.wait(self._work, timeout=timeout) if self._work else (set(), set())
        if pending:
            if not unavailable:
                self.log(f"{len(pending)} stage stream(s) still open {timeout:g} s after the story's cancel; "
                         "its slot is released anyway")
            for w in pending:
                w.cancel()
        return stop

    async def _loop(self) -> Action:
        c = self.clients
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        self._work.append(self._stream(loop, events, PLAN, c.plan))
        state = StoryLoop(c.llm, c.sampler, self.timeout_s, loop.time(), c.stages())
        action = WAIT
        while action.kind is not Do.STOP:
            try:
                tag, item = await asyncio.wait_for(events.get(), self.poll_s)
            except asyncio.TimeoutError:
                action = state.idle(loop.time(), c.cancelled(), c.stages())
                continue
            if item is None:                # a stream ended
                action = state.stream_ended(tag)
                continue
            kind, error = (ERROR, str(item)) if isinstance(item, Exception) else c.kind(item)
            action = state.response(tag, kind, c.cancelled() if kind is CLIP else False, error,
                                    c.stages() if kind is ENTRY else None)
            if action.kind is Do.START_CLIP:
                self._work.append(loop.create_task(self._clip(loop, events, item, action.tag)))
            elif action.kind is Do.SEND and not await c.send(item):
                self.caller_gone = True
                action = state.idle(loop.time(), True)       # as if the client had cancelled
        return action

    def _stream(self, loop, events: asyncio.Queue, tag: str, open_stream: Callable[[], Iterable[Any]]):
        """Iterate a blocking stream on a daemon thread, posting ``(tag, response)`` events, an
        error as a :class:`StageError`, and ``(tag, None)`` at its end."""
        def post(item):
            loop.call_soon_threadsafe(events.put_nowait, (tag, item))

        def run():
            try:
                for response in open_stream():
                    post(response)
            except Exception as e:  # noqa: BLE001 - the story ends with it, naming the stage
                post(_stage_error(e))
            post(None)
        try:
            return self.calls.run(loop, run)
        except RuntimeError as e:       # too many streams open: this one fails, saying why
            post(StageError(f"{self.clients.llm if tag == PLAN else self.clients.sampler}: {e}"))
            post(None)
            done = loop.create_future()
            done.set_result(None)
            return done

    async def _clip(self, loop, events: asyncio.Queue, entry, tag: str) -> None:
        """The clip's conditioning (bridge), then its stream (dit_sampler) under ``tag``."""
        try:
            cond = await self.clients.bridge(entry)
        except Exception as e:  # noqa: BLE001 - posted as the clip stream's error
            events.put_nowait((tag, _stage_error(e)))
            events.put_nowait((tag, None))
            return
        await self._stream(loop, events, tag, lambda: self.clients.render(cond))
