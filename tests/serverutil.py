"""Helpers for tests that talk to a real server: raw requests, metrics, process trees."""
from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from audiostory_ensemble import interface as I
from audiostory_ensemble.runtime.processes import unlink_unmapped_shm
from audiostory_ensemble.serving.triton_server import TritonServer
from client.api import close_stream, request_arrays
from export.make_repo import make_repo


def scrape(server) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def metric(server, name: str, model: str) -> float:
    return scrape(server).get(f'{name}{{model="{model}"}}', 0.0)


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def settled(read, interval: float = 1.0, timeout: float = 120.0) -> float:
    """Poll a counter until two reads ``interval`` apart agree; returns the settled value."""
    prev = read()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(interval)
        cur = read()
        if cur == prev:
            return cur
        prev = cur
    raise AssertionError("counter never settled")


def grpc_inputs(arrays: dict[str, np.ndarray]):
    inputs = []
    for name, arr in arrays.items():
        inp = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def infer_error(url: str, model: str, arrays: dict[str, np.ndarray]) -> InferenceServerException | None:
    """One non-streaming request; the exception it raised, or None if it succeeded."""
    client = grpcclient.InferenceServerClient(url)
    try:
        client.infer(model, grpc_inputs(arrays), client_timeout=300)
        return None
    except InferenceServerException as e:
        return e
    finally:
        client.close()


class OpenStream:
    """A gRPC stream with one story in flight, cancelled (like a client going away) on ``cancel``."""

    def __init__(self, url: str, model: str = I.STREAM_MODEL, **params):
        self.client = grpcclient.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))
        self.client.async_stream_infer(model, grpc_inputs(request_arrays(**params)),
                                       enable_empty_final_response=True)

    def next(self, timeout: float = 300.0):
        return self.responses.get(timeout=timeout)

    def cancel(self):
        close_stream(self.client, cancel=True)
        self.client.close()


def shm_names() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def remove_orphaned_shm(before: set[str]) -> list[str]:
    """Remove the /dev/shm segments made since ``before`` that no live process maps; their names."""
    new = [os.path.join("/dev/shm", name) for name in sorted(shm_names() - before)]
    return [os.path.basename(p) for p in unlink_unmapped_shm([], new)]


class ProcessTree:
    """A process started in its own session, taken down with everything it started.

    vLLM's OpenAI server spawns its engine core and workers; killing the server's pid alone left
    them running (reparented to init, ≈ 2.5 GiB). Their process group is the server's session, so
    signalling the group reaches them, whether the test stops the server or kills it on purpose.
    A killed engine cannot unlink its shared memory (vLLM's message queues): once the group is
    gone, the segments made while it lived that nobody maps any more are removed.
    """

    def __init__(self, cmd, log, env=None):
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.pgid = self.proc.pid
        self._shm_before = shm_names()

    def poll(self):
        return self.proc.poll()

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass

    def members(self) -> list[int]:
        """Live processes of the tree's group (zombies excluded)."""
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[2]) == self.pgid and fields[0] != "Z":
                    out.append(int(d.name))
        return out

    def kill(self) -> None:
        """SIGKILL to the whole group, now (a crash)."""
        self._signal(signal.SIGKILL)
        self.proc.wait(30)
        wait_for(lambda: not self.members(), timeout=30, what="the process group to die")
        remove_orphaned_shm(self._shm_before)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM to the group, SIGKILL to what is left after ``timeout``."""
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + timeout
        while self.members() and time.monotonic() < deadline:
            time.sleep(0.2)
        self._signal(signal.SIGKILL)
        self.proc.wait(30)
        remove_orphaned_shm(self._shm_before)


@contextlib.contextmanager
def served(build_dir: Path, name: str, settings: dict, **server_options):
    """The tiny model's cpu repository with ``settings`` (make_repo's keys) under ``build_dir``,
    served on loopback for the block (its log beside it; ``server_options`` to TritonServer)."""
    path = build_dir / f"{name}_settings.json"
    path.write_text(json.dumps(settings))
    repo = make_repo("cpu", "tiny", build_dir / f"{name}_repository", path)
    with TritonServer(repo, log_path=build_dir / f"{name}_server.log", **server_options).start(timeout=600) as s:
        yield s
