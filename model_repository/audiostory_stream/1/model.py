"""audiostory_stream: the streaming front door. Tensors in and out; the story itself is
``pipeline.story.StoryRunner``, handed the stages as BLS clients (``_Clients`` below).

- Validation (INVALID_ARGUMENT naming the field) and admission: at most `max_active_stories`
  stories at once per instance of this model; past it UNAVAILABLE at once (retry later) instead
  of queueing behind work it would wait minutes for. While the stage board says a stage is down,
  new stories are refused the same way, naming it.
- The steps of the `audiostory` ensemble (`llm` → `bridge` → `dit_sampler`) run here through BLS
  because only here a cancel and a story key reach them: Triton 2.51 neither passes an
  ensemble's cancellation on nor lets a BLS caller cancel its request. Every story has a key, the
  request id of its `llm` and `dit_sampler` requests; a cancel goes to both as a control request
  (`serving.control`). How a story ends (done, cancelled, a stage's error, `story_timeout_s`, a
  stage that died under it) is decided in `pipeline.story`.
- Every response is sent from a thread, never from the loop: a BLS caller that died (an
  `audiostory_full` instance) never takes its responses, and Triton's send then blocks for good
  (seen: the whole front door froze on one such send). A send unfinished after `send_timeout_s`
  ends that story and counts as stuck; so do streams given up on a dead stage. Past a bound
  (Triton's python backend has 32 threads per instance for sends), this stage asks the supervisor
  for its own restart. The first instance exports the stage board as metrics.
"""
import asyncio

import triton_python_backend_utils as pb_utils

