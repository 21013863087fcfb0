"""audiostory_stream: the streaming front door — the pipeline run through BLS, with admission
control and cancellation.

- Validates with the shared validator (INVALID_ARGUMENT naming the field).
- Admission: at most `max_active_stories` stories at once; past it a request fails at once with
  UNAVAILABLE (retry later) instead of queueing behind work it would wait minutes for.
- Runs the same steps as the `audiostory` ensemble — `llm` (streamed clips) → `bridge` →
  `dit_sampler` (denoise, decode, the clip's public outputs) — itself, through BLS, and forwards
  each clip as it lands; the stream ends with an empty final response. (Running the steps here
  rather than calling the ensemble is what lets a cancel and a story key reach them: Triton 2.51
  neither passes an ensemble's cancellation on nor lets a BLS caller cancel its request.)
- Every story has a key, sent as the request id of its `llm` and `dit_sampler` requests. When the
  client cancels or disconnects (checked every `poll_s`, also while waiting), the key goes to `llm`
  and `dit_sampler` as a control request (`audiostory_ensemble.serving.control`): the plan is aborted in
  vLLM and every clip stops before its next step.
- An error from a stage ends the stream with that error and cancels the story's other clips; a
  story unfinished after `story_timeout_s` is failed and cancelled the same way.
"""
import asyncio
import concurrent.futures

import triton_python_backend_utils as pb_utils

from audiostory_ensemble import interface as I
from audiostory_ensemble import names
from audiostory_ensemble.serving import control, story
from audiostory_ensemble.serving.adapter import Parameters, send_error
from audiostory_ensemble.serving.loop import ensure_heartbeat
from audiostory_ensemble.serving.metrics import StageMetrics
from audiostory_ensemble.serving.request import RequestError, parse_request

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
PLAN_OUTPUTS = [names.SEM, names.RES, names.META]


