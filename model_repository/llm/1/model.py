"""llm: the story planner on vLLM (generate + pooling engines), decoupled: one response per clip.

Thin adapter over ``audiostory_ensemble.llm.planner``. Traps handled here (Triton 2.51 + vLLM):
locale set before importing vLLM; engines guarded against outliving the stub; the last clip
carries the final flag (no empty trailing response); ``is_cancelled()`` is never called after
the final response was sent.

Cancellation: a caller of this model directly sees ``is_cancelled()`` work; behind the ensemble it
never fires (Triton 2.51), so the front door sends a control request with ``_CANCEL`` = the story's
key (the ensemble request id, which reaches this model as its request id). Either way the plan's
coroutine is cancelled and the planner aborts its vLLM requests.

Faults: vLLM marks an engine dead when its engine core (or a worker under it) dies; a thread here
looks every 0.25 s. Then every plan in flight is answered UNAVAILABLE at once ("stage llm is
down: the generate engine died"), later requests are refused the same way, and the stage reports
itself on the stage board: the supervisor kills what is left of the stage and reloads it (new
engines, same options; nothing of the old requests kept). A remote tier's server that cannot be
reached is answered UNAVAILABLE too (its own Deployment restarts it).
"""
import asyncio
import contextlib
import locale
import os
import threading
import time

