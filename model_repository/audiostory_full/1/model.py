"""audiostory_full: the whole story in one response (for HTTP clients and simple load tests).

Calls the streaming front door `audiostory_stream` through BLS (so admission control applies to
both), orders the clips by index, crossfades them with the reference's rule, and returns the story
with its captions and timings, encoded in `AUDIO_FORMAT` when it is not pcm. Not decoupled (HTTP
cannot carry streams); concurrency comes from the instance count. If the client goes away (checked
between clips), the story is cancelled by its key.
"""

import time

import numpy as np
import triton_python_backend_utils as pb_utils

from audiostory_ensemble import interface as I
from audiostory_ensemble.model.grammar import model_failed
from audiostory_ensemble.pipeline.encode import clip_payload
from audiostory_ensemble.pipeline.request import RequestError, parse_request
from audiostory_ensemble.pipeline.stitch import Clip, StoryAssembler
from audiostory_ensemble.runtime.stages import down_stage
from audiostory_ensemble.serving import control
from audiostory_ensemble.serving.adapter import Parameters, error_response
from audiostory_ensemble.serving.metrics import ENCODE_COUNTERS, StageMetrics

ENCODING_INPUTS = {t.name for t in I.ENCODING_INPUTS}


class TritonPythonModel:
    def initialize(self, args):
        params = Parameters(args)
        self.stream_model = params.get("stream_model", I.STREAM_MODEL)
        self.limits = params.limits()
        self.metrics = StageMetrics(pb_utils, args["model_name"])
        self.metrics.declare(ENCODE_COUNTERS)

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        inputs = {t.name: pb_utils.get_input_tensor_by_name(request, t.name) for t in I.REQUEST_INPUTS}
        try:
            params = parse_request(lambda n: None if inputs[n] is None else inputs[n].as_numpy(), self.limits)
        except RequestError as e:
            return error_response(pb_utils, e)
        story = StoryAssembler()
        key = control.new_key()
        key_t = pb_utils.Tensor(control.STORY_KEY_INPUT, np.array([key.encode()], dtype=np.object_))
        bls = pb_utils.InferenceRequest(
            model_name=self.stream_model,    # PCM clips: the story is joined, then encoded, here
            inputs=[t for n, t in inputs.items() if t is not None and n not in ENCODING_INPUTS] + [key_t],
            requested_output_names=[t.name for t in I.CLIP_OUTPUTS])
        for response in bls.exec(decoupled=True):
            if request.is_cancelled():
                control.cancel_story_sync(pb_utils, key)
                return error_response(pb_utils, "cancelled by the client", pb_utils.TritonError.CANCELLED)
            if response.has_error():
                message = response.error().message()
                # BLS hands errors back as INTERNAL (2.51): restore the front door's UNAVAILABLE
                # (a full server, a stage that is down).
                if message.startswith(control.BUSY) or down_stage(message):
                    return error_response(pb_utils, message, pb_utils.TritonError.UNAVAILABLE)
                if model_failed(message):     # the model's plan, not the server
                    return error_response(pb_utils, message, pb_utils.TritonError.UNKNOWN)
                return pb_utils.InferenceResponse(error=response.error())
            audio = pb_utils.get_output_tensor_by_name(response, I.CLIP_AUDIO.name)
            if audio is None:  # the stream's final-flag response
                continue
            story.add_clip(Clip.from_outputs(lambda name: _numpy(pb_utils.get_output_tensor_by_name(response, name))))
        try:
            result = story.finish()
        except ValueError as e:
            return error_response(pb_utils, f"incomplete story: {e}")
        try:
            t = time.perf_counter()
            audio, encoded, mime = clip_payload(result.audio, params.audio_format, params.audio_quality)
            if encoded:
                self.metrics.encoded(result.audio.shape[1] / I.SAMPLE_RATE, time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001 - the encoder's failure is this request's error, named
            return error_response(pb_utils, f"encoding the story as {params.audio_format}: {type(e).__name__}: {e}")
        return pb_utils.InferenceResponse([
            pb_utils.Tensor(I.AUDIO.name, audio),
            pb_utils.Tensor(I.CAPTIONS.name, np.array([c.encode() for c in result.captions], dtype=np.object_)),
            pb_utils.Tensor(I.CLIP_STARTS_S.name, np.array(result.starts, dtype=np.float32)),
            pb_utils.Tensor(I.CLIP_DURATIONS_S.name, np.array(result.durations, dtype=np.float32)),
            pb_utils.Tensor(I.PLAN.name, np.array([result.plan_json().encode()], dtype=np.object_)),
            pb_utils.Tensor(I.AUDIO_ENCODED.name, np.array([encoded], dtype=np.object_)),
            pb_utils.Tensor(I.MIME_TYPE.name, np.array([mime.encode()], dtype=np.object_)),
        ])

    def finalize(self):
        self.metrics.close()


def _numpy(tensor):
    return None if tensor is None else tensor.as_numpy()
