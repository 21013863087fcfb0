"""Checks of the deployment artefacts (run with build/deploy-venv's python): offline, except the GPU
lock's, which reads package metadata from the index.

    python deploy/check.py                 # everything; a summary, exit 1 on a failure (--json: all of it)
    python deploy/check.py --validate FILE # only: validate the manifests in FILE (a YAML stream)

- the Helm chart renders (helm's Go engine via helm-python-sdk, no cluster, no network) for the
  default values, values-disaggregated.yaml and values-object-store.yaml, and `helm lint --strict`
  passes for each;
- every rendered object validates strictly (unknown fields are errors) against the JSON schemas
  of Kubernetes KUBE_VERSION (kubernetes-validate); kinds without a schema there are errors,
  except the CRD kinds listed in ALLOWED_CRDS, which get a structural check;
- a PrometheusRule passes `promtool check rules` (Debian's prometheus package, installed by
  `make setup`); the rule file's unit tests pass `promtool test rules`; the dashboard ConfigMap holds
  the dashboard file, whose every panel has a query on the dashboard's datasource; every metric the
  HPA names is served by a rule of files/prometheus-adapter-rules.yaml;
- the Dockerfile passes hadolint; the compose file validates against the compose-spec schema;
- requirements-gpu.lock installs on the image's target (deploy/gpu_lock.py: a pip dry run with the
  image's Python version and platform tags, wheels only, then its dependencies for the image's
  markers); this one needs the package index (metadata only where the index allows).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
CHART = DEPLOY / "helm" / "audiostory"
KUBE_VERSION = "1.31.0"
ALLOWED_CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
FILES = CHART / "files"
RULES = FILES / "audiostory-rules.yaml"
RULES_TEST = FILES / "audiostory-rules.test.yaml"
DASHBOARD = FILES / "audiostory-dashboard.json"
ADAPTER_RULES = FILES / "prometheus-adapter-rules.yaml"
VALUE_SETS = {"default": [], "disaggregated": [CHART / "values-disaggregated.yaml"],
              "object-store": [CHART / "values-object-store.yaml"]}


def render(values_files: list[Path]) -> list[dict]:
    import helm_python as helm

    values = {}
    for f in values_files:
        values = _merge(values, yaml.safe_load(f.read_text()) or {})
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(helm.values_from_yaml(yaml.safe_dump(values)), name="as", namespace="audiostory",
                             is_install=True)
    docs = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def lint(values_files: list[Path]) -> list[str]:
    import helm_python as helm

    values = {}
    for f in values_files:
        values = _merge(values, yaml.safe_load(f.read_text()) or {})
    result = helm.lint(str(CHART), helm.values_from_yaml(yaml.safe_dump(values)), strict=True,
                       kube_version=KUBE_VERSION)
    return [str(e) for e in result.get("errors", [])]


def validate(doc: dict) -> str | None:
    """None if the object is valid for KUBE_VERSION, else the reason."""
    import kubernetes_validate as kv

    key = (doc.get("apiVersion"), doc.get("kind"))
    name = f"{key[1]} {doc.get('metadata', {}).get('name')}"
    if key in ALLOWED_CRDS:
        ok = isinstance(doc.get("metadata", {}).get("name"), str) and isinstance(doc.get("spec"), dict)
        if not ok:
            return f"{name}: a {key[1]} needs metadata.name and spec"
        if key[1] == "PrometheusRule":
            return check_rules(doc["spec"], name)
        return None
    try:
        kv.validate(doc, KUBE_VERSION, strict=True)
    except kv.ValidationError as e:
        return f"{name}: {'/'.join(str(p) for p in e.path)}: {e.message}"
    except kv.SchemaNotFoundError:
        return f"{name}: no schema for {key[0]} {key[1]} in Kubernetes {KUBE_VERSION} (not an allowed CRD)"
    return None


def check_rules(spec: dict, name: str) -> str | None:
    """A PrometheusRule's spec (a rule file's groups) through `promtool check rules`."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(spec, f)
        f.flush()
        rc, out = run_tool(["promtool", "check", "rules", f.name])
    return None if rc == 0 else f"{name}: promtool check rules: {out}"


def check_observability(objects: dict[str, list[dict]]) -> list[str]:
    """The rules' unit tests, the dashboard, and the HPA's metrics against the adapter's rules."""
    errors = []
    rc, out = run_tool(["promtool", "test", "rules", str(RULES_TEST)])
    if rc:
        errors.append(f"promtool test rules: {out}")
    try:
        dashboard = json.loads(DASHBOARD.read_text())
        errors += dashboard_errors(dashboard)
    except ValueError as e:
        return errors + [f"{DASHBOARD.name}: {e}"]
    served = {r["name"]["as"] for r in yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]}
    for label, docs in objects.items():
        for d in docs:
            if d["kind"] == "HorizontalPodAutoscaler":
                for m in d["spec"]["metrics"]:
                    metric = m.get("pods", {}).get("metric", {}).get("name")
                    if metric not in served:
                        errors.append(f"{label}: the HPA scales on {metric!r}, which no rule of "
                                      f"{ADAPTER_RULES.name} serves ({sorted(served)})")
            if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard"):
                if json.loads(d["data"]["audiostory-dashboard.json"]) != dashboard:
                    errors.append(f"{label}: the dashboard ConfigMap does not hold {DASHBOARD.name}")
    return errors


