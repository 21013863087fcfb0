"""Overload and process hygiene, on a disposable server (tiny model) whose process the last test
kills with SIGKILL. (A stage's process killed: tests/test_faults.py.)"""
import os
import signal

import pytest
import tritonclient.grpc as grpcclient

from audiostory_ensemble import interface as I
from audiostory_ensemble.runtime.processes import alive, cmdline, descendants, shm_mappings
from client.api import AudioStoryClient, AudioStoryError, request_arrays
from tests.serverutil import OpenStream, grpc_inputs, infer_error, metric, scrape, served, wait_for

CAPACITY = 2
KNOWN_MALFORMED = "A cat meows, then a door slams."    # at 12 s, unconstrained (tests/test_planner.py)


@pytest.fixture(scope="module")
def server(exported, test_build_dir):
    # The plan grammar off (as the official code runs): the unusable plan's status is tested here.
    with served(test_build_dir, "fault", {"limits": {"max_active_stories": CAPACITY}, "full_instances": 1,
                                          "full_max_queue": 1, "engine_options": {"plan_grammar": False}}) as s:
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


def test_a_plan_the_model_botches_is_the_models_failure_not_the_servers(server):
    """Without the grammar the tiny model writes no usable plan for this request: both doors answer
    UNKNOWN (not INTERNAL) saying the model failed, and the server's log holds the text it wrote."""
    request = dict(total_duration=12.0, num_steps=2)
    with pytest.raises(AudioStoryError) as e:
        AudioStoryClient(server.grpc_url).generate(KNOWN_MALFORMED, timeout=120, **request)
    assert e.value.status == "UNKNOWN" and not e.value.retryable and "the model wrote no usable plan" in str(e.value)
    err = infer_error(server.grpc_url, I.FULL_MODEL, request_arrays(KNOWN_MALFORMED, **request))
    assert err is not None and err.status() == "StatusCode.UNKNOWN" and "no usable plan" in err.message()
    assert "generated text: '2 events. 12.0 = 6.0 + 6.0." in server.log_tail(400_000)
    assert metric(server, "audiostory_plans_unusable_total", "llm") == 2


def test_killing_the_server_leaves_none_of_its_processes(server):
    """Nothing outlives the server: its stubs notice and exit, the engines' watchdog kills vLLM's
    processes and removes their shared memory, and the supervisor stops whatever is still there
    after a grace (a stub waiting on the dead server's answer never exits by itself); it does not
    restart a server that died (its launcher exits non-zero: tests/test_supervisor.py)."""
    tree = descendants(server.process.pid)
    assert len(tree) >= 5   # stubs, vLLM engine processes, the guard
    engine_shm = [p for p in shm_mappings(tree) if "triton_python_backend" not in p]
    assert engine_shm, "vLLM's shared-memory queues were expected in the tree"
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(30)
    try:
        wait_for(lambda: not [p for p in tree if alive(p)], timeout=120, interval=0.5,
                 what="the server's stubs and engines to exit")
    except AssertionError as e:
        left = {p: " ".join(cmdline(p))[:120] for p in tree if alive(p)}
        raise AssertionError(f"{e}; still running: {left}") from None
    wait_for(lambda: not [p for p in engine_shm if os.path.exists(p)], timeout=60, interval=0.5,
             what="the engines' shared memory to be removed")
    assert server.failure is None and not server.supervisor.busy and len(server.supervisor.history) == 0
