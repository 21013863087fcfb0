"""dit_sampler: every clip's flow-matching loop on one step scheduler, then the clip's audio
(`vae_decoder` through BLS, trim, resample to 32 kHz) with every public output of the clip.

The denoising loop is continuous batching (`audiostory_ensemble.serving.scheduler`): each iteration makes
ONE engine call for every clip in flight, at whatever step each is, and the rows stay in the
engine between steps. The engine is a repository setting (`dit_engine`): `onnx` runs the exported
graph with onnxruntime in this process (the cpu profile: no hop per step at all); `triton` sends
one BLS request per iteration to the `dit_step` model (the gpu profile, where that model is a
TensorRT plan). `dit_step` stays servable on its own either way (perf_analyzer, other callers).

Scheduling, two gates in front of the scheduler:
- per request, at most `clips_in_flight_per_request` clips denoise at once, in story order (the
  listener needs clip 0 first, and clips of other requests keep the batches full);
- overall, at most `max_clips_in_flight` clips denoise at once; a freed slot goes to the clip of
  the oldest request (then the lowest index), so stories in progress finish before a newer request
  starts DiT work.

Cancellation: a request with `_CANCEL` = a story key (sent by the front door) takes every clip of
that story out of the scheduler before its next step; clips of the story that arrive later are
dropped at once. A direct caller's own cancel (`is_cancelled()`) is polled every `poll_s`.
"""
import asyncio
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from audiostory_ensemble import interface as I
from audiostory_ensemble import names
from audiostory_ensemble.model import post
from audiostory_ensemble.model.config import OUTPUT_SAMPLE_RATE, VAE_SAMPLE_RATE
from audiostory_ensemble.model.sampler import flow_sigmas, initial_noise
from audiostory_ensemble.serving import control
from audiostory_ensemble.serving.adapter import Parameters, bls_output, send_error
from audiostory_ensemble.serving.gates import CancelRegistry, PerKeyLimiter, PriorityGate
from audiostory_ensemble.serving.loop import ensure_heartbeat
from audiostory_ensemble.serving.metrics import TTFC_BUCKETS, TTFC_DESCRIPTION, BatchMetrics, StageMetrics
from audiostory_ensemble.serving.placement import instance_gpu
from audiostory_ensemble.serving.records import ClipMeta
from audiostory_ensemble.serving.scheduler import StepScheduler
from audiostory_ensemble.serving.stages import down_stage
from audiostory_ensemble.serving.step_engines import OnnxStepEngine, TritonStepEngine

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
STEPS_AFTER_CANCEL = ("DiT steps a cancelled clip ran after the cancel reached the step scheduler "
                      "(the one in flight, at most)", [0, 1, 2, 4, 8, 16, 64])


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        params = Parameters(args)
        self.vae_model = params.get("vae_model", names.VAE)
        self.bls_timeout_s = params.float("bls_timeout_s", 30.0)
        self.bls_attempts = params.int("bls_attempts", 4)
        self.poll_s = params.float("poll_s", 0.25)
        capacity = params.int("max_clips_in_flight", 32)
        n = params.int("num_tokens", 0)
        self.limiter = PerKeyLimiter(params.int("clips_in_flight_per_request", 1))
        self.gate = PriorityGate(capacity)
        self.cancelled = CancelRegistry()
        self.noise_cache = {0: initial_noise(0).numpy()[0]}
        self.sigma_cache = {}
        self.metrics = StageMetrics(pb_utils, "dit_sampler")
        self.metrics.declare({"audiostory_clips_total": "Clips delivered",
                              "audiostory_audio_seconds_total": "Seconds of story audio delivered",
                              "audiostory_cancel_requests_total": "Control requests that cancelled a story",
                              "audiostory_clips_cancelled_total": "Clips stopped by a cancel",
                              "audiostory_steps_saved_total": "DiT steps not run because of a cancel",
                              "audiostory_bls_retries_total": "BLS requests re-sent after no answer"},
                             {"audiostory_time_to_first_clip_seconds": (TTFC_DESCRIPTION, TTFC_BUCKETS),
                              "audiostory_steps_after_cancel": STEPS_AFTER_CANCEL})
        kind = params.get("dit_engine", "onnx")
        on_batch = None
        if kind == "onnx":
            engine = OnnxStepEngine(params.require("onnx_path"), capacity, n, params.int("threads", 0),
                                    instance_gpu(args))
            # The step runs here, not in dit_step: its batch metrics are reported here, under its name.
            self.batch_metrics = BatchMetrics(StageMetrics(pb_utils, "dit_step"), "dit_step")
            on_batch = self.batch_metrics.add
        elif kind == "triton":
            engine = TritonStepEngine(pb_utils, params.get("step_model", names.DIT_STEP), capacity, n,
                                      params.int("step_max_batch", 16), self.bls_timeout_s)
            self.batch_metrics = None
        else:
            raise ValueError(f"dit_sampler: dit_engine must be onnx or triton, got {kind!r}")
        self.scheduler = StepScheduler(engine, on_batch, min_batch=params.int("min_batch", 1))

    async def execute(self, requests):
        ensure_heartbeat()
        await asyncio.gather(*(self._one(r) for r in requests))
        return None

    def _noise(self, seed):
        if seed not in self.noise_cache:
            if len(self.noise_cache) > 64:
                self.noise_cache = {0: self.noise_cache[0]}
            self.noise_cache[seed] = initial_noise(seed).numpy()[0]
        return self.noise_cache[seed]

    def _sigmas(self, steps):
        if steps not in self.sigma_cache:
            self.sigma_cache[steps] = flow_sigmas(steps).numpy()
        return self.sigma_cache[steps]

    async def _one(self, request):
        sender = request.get_response_sender()
        cancel_t = pb_utils.get_input_tensor_by_name(request, control.CANCEL_INPUT)
        if cancel_t is not None:
            key = control.read_key(cancel_t.as_numpy())
            self.cancelled.cancel(key)
            self.scheduler.cancel(key)
            self.metrics.counter("audiostory_cancel_requests_total", "Control requests that cancelled a story")
            self._report_tracked()
            sender.send(flags=FINAL)
            return
        cond_t = pb_utils.get_input_tensor_by_name(request, names.COND)
        meta_t = pb_utils.get_input_tensor_by_name(request, names.META)
        if cond_t is None or meta_t is None:  # a final-flag placeholder
            sender.send(flags=FINAL)
            return
        try:
            meta = ClipMeta.decode(meta_t.as_numpy())
        except (ValueError, TypeError, KeyError) as e:
            send_error(pb_utils, sender, f"dit_sampler: bad _META: {e}")
            return
        try:
            async with self.limiter.slot(meta.request_id), self.gate.slot((meta.arrival, meta.index)):
                x = await self._denoise(sender, cond_t, meta)
            if x is not None:   # the gates are free again while this clip decodes
                await self._decode_and_send(sender, x, meta)
        except Exception as e:  # noqa: BLE001
            self.logger.log_error(f"dit_sampler: {type(e).__name__}: {e}")
            # A stage it calls (the VAE, the DiT step) died or is reloading: UNAVAILABLE, naming it.
            send_error(pb_utils, sender, e, pb_utils.TritonError.UNAVAILABLE if down_stage(str(e)) else None)
        finally:
            self._report_tracked()

    def _report_tracked(self):
        self.metrics.tracked({"request_limiter": len(self.limiter), "cancelled_keys": len(self.cancelled),
                              "noise_cache": len(self.noise_cache), "sigma_cache": len(self.sigma_cache),
                              "first_clip_ids": self.metrics.first_clip_ids, **self.scheduler.tracked()})

    def _stopped(self, sender, meta, job=None):
        self.metrics.counter("audiostory_clips_cancelled_total", "Clips stopped by a cancel")
        self.metrics.counter("audiostory_steps_saved_total", "DiT steps not run because of a cancel",
                             meta.num_steps - (job.steps_done if job else 0))
        if job is not None:     # the clip reached the scheduler
            description, buckets = STEPS_AFTER_CANCEL
            self.metrics.observe("audiostory_steps_after_cancel", description, job.steps_after_cancel, buckets)
        sender.send(flags=FINAL)

    async def _denoise(self, sender, cond_t, meta):
        """The clip's final latent ``[1, 645, 64]``, or None if its story was cancelled (the stream
        is then closed)."""
        if meta.cancel_key in self.cancelled or sender.is_cancelled():
            self._stopped(sender, meta)
            return None
        job, fut = self.scheduler.render(self._noise(meta.seed), cond_t.as_numpy(), meta.render_s, meta.guidance,
                                         self._sigmas(meta.num_steps), meta.cancel_key)
        while not fut.done():
            await asyncio.wait({fut}, timeout=self.poll_s)
            if not fut.done() and (meta.cancel_key in self.cancelled or sender.is_cancelled()):
                job.cancel()
        latent = fut.result()
        if latent is None:
            self._stopped(sender, meta, job)
            return None
        return latent[None]

    def _bls_retry(self, attempt):
        self.metrics.counter("audiostory_bls_retries_total", "BLS requests re-sent after no answer")
        self.logger.log_warn(f"dit_sampler: no answer from {self.vae_model} within {self.bls_timeout_s:g} s "
                             f"(attempt {attempt} of {self.bls_attempts})")

    async def _decode_and_send(self, sender, x, meta):
        wave = (await bls_output(pb_utils, self.vae_model, [pb_utils.Tensor("latent", x)], "wave",
                                 self.bls_timeout_s, self.bls_attempts, self._bls_retry))[0]
        audio = await asyncio.to_thread(
            lambda: post.resample(post.trim(wave, meta.render_s), VAE_SAMPLE_RATE, OUTPUT_SAMPLE_RATE))
        sender.send(pb_utils.InferenceResponse([
            pb_utils.Tensor(I.CLIP_AUDIO.name, np.ascontiguousarray(audio, dtype=np.float32)),
            pb_utils.Tensor(I.CLIP_INDEX.name, np.array([meta.index], dtype=np.int32)),
            pb_utils.Tensor(I.CAPTION.name, np.array([meta.caption.encode()], dtype=np.object_)),
            pb_utils.Tensor(I.CLIP_START_S.name, np.array([meta.start_s], dtype=np.float32)),
            pb_utils.Tensor(I.CLIP_DURATION_S.name, np.array([meta.duration_s], dtype=np.float32)),
            pb_utils.Tensor(I.IS_LAST.name, np.array([meta.is_last], dtype=np.bool_)),
            pb_utils.Tensor(I.CLIP_PLAN.name, np.array([json.dumps(meta.plan_entry()).encode()], dtype=np.object_)),
        ]), flags=FINAL)
        self.metrics.clip_done(meta.request_id, meta.arrival, meta.duration_s)

    def finalize(self):
        self.scheduler.close()
        if self.batch_metrics is not None:
            self.batch_metrics.close()