locale.setlocale(locale.LC_CTYPE, "")  # the stub starts with an ASCII locale; vLLM needs UTF-8
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from audiostory_ensemble import names
from audiostory_ensemble.llm.engine_options import EngineOptions  # noqa: E402
from audiostory_ensemble.llm.planner import Planner, PlanRequest  # noqa: E402
from audiostory_ensemble.model.grammar import MODEL_FAILED, PlanError  # noqa: E402
from audiostory_ensemble.serving import control  # noqa: E402
from audiostory_ensemble.serving.adapter import Parameters, send_error  # noqa: E402
from audiostory_ensemble.serving.gates import CancelRegistry, TasksByKey  # noqa: E402
from audiostory_ensemble.serving.loop import LoopThread  # noqa: E402
from audiostory_ensemble.serving.metrics import StageMetrics  # noqa: E402
from audiostory_ensemble.serving.placement import visible_gpus  # noqa: E402
from audiostory_ensemble.serving.processes import guard_children, release_guard  # noqa: E402
from audiostory_ensemble.serving.records import ClipMeta  # noqa: E402
from audiostory_ensemble.serving.request import RequestError, parse_request  # noqa: E402
from audiostory_ensemble.serving.stages import StageDown, report  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        # Before any CUDA use: vLLM sees the configured GPU set (or this instance's GPU), not GPU 0.
        params = Parameters(args)
        gpus = visible_gpus(args, params.json("gpus", []))
        if gpus is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpus
        options = EngineOptions.from_dict(params.json("engine_options", {}))
        options.check_gpus(params.json("gpus", []))
        self.limits = params.limits()
        self.loop = LoopThread("llm-loop")
        self.planner = Planner.from_model(params.require("checkpoint"), options)
        # Only where continuation can run (a checkpoint with the audio path, embedded engines).
        self.audio_encoder = None if self.planner.continuation_refused else self.planner.converted.audio_encoder()
        # vLLM's engine metrics (both engines, label engine=generate|pooling) on Triton's /metrics;
        # a remote tier's servers export their own.
        self.engine_metrics = None
        if not options.remote:
            from audiostory_ensemble.llm.vllm_metrics import VllmMetrics
            self.engine_metrics = VllmMetrics(pb_utils, {"model": args["model_name"],
                                                         "version": args["model_version"]})
        self.loop.run(self.planner.start(self.engine_metrics))
        guard_children()
        self.metrics = StageMetrics(pb_utils, "llm")
        self.metrics.declare({"audiostory_cancel_requests_total": "Control requests that cancelled a story",
                              "audiostory_plans_cancelled_total": "Plans stopped by a cancel",
                              "audiostory_planner_tokens_total": "Tokens in the plans (generated and forced)",
                              "audiostory_plans_total": "Plans written"})
        self.plans_by_key = TasksByKey()            # story key -> its plan coroutines
        self.cancelled = CancelRegistry()   # a cancel may overtake its story's request
        self.down = ""                      # why the stage cannot serve any more (a dead engine)
        self.closing = threading.Event()
        if not options.remote:
            threading.Thread(target=self._watch_engines, name="llm-engine-watch", daemon=True).start()
        where = (f"remote: generate {options.generate_url}, pooling {options.pooling_url}" if options.remote
                 else f"in-process on {self.planner.converted.llm_dir}, CUDA_VISIBLE_DEVICES={gpus}")
        self.logger.log_info(f"llm: engines ready ({where})")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            cancel = pb_utils.get_input_tensor_by_name(request, control.CANCEL_INPUT)
            if cancel is not None:
                self._cancel(control.read_key(cancel.as_numpy()))
                sender.send(flags=FINAL)
                continue
            try:
                params = parse_request(
                    lambda name: _input(request, name), self.limits)
            except RequestError as e:
                send_error(pb_utils, sender, e)
                continue
            if self.down:
                send_error(pb_utils, sender, StageDown(names.LLM, self.down), pb_utils.TritonError.UNAVAILABLE)
                continue
            self.loop.submit(self._serve(request.request_id() or "", params, sender, time.time()))
        return None

    def _cancel(self, key):
        if not key:
            return
        self.cancelled.cancel(key)   # a plan that has not started yet sees this and ends at once
        plans = self.plans_by_key.cancel(key, self.loop.loop)
        self.metrics.counter("audiostory_cancel_requests_total", "Control requests that cancelled a story")
        self.logger.log_info(f"llm: cancel {key}: {plans} plan(s) in flight")
        self._report_tracked()

    def _watch_engines(self):
        while not self.closing.wait(0.25):
            dead = self.planner.dead_engine()
            if dead and not self.closing.is_set():      # not the engines' own shutdown
                self._engine_died(f"{dead} died")
                return

    def _engine_died(self, what):
        """An engine is dead: answer every plan in flight now, refuse the rest, ask for a restart."""
        if self.down:
            return
        self.down = what
        self.logger.log_error(f"llm: {what}; answering every plan UNAVAILABLE until the stage is restarted")
        if not report(names.LLM, what):
            self.logger.log_error("llm: no stage board (the server was not started by the server helper): "
                                  "nothing will restart this stage")
        self.loop.loop.call_soon_threadsafe(self.plans_by_key.cancel_all)   # on the loop that owns them

    def _report_tracked(self):
        self.metrics.tracked({"plans_by_key": len(self.plans_by_key), "cancelled_keys": len(self.cancelled),
                              **self.planner.tracked()})

    async def _serve(self, key, params, sender, arrival):
        if key in self.cancelled:
            sender.send(flags=FINAL)
            return
        try:
            with self.plans_by_key.track(key):
                await self._plan(key, params, sender, arrival)
        finally:
            self._report_tracked()

    async def _plan(self, key, params, sender, arrival):
        sent_final = False
        clips = 0
        req = None
        try:
            rows = None
            if params.input_audio is not None:
                if self.planner.continuation_refused:   # before any encoder work
                    raise RequestError(self.planner.continuation_refused)
                rows = await asyncio.to_thread(self.audio_encoder, params.input_audio, params.input_sample_rate)
            req = PlanRequest.from_params(params, rows)
            async with contextlib.aclosing(self.planner.plan(req)) as plan:  # closing aborts in vLLM
                async for clip in plan:
                    if sender.is_cancelled():
                        raise asyncio.CancelledError
                    meta = ClipMeta.of_planned(clip, params, req.request_id, arrival, key)
                    response = pb_utils.InferenceResponse([
                        pb_utils.Tensor(names.SEM, clip.sem.astype(np.float32)),
                        pb_utils.Tensor(names.RES, clip.res.astype(np.float32)),
                        pb_utils.Tensor(names.META, meta.encode()),
                    ])
                    sender.send(response, flags=FINAL if clip.is_last else 0)
                    sent_final = clip.is_last
                    clips += 1
        except asyncio.CancelledError:
            # The planner's cleanup has aborted the vLLM requests by now.
            if self.down and not sent_final:        # cancelled because an engine died
                send_error(pb_utils, sender, StageDown(names.LLM, self.down, lost=True),
                           pb_utils.TritonError.UNAVAILABLE)
                sent_final = True
            else:
                self.metrics.counter("audiostory_plans_cancelled_total", "Plans stopped by a cancel")
        except PlanError as e:   # the model's output, not the server: UNKNOWN, the text in the log
            self.logger.log_error(f"llm: request {key}: {type(e).__name__}: {e}; generated text: {e.text!r}")
            self.metrics.counter("audiostory_plans_unusable_total", "Plans the model wrote that did not parse")
            if not sent_final:
                send_error(pb_utils, sender, f"llm: {MODEL_FAILED}: {e}", pb_utils.TritonError.UNKNOWN)
                sent_final = True
        except Exception as e:  # noqa: BLE001 - every failure becomes an error response
            self.logger.log_error(f"llm: request {key}: {type(e).__name__}: {e}")
            dead = self.planner.dead_engine()
            if dead:
                self._engine_died(f"{dead} died")
                e = StageDown(names.LLM, self.down, lost=True)
            elif self.planner.unreachable(e):
                e = StageDown(names.LLM, str(e), lost=True)
            if not sent_final:
                send_error(pb_utils, sender, e,
                           pb_utils.TritonError.UNAVAILABLE if isinstance(e, StageDown) else None)
                sent_final = True
        if not sent_final:
            sender.send(flags=FINAL)
        summary = self.planner.summaries.get(req.request_id) if req is not None else None
        if summary is not None:
            self.metrics.plan_done(len(summary.generated_ids), clips)

    def finalize(self):
        self.closing.set()
        self.planner.shutdown()
        self.loop.stop()
        if self.engine_metrics is not None:
            self.engine_metrics.close()
        self.metrics.close()
        release_guard()


def _input(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()
