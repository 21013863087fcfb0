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
from tests.serverutil import ProcessTree, infer_error, served


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
    with served(test_build_dir, "remote", {"engine_options": {"generate_url": urls["generate"],
                                                              "pooling_url": urls["pooling"], "remote_retries": 1}}) as s:
        yield s


def test_the_remote_tier_gives_the_reference_story(server, reference_result, sample_instructions):
    caption, total = sample_instructions[0]
    ref = reference_result(caption, total)
    story = AudioStoryClient(server.grpc_url).generate(caption, total_duration=total)
    assert story.captions == [c.caption for c in ref.clips]
    assert story.audio.shape == ref.audio.shape
    assert np.abs(story.audio - ref.audio).max() <= 1e-3


def test_a_killed_vllm_server_is_a_clear_error_and_triton_keeps_serving(server, tier, sample_instructions):
    _, procs = tier
    proc, _ = procs["pooling"]
    proc.kill()                 # the server and its engine processes, as a crashed host would lose them
    caption, total = sample_instructions[1]
    t0 = time.monotonic()
    with pytest.raises(AudioStoryError, match="vLLM pooling server at http://127.0.0.1:[0-9]+ unreachable"):
        AudioStoryClient(server.grpc_url).generate(caption, total_duration=total, num_steps=2, timeout=120)
    assert time.monotonic() - t0 < 60
    # The server and its other models keep answering: validation at the front door, the DiT step.
    e = infer_error(server.grpc_url, "audiostory_full", {"INSTRUCTION": np.array([b""], dtype=np.object_)})
    assert e is not None and e.status() == "StatusCode.INVALID_ARGUMENT"
    import tritonclient.grpc as grpcclient
    c = grpcclient.InferenceServerClient(server.grpc_url)
    assert c.is_server_live() and c.is_model_ready("dit_step") and c.is_model_ready("audiostory_stream")
    c.close()