def dashboard_errors(dashboard: dict) -> list[str]:
    errors = []
    if not dashboard.get("uid") or not dashboard.get("panels"):
        errors.append("dashboard: needs a uid and panels")
    names = [v["name"] for v in dashboard.get("templating", {}).get("list", [])]
    if "datasource" not in names:
        errors.append("dashboard: no datasource variable (an importable dashboard names none of a site's)")
    ids = [p.get("id") for p in dashboard.get("panels", [])]
    if len(set(ids)) != len(ids):
        errors.append(f"dashboard: panel ids repeat: {ids}")
    for p in dashboard.get("panels", []):
        targets = p.get("targets") or []
        if not targets or not all(t.get("expr") for t in targets):
            errors.append(f"dashboard panel {p.get('title')!r}: every panel needs queries")
        for t in [p, *targets]:
            if t.get("datasource", {}).get("uid") != "${datasource}":
                errors.append(f"dashboard panel {p.get('title')!r}: not on the ${{datasource}} variable")
                break
    return errors


def run_tool(args: list[str]) -> tuple[int, str]:
    exe = shutil.which(args[0], path=str(Path(sys.executable).parent)) or shutil.which(args[0])
    if exe is None:
        return 127, f"{args[0]} not found (make setup installs it into build/deploy-venv)"
    proc = subprocess.run([exe, *args[1:]], capture_output=True, text=True)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--validate", help="validate the manifests in this YAML file only")
    ap.add_argument("--json", action="store_true", help="print everything (rendered objects too) as one JSON line")
    args = ap.parse_args(argv)
    if args.validate:
        errors = [e for d in yaml.safe_load_all(Path(args.validate).read_text()) if d for e in [validate(d)] if e]
        print(json.dumps({"errors": errors}))
        return 1 if errors else 0
    summary: dict = {"kube_version": KUBE_VERSION, "renders": {}, "errors": []}
    for label, files in VALUE_SETS.items():
        try:
            docs = render(files)
        except Exception as e:  # noqa: BLE001 - a render failure is a check failure
            summary["errors"].append(f"render {label}: {type(e).__name__}: {e}")
            continue
        summary["renders"][label] = sorted(f"{d['apiVersion']}/{d['kind']}/{d['metadata']['name']}" for d in docs)
        summary["errors"] += [f"{label}: {e}" for d in docs for e in [validate(d)] if e]
        summary["errors"] += [f"lint {label}: {e}" for e in lint(files)]
        summary.setdefault("objects", {})[label] = docs
    summary["errors"] += check_observability(summary.get("objects", {}))
    rc, out = run_tool(["hadolint", "--no-color", "--failure-threshold", "info", str(DEPLOY / "Dockerfile")])
    summary["hadolint"] = out or "clean"
    if rc:
        summary["errors"].append(f"hadolint: {out}")
    rc, out = run_tool(["check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml")])
    summary["compose"] = out
    if rc:
        summary["errors"].append(f"compose: {out}")
    import gpu_lock  # beside this file

    summary["gpu_lock"] = gpu_lock.check()
    summary["errors"] += [f"gpu lock: {e}" for e in summary["gpu_lock"]["errors"]]
    if args.json:
        print(json.dumps(summary))
    else:
        for label, names in summary["renders"].items():
            print(f"chart ({label} values): {len(names)} objects valid for Kubernetes {KUBE_VERSION}: "
                  f"{', '.join(names)}")
        print("observability: PrometheusRule through promtool check rules, the rules' unit tests, the dashboard, "
              "the HPA's metrics against the adapter's rules")
        print(f"Dockerfile (hadolint): {summary['hadolint']}")
        print(f"compose.yaml (compose-spec): {summary['compose']}")
        g = summary["gpu_lock"]
        print(f"{g['lock']} ({g['image']}, CPython {g['python']}): {g['pins']} pins, "
              + ("install on the image, dependencies complete" if not g["errors"] else "FAILED")
              + (f" ({g['seconds']} s)" if "seconds" in g else ""))
        for e in summary["errors"]:
            print(f"ERROR: {e}")
        print("deploy checks: " + ("FAILED" if summary["errors"] else "passed"))
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
