"""Custom Prometheus metrics of the python models, next to Triton's own on ``/metrics``.

``pb_utils`` is passed in (it exists only inside the python-backend stub), so this module stays
importable anywhere. Names are prefixed ``audiostory_``; every metric carries the model name.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque

TTFC_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]
TTFC_DESCRIPTION = "From the request reaching the planner to its first clip leaving the pipeline"


# dit_sampler's metrics (declared at zero when it starts).
SAMPLER_COUNTERS = {"audiostory_clips_total": "Clips delivered",
                    "audiostory_audio_seconds_total": "Seconds of story audio delivered",
                    "audiostory_cancel_requests_total": "Control requests that cancelled a story",
                    "audiostory_clips_cancelled_total": "Clips stopped by a cancel",
                    "audiostory_steps_saved_total": "DiT steps not run because of a cancel",
                    "audiostory_bls_retries_total": "BLS requests re-sent after no answer",
                    "audiostory_clips_late_total": "Clips delivered after the listener needed them (a stall)",
                    "audiostory_stall_seconds_total": "Seconds of silence late clips caused (at this stage)",
                    "audiostory_stories_refused_total": "New stories refused: DiT work at risk over admit_backlog_s"}
STEPS_AFTER_CANCEL = ("DiT steps a cancelled clip ran after the cancel reached the step scheduler "
                      "(the one in flight, at most)", [0, 1, 2, 4, 8, 16, 64])
SAMPLER_HISTOGRAMS = {"audiostory_time_to_first_clip_seconds": (TTFC_DESCRIPTION, TTFC_BUCKETS),
                      "audiostory_steps_after_cancel": STEPS_AFTER_CANCEL}


# The front door's counters, by the name the story runner reports an ending under.
# Where AUDIO_FORMAT is not pcm: the front door encodes (clips and the ordered story), or in the
# ensemble dit_sampler (clips).
ENCODE_COUNTERS = {"audiostory_encoded_audio_seconds_total": "Seconds of audio encoded for clients (not pcm)",
                   "audiostory_encode_seconds_total": "Seconds spent encoding audio for clients, on worker threads"}

FRONT_DOOR_COUNTERS = {
    "rejected": ("audiostory_requests_rejected_total", "Requests refused: server at capacity"),
    "timed_out": ("audiostory_requests_timed_out_total", "Stories failed by the timeout"),
    "cancelled": ("audiostory_requests_cancelled_total", "Stories cancelled by their client"),
    "unavailable": ("audiostory_requests_unavailable_total", "Stories refused or ended because a stage was down"),
    "overloaded": ("audiostory_requests_overloaded_total",
                   "Stories refused because the DiT could not play them without stalling the ones in progress")}


class StageMetrics:
    def __init__(self, pb_utils, model: str):
        self.pb = pb_utils
        self.labels = {"model": model}
        self._families = {}
        self._seen_first: OrderedDict[str, float] = OrderedDict()
        self._tracked_family = None
        self._tracked: dict[str, object] = {}

    def _metric(self, name: str, description: str, kind: str, buckets=None):
        if name not in self._families:
            family = self.pb.MetricFamily(name=name, description=description,
                                          kind=getattr(self.pb.MetricFamily, kind))
            kwargs = {"buckets": buckets} if buckets is not None else {}
            self._families[name] = (family, family.Metric(labels=self.labels, **kwargs))
        return self._families[name][1]

    def declare(self, counters: dict[str, str], histograms: dict[str, tuple[str, list]] | None = None) -> None:
        """Counters (``name -> description``) and histograms (``name -> (description, buckets)``)
        that exist from the start at zero, so that a query for one (a rate, an alert) finds a
        series before the first event."""
        for name, description in counters.items():
            self._metric(name, description, "COUNTER")
        for name, (description, buckets) in (histograms or {}).items():
            self._metric(name, description, "HISTOGRAM", buckets)

    def counter(self, name: str, description: str = "", value: float = 1.0) -> None:
        """Adds ``value``; a counter declared with :meth:`declare` needs no description here."""
        self._metric(name, description, "COUNTER").increment(value)

    def encoded(self, audio_s: float, seconds: float) -> None:
        """Audio encoded for clients (``ENCODE_COUNTERS``): its seconds, and the time it took."""
        self.counter("audiostory_encoded_audio_seconds_total", value=audio_s)
        self.counter("audiostory_encode_seconds_total", value=seconds)

    def gauge(self, name: str, description: str, value: float) -> None:
        self._metric(name, description, "GAUGE").set(value)

    def observe(self, name: str, description: str, value: float, buckets=TTFC_BUCKETS) -> None:
        self._metric(name, description, "HISTOGRAM", buckets).observe(value)

    def close(self) -> None:
        """Release the metrics while the stub can still talk to the server (from ``finalize``): a
        metric family that lives on into the interpreter's teardown (the model held by a stored
        traceback, say) crashes the stub there, its destructor writing to shared memory already gone."""
        self._families.clear()
        self._tracked.clear()
        self._tracked_family = None

    @property
    def first_clip_ids(self) -> int:
        return len(self._seen_first)

    def tracked(self, sizes: dict[str, int]) -> None:
        """``audiostory_tracked_entries{model, structure}``: the size of each per-request structure
        of a stage (registries, caches, limiters, summaries), so that a bound can be watched."""
        if self._tracked_family is None:
            self._tracked_family = self.pb.MetricFamily(
                name="audiostory_tracked_entries", description="Entries held in a stage's per-request structure",
                kind=self.pb.MetricFamily.GAUGE)
        for structure, size in sizes.items():
            if structure not in self._tracked:
                self._tracked[structure] = self._tracked_family.Metric(labels={**self.labels, "structure": structure})
            self._tracked[structure].set(size)

    # -- the stages' metrics --------------------------------------------------------------------
    def clip_done(self, plan_id: str, arrival: float, audio_seconds: float) -> None:
        self.counter("audiostory_clips_total", "Clips delivered")
        self.counter("audiostory_audio_seconds_total", "Seconds of story audio delivered", audio_seconds)
        if plan_id not in self._seen_first:    # bounded: the newest 4096 ids
            self._seen_first[plan_id] = arrival
            if len(self._seen_first) > 4096:
                self._seen_first.popitem(last=False)
            self.observe("audiostory_time_to_first_clip_seconds", TTFC_DESCRIPTION, max(0.0, time.time() - arrival))

    def clip_stopped(self, steps_saved: int, steps_after_cancel: int | None) -> None:
        """A clip stopped by a cancel: the steps it did not run and, if it reached the step
        scheduler, how many ran after the cancel got there."""
        self.counter("audiostory_clips_cancelled_total", SAMPLER_COUNTERS["audiostory_clips_cancelled_total"])
        self.counter("audiostory_steps_saved_total", SAMPLER_COUNTERS["audiostory_steps_saved_total"], steps_saved)
        if steps_after_cancel is not None:
            self.observe("audiostory_steps_after_cancel", STEPS_AFTER_CANCEL[0], steps_after_cancel,
                         STEPS_AFTER_CANCEL[1])

    def plan_done(self, generated_tokens: int) -> None:
        self.counter("audiostory_planner_tokens_total", "Tokens in the plans (generated and forced)",
                     generated_tokens)
        self.counter("audiostory_plans_total", "Plans written")

    def batch(self, rows: int, executions_name: str) -> None:
        self.counter(f"audiostory_{executions_name}_rows_total", "Rows (clip-steps or clips) executed", rows)
        self.observe(f"audiostory_{executions_name}_batch_rows", "Rows per execution", rows, BATCH_BUCKETS)


class BatchMetrics:
    """The step scheduler's metrics, written off its thread: :meth:`add` only appends, and a
    flusher thread writes the counters (one increment for everything since its last pass) and the
    batch histogram (one observation per engine call). Each metric update is a round trip to the
    server process, and the scheduler calls :meth:`add` after every iteration.

    The same families as a Triton model's batch metrics (``StageMetrics.batch``), plus the engine's
    seconds (``..._compute_seconds_total``: what Triton reports as compute for a served model) and
    the loop's (``..._loop_seconds_total``: gather, engine call and scatter)."""

    def __init__(self, metrics: StageMetrics, executions_name: str):
        self.metrics = metrics
        self.name = executions_name
        self._pending: deque[int] = deque()    # append / popleft are thread-safe
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"{executions_name}-metrics", daemon=True)
        self._thread.start()

    def add(self, rows: int, engine_s: float = 0.0, busy_s: float = 0.0) -> None:
        self._pending.append((rows, engine_s, busy_s))
        self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            batch = []
            while self._pending:
                batch.append(self._pending.popleft())
            if not batch:
                continue
            m = self.metrics
            m.counter(f"audiostory_{self.name}_rows_total", "Rows (clip-steps or clips) executed",
                      sum(b[0] for b in batch))
            m.counter(f"audiostory_{self.name}_compute_seconds_total", "Seconds in engine calls",
                      sum(b[1] for b in batch))
            m.counter(f"audiostory_{self.name}_loop_seconds_total",
                      "Seconds in scheduler iterations (gather, engine call, scatter)", sum(b[2] for b in batch))
            for rows, _, _ in batch:
                m.observe(f"audiostory_{self.name}_batch_rows", "Rows per execution", rows, BATCH_BUCKETS)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=5)


