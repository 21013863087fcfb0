"""Shared fixtures. Artefacts (tiny checkpoint, conversion, ONNX export) are built once, cached by
content, and reused; servers and engines are started once per module or session."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from audiostory_ensemble.model.layout import BUILD

ROOT = Path(__file__).resolve().parent.parent
TEST_BUILD = BUILD / "tests"

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Every process this session starts inherits this mark (servers, stubs, engines, watchdogs, their
# children): what carries it after the session is something the suite left running. A session
# started by this one (a nested run) inherits the mark and leaves the check to the outer one.
SESSION_MARK = "AUDIOSTORY_TEST_SESSION"
OUTER_SESSION = SESSION_MARK not in os.environ
os.environ.setdefault(SESSION_MARK, uuid.uuid4().hex)


def _processes_of_this_session() -> list[tuple[int, str]]:
    mark = f"{SESSION_MARK}={os.environ[SESSION_MARK]}".encode()
    me, out = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            if mark not in (d / "environ").read_bytes().split(b"\0"):
                continue
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        # zombies are dead; this process's own multiprocessing resource tracker exits with it
        if fields[0] == "Z" or (int(fields[1]) == me and "resource_tracker" in cmd):
            continue
        out.append((int(d.name), cmd[:160]))
    return out


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    """After the last test: no process the suite started and no /dev/shm segment it created is
    still there (waiting up to 60 s for processes on their way out). What is left is removed, and
    the session fails naming it (as an error in the last test's teardown)."""
    from tests.serverutil import remove_orphaned_shm, shm_names

    shm_before = shm_names()
    yield
    if not OUTER_SESSION:
        return
    deadline = time.monotonic() + 60
    left = _processes_of_this_session()
    while left and time.monotonic() < deadline:
        time.sleep(1)
        left = _processes_of_this_session()
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(1)
    # a new segment nobody maps is a leak (a server started by hand beside the suite keeps its own)
    shm_left = remove_orphaned_shm(shm_before)
    assert not left and not shm_left, ("the test session left behind: "
                                       + "; ".join([f"process {pid}: {cmd}" for pid, cmd in left]
                                                   + [f"/dev/shm/{name}" for name in shm_left]))


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
    from audiostory_ensemble.model import layout

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
    from audiostory_ensemble.model import layout
    from audiostory_ensemble.model.checkpoint import load_converted
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
