"""Custom Prometheus metrics of the python models, next to Triton's own on ``/metrics``.

``pb_utils`` is passed in (it exists only inside the python-backend stub), so this module stays
importable anywhere. Names are prefixed ``audiostory_``; every metric carries the model name.
"""

from __future__ import annotations

import time
from collections import OrderedDict

TTFC_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]


class StageMetrics:
    def __init__(self, pb_utils, model: str):
        self.pb = pb_utils
        self.labels = {"model": model}
        self._families = {}
        self._seen_first: OrderedDict[str, float] = OrderedDict()

    def _metric(self, name: str, description: str, kind: str, buckets=None):
        if name not in self._families:
            family = self.pb.MetricFamily(name=name, description=description,
                                          kind=getattr(self.pb.MetricFamily, kind))
            kwargs = {"buckets": buckets} if buckets is not None else {}
            self._families[name] = (family, family.Metric(labels=self.labels, **kwargs))
        return self._families[name][1]

    def counter(self, name: str, description: str, value: float = 1.0) -> None:
        self._metric(name, description, "COUNTER").increment(value)

    def gauge(self, name: str, description: str, value: float) -> None:
        self._metric(name, description, "GAUGE").set(value)

    def observe(self, name: str, description: str, value: float, buckets=TTFC_BUCKETS) -> None:
        self._metric(name, description, "HISTOGRAM", buckets).observe(value)

    # -- the stages' metrics --------------------------------------------------------------------
    def clip_done(self, request_id: str, arrival: float, audio_seconds: float) -> None:
        self.counter("audiostory_clips_total", "Clips delivered")
        self.counter("audiostory_audio_seconds_total", "Seconds of story audio delivered", audio_seconds)
        if request_id not in self._seen_first:
            self._seen_first[request_id] = arrival
            if len(self._seen_first) > 4096:
                self._seen_first.popitem(last=False)
            self.observe("audiostory_time_to_first_clip_seconds",
                         "From the request reaching the planner to its first clip leaving the pipeline",
                         max(0.0, time.time() - arrival))

    def plan_done(self, generated_tokens: int, clips: int) -> None:
        self.counter("audiostory_planner_tokens_total", "Tokens in the plans (generated and forced)",
                     generated_tokens)
        self.counter("audiostory_plans_total", "Plans written")

    def batch(self, rows: int, executions_name: str) -> None:
        self.counter(f"audiostory_{executions_name}_rows_total", "Rows (clip-steps or clips) executed", rows)
        self.observe(f"audiostory_{executions_name}_batch_rows", "Rows per execution", rows, BATCH_BUCKETS)
