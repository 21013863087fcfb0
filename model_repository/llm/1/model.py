"""llm: the story planner on vLLM (generate + pooling engines), decoupled: one response per clip.
Tensors in and out; the work is ``audiostory_ensemble.llm.stage.PlanStage`` over the planner.

Traps handled here (Triton 2.51 + vLLM): locale set before importing vLLM; engines guarded against
outliving the stub; the last clip carries the final flag (no empty trailing response);
``is_cancelled()`` is never called after the final response was sent.

Cancellation: a caller of this model directly sees ``is_cancelled()`` work; behind the ensemble it
never fires (Triton 2.51), so the front door sends a control request with ``_CANCEL`` = the story's
key (the request id of the front door's `llm` request, so this model knows its plans by it). Either
way the plan's coroutine is cancelled and the planner aborts its vLLM requests.

Faults: an engine that dies (vLLM marks it dead) ends every plan in flight UNAVAILABLE at once ("stage
llm is down: the generate engine died"), later requests are refused the same way, and the stage
reports itself on the stage board: the supervisor kills what is left of the stage and reloads it.
A remote tier's server that cannot be reached is answered UNAVAILABLE too (its own Deployment
restarts it).
"""
import asyncio
import locale
import os
import time

locale.setlocale(locale.LC_CTYPE, "")  # the stub starts with an ASCII locale; vLLM needs UTF-8
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")

import triton_python_backend_utils as pb_utils

from audiostory_ensemble import names
from audiostory_ensemble.llm.engine_options import EngineOptions
from audiostory_ensemble.llm.planner import Planner
from audiostory_ensemble.llm.stage import PlanFailed, PlanStage
from audiostory_ensemble.pipeline.request import RequestError, parse_request
from audiostory_ensemble.runtime.loop import LoopThread
from audiostory_ensemble.runtime.processes import guard_children, release_guard
from audiostory_ensemble.runtime.stages import StageDown, report
from audiostory_ensemble.serving import control
from audiostory_ensemble.serving.adapter import Parameters, send_error
from audiostory_ensemble.serving.metrics import StageMetrics
from audiostory_ensemble.serving.placement import visible_gpus

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
        planner = Planner.from_model(params.require("checkpoint"), options)
        # vLLM's engine metrics (both engines, label engine=generate|pooling) on Triton's /metrics;
        # a remote tier's servers export their own.
        self.engine_metrics = None
        if not options.remote:
            from audiostory_ensemble.llm.vllm_metrics import VllmMetrics
            self.engine_metrics = VllmMetrics(pb_utils, {"model": args["model_name"], "version": args["model_version"]})
        self.loop.run(planner.start(self.engine_metrics))
        guard_children()
        self.metrics = StageMetrics(pb_utils, names.LLM)
        self.metrics.declare({"audiostory_cancel_requests_total": "Control requests that cancelled a story",
                              "audiostory_plans_cancelled_total": "Plans stopped by a cancel",
                              "audiostory_plans_unusable_total": "Plans the model wrote that did not parse",
                              "audiostory_planner_tokens_total": "Tokens in the plans (generated and forced)",
                              "audiostory_plans_total": "Plans written"})
        self.stage = PlanStage(planner, self.loop.loop, self._engine_died, self.metrics.plan_done)
        where = (f"remote: generate {options.generate_url}, pooling {options.pooling_url}" if options.remote
                 else f"in-process on {planner.converted.llm_dir}, CUDA_VISIBLE_DEVICES={gpus}")
        self.logger.log_info(f"{names.LLM}: engines ready ({where})")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            cancel = pb_utils.get_input_tensor_by_name(request, control.CANCEL_INPUT)
            if cancel is not None:
                story_key = control.read_key(cancel.as_numpy())
                plans = self.stage.cancel(story_key)
                self.metrics.counter("audiostory_cancel_requests_total")
                self.logger.log_info(f"{names.LLM}: cancel {story_key}: {plans} plan(s) in flight")
                self.metrics.tracked(self.stage.tracked())
                sender.send(flags=FINAL)
                continue
            try:
                params = parse_request(lambda name: _input(request, name), self.limits)
            except RequestError as e:
                send_error(pb_utils, sender, e)
                continue
            if self.stage.down:
                send_error(pb_utils, sender, StageDown(names.LLM, self.stage.down), pb_utils.TritonError.UNAVAILABLE)
                continue
            self.loop.submit(self._serve(request.request_id() or "", params, sender, time.time()))

    def _engine_died(self, what):
        self.logger.log_error(f"{names.LLM}: {what}; answering every plan UNAVAILABLE until the stage is restarted")
        if not report(names.LLM, what):
            self.logger.log_error(f"{names.LLM}: no stage board (the server was not started by the server helper): "
                                  "nothing will restart this stage")

    async def _serve(self, story_key, params, sender, arrival):
        sent_final = False
        try:
            async for entry in self.stage.plan(story_key, params, arrival, sender.is_cancelled):
                sender.send(pb_utils.InferenceResponse([
                    pb_utils.Tensor(names.SEM, entry.sem), pb_utils.Tensor(names.RES, entry.res),
                    pb_utils.Tensor(names.META, entry.meta.encode())]), flags=FINAL if entry.is_last else 0)
                sent_final = entry.is_last
        except asyncio.CancelledError:
            self.metrics.counter("audiostory_plans_cancelled_total")
        except Exception as e:  # noqa: BLE001 - every failure becomes the plan's error response
            code = (pb_utils.TritonError.UNAVAILABLE if isinstance(e, StageDown) else
                    pb_utils.TritonError.UNKNOWN if isinstance(e, PlanFailed) else None)
            text = f"; generated text: {e.text!r}" if isinstance(e, PlanFailed) else ""
            self.logger.log_error(f"{names.LLM}: story {story_key}: {type(e).__name__}: {e}{text}")
            if isinstance(e, PlanFailed):     # the model's output, not the server: UNKNOWN
                self.metrics.counter("audiostory_plans_unusable_total")
            if not sent_final:
                send_error(pb_utils, sender, e, code)
                sent_final = True
        finally:
            self.metrics.tracked(self.stage.tracked())
        if not sent_final:
            sender.send(flags=FINAL)

    def finalize(self):
        self.stage.close()
        self.loop.stop()
        if self.engine_metrics is not None:
            self.engine_metrics.close()
        self.metrics.close()
        release_guard()


def _input(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()
