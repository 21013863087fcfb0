"""vLLM's engine metrics on Triton's ``/metrics``: a vLLM stat logger that sets Triton custom metrics.

The ``llm`` model embeds two ``AsyncLLM`` engines (generate and pooling). Each gets a stat logger
(vLLM v1's ``StatLoggerBase``) whose ``record`` runs on the engine's output loop after every engine
step; it only appends what it is given to a queue. A flusher thread writes the queue to Triton
through ``pb_utils.MetricFamily`` (every write is a round trip to the server process, so none is
made on the engine's loop), at most every ``interval_s``.

Names are the ones a vLLM user knows from vLLM's own ``/metrics`` (and vLLM's Triton backend), so
the same dashboards and rules read the embedded engines and a disaggregated tier of vLLM servers;
every series carries ``model``, ``version`` and ``engine`` (``generate`` or ``pooling``). The
histograms use vLLM's own bucket bounds.

``pb_utils`` is passed in (it exists only inside the python-backend stub).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from vllm.v1.metrics.buckets import INTER_TOKEN_LATENCY_BUCKETS, REQUEST_LATENCY_BUCKETS, TIME_TO_FIRST_TOKEN_BUCKETS
from vllm.v1.metrics.loggers import StatLoggerBase

ENGINES = ("generate", "pooling")

# name -> (kind, description, buckets); the series an engine exports (README: "Metrics").
GAUGES = {
    "vllm:num_requests_running": "Requests in the engine's running batch.",
    "vllm:num_requests_waiting": "Requests waiting to be scheduled.",
    "vllm:kv_cache_usage_perc": "KV-cache usage (1 = full).",
}
COUNTERS = {
    "vllm:prompt_tokens_total": "Prefill tokens processed.",
    "vllm:generation_tokens_total": "Generation tokens processed.",
    "vllm:num_preemptions_total": "Preemptions of running requests by the scheduler.",
}
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": ("Time to first token in seconds.", TIME_TO_FIRST_TOKEN_BUCKETS),
    "vllm:inter_token_latency_seconds": ("Inter-token latency in seconds.", INTER_TOKEN_LATENCY_BUCKETS),
    "vllm:e2e_request_latency_seconds": ("End-to-end engine request latency in seconds.", REQUEST_LATENCY_BUCKETS),
    "vllm:request_queue_time_seconds": ("Time requests spent waiting in the engine's queue, seconds.",
                                        REQUEST_LATENCY_BUCKETS),
}
SUCCESS = "vllm:request_success_total"   # counter with ``finished_reason`` (stop, length, abort, ...)


@dataclass
class _Snapshot:
    engine: str
    gauges: dict[str, float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    observations: dict[str, list[float]] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)


class VllmMetrics:
    """The families (created once, shared by both engines) and the flusher thread."""

    def __init__(self, pb_utils, labels: dict[str, str], interval_s: float = 0.5):
        self.pb = pb_utils
        self.labels = dict(labels)
        self.interval_s = interval_s
        self._families: dict[str, object] = {}
        self._metrics: dict[tuple, object] = {}
        self._pending: deque[_Snapshot] = deque()    # append / popleft are thread-safe
        self._wake = threading.Event()
        self._stop = threading.Event()
        kinds = [(GAUGES, "GAUGE"), (COUNTERS, "COUNTER")]
        for table, kind in kinds:
            for name, description in table.items():
                self._family(name, description, kind)
        for name, (description, _) in HISTOGRAMS.items():
            self._family(name, description, "HISTOGRAM")
        self._family(SUCCESS, "Requests finished by the engine, by finish reason.", "COUNTER")
        # Every series exists from the start (at zero), so that a query for it is never empty.
        for engine in ENGINES:
            for name in (*GAUGES, *COUNTERS):
                self._metric(name, engine)
            for name, (_, buckets) in HISTOGRAMS.items():
                self._metric(name, engine, buckets=buckets)
        self._thread = threading.Thread(target=self._run, name="vllm-metrics", daemon=True)
        self._thread.start()

    def _family(self, name: str, description: str, kind: str):
        self._families[name] = self.pb.MetricFamily(name=name, description=description,
                                                    kind=getattr(self.pb.MetricFamily, kind))

    def _metric(self, name: str, engine: str, buckets=None, **extra):
        key = (name, engine, tuple(sorted(extra.items())))
        if key not in self._metrics:
            kwargs = {"buckets": list(buckets)} if buckets is not None else {}
            self._metrics[key] = self._families[name].Metric(labels={**self.labels, "engine": engine, **extra},
                                                            **kwargs)
        return self._metrics[key]

    def stat_logger(self, engine: str):
        """A per-engine stat logger factory for ``AsyncLLM(stat_loggers=[...])``."""
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        metrics = self

        class TritonStatLogger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                self.engine_index = engine_index

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                metrics.add(engine, scheduler_stats, iteration_stats)

            def log_engine_initialized(self):
                pass

        TritonStatLogger.__name__ = TritonStatLogger.__qualname__ = f"TritonStatLogger[{engine}]"
        return TritonStatLogger

    # -- the engine's side: cheap ---------------------------------------------------------------
    def add(self, engine: str, scheduler_stats, iteration_stats) -> None:
        if self._stop.is_set():
            return
        snap = _Snapshot(engine)
        if scheduler_stats is not None:
            snap.gauges["vllm:num_requests_running"] = scheduler_stats.num_running_reqs
            snap.gauges["vllm:num_requests_waiting"] = (scheduler_stats.num_waiting_reqs
                                                       + scheduler_stats.num_skipped_waiting_reqs)
            snap.gauges["vllm:kv_cache_usage_perc"] = scheduler_stats.kv_cache_usage
        if iteration_stats is not None:
            it = iteration_stats
            snap.counters["vllm:prompt_tokens_total"] = it.num_prompt_tokens
            snap.counters["vllm:generation_tokens_total"] = it.num_generation_tokens
            snap.counters["vllm:num_preemptions_total"] = it.num_preempted_reqs
            snap.observations["vllm:time_to_first_token_seconds"] = list(it.time_to_first_tokens_iter)
            snap.observations["vllm:inter_token_latency_seconds"] = list(it.inter_token_latencies_iter)
            snap.observations["vllm:e2e_request_latency_seconds"] = [f.e2e_latency for f in it.finished_requests]
            snap.observations["vllm:request_queue_time_seconds"] = [f.queued_time for f in it.finished_requests]
            for f in it.finished_requests:
                reason = str(f.finish_reason)
                snap.finished[reason] = snap.finished.get(reason, 0) + 1
        if snap.gauges or snap.counters:
            self._pending.append(snap)
            self._wake.set()

    # -- the flusher thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            self.flush()
            self._stop.wait(self.interval_s)   # what arrives meanwhile goes in the next pass

    def flush(self) -> None:
        batch = []
        while self._pending:
            batch.append(self._pending.popleft())
        if not batch:
            return
        gauges: dict[tuple[str, str], float] = {}
        counters: dict[tuple[str, str], float] = {}
        finished: dict[tuple[str, str], int] = {}
        for snap in batch:
            for name, value in snap.gauges.items():
                gauges[(name, snap.engine)] = value          # the latest wins
            for name, value in snap.counters.items():
                counters[(name, snap.engine)] = counters.get((name, snap.engine), 0) + value
            for reason, n in snap.finished.items():
                finished[(reason, snap.engine)] = finished.get((reason, snap.engine), 0) + n
        for (name, engine), value in gauges.items():
            self._metric(name, engine).set(float(value))
        for (name, engine), value in counters.items():
            if value:
                self._metric(name, engine).increment(float(value))
        for (reason, engine), n in finished.items():
            self._metric(SUCCESS, engine, finished_reason=reason).increment(float(n))
        for snap in batch:
            for name, values in snap.observations.items():
                if values:
                    metric = self._metric(name, snap.engine, buckets=HISTOGRAMS[name][1])
                    for v in values:
                        metric.observe(float(v))

    def close(self) -> None:
        """Stop the flusher and release the metrics now, while the stub can still talk to the
        server: a metric family left to the interpreter's own teardown crashes the stub (its
        destructor writes to shared memory that is gone by then)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        self._pending.clear()
        self._metrics.clear()
        self._families.clear()
