"""The ``llm`` stage without Triton: a story's plan streamed as clip records, cancellation by story
key, and what happens when an engine dies.

:meth:`PlanStage.plan` is the data path: encode a continuation's audio, run the planner, and
yield one :class:`PlanEntry` per clip (its record, ``ClipMeta``, and its bridging queries). Its
failures are raised as what the caller answers: :class:`~..runtime.stages.StageDown` (the stage
cannot serve: UNAVAILABLE), :class:`PlanFailed` (the model wrote an unusable plan: UNKNOWN), a
``RequestError`` (INVALID_ARGUMENT), anything else (INTERNAL); a cancel ends the stream with
``CancelledError``.

Faults: vLLM marks an engine dead when its engine core (or a worker under it) dies; a thread here
looks every 0.25 s. Then every plan in flight ends at once with ``StageDown`` (its work is lost),
later plans are refused the same way (:attr:`PlanStage.down`), and ``on_down`` is told once (the
model reports the stage to the supervisor, which reloads it).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import numpy as np

from .. import names
from ..model.grammar import MODEL_FAILED, PlanError
from ..pipeline.records import ClipMeta
from ..pipeline.request import RequestError, RequestParams
from ..runtime.gates import CancelScope
from ..runtime.stages import StageDown
from .audio_input import AudioEncoder
from .planner import Planner, PlanRequest


class PlanFailed(RuntimeError):
    """The model's plan did not parse: the model's output, not the server. ``text``: what it wrote."""

    def __init__(self, error: PlanError):
        super().__init__(f"{names.LLM}: {MODEL_FAILED}: {error}")
        self.text = error.text


@dataclass(frozen=True)
class PlanEntry:
    meta: ClipMeta
    sem: np.ndarray          # [N, hidden] float32: the semantic queries
    res: np.ndarray          # [M, hidden] float32: the residual queries

    @property
    def is_last(self) -> bool:
        return self.meta.is_last


class PlanStage:
    """One planner served to many stories. ``loop``: the event loop the plans run on (a stage whose
    requests arrive on other threads cancels there)."""

    def __init__(self, planner: Planner, loop: asyncio.AbstractEventLoop, on_down: Callable[[str], None],
                 on_plan: Callable[[int], None] = lambda tokens: None, watch_s: float = 0.25):
        self.planner = planner
        # Only where continuation can run (a checkpoint with the audio path, embedded engines).
        self.audio_encoder = None if planner.continuation_refused else AudioEncoder.of_converted(planner.converted)
        self.scope = CancelScope(loop)
        self.down = ""                      # why the stage cannot serve any more (a dead engine)
        self.on_down, self.on_plan = on_down, on_plan      # on_plan(tokens): a plan the engines wrote
        self.closing = threading.Event()
        if not planner.options.remote:
            threading.Thread(target=self._watch, args=(watch_s,), name="llm-engine-watch", daemon=True).start()

    def cancel(self, story_key: str) -> int:
        """Cancels the story's plans here (a plan that has not started yet ends at once)."""
        return self.scope.cancel(story_key)

    def tracked(self) -> dict[str, int]:
        return {**self.scope.tracked(), **self.planner.tracked()}

    def _watch(self, every_s: float) -> None:
        while not self.closing.wait(every_s):
            dead = self.planner.dead_engine()
            if dead and not self.closing.is_set():      # not the engines' own shutdown
                self.engine_died(f"{dead} died")
                return

    def engine_died(self, what: str) -> None:
        """An engine is dead: end every plan in flight now, refuse the rest, tell ``on_down`` once."""
        if self.down:
            return
        self.down = what
        self.on_down(what)
        self.scope.cancel_all()

    async def plan(self, story_key: str, params: RequestParams, arrival: float,
                   is_cancelled: Callable[[], bool] = lambda: False) -> AsyncIterator[PlanEntry]:
        """The story's plan, one entry per clip as the planner releases it (see the module's text
        for what it raises). ``is_cancelled`` is read before each entry is handed out."""
        if self.down:
            raise StageDown(names.LLM, self.down)
        request = None
        with self.scope.track(story_key):
            try:
                rows = None
                if params.input_audio is not None:
                    if self.planner.continuation_refused:   # before any encoder work
                        raise RequestError(self.planner.continuation_refused)
                    rows = await asyncio.to_thread(self.audio_encoder, params.input_audio, params.input_sample_rate)
                request = PlanRequest.from_params(params, rows)
                async with contextlib.aclosing(self.planner.plan(request)) as clips:   # closing aborts in vLLM
                    async for clip in clips:
                        if is_cancelled():
                            raise asyncio.CancelledError
                        meta = ClipMeta.of_planned(clip, params, request.request_id, arrival, story_key)
                        yield PlanEntry(meta, clip.sem.astype(np.float32), clip.res.astype(np.float32))
            except asyncio.CancelledError:
                # The planner's cleanup has aborted the vLLM requests by now.
                if self.down:               # cancelled because an engine died
                    raise StageDown(names.LLM, self.down, lost=True) from None
                raise
            except PlanError as e:
                raise PlanFailed(e) from e
            except (RequestError, StageDown):
                raise
            except Exception as e:
                dead = self.planner.dead_engine()
                if dead:
                    self.engine_died(f"{dead} died")
                    raise StageDown(names.LLM, self.down, lost=True) from e
                if self.planner.unreachable(e):
                    raise StageDown(names.LLM, str(e), lost=True) from e
                raise
            finally:
                summary = self.planner.summaries.get(request.request_id) if request is not None else None
                if summary is not None:
                    self.on_plan(len(summary.generated_ids))

    def close(self) -> None:
        self.closing.set()
        self.planner.shutdown()
