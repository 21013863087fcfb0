"""postprocess: decode the clip's latent (BLS to `vae_decoder`), trim, resample to 32 kHz, and
emit every public output of the clip together (so caption, timing and audio always match)."""
import asyncio
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from audiostory_ensemble import post, serving
from audiostory_ensemble.config import OUTPUT_SAMPLE_RATE, VAE_SAMPLE_RATE
from audiostory_ensemble.metrics import StageMetrics

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        self.vae_model = json.loads(args["model_config"]).get("parameters", {}).get(
            "vae_model", {}).get("string_value", "vae_decoder")
        self.metrics = StageMetrics(pb_utils, "postprocess")

    async def execute(self, requests):
        await asyncio.gather(*(self._one(r) for r in requests))
        return None

    async def _one(self, request):
        sender = request.get_response_sender()
        latent_t = pb_utils.get_input_tensor_by_name(request, "_LATENT")
        meta_t = pb_utils.get_input_tensor_by_name(request, "_META")
        if latent_t is None or meta_t is None:  # a final-flag placeholder
            sender.send(flags=FINAL)
            return
        try:
            meta = serving.ClipMeta.decode(meta_t.as_numpy())
            result = await pb_utils.InferenceRequest(
                model_name=self.vae_model, inputs=[pb_utils.Tensor("latent", latent_t.as_numpy()[None])],
                requested_output_names=["wave"]).async_exec()
            if result.has_error():
                raise RuntimeError(f"{self.vae_model}: {result.error().message()}")
            wave = pb_utils.get_output_tensor_by_name(result, "wave").as_numpy()[0]
            audio = post.resample(post.trim(wave, meta.render_s), VAE_SAMPLE_RATE, OUTPUT_SAMPLE_RATE)
            sender.send(pb_utils.InferenceResponse([
                pb_utils.Tensor("CLIP_AUDIO", np.ascontiguousarray(audio, dtype=np.float32)),
                pb_utils.Tensor("CLIP_INDEX", np.array([meta.index], dtype=np.int32)),
                pb_utils.Tensor("CAPTION", np.array([meta.caption.encode()], dtype=np.object_)),
                pb_utils.Tensor("CLIP_START_S", np.array([meta.start_s], dtype=np.float32)),
                pb_utils.Tensor("CLIP_DURATION_S", np.array([meta.duration_s], dtype=np.float32)),
                pb_utils.Tensor("IS_LAST", np.array([meta.is_last], dtype=np.bool_)),
            ]), flags=FINAL)
            self.metrics.clip_done(meta.request_id, meta.arrival, meta.duration_s)
        except Exception as e:  # noqa: BLE001
            self.logger.log_error(f"postprocess: {type(e).__name__}: {e}")
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))), flags=FINAL)