class BoardMetrics:
    """The stage board (:mod:`.stages`) on ``/metrics``, refreshed every ``interval`` seconds from a
    thread: ``audiostory_stage_up{model, stage}`` (1 up, 0 restarting or failed) and
    ``audiostory_stage_restarts_total{model, stage}`` (restarts since the server helper started; the
    board outlives a restart of the server, so the counter goes on from where it was)."""

    def __init__(self, pb_utils, model: str, board, interval: float = 1.0):
        self.pb = pb_utils
        self.model = model
        self.board = board
        self.interval = interval
        self._up = pb_utils.MetricFamily(name="audiostory_stage_up", kind=pb_utils.MetricFamily.GAUGE,
                                         description="1 while the stage is up, 0 while it restarts or has failed")
        self._restarts = pb_utils.MetricFamily(name="audiostory_stage_restarts_total",
                                               kind=pb_utils.MetricFamily.COUNTER,
                                               description="Restarts of the stage by the supervisor")
        self._metrics: dict[str, tuple[object, object]] = {}
        self._counted: dict[str, int] = {}
        self._up_values: dict[str, float] = {}
        self._stop = threading.Event()
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="board-metrics", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        for stage, state in self.board.stages().items():
            if stage not in self._metrics:
                labels = {"model": self.model, "stage": stage}
                self._metrics[stage] = (self._up.Metric(labels=labels), self._restarts.Metric(labels=labels))
                self._counted[stage] = 0
            up, restarts = self._metrics[stage]
            value = 1.0 if state.up else 0.0
            if self._up_values.get(stage) != value:     # a set is a round trip to the server: only changes
                up.set(value)
                self._up_values[stage] = value
            if state.restarts > self._counted[stage]:
                restarts.increment(state.restarts - self._counted[stage])
                self._counted[stage] = state.restarts

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - metrics must never take the stage down
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._metrics.clear()
        self._up = self._restarts = None
