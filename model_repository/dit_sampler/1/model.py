"""dit_sampler: every clip's flow-matching loop on one step scheduler, then the clip's audio, with
every public output of the clip. Tensors in and out; the work is ``pipeline.clip.ClipRenderer``.

The step engine is a repository setting (`dit_engine`): `onnx` runs the exported graph with
onnxruntime in this process (the cpu profile: no hop per step); `triton` sends the rows of each
iteration to the `dit_step` model through BLS, in chunks of `step_max_batch` (the gpu profile, where
that model is a TensorRT plan); `simulated` sleeps an H100's measured step time (benchmarks).
Which rows each iteration steps is `step_policy` (`all` | `deadline`: playback deadlines), and
`admit_backlog_s` > 0 refuses a new story (UNAVAILABLE) the engine could not play without stalls.
The VAE is called through BLS; a decode unanswered within `bls_timeout_s` is re-sent
(`bls_attempts` in all), as is a step (the rows travel with each call).

A request with `_CANCEL` = a story key (sent by the front door) cancels that story's clips here
(`CancelScope`): each leaves the scheduler before its next step; clips of the story that arrive
later are dropped at once. A direct caller's own cancel (`is_cancelled()`) is polled every `poll_s`.
"""
import asyncio
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from audiostory_ensemble import interface as I
from audiostory_ensemble import names
from audiostory_ensemble.pipeline.clip import ClipRenderer, Stopped
from audiostory_ensemble.pipeline.encode import PCM, clip_payload
from audiostory_ensemble.pipeline.records import ClipMeta
from audiostory_ensemble.runtime.gates import CancelScope
from audiostory_ensemble.runtime.loop import ensure_heartbeat
from audiostory_ensemble.runtime.stages import OverCapacity, down_stage
from audiostory_ensemble.serving import control
from audiostory_ensemble.serving.adapter import Parameters, bls_output, send_error
from audiostory_ensemble.serving.metrics import ENCODE_COUNTERS, SAMPLER_COUNTERS, SAMPLER_HISTOGRAMS, StageMetrics
from audiostory_ensemble.serving.scheduler import scheduler_from_parameters

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        params = Parameters(args)
        self.vae_model = params.get("vae_model", names.VAE)
        self.bls_timeout_s, self.bls_attempts = params.float("bls_timeout_s", 30.0), params.int("bls_attempts", 4)
        self.metrics = StageMetrics(pb_utils, names.SAMPLER)
        self.metrics.declare({**SAMPLER_COUNTERS, **ENCODE_COUNTERS}, SAMPLER_HISTOGRAMS)
        self.scheduler, self.batch_metrics = scheduler_from_parameters(pb_utils, params, args, self._bls_retry)
        self.renderer = ClipRenderer(self.scheduler, self._decode, params.int("clips_in_flight_per_request", 1),
                                     params.int("max_clips_in_flight", 32), params.float("poll_s", 0.25),
                                     lead_s=params.float("deadline_lead_s", 0.3),
                                     admit_backlog_s=params.float("admit_backlog_s", 0.0), stage=names.SAMPLER)
        self.scope = CancelScope()

    async def execute(self, requests):
        ensure_heartbeat()
        await asyncio.gather(*(self._one(r) for r in requests))

    async def _one(self, request):
        sender = request.get_response_sender()
        cancel_t = pb_utils.get_input_tensor_by_name(request, control.CANCEL_INPUT)
        cond_t = pb_utils.get_input_tensor_by_name(request, names.COND)
        meta_t = pb_utils.get_input_tensor_by_name(request, names.META)
        if cancel_t is not None:
            self.scope.cancel(control.read_key(cancel_t.as_numpy()))
            self.metrics.counter("audiostory_cancel_requests_total")
        if cancel_t is not None or cond_t is None or meta_t is None:   # a control request, or a placeholder
            return sender.send(flags=FINAL)
        try:
            meta = ClipMeta.decode(meta_t.as_numpy())
        except (ValueError, TypeError, KeyError) as e:
            return send_error(pb_utils, sender, f"{names.SAMPLER}: bad {names.META}: {e}")
        try:
            with self.scope.track(meta.story_key):
                result = await self.renderer.render(meta, cond_t.as_numpy(), sender.is_cancelled)
        except asyncio.CancelledError:          # the story was cancelled before this clip arrived
            result = Stopped(meta)
        except OverCapacity as e:
            self.metrics.counter("audiostory_stories_refused_total")
            return send_error(pb_utils, sender, e, pb_utils.TritonError.UNAVAILABLE)
        except Exception as e:  # noqa: BLE001 - every failure is the clip's error response
            self.logger.log_error(f"{names.SAMPLER}: {type(e).__name__}: {e}")
            # A stage it calls (the VAE, the DiT step) died or is reloading: UNAVAILABLE, naming it.
            return send_error(pb_utils, sender, e, pb_utils.TritonError.UNAVAILABLE if down_stage(str(e)) else None)
        finally:
            self.metrics.tracked({**self.scope.tracked(), **self.renderer.tracked(),
                                  "first_clip_ids": self.metrics.first_clip_ids})
        if isinstance(result, Stopped):
            self.metrics.clip_stopped(result.steps_saved, result.steps_after_cancel)
            return sender.send(flags=FINAL)
        meta = result.meta
        # pcm unless the ensemble was asked for a format (the front door asks for pcm and encodes itself)
        audio, encoded, mime = result.audio, b"", ""
        if meta.audio_format != PCM:
            try:
                t = time.perf_counter()
                audio, encoded, mime = await asyncio.to_thread(clip_payload, result.audio, meta.audio_format,
                                                               meta.audio_quality)
                self.metrics.encoded(result.audio.shape[1] / I.SAMPLE_RATE, time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001 - the clip's error, naming the encoder
                return send_error(pb_utils, sender, f"{names.SAMPLER}: encoding clip {meta.index} as "
                                  f"{meta.audio_format}: {type(e).__name__}: {e}")
        outputs = ((I.CLIP_AUDIO, audio), (I.CLIP_INDEX, [meta.index]), (I.CAPTION, [meta.caption.encode()]),
                   (I.CLIP_START_S, [meta.start_s]), (I.CLIP_DURATION_S, [meta.duration_s]),
                   (I.IS_LAST, [meta.is_last]), (I.CLIP_PLAN, [json.dumps(meta.plan_entry()).encode()]),
                   (I.CLIP_ENCODED, [encoded]), (I.MIME_TYPE, [mime.encode()]))
        sender.send(pb_utils.InferenceResponse([pb_utils.Tensor(t.name, np.ascontiguousarray(v, dtype=t.numpy_dtype))
                                                for t, v in outputs]), flags=FINAL)
        self.metrics.clip_done(meta.plan_id, meta.arrival, meta.duration_s)
        if result.silence_s > 0:
            self.metrics.counter("audiostory_clips_late_total")
            self.metrics.counter("audiostory_stall_seconds_total", value=result.silence_s)

    async def _decode(self, latent):
        return await bls_output(pb_utils, self.vae_model, [pb_utils.Tensor(names.VAE_INPUT, latent)], names.VAE_OUTPUT,
                                self.bls_timeout_s, self.bls_attempts, self._bls_retry)

    def _bls_retry(self, model, attempt):
        self.metrics.counter("audiostory_bls_retries_total")
        self.logger.log_warn(f"{names.SAMPLER}: no answer from {model} within {self.bls_timeout_s:g} s "
                             f"(attempt {attempt} of {self.bls_attempts})")

    def finalize(self):
        self.scheduler.close()
        if self.batch_metrics is not None:
            self.batch_metrics.close()