class StageError(RuntimeError):
    pass


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        params = Parameters(args)
        self.llm, self.bridge, self.sampler = (params.get("llm", names.LLM), params.get("bridge", names.BRIDGE),
                                               params.get("sampler", names.SAMPLER))
        self.limits = params.limits()
        self.poll_s = 0.05
        self.active = 0
        # Blocking BLS stream iterators run on these threads: one per story (its plan) and one per
        # clip being rendered.
        self.pool = concurrent.futures.ThreadPoolExecutor(8 * self.limits.max_active_stories + 8, "story")
        self.metrics = StageMetrics(pb_utils, "audiostory_stream")
        self.metrics.declare({"audiostory_requests_rejected_total": "Requests refused: server at capacity",
                              "audiostory_requests_timed_out_total": "Stories failed by the timeout",
                              "audiostory_requests_cancelled_total": "Stories cancelled by their client"})
        self._set_active(0)

    async def execute(self, requests):
        ensure_heartbeat()
        await asyncio.gather(*(self._one(r) for r in requests))
        return None

    def _error(self, sender, message, code=None):
        send_error(pb_utils, sender, message, code)

    async def _one(self, request):
        sender = request.get_response_sender()
        inputs = {t.name: pb_utils.get_input_tensor_by_name(request, t.name) for t in I.REQUEST_INPUTS}
        try:
            parse_request(lambda n: None if inputs[n] is None else inputs[n].as_numpy(), self.limits)
            key = _story_key(request)
        except RequestError as e:
            return self._error(sender, str(e), pb_utils.TritonError.INVALID_ARG)
        if self.active >= self.limits.max_active_stories:
            self.metrics.counter("audiostory_requests_rejected_total", "Requests refused: server at capacity")
            return self._error(sender, f"{control.BUSY}: {self.active} stories in progress (max_active_stories = "
                               f"{self.limits.max_active_stories}); retry later", pb_utils.TritonError.UNAVAILABLE)
        self._set_active(self.active + 1)
        try:
            await self._story(sender, [t for t in inputs.values() if t is not None], key)
        finally:
            self._set_active(self.active - 1)

    def _set_active(self, count):
        self.active = count
        self.metrics.gauge("audiostory_active_stories", "Stories in progress at the front door", count)

    # -- the pipeline ---------------------------------------------------------------------------
    def _stream_in_thread(self, loop, events, request, tag):
        """Iterate a decoupled BLS stream on a worker thread, posting (tag, response) events."""
        def run():
            try:
                for response in request.exec(decoupled=True):
                    loop.call_soon_threadsafe(events.put_nowait, (tag, response))
            except Exception as e:  # noqa: BLE001
                loop.call_soon_threadsafe(events.put_nowait, (tag, StageError(f"{type(e).__name__}: {e}")))
            loop.call_soon_threadsafe(events.put_nowait, (tag, None))
        return loop.run_in_executor(self.pool, run)

    async def _clip(self, loop, events, plan_response, key, tag):
        """bridge (awaited BLS), then dit_sampler (its stream, posted as events under ``tag``)."""
        try:
            tensors = [pb_utils.Tensor(n, pb_utils.get_output_tensor_by_name(plan_response, n).as_numpy())
                       for n in PLAN_OUTPUTS]
            result = await pb_utils.InferenceRequest(
                model_name=self.bridge, inputs=tensors, requested_output_names=[names.COND, names.META]).async_exec()
            if result.has_error():
                raise StageError(f"{self.bridge}: {result.error().message()}")
            cond = [pb_utils.Tensor(n, pb_utils.get_output_tensor_by_name(result, n).as_numpy())
                    for n in (names.COND, names.META)]
        except Exception as e:  # noqa: BLE001
            events.put_nowait((tag, e if isinstance(e, StageError) else StageError(f"{type(e).__name__}: {e}")))
            events.put_nowait((tag, None))
            return
        sampler = pb_utils.InferenceRequest(model_name=self.sampler, inputs=cond, request_id=key,
                                            requested_output_names=[t.name for t in I.CLIP_OUTPUTS])
        await self._stream_in_thread(loop, events, sampler, tag)

    async def _story(self, sender, inputs, key):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        plan = pb_utils.InferenceRequest(model_name=self.llm, inputs=inputs, request_id=key,
                                         requested_output_names=PLAN_OUTPUTS)
        work = [self._stream_in_thread(loop, events, plan, story.PLAN)]
        state = story.StoryLoop(self.llm, self.sampler, self.limits.story_timeout_s, loop.time())
        action = story.WAIT
        while action.kind != "stop":
            try:
                tag, item = await asyncio.wait_for(events.get(), self.poll_s)
            except asyncio.TimeoutError:
                action = state.idle(loop.time(), sender.is_cancelled())
                continue
            if item is None:             # a stream ended
                action = state.stream_ended()
                continue
            kind, error = _kind(item)
            action = state.response(tag, kind, sender.is_cancelled() if kind == story.CLIP else False, error)
            if action.kind == "start_clip":
                work.append(loop.create_task(self._clip(loop, events, item, key, action.tag)))
            elif action.kind == "send":
                sender.send(pb_utils.InferenceResponse([
                    pb_utils.Tensor(t.name, pb_utils.get_output_tensor_by_name(item, t.name).as_numpy())
                    for t in I.CLIP_OUTPUTS]))
        stop_reason = None if action.reason == "done" else action.reason
        if action.message:
            self._error(sender, action.message)
        if action.reason == "timeout":
            self.metrics.counter("audiostory_requests_timed_out_total", "Stories failed by the timeout")
            stop_reason = "error"
        if stop_reason is not None:
            errors = await control.cancel_story(pb_utils, key, (self.llm, self.sampler))
            if errors:
                self.logger.log_warn(f"audiostory_stream: cancel {key}: {'; '.join(errors)}")
            if stop_reason == "cancelled":
                self.metrics.counter("audiostory_requests_cancelled_total", "Stories cancelled by their client")
        if stop_reason != "error":
            sender.send(flags=FINAL)
        # The stages' streams end once they have stopped; wait for them (bounded after a cancel).
        done, pending = await asyncio.wait(work, timeout=60 if stop_reason else None)
        if pending:
            self.logger.log_warn(f"audiostory_stream: story {key}: {len(pending)} stage stream(s) still open "
                                 "60 s after its cancel; its slot is released anyway")

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


def _kind(item) -> tuple[str, str]:
    """What a stage's response is, for the story loop: an error (with its message), a plan entry,
    a clip, or an empty response."""
    if isinstance(item, Exception):
        return story.ERROR, str(item)
    if item.has_error():
        return story.ERROR, item.error().message()
    if pb_utils.get_output_tensor_by_name(item, names.SEM) is not None:
        return story.ENTRY, ""
    if pb_utils.get_output_tensor_by_name(item, I.CLIP_AUDIO.name) is not None:
        return story.CLIP, ""
    return story.EMPTY, ""


def _story_key(request) -> str:
    """The caller's `_STORY_KEY` (32 hex digits; `audiostory_full` passes one) or a fresh key."""
    t = pb_utils.get_input_tensor_by_name(request, control.STORY_KEY_INPUT)
    if t is None:
        return control.new_key()
    key = control.read_key(t.as_numpy())
    if not control.valid_key(key):
        raise RequestError(f"{control.STORY_KEY_INPUT} must be 32 lowercase hex digits")
    return key
