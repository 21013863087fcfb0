"""audiostory_stream: the streaming front door. Tensors in and out; the story itself is
``pipeline.story.StoryRunner``, handed the stages as BLS clients (``serving.stage_clients``).

- The client's format (`AUDIO_FORMAT`): the stages render PCM, each clip is encoded here, and with
  `STORY_STREAM` the story itself follows in order, final part by final part
  (`pipeline.output.StoryOutput`), PCM chunks or one encoded file in pieces.
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
- Every response is sent from a thread (`serving.stage_clients.ThreadedSends`: a caller that died
  never takes its responses, and Triton's send then blocks for good). A send unfinished after
  `send_timeout_s` ends that story and counts as stuck; so do streams given up on a dead stage.
  Past a bound (Triton's python backend has 32 threads per instance for sends), this stage asks
  the supervisor for its own restart. The first instance exports the stage board as metrics.
"""
import asyncio

import triton_python_backend_utils as pb_utils

from audiostory_ensemble import interface as I
from audiostory_ensemble import names
from audiostory_ensemble.pipeline.output import StoryOutput
from audiostory_ensemble.pipeline.request import RequestError, parse_request, story_stream
from audiostory_ensemble.pipeline.story import StoryRunner
from audiostory_ensemble.runtime.loop import DaemonCalls, ensure_heartbeat
from audiostory_ensemble.runtime.stages import BoardView, StageDown, report
from audiostory_ensemble.serving import control
from audiostory_ensemble.serving.adapter import Parameters
from audiostory_ensemble.serving.metrics import ENCODE_COUNTERS, BoardMetrics, StageMetrics
from audiostory_ensemble.serving.metrics import FRONT_DOOR_COUNTERS as COUNTERS
from audiostory_ensemble.serving.stage_clients import BlsStageClients, ThreadedSends

ENCODING_INPUTS = {t.name for t in I.ENCODING_INPUTS}


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        params = Parameters(args)
        self.stages = (params.get("llm", names.LLM), params.get("bridge", names.BRIDGE),
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
        self.sends = ThreadedSends(pb_utils, self.limits.max_active_stories + 8, params.float("send_timeout_s", 10.0),
                                   self._send_stuck)
        self.max_stuck_sends = 8
        self.stuck_reported = False
        self.board = BoardView()
        self.metrics = StageMetrics(pb_utils, self.name)
        self.metrics.declare({**dict(COUNTERS.values()), **ENCODE_COUNTERS})
        self._set_active(0)
        first = args.get("model_instance_name", "").endswith("_0_0")
        self.board_metrics = BoardMetrics(pb_utils, self.name, self.board) if first and self.board.present else None

    async def execute(self, requests):
        ensure_heartbeat()
        await asyncio.gather(*(self._one(r) for r in requests))

    async def _one(self, request):
        sender = request.get_response_sender()
        inputs = {t.name: pb_utils.get_input_tensor_by_name(request, t.name) for t in I.REQUEST_INPUTS}
        try:
            params = parse_request(lambda n: None if inputs[n] is None else inputs[n].as_numpy(), self.limits)
            stream_t = pb_utils.get_input_tensor_by_name(request, I.STORY_STREAM.name)
            wanted = set(request.requested_output_names())     # none named: every output
            output = StoryOutput(params.audio_format, params.audio_quality,
                                 story_stream(lambda n: None if stream_t is None else stream_t.as_numpy()),
                                 clip_files=not wanted or I.CLIP_ENCODED.name in wanted)
            story_key = control.story_key(pb_utils.get_input_tensor_by_name(request, control.STORY_KEY_INPUT))
        except RequestError as e:
            return await self.sends.error(sender, str(e), pb_utils.TritonError.INVALID_ARG)
        down = self.board.down(n for n in self.board.stages() if n not in (self.name, I.FULL_MODEL))
        if down is not None:
            self.metrics.counter(*COUNTERS["unavailable"])
            return await self.sends.error(sender, str(StageDown(down[0], down[1].reason or "it died")),
                                          pb_utils.TritonError.UNAVAILABLE)
        if self.active >= self.limits.max_active_stories:
            self.metrics.counter(*COUNTERS["rejected"])
            return await self.sends.error(sender, f"{control.BUSY}: {self.active} stories in progress "
                                          f"(max_active_stories = {self.limits.max_active_stories}); retry later",
                                          pb_utils.TritonError.UNAVAILABLE)
        self._set_active(self.active + 1)
        try:
            def log(message):
                self.logger.log_warn(f"{self.name}: story {story_key}: {message}")
            # The stages render PCM; the client's format is made here (and the story, in order).
            stage_inputs = [t for n, t in inputs.items() if t is not None and n not in ENCODING_INPUTS]
            clients = BlsStageClients(pb_utils, self.stages, sender, stage_inputs, story_key, self.sends, self.board,
                                      log, output)
            await StoryRunner(clients, self.calls, self.limits.story_timeout_s, 0.05,
                              lambda counter: self.metrics.counter(*COUNTERS[counter]), log).run()
            self._check_stuck()
        finally:
            output.close()
            if output.encode_s:
                self.metrics.encoded(output.encoded_audio_s, output.encode_s)
            self._set_active(self.active - 1)

    def _set_active(self, count):
        self.active = count
        self.metrics.gauge("audiostory_active_stories", "Stories in progress at the front door", count)
        self.metrics.tracked({"stream_threads": self.calls.running, "stuck_streams": self.calls.stuck,
                              "stuck_sends": self.sends.stuck})

    def _send_stuck(self):
        self.logger.log_warn(f"{self.name}: a response was not taken within {self.sends.timeout_s:g} s "
                             "(its caller died?); the story is dropped")
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
