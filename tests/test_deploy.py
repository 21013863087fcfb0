"""deploy/: the chart renders and validates against pinned Kubernetes schemas, the Dockerfile and
compose file pass their linters (offline, tools from build/deploy-venv), the GPU lock installs on the
image's target (pip against the package index); GPU placement settings."""
import json
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_PY = ROOT / "build" / "deploy-venv" / "bin" / "python"


def check(*args):
    assert DEPLOY_PY.exists(), "build/deploy-venv is missing: run `make setup`"
    proc = subprocess.run([str(DEPLOY_PY), str(ROOT / "deploy" / "check.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture(scope="module")
def rendered():
    rc, summary, err = check("--json")
    assert rc == 0, (summary.get("errors"), err[-2000:])
    return summary


def _find(docs, kind, name_suffix=""):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert found, f"no {kind} *{name_suffix}"
    return found[0]


def test_chart_renders_and_every_object_validates_strictly(rendered):
    assert rendered["errors"] == [] and rendered["kube_version"] == "1.31.0"
    assert rendered["hadolint"] == "clean" and "ok" in rendered["compose"]
    default = rendered["objects"]["default"]
    pod = _find(default, "Deployment")["spec"]["template"]["spec"]
    triton = pod["containers"][0]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Triton's own endpoints, made true to the stages by the supervisor the entrypoint runs
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    live = triton["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 180      # a server restart fits
    assert triton["startupProbe"]["failureThreshold"] * triton["startupProbe"]["periodSeconds"] >= 1800
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    hpa = _find(default, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]] == ["audiostory_pending_stories",
                                                                            "audiostory_active_stories"]
    assert _find(default, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "metrics"
    rules = _find(default, "PrometheusRule")["spec"]
    chart_files = ROOT / "deploy" / "helm" / "audiostory" / "files"
    assert rules == yaml.safe_load((chart_files / "audiostory-rules.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"AudioStoryFirstClipSlow", "AudioStoryRejectingStories", "AudioStoryStageFailing",
            "AudioStoryKVCacheNearFull", "AudioStoryDiTBatchCollapsed"} <= alerts
    dashboard = _find(default, "ConfigMap", "-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["audiostory-dashboard.json"])["uid"] == "audiostory"
    assert {p["name"] for p in _find(default, "Service")["spec"]["ports"]} == {"http", "grpc", "metrics"}
    assert not [d for d in default if "vllm" in d["metadata"]["name"]]


def test_disaggregated_values_add_the_vllm_tier_and_point_the_llm_at_it(rendered):
    docs = rendered["objects"]["disaggregated"]
    settings = json.loads(_find(docs, "ConfigMap", "-settings")["data"]["settings.json"])
    eo = settings["engine_options"]
    assert eo["generate_url"] == "http://as-audiostory-vllm-generate:8100"
    assert eo["pooling_url"] == "http://as-audiostory-vllm-pooling:8101"
    pooling = _find(docs, "Deployment", "vllm-pooling")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--runner=pooling" in pooling and any("token_embed" in a for a in pooling)
    # One source for the tier servers' arguments: the chart's file is remote_llm.SERVER_ARGS, and
    # every one of them reaches its Deployment (--seed=0 included).
    from audiostory_ensemble.llm.remote_llm import SERVER_ARGS, SERVER_ARGS_FILE
    assert json.loads((ROOT / SERVER_ARGS_FILE).read_text()) == SERVER_ARGS
    for role, args in SERVER_ARGS.items():
        rendered_args = _find(docs, "Deployment", f"vllm-{role}")["spec"]["template"]["spec"]["containers"][0]["args"]
        assert rendered_args[-len(args):] == args and "--seed=0" in rendered_args
    assert _find(docs, "Service", "vllm-generate")["spec"]["ports"][0]["port"] == 8100
    # vLLM's own /metrics on both servers, with engine=generate|pooling as the embedded engines report it
    monitor = _find(docs, "ServiceMonitor", "-vllm")["spec"]
    assert monitor["selector"]["matchExpressions"][0]["values"] == ["vllm-generate", "vllm-pooling"]
    relabel = monitor["endpoints"][0]["relabelings"][0]
    assert relabel["targetLabel"] == "engine" and relabel["regex"] == "vllm-(.+)"


def test_object_store_values_fetch_the_release_and_keep_plans_on_a_pvc(rendered):
    docs = rendered["objects"]["object-store"]
    assert rendered["renders"]["object-store"] == [
        "apps/v1/Deployment/as-audiostory", "v1/ConfigMap/as-audiostory-dashboard",
        "v1/ConfigMap/as-audiostory-settings", "v1/Service/as-audiostory"]
    spec = _find(docs, "Deployment")["spec"]
    assert spec["replicas"] == 2
    init = spec["template"]["spec"]["initContainers"][0]
    assert init["command"][:3] == ["aws", "s3", "sync"] and init["envFrom"][0]["secretRef"]["name"] == "audiostory-s3"
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["release"]
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == "audiostory-engines"


def test_the_gpu_lock_installs_on_the_image(rendered):
    """The image's pip dry run (CPython 3.12, manylinux_2_39 x86_64, wheels only) for every pin, and
    the dependencies complete for the image's markers (tests/test_gpu_lock.py plants the drifts)."""
    lock = rendered["gpu_lock"]
    pins = [ln for ln in (ROOT / "requirements-gpu.lock").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lock["errors"] == [] and lock["pins"] == len(pins) and lock["python"] == "3.12.3", lock
    assert "nvcr.io/nvidia/tritonserver:25.10-py3" in (ROOT / "deploy" / "Dockerfile").read_text()
    assert lock["image"] == "nvcr.io/nvidia/tritonserver:25.10-py3"
    assert [p for p in pins if p.startswith("numpy==")][0].startswith("numpy==2."), "vllm 0.32 needs numpy 2"


BAD = {
    "a misspelt field": {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
                         "spec": {"ports": [{"port": 80}], "selectr": {"a": "b"}}},
    "a removed API": {"apiVersion": "autoscaling/v2beta2", "kind": "HorizontalPodAutoscaler",
                      "metadata": {"name": "x"}, "spec": {"maxReplicas": 2, "scaleTargetRef": {
                          "apiVersion": "apps/v1", "kind": "Deployment", "name": "x"}}},
    "a CRD not on the list": {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "x"}, "spec": {}},
    "a rule that does not parse": {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
                                   "metadata": {"name": "x"}, "spec": {"groups": [{"name": "g", "rules": [
                                       {"alert": "A", "expr": "sum(rate(audiostory_clips_total[5m])"}]}]}},
}


@pytest.mark.parametrize("what", sorted(BAD))
def test_the_validator_rejects(what, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(BAD[what]))
    rc, summary, _ = check("--validate", str(f))
    assert rc == 1 and summary["errors"], summary


def test_gpu_placement_settings_reach_the_instance_groups_and_the_llm(converted):
    from export.make_repo import PROFILES, _gpus_clause, fields

    settings = json.loads(json.dumps(PROFILES["gpu"]))
    settings.update(llm_gpus=[2, 3], dit_gpus=[0, 1], vae_gpus=[1])
    f = fields("gpu", settings, converted.root)
    assert f["dit_gpus"] == " gpus: [ 0, 1 ]" and f["vae_gpus"] == " gpus: [ 1 ]"
    assert json.loads(f["llm_gpus"]) == [2, 3]
    with pytest.raises(SystemExit, match="dit_gpus needs the gpu profile"):
        _gpus_clause({"dit_gpus": [0]}, "dit_gpus", gpu=False)
    with pytest.raises(SystemExit, match="list of GPU indices"):
        _gpus_clause({"dit_gpus": ["0"]}, "dit_gpus", gpu=True)
    for name in ("dit_step", "vae_decoder"):
        template = (ROOT / "model_repository" / name / "config.pbtxt").read_text()
        assert "_gpus} } ]" in template


def test_models_bind_to_the_gpu_triton_assigns():
    from audiostory_ensemble.serving.placement import instance_gpu, visible_gpus

    gpu3 = {"model_instance_kind": "GPU", "model_instance_device_id": "3"}
    assert instance_gpu(gpu3) == 3 and instance_gpu({"model_instance_kind": "CPU"}) is None
    assert visible_gpus(gpu3, []) == "3"                    # the instance's own GPU, not GPU 0
    assert visible_gpus(gpu3, [0, 1]) == "0,1"              # a configured set (tensor parallel) wins
    assert visible_gpus({"model_instance_kind": "MODEL"}, []) is None