from audiostory_ensemble import interface as I
from audiostory_ensemble import names
from audiostory_ensemble.pipeline.request import RequestError, parse_request
from audiostory_ensemble.pipeline.story import CLIP, EMPTY, ENTRY, ERROR, Code, StageError, StoryRunner
from audiostory_ensemble.runtime.loop import DaemonCalls, ensure_heartbeat
from audiostory_ensemble.runtime.stages import BoardView, StageDown, report
from audiostory_ensemble.serving import control
from audiostory_ensemble.serving.adapter import Parameters, error_response
from audiostory_ensemble.serving.metrics import BoardMetrics, StageMetrics

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
PLAN_OUTPUTS = [names.SEM, names.RES, names.META]
COUNTERS = {"rejected": ("audiostory_requests_rejected_total", "Requests refused: server at capacity"),
            "timed_out": ("audiostory_requests_timed_out_total", "Stories failed by the timeout"),
            "cancelled": ("audiostory_requests_cancelled_total", "Stories cancelled by their client"),
            "unavailable": ("audiostory_requests_unavailable_total",
                            "Stories refused or ended because a stage was down")}


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        params = Parameters(args)
        self.llm, self.bridge, self.sampler = (params.get("llm", names.LLM), params.get("bridge", names.BRIDGE),
                                               params.get("sampler", names.SAMPLER))
        self.limits = params.limits()
        self.name = args["model_name"]
        self.active = 0
        # Blocking BLS stream iterators run on daemon threads: a story holds one for its plan and
        # one for every clip it planned until the clip is delivered (the clip's stream waits in
        # dit_sampler's gates). 8 per story on average, shared: a 50 s story plans 2-6 clips, a long
        # one more while others hold fewer. Past the limit a clip's stream fails with an error
        # naming it; past half of it in streams given up on dead stages, this stage asks the
        # supervisor for its own restart.
        self.calls = DaemonCalls(8 * self.limits.max_active_stories + 8, "story")
        self.sends = DaemonCalls(self.limits.max_active_stories + 8, "send")
        self.send_timeout_s = params.float("send_timeout_s", 10.0)
        self.max_stuck_sends = 8
        self.stuck_reported = False
        self.board = BoardView()
        self.metrics = StageMetrics(pb_utils, self.name)
        self.metrics.declare(dict(COUNTERS.values()))
        self._set_active(0)
        first = args.get("model_instance_name", "").endswith("_0_0")
        self.board_metrics = BoardMetrics(pb_utils, self.name, self.board) if first and self.board.present else None

    async def execute(self, requests):
        ensure_heartbeat()
        await asyncio.gather(*(self._one(r) for r in requests))

    async def _send(self, sender, response=None, flags=0) -> bool:
        """One response, from a thread; False if it did not complete within ``send_timeout_s``."""
        loop = asyncio.get_running_loop()
        send = (lambda: sender.send(flags=flags)) if response is None else (lambda: sender.send(response, flags=flags))
        try:
            await asyncio.wait_for(self.sends.run(loop, send), self.send_timeout_s)
            return True
        except asyncio.TimeoutError:     # the future is cancelled: its thread counts as stuck
            self.logger.log_warn(f"{self.name}: a response was not taken within {self.send_timeout_s:g} s "
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
            self.metrics.counter(*COUNTERS["unavailable"])
            return await self._error(sender, str(StageDown(down[0], down[1].reason or "it died")),
                                     pb_utils.TritonError.UNAVAILABLE)
        if self.active >= self.limits.max_active_stories:
            self.metrics.counter(*COUNTERS["rejected"])
            return await self._error(sender, f"{control.BUSY}: {self.active} stories in progress (max_active_stories "
                                     f"= {self.limits.max_active_stories}); retry later",
                                     pb_utils.TritonError.UNAVAILABLE)
        self._set_active(self.active + 1)
        try:
            clients = _Clients(self, sender, [t for t in inputs.values() if t is not None], key)
            runner = StoryRunner(clients, self.calls, self.limits.story_timeout_s, 0.05,
                                 lambda counter: self.metrics.counter(*COUNTERS[counter]),
                                 lambda message: self.logger.log_warn(f"{self.name}: story {key}: {message}"))
            await runner.run()
            self._check_stuck()
        finally:
            self._set_active(self.active - 1)

    def _set_active(self, count):
        self.active = count
        self.metrics.gauge("audiostory_active_stories", "Stories in progress at the front door", count)
        self.metrics.tracked({"stream_threads": self.calls.running, "stuck_streams": self.calls.stuck,
                              "stuck_sends": self.sends.stuck})

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


class _Clients:
    """The story's stages as BLS clients (``pipeline.story.StageClients``), and its client."""

    def __init__(self, model, sender, inputs, key):
        self.m, self.sender, self.inputs, self.key = model, sender, inputs, key
        self.llm, self.sampler = model.llm, model.sampler

    def plan(self):
        return pb_utils.InferenceRequest(model_name=self.llm, inputs=self.inputs, request_id=self.key,
                                         requested_output_names=PLAN_OUTPUTS).exec(decoupled=True)

    async def bridge(self, entry):
        tensors = [pb_utils.Tensor(n, pb_utils.get_output_tensor_by_name(entry, n).as_numpy()) for n in PLAN_OUTPUTS]
        result = await pb_utils.InferenceRequest(model_name=self.m.bridge, inputs=tensors,
                                                 requested_output_names=[names.COND, names.META]).async_exec()
        if result.has_error():
            raise StageError(f"{self.m.bridge}: {result.error().message()}")
        return [pb_utils.Tensor(n, pb_utils.get_output_tensor_by_name(result, n).as_numpy())
                for n in (names.COND, names.META)]

    def render(self, cond):
        return pb_utils.InferenceRequest(model_name=self.sampler, inputs=cond, request_id=self.key,
                                         requested_output_names=[t.name for t in I.CLIP_OUTPUTS]).exec(decoupled=True)

    def kind(self, response):
        if response.has_error():
            return ERROR, response.error().message()
        if pb_utils.get_output_tensor_by_name(response, names.SEM) is not None:
            return ENTRY, ""
        if pb_utils.get_output_tensor_by_name(response, I.CLIP_AUDIO.name) is not None:
            return CLIP, ""
        return EMPTY, ""

    async def send(self, clip):
        return await self.m._send(self.sender, pb_utils.InferenceResponse([
            pb_utils.Tensor(t.name, pb_utils.get_output_tensor_by_name(clip, t.name).as_numpy())
            for t in I.CLIP_OUTPUTS]))

    async def fail(self, message, code):
        if code is Code.UNAVAILABLE:
            self.m.logger.log_warn(f"{self.m.name}: story {self.key}: {message}")
        codes = {Code.UNAVAILABLE: pb_utils.TritonError.UNAVAILABLE, Code.UNKNOWN: pb_utils.TritonError.UNKNOWN}
        await self.m._error(self.sender, message, codes.get(code))

    async def finish(self):
        await self.m._send(self.sender, flags=FINAL)

    async def cancel(self, stages):
        errors = await control.cancel_story(pb_utils, self.key, stages)
        if errors:
            self.m.logger.log_warn(f"{self.m.name}: cancel {self.key}: {'; '.join(errors)}")

    def cancelled(self):
        return self.sender.is_cancelled()

    def stages(self):
        return self.m.board.stages()


def _story_key(request) -> str:
    """The caller's `_STORY_KEY` (32 hex digits; `audiostory_full` passes one) or a fresh key."""
    t = pb_utils.get_input_tensor_by_name(request, control.STORY_KEY_INPUT)
    if t is None:
        return control.new_key()
    key = control.read_key(t.as_numpy())
    if not control.valid_key(key):
        raise RequestError(f"{control.STORY_KEY_INPUT} must be 32 lowercase hex digits")
    return key
