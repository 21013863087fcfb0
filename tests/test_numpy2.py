"""The code the GPU image runs, under the image's numpy 2.

This suite runs on numpy 1 (the CPU host's Triton 2.51 python backend needs it); the image has
numpy 2 (requirements-gpu.lock). The tests below need neither tritonserver nor vLLM, and run here a
second time in build/numpy2-venv (requirements-numpy2.lock: numpy, torch, transformers, diffusers,
onnx and tritonclient at the image's versions), in a build folder of their own, on the tiny release
this session made. The test fails if any of them fails, errors or skips, or if a file of the list
collected nothing.
"""
from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from audiostory_ensemble.model.layout import BUILD

ROOT = Path(__file__).resolve().parent.parent
NUMPY2_PY = ROOT / "build" / "numpy2-venv" / "bin" / "python"
NUMPY2_LOCK = ROOT / "requirements-numpy2.lock"
# The package's unit tests, the reference pipeline, the converter, the exporter and its checks, the
# repository generator, the client, the DiT step scheduler (dit_sampler's loop in the image).
SUBSET = [
    "tests/test_grammar.py", "tests/test_serving.py", "tests/test_request.py", "tests/test_gates.py",
    "tests/test_story_loop.py", "tests/test_script.py", "tests/test_post.py",
    "tests/test_client.py", "tests/test_modules.py", "tests/test_converter.py", "tests/test_export.py",
    "tests/test_interface.py", "tests/test_repo_config.py", "tests/test_reference.py", "tests/test_scheduler.py",
    "tests/test_planner.py::test_scale_to_total_scales_and_recomputes_starts",
    "tests/test_planner.py::test_audio_encoder_slices_positions_and_matches_the_full_window",
]


def venv_versions() -> dict[str, str]:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('numpy', 'torch', 'transformers', 'diffusers', 'onnxruntime', 'tritonclient')}))")
    proc = subprocess.run([str(NUMPY2_PY), "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_the_image_code_passes_under_numpy_2(tiny_release, tmp_path):
    assert NUMPY2_PY.exists(), "build/numpy2-venv is missing: run `make setup`"
    versions = venv_versions()
    pins = dict(line.split("==") for line in NUMPY2_LOCK.read_text().splitlines() if line and line[0] != "#")
    assert versions["numpy"].startswith("2."), versions
    assert versions == {p: pins[p] for p in versions}, "build/numpy2-venv is not requirements-numpy2.lock: `make setup`"

    junit = tmp_path / "numpy2.xml"
    env = {**os.environ, "AUDIOSTORY_BUILD": str(BUILD / "numpy2"), "AUDIOSTORY_TINY_RELEASE": str(tiny_release)}
    proc = subprocess.run([str(NUMPY2_PY), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
                           f"--junitxml={junit}", *SUBSET], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=3600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert junit.exists(), tail
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases if c.find("failure") is not None
              or c.find("error") is not None]
    skipped = [f"{c.get('classname')}::{c.get('name')}" for c in cases if c.find("skipped") is not None]
    assert not failed and proc.returncode == 0, f"under numpy {versions['numpy']}: {failed}\n{tail}"
    assert not skipped, f"skipped under numpy 2 (a skip here hides the check): {skipped}"
    collected = {c.get("classname") for c in cases}
    for entry in SUBSET:
        module = entry.split("::")[0].removesuffix(".py").replace("/", ".")
        assert module in collected, f"{entry} collected no test"
