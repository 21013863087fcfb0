"""Shared fixtures. Artefacts (tiny checkpoint, conversion, ONNX export) are built once, cached by
content, and reused; servers and engines are started once per module or session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from audiostory_ensemble.layout import BUILD

ROOT = Path(__file__).resolve().parent.parent
TEST_BUILD = BUILD / "tests"

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def test_build_dir() -> Path:
    TEST_BUILD.mkdir(parents=True, exist_ok=True)
    return TEST_BUILD


def run_tiny_maker(*args: str) -> subprocess.CompletedProcess:
    """The tiny-checkpoint maker in its own process (it trains with its own thread settings)."""
    return subprocess.run([sys.executable, str(ROOT / "export" / "make_tiny_checkpoint.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="session")
def tiny_release() -> Path:
    """The tiny release folder, built (or found up to date) once per session. AUDIOSTORY_TINY_RELEASE
    names one made elsewhere, used as it is (the numpy-2 run takes the main venv's: the maker's
    cache key holds the library versions, and the image never runs the maker)."""
    from audiostory_ensemble import layout

    given = os.environ.get("AUDIOSTORY_TINY_RELEASE")
    if given:
        assert (Path(given) / ".content-hash").is_file(), f"AUDIOSTORY_TINY_RELEASE={given} is not a made release"
        return Path(given)
    proc = run_tiny_maker()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = layout.release_dir("tiny")
    assert (out / ".content-hash").is_file()
    return out


@pytest.fixture(scope="session")
def converted(tiny_release):
    from audiostory_ensemble import layout
    from audiostory_ensemble.checkpoint import load_converted
    from export.convert_checkpoint import convert

    convert(tiny_release, layout.converted_dir("tiny"), "tiny")
    return load_converted("tiny")


@pytest.fixture(scope="session")
def exported(converted) -> Path:
    from export.export_onnx import export

    return export("tiny")


@pytest.fixture(scope="session")
def reference(converted):
    import torch

    from audiostory_ensemble.reference import ReferencePipeline

    torch.set_grad_enabled(False)
    return ReferencePipeline("tiny")


@pytest.fixture(scope="session")
def sample_instructions():
    from audiostory_ensemble.tiny_story import SAMPLE_INSTRUCTIONS

    return SAMPLE_INSTRUCTIONS


class ReferenceCache:
    """Reference results computed once per (instruction, duration, guidance, seed, steps)."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.results = {}

    def __call__(self, instruction, total, guidance=4.0, seed=0, steps=50):
        key = (instruction, float(total), float(guidance), int(seed), int(steps))
        if key not in self.results:
            self.results[key] = self.pipeline(instruction, total, guidance, seed, steps)
        return self.results[key]


@pytest.fixture(scope="session")
def reference_result(reference):
    return ReferenceCache(reference)
