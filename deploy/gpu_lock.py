"""The GPU image's Python packages: resolve requirements-gpu.txt for the image into
requirements-gpu.lock (and the numpy-2 test venv's lock beside it), and check that the lock still
installs on the image.

    python deploy/gpu_lock.py resolve-gpu      # under a Python 3.12, the image's (`make gpu-lock`)
    python deploy/gpu_lock.py resolve-numpy2   # under the host's python3 (`make gpu-lock`)
    python deploy/gpu_lock.py check [--lock F] [--requirements F] [--numpy2-lock F]   # any Python

The image is nvcr.io/nvidia/tritonserver:25.10-py3: CPython 3.12 (3.12.3), glibc 2.39, x86_64.
Resolution for it runs pip with that Python version and those platform tags, binaries only
(`--only-binary=:all:`: nothing is built, so nothing needs a GPU or the image), TensorRT left out
(its lines start with `tensorrt`; the Dockerfile pins it to the image's own libnvinfer).

Why the resolution needs a Python 3.12 interpreter and the check does not: `--python-version`
changes the wheel tags and the Requires-Python test, not the environment markers, which pip
evaluates for the interpreter it runs on (vllm 0.32 needs `setuptools<81` and `six` only when
`python_version > "3.11"`). So `check` asks pip only whether every pin has a wheel for the image
(`--no-deps`), and checks the dependencies itself, with the image's markers.

pip runs with the host's pip configuration files switched off and only the environment variables
that reach an index (PIP_INDEX_URL, certificates, proxy, timeouts) kept: a constraint file or a
local wheel folder meant for this host must not leak into the image's lock. `--use-feature=fast-deps`
reads each wheel's METADATA with HTTP range requests where the index serves no metadata files
(PEP 658); where neither works pip downloads the wheel, and the check still holds.


Why this module is over 300 lines: resolution and check share the reading of pins and the image's
environment markers; apart, the check could judge the lock by rules the resolution did not follow.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements-gpu.txt"
LOCK = ROOT / "requirements-gpu.lock"
NUMPY2_REQUIREMENTS = ROOT / "requirements-numpy2.txt"
NUMPY2_LOCK = ROOT / "requirements-numpy2.lock"
REPORT_CACHE = ROOT / "build" / "gpu-lock" / "report.json"   # the last resolve-gpu's pip report

IMAGE = "nvcr.io/nvidia/tritonserver:25.10-py3"
PYTHON = (3, 12)
PYTHON_FULL = "3.12.3"
GLIBC_MINOR = 39
PLATFORMS = ([f"manylinux_2_{m}_x86_64" for m in range(GLIBC_MINOR, 4, -1)]
             + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"])
# The image's environment markers (PEP 508), for the dependency check.
MARKERS = {"implementation_name": "cpython", "implementation_version": PYTHON_FULL, "os_name": "posix",
           "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_release": "",
           "platform_system": "Linux", "platform_version": "", "python_full_version": PYTHON_FULL,
           "python_version": "%d.%d" % PYTHON, "sys_platform": "linux"}
LEFT_OUT = re.compile(r"^tensorrt")        # the Dockerfile installs TensorRT on its own
# What may reach pip from the environment: where the index is and how to talk to it.
PIP_ENV_KEPT = {"PIP_INDEX_URL", "PIP_CERT", "PIP_CLIENT_CERT", "PIP_TRUSTED_HOST", "PIP_PROXY", "PIP_TIMEOUT",
                "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES", "PIP_DISABLE_PIP_VERSION_CHECK", "PIP_NO_INPUT"}
NUMPY2_SAME_AS = {"onnxruntime": "onnxruntime-gpu"}   # the numpy-2 venv's CPU builds of image packages


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    """A version without its local label (`2.13.0+cpu` -> `2.13.0`)."""
    return version.split("+", 1)[0]


# ---- files -------------------------------------------------------------------------------------

def read_pins(path: Path) -> tuple[dict[str, str], list[str]]:
    """``{name: version}`` of a lock file, and the lines that are not one exact pin."""
    pins, bad = {}, []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        if not m:
            bad.append(f"{path.name}:{n}: not an exact pin: {line}")
        elif canonical(m.group(1)) in pins:
            bad.append(f"{path.name}:{n}: {m.group(1)} is pinned twice")
        else:
            pins[canonical(m.group(1))] = m.group(2)
    return pins, bad


def requirement_lines(path: Path) -> list[str]:
    """The requirement lines of a requirements file, TensorRT left out."""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#") and not LEFT_OUT.match(line):
            if line.startswith("-"):
                raise SystemExit(f"gpu_lock: {path.name}: options are not supported here: {line}")
            out.append(line)
    return out


def lock_text(pins: dict[str, str], header: list[str]) -> str:
    return "".join(f"# {h}\n" for h in header) + "".join(f"{n}=={pins[n]}\n" for n in sorted(pins))


def pins_from_report(report: dict) -> dict[str, str]:
    if report.get("version") != "1":
        raise SystemExit(f"gpu_lock: unknown pip report version {report.get('version')!r}")
    pins = {}
    for item in report["install"]:
        name, version = canonical(item["metadata"]["name"]), item["metadata"]["version"]
        if pins.setdefault(name, version) != version:
            raise SystemExit(f"gpu_lock: {name} resolved twice ({pins[name]}, {version})")
    return pins


# ---- pip ---------------------------------------------------------------------------------------

def pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in PIP_ENV_KEPT}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def image_dry_run(requirements: Path, *, deps: bool, python: str = sys.executable) -> tuple[int, str, dict | None]:
    """``pip install --dry-run`` for the image (its Python version and platform tags, wheels only).
    Returns pip's exit code, its output, and its installation report."""
    with tempfile.TemporaryDirectory(prefix="gpu-lock-") as tmp:
        report = Path(tmp) / "report.json"
        cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
               "--python-version", "%d.%d" % PYTHON, "--implementation", "cp", "--abi", "cp%d%d" % PYTHON,
               *[a for p in PLATFORMS for a in ("--platform", p)], "--target", str(Path(tmp) / "target"),
               "--use-feature=fast-deps", "--progress-bar", "off", "--report", str(report),
               "-r", str(requirements)]
        if not deps:
            cmd.append("--no-deps")
        proc = subprocess.run(cmd, env=pip_env(), capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        return proc.returncode, out, json.loads(report.read_text()) if report.exists() else None


def pip_error(out: str) -> str:
    lines = [ln.strip() for ln in out.splitlines() if ln.startswith("ERROR") or "conflict is caused" in ln
             or ln.startswith("    ")]
    return " | ".join(lines[-8:]) or out.strip()[-600:]


# ---- the dependency check (the image's markers) --------------------------------------------------

def dependency_errors(top_level: list[str], pins: dict[str, str], metadata: dict[str, dict],
                      markers: dict[str, str] = MARKERS, source: str = REQUIREMENTS.name) -> list[str]:
    """Everything ``top_level`` needs, transitively, for the image's markers: each must be pinned, at
    a version its requirer accepts; every pin must be needed by something; every Requires-Python
    must admit the image's Python. ``metadata``: the pip report's metadata per canonical name."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    errors = []
    extras_seen: dict[str, set[str]] = {}
    work = [(Requirement(line), source) for line in top_level]
    while work:
        req, by = work.pop()
        if req.marker is not None and not req.marker.evaluate({**markers, "extra": ""}):
            continue
        name = canonical(req.name)
        if name not in pins:
            errors.append(f"{name} (needed by {by}: {req}) is not in the lock")
            continue
        if not req.specifier.contains(Version(pins[name]), prereleases=True):
            errors.append(f"{by} needs {req}, the lock pins {name}=={pins[name]}")
        wanted = {""} | {canonical(e) for e in req.extras}
        new = wanted - extras_seen.get(name, set())
        if not new:
            continue
        extras_seen.setdefault(name, set()).update(new)
        meta = metadata.get(name)
        if meta is None:
            errors.append(f"{name}: pip gave no metadata")
            continue
        for dep in meta.get("requires_dist") or []:
            dreq = Requirement(dep)
            if dreq.marker is None or any(dreq.marker.evaluate({**markers, "extra": e}) for e in new):
                dreq.marker = None
                work.append((dreq, f"{name} {pins[name]}"))
    for name, version in sorted(pins.items()):
        if name not in extras_seen:
            errors.append(f"{name}=={version} is pinned but nothing needs it on the image")
        rp = (metadata.get(name) or {}).get("requires_python")
        if rp and not SpecifierSet(rp).contains(markers["python_full_version"], prereleases=True):
            errors.append(f"{name}=={version} requires Python {rp}, the image has {markers['python_full_version']}")
    return list(dict.fromkeys(errors))


def numpy2_errors(gpu: dict[str, str], numpy2: dict[str, str], metadata: dict[str, dict],
                  python: str = "%d.%d.%d" % sys.version_info[:3]) -> list[str]:
    """The numpy-2 venv must test the image's versions: a package in both locks has one version,
    unless the image's version cannot install on the venv's Python (the venv is made from the same
    python3 as the one running this check: scripts/setup.sh makes both)."""
    from packaging.specifiers import SpecifierSet

    errors = []
    for name, version in sorted(numpy2.items()):
        image_name = NUMPY2_SAME_AS.get(name, name)
        if image_name not in gpu or public(version) == public(gpu[image_name]):
            continue
        rp = (metadata.get(image_name) or {}).get("requires_python")
        if rp and not SpecifierSet(rp).contains(python, prereleases=True):
            continue
        errors.append(f"requirements-numpy2.lock pins {name}=={version}, the image has {image_name}=={gpu[image_name]}")
    return errors


def check(lock: Path = LOCK, requirements: Path = REQUIREMENTS, numpy2_lock: Path | None = NUMPY2_LOCK) -> dict:
    """Does the lock install on the image? A pip dry run (image tags, wheels only, no deps) for the
    pins, then the dependency check with the image's markers, then the numpy-2 lock's agreement."""
    t0 = time.monotonic()
    pins, errors = read_pins(lock)
    result = {"lock": lock.name, "image": IMAGE, "python": PYTHON_FULL, "pins": len(pins), "errors": errors}
    if errors:
        return result
    rc, out, report = image_dry_run(lock, deps=False)
    result["pip_seconds"] = round(time.monotonic() - t0, 1)
    if rc != 0 or report is None:
        errors.append(f"pip cannot install {lock.name} on the image: {pip_error(out)}")
        return result
    metadata = {canonical(i["metadata"]["name"]): i["metadata"] for i in report["install"]}
    yanked = sorted(canonical(i["metadata"]["name"]) for i in report["install"] if i.get("is_yanked"))
    if yanked:
        result["yanked"] = yanked
    missing = sorted(set(pins) - set(metadata))
    if missing:
        errors.append(f"pip did not report {', '.join(missing)}")
    errors += dependency_errors(requirement_lines(requirements), pins, metadata, source=requirements.name)
    if numpy2_lock is not None:
        numpy2, bad = read_pins(numpy2_lock)
        errors += bad or numpy2_errors(pins, numpy2, metadata)
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result


# ---- resolution (make gpu-lock) ----------------------------------------------------------------

def resolve_gpu() -> int:
    if sys.version_info[:2] != PYTHON:
        print(f"gpu_lock: resolve-gpu must run under Python {'%d.%d' % PYTHON} (the image's): pip evaluates "
              f"environment markers for its own interpreter, this is {sys.version.split()[0]} "
              "(make gpu-lock PYTHON312=/path/to/python3.12)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text("\n".join(requirement_lines(REQUIREMENTS)) + "\n")
        t0 = time.monotonic()
        rc, out, report = image_dry_run(req, deps=True)
    if rc != 0 or report is None:
        print(f"gpu_lock: {REQUIREMENTS.name} does not resolve for the image: {pip_error(out)}", file=sys.stderr)
        return 1
    pins = pins_from_report(report)
    metadata = {canonical(i["metadata"]["name"]): i["metadata"] for i in report["install"]}
    errors = dependency_errors(requirement_lines(REQUIREMENTS), pins, metadata)
    if errors:
        print("gpu_lock: the resolution fails the dependency check:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    LOCK.write_text(lock_text(pins, [
        f"The GPU image's packages: {REQUIREMENTS.name} resolved for {IMAGE}",
        f"(CPython {PYTHON_FULL}, manylinux_2_{GLIBC_MINOR} x86_64, wheels only), TensorRT left out: the",
        "Dockerfile pins it to the image's libnvinfer. Generated by `make gpu-lock`; do not edit.",
        "`make deploy-check` checks that it still installs on the image."]))
    REPORT_CACHE.parent.mkdir(parents=True, exist_ok=True)
    REPORT_CACHE.write_text(json.dumps(report))
    print(f"gpu_lock: wrote {LOCK.name}: {len(pins)} pins, numpy=={pins.get('numpy')} "
          f"({time.monotonic() - t0:.0f} s)")
    return 0


def resolve_numpy2() -> int:
    """requirements-numpy2.txt for this host's Python, with every version the image has (the GPU lock
    as constraints, except pins whose Requires-Python excludes this Python). The host's own pip
    configuration applies: this venv is installed here, like requirements.lock."""
    from packaging.specifiers import SpecifierSet

    gpu, bad = read_pins(LOCK)
    if bad:
        print("gpu_lock: " + "; ".join(bad), file=sys.stderr)
        return 1
    report = json.loads(REPORT_CACHE.read_text()) if REPORT_CACHE.exists() else None
    if report is None or pins_from_report(report) != gpu:
        rc, out, report = image_dry_run(LOCK, deps=False)
        if rc != 0 or report is None:
            print(f"gpu_lock: {LOCK.name} does not install on the image: {pip_error(out)}", file=sys.stderr)
            return 1
    host = "%d.%d.%d" % sys.version_info[:3]
    rp = {canonical(i["metadata"]["name"]): i["metadata"].get("requires_python") for i in report["install"]}
    skipped = sorted(n for n in gpu if rp.get(n) and not SpecifierSet(rp[n]).contains(host, prereleases=True))
    with tempfile.TemporaryDirectory() as tmp:
        constraints, out_report = Path(tmp) / "constraints.txt", Path(tmp) / "report.json"
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(gpu.items()) if n not in skipped))
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                               "--only-binary=:all:", "--progress-bar", "off", "--report", str(out_report),
                               "-c", str(constraints), "-r", str(NUMPY2_REQUIREMENTS)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"gpu_lock: {NUMPY2_REQUIREMENTS.name} does not resolve: {pip_error(proc.stdout + proc.stderr)}",
                  file=sys.stderr)
            return 1
        pins = pins_from_report(json.loads(out_report.read_text()))
    NUMPY2_LOCK.write_text(lock_text(pins, [
        f"The numpy-2 test venv (build/numpy2-venv): {NUMPY2_REQUIREMENTS.name} resolved for Python {host},",
        f"with every version the image has ({LOCK.name} as constraints)."]
        + ([f"Not the image's: {', '.join(skipped)} (its version there needs a newer Python)."] if skipped else [])
        + ["Generated by `make gpu-lock`; do not edit. Installed by `make setup` with --no-deps."]))
    print(f"gpu_lock: wrote {NUMPY2_LOCK.name}: {len(pins)} pins, numpy=={pins.get('numpy')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("resolve-gpu", help=f"resolve {REQUIREMENTS.name} into {LOCK.name} (under Python 3.12)")
    sub.add_parser("resolve-numpy2", help=f"resolve {NUMPY2_REQUIREMENTS.name} into {NUMPY2_LOCK.name}")
    c = sub.add_parser("check", help=f"check that {LOCK.name} installs on the image")
    c.add_argument("--lock", type=Path, default=LOCK)
    c.add_argument("--requirements", type=Path, default=REQUIREMENTS)
    c.add_argument("--numpy2-lock", type=Path, default=NUMPY2_LOCK, help="'none' to skip")
    args = ap.parse_args(argv)
    if args.command == "resolve-gpu":
        return resolve_gpu()
    if args.command == "resolve-numpy2":
        return resolve_numpy2()
    result = check(args.lock, args.requirements, None if str(args.numpy2_lock) == "none" else args.numpy2_lock)
    print(json.dumps(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
