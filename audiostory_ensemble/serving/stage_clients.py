"""The front door's side of Triton: the story's stages as BLS clients (what
``pipeline.story.StoryRunner`` is handed) and responses sent from threads. ``pb_utils`` is passed in.

Why responses go from threads, never from the event loop: a BLS caller that died (an
``audiostory_full`` instance) never takes its responses, and Triton's send then blocks for good
(seen: the whole front door froze on one such send). A send unfinished after ``timeout_s`` is
given up and its thread counted as stuck, so that the model can bound them.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from .. import interface as I
from .. import names
from ..pipeline.output import StoryOutput
from ..pipeline.story import CLIP, EMPTY, ENTRY, ERROR, Code, StageError
from ..runtime.loop import DaemonCalls
from . import control
from .adapter import error_response

PLAN_OUTPUTS = [names.SEM, names.RES, names.META]


class ThreadedSends:
    """A model's responses, each sent on a daemon thread (at most ``limit`` at once)."""

    def __init__(self, pb_utils, limit: int, timeout_s: float, on_stuck: Callable[[], None] = lambda: None):
        self.pb = pb_utils
        self.calls = DaemonCalls(limit, "send")
        self.timeout_s = timeout_s
        self.on_stuck = on_stuck

    @property
    def stuck(self) -> int:
        return self.calls.stuck

    async def send(self, sender, response=None, flags: int = 0) -> bool:
        """One response; False if it did not complete within ``timeout_s`` (its thread then counts
        as stuck and ``on_stuck`` is told)."""
        loop = asyncio.get_running_loop()
        send = (lambda: sender.send(flags=flags)) if response is None else (lambda: sender.send(response, flags=flags))
        try:
            await asyncio.wait_for(self.calls.run(loop, send), self.timeout_s)
            return True
        except asyncio.TimeoutError:     # the future is cancelled: its thread counts as stuck
            self.on_stuck()
            return False

    async def error(self, sender, message: str, code=None) -> bool:
        """The request's error, with the final flag."""
        return await self.send(sender, error_response(self.pb, message, code),
                               self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class BlsStageClients:
    """One story's stages through BLS (``pipeline.story.StageClients``), and its client. The story
    key goes with the ``llm`` and ``dit_sampler`` requests as their request id: a cancel names it.
    ``output``: what the client gets besides the stages' PCM clips (its format, the ordered story);
    encoding runs on a worker thread, never on the event loop."""

    def __init__(self, pb_utils, stages: tuple[str, str, str], sender, inputs: list, story_key: str,
                 sends: ThreadedSends, board, log: Callable[[str], None], output: StoryOutput | None = None):
        self.pb = pb_utils
        self.llm, self.bridge_model, self.sampler = stages
        self.sender, self.inputs, self.story_key = sender, inputs, story_key
        self.sends, self.board, self.log = sends, board, log
        self.output = output or StoryOutput()

    def _tensors(self, response, tensor_names) -> list:
        pb = self.pb
        return [pb.Tensor(n, pb.get_output_tensor_by_name(response, n).as_numpy()) for n in tensor_names]

    def plan(self):
        return self.pb.InferenceRequest(model_name=self.llm, inputs=self.inputs, request_id=self.story_key,
                                        requested_output_names=PLAN_OUTPUTS).exec(decoupled=True)

    async def bridge(self, entry):
        result = await self.pb.InferenceRequest(model_name=self.bridge_model, inputs=self._tensors(entry, PLAN_OUTPUTS),
                                                requested_output_names=[names.COND, names.META]).async_exec()
        if result.has_error():
            raise StageError(f"{self.bridge_model}: {result.error().message()}")
        return self._tensors(result, (names.COND, names.META))

    def render(self, cond):
        return self.pb.InferenceRequest(model_name=self.sampler, inputs=cond, request_id=self.story_key,
                                        requested_output_names=[t.name for t in I.CLIP_OUTPUTS]).exec(decoupled=True)

    def kind(self, response):
        if response.has_error():
            return ERROR, response.error().message()
        if self.pb.get_output_tensor_by_name(response, names.SEM) is not None:
            return ENTRY, ""
        if self.pb.get_output_tensor_by_name(response, I.CLIP_AUDIO.name) is not None:
            return CLIP, ""
        return EMPTY, ""

    async def send(self, clip) -> bool:
        out = self.output
        if not (out.encoded or out.story is not None):     # pcm clips only: passed on as they came
            return await self.sends.send(self.sender, self.pb.InferenceResponse(
                self._tensors(clip, [t.name for t in I.CLIP_OUTPUTS])))
        outputs = {t.name: self.pb.get_output_tensor_by_name(clip, t.name).as_numpy() for t in I.CLIP_OUTPUTS}
        # The clip's file and the story's next part are encoded side by side (libsndfile lets go of
        # the GIL); the clip goes out as soon as it is ready, then the story's part, piece by piece.
        story = asyncio.ensure_future(asyncio.to_thread(out.after_clip, outputs)) if out.story is not None else None
        try:
            try:
                response = await asyncio.to_thread(out.clip, outputs)
            finally:
                parts = await story if story is not None else iter(())
        except Exception as e:  # noqa: BLE001 - an encoder's failure ends the story, named
            return await self._encoding_failed(e)
        return await self.sends.send(self.sender, self._response(response)) and await self._send_parts(parts)

    async def _send_parts(self, parts) -> bool:
        """Story chunks, each encoded on a worker thread as it is taken, sent in order."""
        while True:
            try:
                tensors = await asyncio.to_thread(next, parts, None)
            except Exception as e:  # noqa: BLE001
                return await self._encoding_failed(e)
            if tensors is None:
                return True
            if not await self.sends.send(self.sender, self._response(tensors)):
                return False

    async def _encoding_failed(self, e: Exception) -> bool:
        """The story's error (its clients hear why), then False: the story stops as if its caller
        had gone, and the stages get its cancel."""
        message = f"{I.STREAM_MODEL}: encoding the story as {self.output.codec.name}: {type(e).__name__}: {e}"
        self.log(message)
        await self.sends.error(self.sender, message)
        return False

    def _response(self, tensors: dict):
        return self.pb.InferenceResponse([self.pb.Tensor(n, v) for n, v in tensors.items()])

    async def fail(self, message: str, code: Code) -> None:
        codes = {Code.UNAVAILABLE: self.pb.TritonError.UNAVAILABLE, Code.UNKNOWN: self.pb.TritonError.UNKNOWN}
        if code is Code.UNAVAILABLE:
            self.log(message)
        await self.sends.error(self.sender, message, codes.get(code))

    async def finish(self) -> None:
        if self.output.story is not None and not self.cancelled():
            try:
                parts = self.output.at_end()
            except ValueError as e:         # clips missing: the story is not whole; say so, send no end
                parts = iter(())
                self.log(f"ordered story not finished: {e}")
            if not await self._send_parts(parts):
                return
        await self.sends.send(self.sender, flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    async def cancel(self, stages: list[str]) -> None:
        errors = await control.cancel_story(self.pb, self.story_key, stages)
        if errors:
            self.log(f"cancel: {'; '.join(errors)}")

    def cancelled(self) -> bool:
        return self.sender.is_cancelled()

    def stages(self):
        return self.board.stages()
