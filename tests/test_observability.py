"""Observability with real parts: a real Prometheus (Debian's `prometheus` package) scrapes a real
server (tiny model) while stories run; the test reads our metrics, Triton's and vLLM's back through
Prometheus's HTTP API, evaluates the autoscaling queries the Prometheus adapter would send, the
chart's recording and alerting rules (loaded by that Prometheus) and every panel of the Grafana
dashboard. A query that names a series Prometheus does not have is a failure.

Why this module is over 300 lines: its tests share one server and one Prometheus scraping it,
started once for the module; the queries the tests send are kept beside the fixtures they read.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import yaml

from audiostory_ensemble import interface as I
from audiostory_ensemble.serving.triton_server import free_port
from client.api import AudioStoryClient, request_arrays
from tests.serverutil import OpenStream, ProcessTree, grpc_inputs, scrape, served, settled, wait_for

ROOT = Path(__file__).resolve().parent.parent
CHART_FILES = ROOT / "deploy" / "helm" / "audiostory" / "files"
RULES = CHART_FILES / "audiostory-rules.yaml"
DASHBOARD = CHART_FILES / "audiostory-dashboard.json"
ADAPTER_RULES = CHART_FILES / "prometheus-adapter-rules.yaml"
# The labels the Prometheus operator's ServiceMonitor gives a pod's series; the rules group by them.
TARGET_LABELS = {"namespace": "audiostory", "pod": "audiostory-0"}
STORIES = 3
QUEUED = 2          # audiostory_full requests waiting behind the one its single instance runs
STREAMS = 2         # streamed stories running meanwhile

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is installed by make setup")


# ---- Prometheus -----------------------------------------------------------------------------------

class Prometheus:
    """A Prometheus server on loopback scraping ``targets`` every second, with ``rule_files``
    evaluated every second; its storage in a temporary folder removed on stop."""

    def __init__(self, targets: list[str], rule_files: list[Path], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="prometheus-"))
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(f) for f in rule_files],
            "scrape_configs": [{"job_name": "audiostory",
                                "static_configs": [{"targets": targets, "labels": TARGET_LABELS}]}],
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.cmd = ["prometheus", f"--config.file={self.dir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn"]
        self.log = log
        self.tree = None

    def start(self) -> "Prometheus":
        self.tree = ProcessTree(self.cmd, self.log)
        wait_for(self._ready, timeout=60, interval=0.2, what="Prometheus to be ready")
        return self

    def _ready(self) -> bool:
        if self.tree.poll() is not None:
            raise AssertionError(f"prometheus exited: {self.log.read_text()[-2000:]}")
        try:
            return urllib.request.urlopen(f"{self.url}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def stop(self) -> None:
        try:
            if self.tree is not None:
                self.tree.stop(timeout=20)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            body = json.loads(urllib.request.urlopen(url, timeout=30).read())
        except urllib.error.HTTPError as e:   # a bad query answers 400 with the reason
            body = json.loads(e.read())
        return body

    def query(self, expr: str) -> list[dict]:
        body = self.api("query", query=expr)
        assert body["status"] == "success", f"{expr}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The one sample of a query (None when it has none)."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: {len(result)} series, expected at most one: {result}"
        return float(result[0]["value"][1]) if result else None

    def names(self) -> set[str]:
        return set(self.api("label/__name__/values")["data"])


# ---- PromQL: the series a query names ---------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan", "atan2"}


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords or label names)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                  # strings
    e = re.sub(r"\{[^{}]*\}", " ", e)                               # label matchers
    e = re.sub(r"\[[^\[\]]*\]", " ", e)                             # ranges and subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][+-]?\d+)?", " ", e)     # numbers
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        rest = e[m.end():].lstrip()
        if m.group(0).lower() not in _KEYWORDS and not rest.startswith("("):
            names.add(m.group(0))
    return names


def unknown_series(prom: Prometheus, expr: str, known: set[str]) -> set[str]:
    return series_names(expr) - known


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, query) for every panel, with the dashboard's variables as Grafana fills them."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "30s").replace("$namespace", ".*")
            out.append((panel["title"], expr))
    return out


def adapter_query(rule: dict, pod: str = TARGET_LABELS["pod"]) -> str:
    """A prometheus-adapter rule's metricsQuery as the adapter sends it for one pod's metric."""
    series = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", rule["seriesQuery"]).group(0)
    matchers = f'namespace="{TARGET_LABELS["namespace"]}",pod=~"{pod}"'
    return (rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers)
            .replace("<<.GroupBy>>", "pod"))


# ---- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(exported, test_build_dir):
    with served(test_build_dir, "observability", {"full_instances": 1, "full_max_queue": 8}) as s:
        yield s


@pytest.fixture(scope="module")
def prometheus(server, test_build_dir):
    prom = Prometheus([f"127.0.0.1:{server.metrics_port}"], [RULES], test_build_dir / "observability_prometheus.log")
    try:
        prom.start()
        wait_for(lambda: prom.query('up{job="audiostory"} == 1'), timeout=30, what="the first scrape")
        yield prom
    finally:
        prom.stop()


def caught_up(prom: Prometheus, server, expr: str, series_key: str) -> float:
    """The server's settled value of ``series_key``, once Prometheus's ``expr`` shows it."""
    target = settled(lambda: scrape(server).get(series_key, 0.0))
    wait_for(lambda: prom.value(expr) == target, timeout=30, interval=0.25,
             what=f"Prometheus to scrape {expr} = {target}")
    return target


# ---- tests ----------------------------------------------------------------------------------------

def test_prometheus_scrapes_our_tritons_and_vllms_metrics_with_sane_values(server, prometheus, sample_instructions):
    p = prometheus
    sel = 'model="dit_sampler"'
    # Declared at zero: the series exist before the first clip.
    assert p.value(f"audiostory_clips_total{{{sel}}}") == 0
    assert p.value(f"audiostory_time_to_first_clip_seconds_count{{{sel}}}") == 0
    assert p.value('audiostory_requests_rejected_total{model="audiostory_stream"}') == 0

    client = AudioStoryClient(server.grpc_url)
    clips = 0
    for k in range(STORIES):
        caption, total = sample_instructions[k]
        clips += len(client.generate(caption, total_duration=min(total, 15.0), num_steps=2, seed=k).clips)
    assert clips >= STORIES

    assert caught_up(p, server, f"audiostory_clips_total{{{sel}}}", f"audiostory_clips_total{{{sel}}}") == clips
    assert p.value(f"audiostory_time_to_first_clip_seconds_count{{{sel}}}") == STORIES
    ttfc = p.value(f"audiostory_time_to_first_clip_seconds_sum{{{sel}}}") / STORIES
    assert 0 < ttfc < 120
    assert p.value(f'audiostory_time_to_first_clip_seconds_bucket{{{sel},le="+Inf"}}') == STORIES
    assert p.value('audiostory_plans_total{model="llm"}') == STORIES
    # Triton's own: every story went through the front door, every clip through the VAE.
    assert p.value('nv_inference_request_success{model="audiostory_stream"}') == STORIES
    assert p.value('nv_inference_count{model="vae_decoder"}') == clips
    assert p.value('nv_inference_request_failure{model="audiostory_stream", reason="BACKEND"}') == 0
    steps = p.value('audiostory_dit_step_rows_total{model="dit_step"}')
    assert steps == 2 * clips                                  # 2 steps per clip, one row each

    # vLLM's engine metrics, both engines, told apart by `engine`.
    wait_for(lambda: p.value('sum(vllm:num_requests_running)') == 0, timeout=30, what="the engines to be idle")
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count"):
        series = p.query(name)
        assert sorted(s["metric"].get("engine") for s in series) == ["generate", "pooling"], (name, series)
        assert all(s["metric"]["model"] == "llm" and s["metric"]["version"] == "1" for s in series), series
    generated = p.value('vllm:generation_tokens_total{engine="generate"}')
    planned = p.value('audiostory_planner_tokens_total{model="llm"}')
    assert 0 < generated < planned          # the plan's forced runs are appended, not generated
    assert p.value('vllm:prompt_tokens_total{engine="generate"}') > 0
    assert p.value('vllm:prompt_tokens_total{engine="pooling"}') > 0
    assert p.value('vllm:time_to_first_token_seconds_count{engine="generate"}') >= STORIES
    assert p.value('vllm:inter_token_latency_seconds_count{engine="generate"}') > 0
    # one pooling pass per clip
    assert p.value('sum(vllm:e2e_request_latency_seconds_count{engine="pooling"})') == clips
    assert p.value('vllm:num_preemptions_total{engine="generate"}') == 0
    for engine in ("generate", "pooling"):
        usage = p.value(f'vllm:kv_cache_usage_perc{{engine="{engine}"}}')
        assert 0 <= usage <= 1


def test_the_autoscaling_queries_return_the_known_load(server, prometheus, sample_instructions):
    """One audiostory_full instance runs a story while QUEUED more wait in its queue and STREAMS
    streamed stories run: the adapter's queries give QUEUED pending and 1 + STREAMS active stories
    for the pod, and so does the recording rule."""
    p = prometheus
    rules = {r["name"]["as"]: r for r in yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]}
    pending_q = adapter_query(rules["audiostory_pending_stories"])
    active_q = adapter_query(rules["audiostory_active_stories"])
    assert p.value(pending_q) == 0 and p.value(active_q) == 0

    caption, _ = sample_instructions[0]
    full = grpcclient.InferenceServerClient(server.grpc_url)
    results: list = []
    done = threading.Event()

    def send(**params):
        def callback(result, error):
            results.append(error)
            if len(results) == 1 + QUEUED:
                done.set()
        full.async_infer(I.FULL_MODEL, grpc_inputs(request_arrays(caption, **params)), callback=callback,
                         client_timeout=600)

    streams = []
    try:
        send(total_duration=8.0, num_steps=200)                  # holds the one instance
        wait_for(lambda: scrape(server).get('audiostory_active_stories{model="audiostory_stream"}') == 1,
                 what="the whole story to start")
        for _ in range(QUEUED):
            send(total_duration=5.0, num_steps=2)
        streams = [OpenStream(server.grpc_url, instruction=caption, total_duration=50.0, num_steps=200)
                   for _ in range(STREAMS)]
        # The pod's per-pod values, as the HPA reads them through the adapter.
        wait_for(lambda: p.value(pending_q) == QUEUED and p.value(active_q) == 1 + STREAMS, timeout=60,
                 interval=0.25, what=f"pending {QUEUED} and active {1 + STREAMS} in Prometheus")
        assert p.query(pending_q)[0]["metric"] == {"pod": TARGET_LABELS["pod"]}
        wait_for(lambda: p.value("audiostory:pending_stories") == QUEUED, timeout=30, interval=0.25,
                 what="the recording rule audiostory:pending_stories")
    finally:
        for s in streams:
            s.cancel()
    assert done.wait(600) and results == [None] * (1 + QUEUED)
    full.close()
    wait_for(lambda: p.value(pending_q) == 0 and p.value(active_q) == 0, timeout=60, interval=0.25,
             what="the load to drain in Prometheus")


def test_every_rule_evaluates_on_scraped_series(prometheus):
    p = prometheus
    known = p.names()
    rule_file = yaml.safe_load(RULES.read_text())
    for group in rule_file["groups"]:
        for rule in group["rules"]:
            missing = unknown_series(p, rule["expr"], known | {r.get("record") for g in rule_file["groups"]
                                                                for r in g["rules"]})
            name = rule.get("record") or rule.get("alert")
            assert not missing, f"{name} names series Prometheus does not have: {missing}"
    # Prometheus loaded them all and evaluates them without error.
    groups = p.api("rules")["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert len(loaded) == sum(len(g["rules"]) for g in rule_file["groups"])
    wait_for(lambda: all(r["health"] == "ok" and r.get("lastEvaluation", "").startswith("2")
                         for g in p.api("rules")["data"]["groups"] for r in g["rules"]),
             timeout=10, what="every rule evaluated")
    bad = [(r["name"], r.get("lastError")) for g in p.api("rules")["data"]["groups"] for r in g["rules"]
           if r["health"] != "ok"]
    assert not bad
    # The recording rules over the stories of the tests above have values.
    assert p.value("audiostory:clips:rate1m") is not None
    assert p.value("audiostory:dit_step_batch_rows:mean5m") >= 1
    assert p.value("audiostory:vae_decoder_batch:mean5m") >= 1
    assert p.value("audiostory:time_to_first_clip_seconds:p99_5m") > 0
    assert p.value("audiostory:stories_rejected:rate5m") == 0
    # No alert fires on a healthy server. The first-clip objective may be pending: on 2 CPU cores the
    # stories queued behind a 200-step story above waited longer than 10 s for their first clip.
    alerts = p.api("alerts")["data"]["alerts"]
    assert [a for a in alerts if a["state"] == "firing"] == []
    assert {a["labels"]["alertname"] for a in alerts} <= {"AudioStoryFirstClipSlow"}, alerts


def test_every_dashboard_panel_evaluates_with_series(prometheus):
    p = prometheus
    known = p.names()
    queries = dashboard_queries()
    assert len(queries) >= 12
    for title, expr in queries:
        missing = unknown_series(p, expr, known)
        assert not missing, f"panel {title!r} names series Prometheus does not have: {missing}"
        assert p.query(expr), f"panel {title!r}: {expr} returns no series"


def test_the_checks_catch_a_misspelt_series(prometheus):
    """Teeth for the two tests above: a misspelt name in a panel or a rule is reported, whether
    the query would have come back empty or (inside an `or`) not."""
    p = prometheus
    known = p.names()
    title, expr = next((t, e) for t, e in dashboard_queries() if "audiostory_clips_total" in e)
    wrong = expr.replace("audiostory_clips_total", "audiostory_clip_total")
    assert unknown_series(p, wrong, known) == {"audiostory_clip_total"}
    assert p.query(wrong) == []
    dit = next(e for t, e in dashboard_queries() if "audiostory_dit_step_rows_total" in e)
    hidden = dit.replace('nv_inference_exec_count{model="dit_step"', 'nv_inference_exec_counts{model="dit_step"')
    assert p.query(hidden), "the `or` hides the misspelt name from the result"
    assert unknown_series(p, hidden, known) == {"nv_inference_exec_counts"}
    assert series_names('histogram_quantile(0.99, sum by (le, engine) (rate(vllm:ttft_bucket{a="b"}[5m]))) / 1e6') \
        == {"vllm:ttft_bucket"}


def test_the_engine_series_carry_vllms_own_names():
    """The names a vLLM user knows: every engine series we export is one vLLM's own Prometheus
    logger defines (counters with the `_total` prometheus_client appends), so one dashboard and
    one rule file read the embedded engines and a disaggregated tier's vLLM servers alike."""
    import inspect

    from vllm.v1.metrics import loggers

    from audiostory_ensemble.llm import vllm_metrics as vm

    theirs = set(re.findall(r'name="(vllm:[a-z0-9_]+)"', inspect.getsource(loggers.PrometheusStatLogger)))
    assert len(theirs) > 20
    ours = {*vm.GAUGES, *vm.HISTOGRAMS} | {n.removesuffix("_total") for n in (*vm.COUNTERS, vm.SUCCESS)}
    assert all(n.endswith("_total") for n in (*vm.COUNTERS, vm.SUCCESS))
    assert ours <= theirs, ours - theirs
    assert "vllm:kv_cache_usage_perc" in ours and "vllm:inter_token_latency_seconds" in ours
