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
- Faults (`audiostory_ensemble.serving.stages`): while the stage board says a stage is down, new
  stories are refused at once with UNAVAILABLE naming it; a story whose stream waits on a stage
  that died (the board, read at every idle tick, or the stage's error) ends with UNAVAILABLE
  naming the stage, and its streams to the dead stage are given up (their threads may never
  return: counted, and past a bound this stage asks the supervisor for its own restart).
  The first instance exports the board as `audiostory_stage_up` / `audiostory_stage_restarts_total`.
- Every response is sent from a thread, never from the loop: a BLS caller that died (an
  `audiostory_full` instance) never takes its responses, and Triton's send then blocks for good
  (seen: the whole front door froze on one such send). A send unfinished after 10 s
  ends that story (its stages are told to stop) and is counted as stuck; past a bound (Triton's
  python backend has 32 threads per instance for sends), this stage asks for its own restart.
"""
import asyncio

import triton_python_backend_utils as pb_utils

from audiostory_ensemble import interface as I
from audiostory_ensemble import names
from audiostory_ensemble.model.grammar import model_failed
from audiostory_ensemble.serving import control, story
from audiostory_ensemble.serving.adapter import Parameters, error_response
from audiostory_ensemble.serving.loop import DaemonCalls, ensure_heartbeat
from audiostory_ensemble.serving.metrics import BoardMetrics, StageMetrics
from audiostory_ensemble.serving.request import RequestError, parse_request
from audiostory_ensemble.serving.stages import BoardView, StageDown, report

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
PLAN_OUTPUTS = [names.SEM, names.RES, names.META]


UNAVAILABLE_DESCRIPTION = "Stories refused or ended because a stage was down"


class StageError(RuntimeError):
    pass


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        params = Parameters(args)
        self.llm, self.bridge, self.sampler = (params.get("llm", names.LLM), params.get("bridge", names.BRIDGE),
                                               params.get("sampler", names.SAMPLER))
        self.limits = params.limits()
        self.name = args["model_name"]
        self.poll_s = 0.05
        self.active = 0
        # Blocking BLS stream iterators run on these threads: one per story (its plan) and one per
        # clip being rendered. Streams given up on a dead stage may never return: past half the
        # limit, this stage asks for its own restart (the supervisor restarts the server).
        self.calls = DaemonCalls(8 * self.limits.max_active_stories + 8, "story")
        self.sends = DaemonCalls(self.limits.max_active_stories + 8, "send")
        self.send_timeout_s = params.float("send_timeout_s", 10.0)
        self.max_stuck_sends = 8
        self.stuck_reported = False
        self.board = BoardView()
        self.metrics = StageMetrics(pb_utils, self.name)
        self.metrics.declare({"audiostory_requests_rejected_total": "Requests refused: server at capacity",
                              "audiostory_requests_timed_out_total": "Stories failed by the timeout",
                              "audiostory_requests_cancelled_total": "Stories cancelled by their client",
                              "audiostory_requests_unavailable_total": UNAVAILABLE_DESCRIPTION})
        self._set_active(0)
        first = args.get("model_instance_name", "").endswith("_0_0")
        self.board_metrics = BoardMetrics(pb_utils, self.name, self.board) if first and self.board.present else None

    async def execute(self, requests):
        ensure_heartbeat()
        await asyncio.gather(*(self._one(r) for r in requests))
        return None

    async def _send(self, sender, response=None, flags=0) -> bool:
        """One response, from a thread; False if it did not complete within ``send_timeout_s``."""
        loop = asyncio.get_running_loop()
        send = (lambda: sender.send(flags=flags)) if response is None else (lambda: sender.send(response, flags=flags))
        try:
            await asyncio.wait_for(self.sends.run(loop, send), self.send_timeout_s)
            return True
        except asyncio.TimeoutError:     # the future is cancelled: its thread counts as stuck
            self.logger.log_warn(f"audiostory_stream: a response was not taken within {self.send_timeout_s:g} s "
                                 "(its caller died?); the story is dropped")
            self._check_stuck()
            return False

    async def _error(self, sender, message, code=None) -> bool:
        return await self._send(sender, error_response(pb_utils, message, code), FINAL)

    async def _one(self, request):
        sender = request.get_response_sender()
        inputs = {t.name: pb_utils.get_input_tensor_by_name(request, t.name) for t in I.REQUEST_INPUTS}
        try:
            parse_request(lambda n: None if inputs[n] is None else inputs[n].as_numpy(), self.limits)
            key = _story_key(request)
        except RequestError as e:
            return await self._error(sender, str(e), pb_utils.TritonError.INVALID_ARG)
        down = self.board.down(n for n in self.board.stages() if n not in (self.name, I.FULL_MODEL))
        if down is not None:
            self.metrics.counter("audiostory_requests_unavailable_total", UNAVAILABLE_DESCRIPTION)
            return await self._error(sender, str(StageDown(down[0], down[1].reason or "it died")),
                                     pb_utils.TritonError.UNAVAILABLE)
        if self.active >= self.limits.max_active_stories:
            self.metrics.counter("audiostory_requests_rejected_total", "Requests refused: server at capacity")
            return await self._error(sender, f"{control.BUSY}: {self.active} stories in progress (max_active_stories "
                                     f"= {self.limits.max_active_stories}); retry later",
                                     pb_utils.TritonError.UNAVAILABLE)
        self._set_active(self.active + 1)
        try:
            await self._story(sender, [t for t in inputs.values() if t is not None], key)
        finally:
            self._set_active(self.active - 1)

    def _set_active(self, count):
        self.active = count
        self.metrics.gauge("audiostory_active_stories", "Stories in progress at the front door", count)
        self.metrics.tracked({"stream_threads": self.calls.running, "stuck_streams": self.calls.stuck,
                              "stuck_sends": self.sends.stuck})

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
        return self.calls.run(loop, run)

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
        state = story.StoryLoop(self.llm, self.sampler, self.limits.story_timeout_s, loop.time(),
                                self.board.stages())
        action = story.WAIT
        caller_gone = False            # a response was not taken: send nothing more
        while action.kind != "stop":
            try:
                tag, item = await asyncio.wait_for(events.get(), self.poll_s)
            except asyncio.TimeoutError:
                action = state.idle(loop.time(), sender.is_cancelled(), self.board.stages())
                continue
            if item is None:             # a stream ended
                action = state.stream_ended(tag)
                continue
            kind, error = _kind(item)
            action = state.response(tag, kind, sender.is_cancelled() if kind == story.CLIP else False, error,
                                    self.board.stages() if kind == story.ENTRY else None)
            if action.kind == "start_clip":
                work.append(loop.create_task(self._clip(loop, events, item, key, action.tag)))
            elif action.kind == "send":
                if not await self._send(sender, pb_utils.InferenceResponse([
                        pb_utils.Tensor(t.name, pb_utils.get_output_tensor_by_name(item, t.name).as_numpy())
                        for t in I.CLIP_OUTPUTS])):
                    caller_gone = True
                    action = state.idle(loop.time(), True)       # as if the client had cancelled
        stop_reason = None if action.reason == "done" else action.reason
        unavailable = action.reason == "unavailable"
        if action.message and not caller_gone:
            code = (pb_utils.TritonError.UNAVAILABLE if unavailable else
                    pb_utils.TritonError.UNKNOWN if model_failed(action.message) else None)
            await self._error(sender, action.message, code)
        if action.reason == "timeout":
            self.metrics.counter("audiostory_requests_timed_out_total", "Stories failed by the timeout")
        if unavailable:
            self.metrics.counter("audiostory_requests_unavailable_total", UNAVAILABLE_DESCRIPTION)
            self.logger.log_warn(f"audiostory_stream: story {key}: {action.message}")
        if stop_reason is not None:      # the stages still alive stop the story's work
            targets = [t for t in (self.llm, self.sampler)
                       if t != action.stage and self.board.down([t]) is None]
            errors = await control.cancel_story(pb_utils, key, targets)
            if errors:
                self.logger.log_warn(f"audiostory_stream: cancel {key}: {'; '.join(errors)}")
            if stop_reason == "cancelled":
                self.metrics.counter("audiostory_requests_cancelled_total", "Stories cancelled by their client")
        if stop_reason in (None, "cancelled") and not caller_gone:
            await self._send(sender, flags=FINAL)
        # The stages' streams end once they have stopped; wait for them (bounded after a cancel;
        # a stream to a stage that died is not waited for: nobody will end it).
        done, pending = await asyncio.wait(work, timeout=1.0 if unavailable else (60 if stop_reason else None))
        if pending:
            if not unavailable:
                self.logger.log_warn(f"audiostory_stream: story {key}: {len(pending)} stage stream(s) still "
                                     "open 60 s after its cancel; its slot is released anyway")
            for w in pending:
                w.cancel()
        self._check_stuck()

    def _check_stuck(self):
        """Streams given up on dead stages and sends to dead callers keep their threads (and a send,
        one of the python backend's); past a bound, ask the supervisor to restart this stage (which
        restarts the server and frees them)."""
        if self.stuck_reported:
            return
        if self.calls.stuck > self.calls.limit // 2 or self.sends.stuck >= self.max_stuck_sends:
            self.stuck_reported = report(self.name, f"{self.calls.stuck} stream threads stuck on stages that died, "
                                                    f"{self.sends.stuck} sends stuck on callers that died")

    def finalize(self):
        if self.board_metrics is not None:
            self.board_metrics.close()
        self.metrics.close()


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
