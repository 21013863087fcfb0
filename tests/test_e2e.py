"""The main job: the filled repository on a real tritonserver (loopback), tiny checkpoint."""
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from audiostory_ensemble.triton_server import TritonServer
from client.api import AudioStoryClient, AudioStoryError, generate_http
from export.make_repo import make_repo


@pytest.fixture(scope="module")
def server(exported, test_build_dir):
    repo = make_repo("cpu", "tiny", test_build_dir / "model_repository")
    with TritonServer(repo, log_path=test_build_dir / "e2e_server.log").start(timeout=600) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return AudioStoryClient(server.grpc_url)


def test_parity_streamed_story_equals_the_reference(client, reference_result, sample_instructions):
    caption, total = sample_instructions[0]
    ref = reference_result(caption, total)
    story = client.generate(caption, total_duration=total)
    assert story.captions == [c.caption for c in ref.clips]
    assert story.audio.shape == ref.audio.shape
    assert np.abs(story.audio - ref.audio).max() <= 1e-3
    for clip, rclip in zip(story.clips, ref.clips):
        assert clip.audio.shape == rclip.audio.shape
        assert np.abs(clip.audio - rclip.audio).max() <= 1e-3


def test_streaming_one_response_per_clip_with_complete_indices(client, sample_instructions):
    caption, total = sample_instructions[2]
    clips = list(client.stream(caption, total_duration=total, num_steps=8))
    indices = sorted(c.index for c in clips)
    assert indices == list(range(len(clips))) and len(clips) >= 2
    assert [c.index for c in clips if c.is_last] == [len(clips) - 1]
    by_index = sorted(clips, key=lambda c: c.index)
    np.testing.assert_allclose([c.start_s for c in by_index],
                               np.cumsum([0] + [c.duration_s for c in by_index[:-1]]), rtol=1e-6)
    assert abs(sum(c.duration_s for c in clips) - total) < 1e-3
    for c in by_index:
        render = c.duration_s + (0 if c.is_last else 3.0)
        assert abs(c.audio.shape[1] - render * 32000) <= 1, (c.index, c.audio.shape)


def test_full_model_over_http_equals_client_side_stitching(client, server, sample_instructions):
    caption, total = sample_instructions[1]
    streamed = client.generate(caption, total_duration=total, num_steps=8, seed=5)
    whole = generate_http(caption, url=server.http_url, total_duration=total, num_steps=8, seed=5)
    assert whole.captions == streamed.captions
    np.testing.assert_allclose(whole.starts, streamed.starts)
    assert whole.audio.shape == streamed.audio.shape
    assert np.abs(whole.audio - streamed.audio).max() <= 1e-4


def test_concurrent_requests_equal_solo_and_dit_step_batches(client, server, sample_instructions):
    caption, total = sample_instructions[4]
    seeds = [11, 12, 13, 14, 15, 16]
    solo = {s: client.generate(caption, total_duration=total, num_steps=6, seed=s) for s in seeds}
    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics("dit_step").model_stats[0]
    before = (stats.inference_count, stats.execution_count)
    results, errors = {}, []

    def run(seed):
        try:
            results[seed] = AudioStoryClient(server.grpc_url).generate(caption, total_duration=total, num_steps=6, seed=seed)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    for s in seeds:
        assert results[s].captions == solo[s].captions
        assert np.abs(results[s].audio - solo[s].audio).max() <= 1e-4
    assert not np.allclose(results[seeds[0]].audio, results[seeds[1]].audio)  # seeds matter
    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics("dit_step").model_stats[0]
    inferences, executions = stats.inference_count - before[0], stats.execution_count - before[1]
    assert inferences > executions, f"dit_step ran {inferences} rows in {executions} executions: no batching"


def test_bad_request_names_the_field(client, server, sample_instructions):
    with pytest.raises(AudioStoryError, match="GUIDANCE_SCALE must be in"):
        client.generate("rain", guidance=float("nan"))
    with pytest.raises(AudioStoryError, match="INSTRUCTION must not be empty"):
        generate_http("   ", url=server.http_url)
    caption, total = sample_instructions[1]
    assert len(client.generate(caption, total_duration=total, num_steps=2).clips) >= 2  # still serving


def _scrape(server) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def test_metrics_after_a_request(client, server, sample_instructions):
    caption, total = sample_instructions[1]
    story = client.generate(caption, total_duration=total, num_steps=3, seed=21)
    m = _scrape(server)
    assert m['audiostory_clips_total{model="postprocess"}'] >= len(story.clips)
    assert m['audiostory_audio_seconds_total{model="postprocess"}'] >= total - 1e-3
    ttfc_count = m['audiostory_time_to_first_clip_seconds_count{model="postprocess"}']
    ttfc_sum = m['audiostory_time_to_first_clip_seconds_sum{model="postprocess"}']
    assert ttfc_count >= 1 and 0 < ttfc_sum / ttfc_count < 600
    assert m['audiostory_planner_tokens_total{model="llm"}'] > 0
    steps = m['audiostory_dit_step_rows_total{model="dit_step"}']
    assert steps >= 3 * len(story.clips)
    executions = m['audiostory_dit_step_batch_rows_count{model="dit_step"}']
    assert 1 <= steps / executions <= 16
    # Triton's own latency distributions are on (2.51 offers quantile summaries, not histograms).
    assert any(k.startswith('nv_inference_request_summary_us{model="audiostory"') for k in m)
    assert m['nv_inference_request_summary_us_count{model="dit_step",version="1"}'] >= steps
