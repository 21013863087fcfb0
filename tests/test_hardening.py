"""Overload, faults and process hygiene, on a disposable server (tiny model) whose stubs and
process these tests kill. Order matters: the module ends by killing the server with SIGKILL."""
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from audiostory_ensemble import interface as I
from audiostory_ensemble.serving.processes import alive, descendants, shm_mappings
from client.api import AudioStoryClient, AudioStoryError, health_check, request_arrays
from tests.serverutil import OpenStream, grpc_inputs, infer_error, metric, scrape, served, wait_for

CAPACITY = 2


@pytest.fixture(scope="module")
def server(exported, test_build_dir):
    with served(test_build_dir, "fault", {"limits": {"max_active_stories": CAPACITY}, "full_instances": 1,
                                          "full_max_queue": 1}) as s:
        yield s


def _active(server):
    return metric(server, "audiostory_active_stories", "audiostory_stream")


def test_past_capacity_requests_fail_fast_with_unavailable(server, sample_instructions):
    caption, _ = sample_instructions[0]
    long_ones = [OpenStream(server.grpc_url, instruction=caption, total_duration=50.0, num_steps=200)
                 for _ in range(CAPACITY)]
    try:
        wait_for(lambda: _active(server) == CAPACITY, what="the server to be at capacity")
        rejected0 = metric(server, "audiostory_requests_rejected_total", "audiostory_stream")
        # Streaming and whole-story requests alike are refused at once, not queued.
        with pytest.raises(AudioStoryError, match="server busy.*max_active_stories = 2"):
            AudioStoryClient(server.grpc_url).generate("rain", total_duration=5.0, num_steps=2, timeout=60)
        e = infer_error(server.grpc_url, I.FULL_MODEL, request_arrays("rain", total_duration=5.0, num_steps=2))
        assert e is not None and e.status() == "StatusCode.UNAVAILABLE" and "server busy" in e.message()
        assert _active(server) == CAPACITY           # the long stories were still running
        assert metric(server, "audiostory_requests_rejected_total", "audiostory_stream") == rejected0 + 2
    finally:
        for s in long_ones:
            s.cancel()
    wait_for(lambda: _active(server) == 0, what="the cancelled stories to end")
    story = AudioStoryClient(server.grpc_url).generate("rain", total_duration=5.0, num_steps=2, timeout=120)
    assert story.audio.shape[1] > 0


def test_whole_story_requests_past_the_queue_fail_fast(server, sample_instructions):
    """One `audiostory_full` instance, one queue place: a third concurrent request is refused."""
    caption, _ = sample_instructions[0]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results = []

    def send():
        client.async_infer(I.FULL_MODEL, grpc_inputs(request_arrays(caption, total_duration=20.0, num_steps=40)),
                           callback=lambda result, error: results.append(error), client_timeout=300)

    send()                                   # runs ...
    wait_for(lambda: _active(server) >= 1, what="the first whole story to start")
    send()                                   # ... waits in the queue ...
    wait_for(lambda: scrape(server).get('nv_inference_pending_request_count{model="audiostory_full",version="1"}',
                                        0) >= 1, what="the second story to be queued")
    e = infer_error(server.grpc_url, I.FULL_MODEL, request_arrays("rain", total_duration=5.0, num_steps=2))
    assert e is not None and e.status() == "StatusCode.UNAVAILABLE" and "queue" in e.message()   # ... refused
    wait_for(lambda: len(results) == 2, timeout=300, what="the two admitted stories")
    assert results == [None, None]


def _stub_pid(server, model: str) -> int:
    for pid in descendants(server.process.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(f"/{model}/1/model.py".encode()) for part in cmdline):
            return pid
    raise AssertionError(f"no stub process for {model}")


def test_a_dead_stub_fails_requests_by_name_and_the_rest_keeps_serving(server):
    assert health_check(server.grpc_url, timeout=120) > 0
    os.kill(_stub_pid(server, "dit_sampler"), signal.SIGKILL)
    with pytest.raises(AudioStoryError, match="dit_sampler"):
        AudioStoryClient(server.grpc_url).generate("rain", total_duration=5.0, num_steps=2, timeout=120)
    # Triton 2.51 still reports the model ready; the probe that sends a real request does not.
    assert grpcclient.InferenceServerClient(server.grpc_url).is_model_ready("dit_sampler")
    with pytest.raises(AudioStoryError, match="dit_sampler"):
        health_check(server.grpc_url, timeout=120)
    # Other models answer: the DiT step itself, and the front door's validation.
    meta = grpcclient.InferenceServerClient(server.grpc_url).get_model_metadata("dit_step")
    n = int(next(i for i in meta.inputs if i.name == "cond").shape[1])
    step = {"x": np.zeros((1, 645, 64), np.float32), "cond": np.zeros((1, n, 1024), np.float32)}
    for name in ("duration", "sigma", "sigma_next", "guidance"):
        step[name] = np.full((1, 1), 0.5, np.float32)
    result = grpcclient.InferenceServerClient(server.grpc_url).infer("dit_step", grpc_inputs(step))
    assert result.as_numpy("x_next").shape == (1, 645, 64)
    e = infer_error(server.grpc_url, I.FULL_MODEL, request_arrays("rain", guidance=float("nan")))
    assert e is not None and "GUIDANCE_SCALE" in e.message()


def test_killing_the_server_leaves_none_of_its_processes(server):
    tree = descendants(server.process.pid)
    assert len(tree) >= 5   # stubs, vLLM engine processes, the guard
    engine_shm = [p for p in shm_mappings(tree) if "triton_python_backend" not in p]
    assert engine_shm, "vLLM's shared-memory queues were expected in the tree"
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(30)
    wait_for(lambda: not [p for p in tree if alive(p)], timeout=120, interval=0.5,
             what="the server's stubs and engines to exit")
    wait_for(lambda: not [p for p in engine_shm if os.path.exists(p)], timeout=60, interval=0.5,
             what="the engines' shared memory to be removed")
