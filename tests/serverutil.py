"""Helpers for tests that talk to a real server: raw requests, metrics, process trees."""
from __future__ import annotations

import os
import queue
import time
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from audiostory_ensemble import interface as I
from client.api import request_arrays


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
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
