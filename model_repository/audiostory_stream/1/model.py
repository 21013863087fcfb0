"""audiostory_stream: the streaming front door — the `audiostory` ensemble behind admission
control and cancellation.

- Validates with the shared validator (INVALID_ARGUMENT naming the field).
- Admission: at most `max_active_stories` stories at once; past it a request fails at once with
  UNAVAILABLE (retry later) instead of queueing behind work it would wait minutes for.
- Calls the ensemble through BLS with a fresh story key as the request id (the ensemble hands it
  to every step) and forwards each clip as it lands; the stream ends with an empty final response.
- Cancellation: when the client cancels or disconnects (checked every `poll_s`, also while waiting
  for a clip), the story key goes to `llm` and `dit_sampler` as a control request
  (`audiostory_ensemble.control`); the rest of the ensemble's stream is drained and dropped.
- An error from a stage ends the stream with that error and cancels the story's other clips.
"""
import asyncio
import concurrent.futures
import json

import triton_python_backend_utils as pb_utils

from audiostory_ensemble import control, serving
from audiostory_ensemble import interface as I
from audiostory_ensemble.metrics import StageMetrics

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
_END = object()


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        params = json.loads(args["model_config"]).get("parameters", {})
        self.ensemble = params.get("ensemble", {}).get("string_value", I.ENSEMBLE)
        self.limits = serving.Limits(**json.loads(params.get("limits", {}).get("string_value", "{}")))
        self.poll_s = 0.05
        self.active = 0
        self.pool = concurrent.futures.ThreadPoolExecutor(self.limits.max_active_stories + 2, "story")
        self.metrics = StageMetrics(pb_utils, "audiostory_stream")
        self.metrics.gauge("audiostory_active_stories", "Stories in progress at the front door", 0)

    async def execute(self, requests):
        await asyncio.gather(*(self._one(r) for r in requests))
        return None

    def _error(self, sender, message, code=None):
        error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
        sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)

    async def _one(self, request):
        sender = request.get_response_sender()
        inputs = {t.name: pb_utils.get_input_tensor_by_name(request, t.name) for t in I.REQUEST_INPUTS}
        try:
            serving.parse_request(lambda n: None if inputs[n] is None else inputs[n].as_numpy(), self.limits)
            key = _story_key(request)
        except serving.RequestError as e:
            return self._error(sender, str(e), pb_utils.TritonError.INVALID_ARG)
        if self.active >= self.limits.max_active_stories:
            self.metrics.counter("audiostory_requests_rejected_total", "Requests refused: server at capacity")
            return self._error(sender, f"{control.BUSY}: {self.active} stories in progress (max_active_stories = "
                               f"{self.limits.max_active_stories}); retry later", pb_utils.TritonError.UNAVAILABLE)
        self.active += 1
        self.metrics.gauge("audiostory_active_stories", "Stories in progress at the front door", self.active)
        try:
            await self._stream(sender, [t for t in inputs.values() if t is not None], key)
        finally:
            self.active -= 1
            self.metrics.gauge("audiostory_active_stories", "Stories in progress at the front door", self.active)

    async def _stream(self, sender, inputs, key):
        loop = asyncio.get_running_loop()
        responses: asyncio.Queue = asyncio.Queue()
        bls = pb_utils.InferenceRequest(model_name=self.ensemble, inputs=inputs, request_id=key,
                                        requested_output_names=[t.name for t in I.CLIP_OUTPUTS])

        def pump():  # the BLS stream iterator blocks: it runs on a worker thread
            try:
                for response in bls.exec(decoupled=True):
                    loop.call_soon_threadsafe(responses.put_nowait, response)
            except Exception as e:  # noqa: BLE001
                loop.call_soon_threadsafe(responses.put_nowait, e)
            loop.call_soon_threadsafe(responses.put_nowait, _END)

        drained = loop.run_in_executor(self.pool, pump)
        stop_reason = None           # None: the stream ended; "cancelled" / "error"
        while True:
            try:
                item = await asyncio.wait_for(responses.get(), self.poll_s)
            except asyncio.TimeoutError:
                if sender.is_cancelled():
                    stop_reason = "cancelled"
                    break
                continue
            if item is _END:
                break
            if isinstance(item, Exception):
                self._error(sender, f"{self.ensemble}: {type(item).__name__}: {item}")
                stop_reason = "error"
                break
            if item.has_error():
                err = item.error()
                code = getattr(err, "code", lambda: None)()
                self._error(sender, err.message(), code)
                stop_reason = "error"
                break
            if pb_utils.get_output_tensor_by_name(item, I.CLIP_AUDIO.name) is None:
                continue             # the ensemble's own final-flag response
            if sender.is_cancelled():
                stop_reason = "cancelled"
                break
            sender.send(pb_utils.InferenceResponse([
                pb_utils.Tensor(t.name, pb_utils.get_output_tensor_by_name(item, t.name).as_numpy())
                for t in I.CLIP_OUTPUTS]))
        if stop_reason is not None:
            errors = await control.cancel_story(pb_utils, key)
            if errors:
                self.logger.log_warn(f"audiostory_stream: cancel {key}: {'; '.join(errors)}")
            if stop_reason == "cancelled":
                self.metrics.counter("audiostory_requests_cancelled_total", "Stories cancelled by their client")
        if stop_reason != "error":
            sender.send(flags=FINAL)
        await drained                # the ensemble's stream ends once the stages have stopped

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


def _story_key(request) -> str:
    """The caller's `_STORY_KEY` (32 hex digits; `audiostory_full` passes one) or a fresh key."""
    t = pb_utils.get_input_tensor_by_name(request, control.STORY_KEY_INPUT)
    if t is None:
        return control.new_key()
    key = t.as_numpy().reshape(-1)[0]
    key = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
    if not control.valid_key(key):
        raise serving.RequestError(f"{control.STORY_KEY_INPUT} must be 32 lowercase hex digits")
    return key
