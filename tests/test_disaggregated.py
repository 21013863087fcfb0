"""The disaggregated LLM tier on CPU: two vLLM OpenAI servers (generate; pooling with token_embed)
on loopback, Triton's `llm` model in remote mode talking to them."""
import os
import sys
import time
import urllib.request

import numpy as np
import pytest

from audiostory_ensemble.llm.remote_llm import server_command
from audiostory_ensemble.serving.triton_server import free_port
from client.api import AudioStoryClient, AudioStoryError
from tests.serverutil import OpenStream, ProcessTree, infer_error, served


def converted_dir():
    from audiostory_ensemble.model.checkpoint import load_converted
    return load_converted("tiny").llm_dir


def _wait_healthy(url, proc, log, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited ({proc.returncode}); see {log}")
        try:
            if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"vLLM server at {url} not healthy within {timeout} s; see {log}")


@pytest.fixture(scope="module")
def tier(converted, test_build_dir):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    procs, urls = {}, {}
    try:
        for role in ("generate", "pooling"):
            port = free_port()
            log = test_build_dir / f"vllm_{role}.log"
            cmd = server_command(sys.executable, converted.llm_dir, role, port,
                                 extra=("--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"))
            procs[role] = (ProcessTree(cmd, log, env), log)
            urls[role] = f"http://127.0.0.1:{port}"
        for role, (proc, log) in procs.items():
            _wait_healthy(urls[role], proc, log)
        yield urls, procs
    finally:
        for proc, _ in procs.values():     # each server with its engine core and workers
            proc.stop()


@pytest.fixture(scope="module")
def server(exported, tier, test_build_dir):
    urls, _ = tier
    options = {"generate_url": urls["generate"], "pooling_url": urls["pooling"], "remote_retries": 1}
    with served(test_build_dir, "remote", {"engine_options": options}) as s:
        yield s


def test_the_remote_tier_gives_the_reference_story(server, reference_result, sample_instructions):
    caption, total = sample_instructions[0]
    ref = reference_result(caption, total)
    story = AudioStoryClient(server.grpc_url).generate(caption, total_duration=total)
    assert story.captions == [c.caption for c in ref.clips]
    assert story.audio.shape == ref.audio.shape
    assert np.abs(story.audio - ref.audio).max() <= 1e-3


def test_a_killed_vllm_server_is_a_clear_error_and_triton_keeps_serving(server, tier, sample_instructions):
    """A tier server dies mid-story: the story ends UNAVAILABLE naming it (after remote_retries);
    new stories get the same at once; Triton and its other models keep serving; once the server is
    back (its Deployment's probes restart it; here the test does), stories succeed again."""
    urls, procs = tier
    proc, log = procs["pooling"]
    caption, total = sample_instructions[1]
    stream = OpenStream(server.grpc_url, instruction=caption, total_duration=total, num_steps=2)
    proc.kill()                 # the server and its engine processes, as a crashed host would lose them
    killed = time.monotonic()
    while True:                 # the story in flight: it completes (its plan was done) or ends UNAVAILABLE
        result, error = stream.next(timeout=120)
        if error is not None:
            assert AudioStoryError(error.message()).retryable, error.message()
            assert "vLLM pooling server at http://127.0.0.1:" in error.message()
            assert time.monotonic() - killed < 10
            break
        final = result.get_response().parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            break
    stream.cancel()
    t0 = time.monotonic()
    with pytest.raises(AudioStoryError, match="vLLM pooling server at http://127.0.0.1:[0-9]+ unreachable") as e:
        AudioStoryClient(server.grpc_url).generate(caption, total_duration=total, num_steps=2, timeout=120)
    assert e.value.retryable and e.value.status == "UNAVAILABLE"
    assert time.monotonic() - t0 < 10
    # The server and its other models keep answering: validation at the front door, the DiT step.
    e = infer_error(server.grpc_url, "audiostory_full", {"INSTRUCTION": np.array([b""], dtype=np.object_)})
    assert e is not None and e.status() == "StatusCode.INVALID_ARGUMENT"
    import tritonclient.grpc as grpcclient
    c = grpcclient.InferenceServerClient(server.grpc_url)
    assert c.is_server_live() and c.is_model_ready("dit_step") and c.is_model_ready("audiostory_stream")
    c.close()
    # The tier server back on its port (what its Deployment does): stories succeed again.
    port = int(urls["pooling"].rsplit(":", 1)[1])
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    procs["pooling"] = (ProcessTree(server_command(sys.executable, converted_dir(), "pooling", port,
                                                   extra=("--dtype", "float32", "--max-model-len", "2048",
                                                          "--enforce-eager")), log, env), log)
    _wait_healthy(urls["pooling"], procs["pooling"][0], log)
    story = AudioStoryClient(server.grpc_url).generate(caption, total_duration=total, num_steps=2, timeout=120)
    assert story.audio.shape[1] > 0 and server.failure is None and not server.supervisor.history
