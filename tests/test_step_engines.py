"""The step scheduler's other engine: BLS requests to the `dit_step` model each iteration (what
the gpu profile runs, with dit_step a TensorRT plan), here with dit_step's CPU form."""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from client.api import AudioStoryClient
from tests.serverutil import served


@pytest.fixture(scope="module")
def server(exported, test_build_dir):
    with served(test_build_dir, "triton_engine", {"dit_engine": "triton", "clips_in_flight_per_request": 3}) as s:
        yield s


def test_parity_through_dit_step_requests(server, reference_result, sample_instructions):
    caption, total = sample_instructions[0]
    ref = reference_result(caption, total)
    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics("dit_step").model_stats[0]
    before = (stats.inference_count, stats.execution_count)
    story = AudioStoryClient(server.grpc_url).generate(caption, total_duration=total)
    assert story.captions == [c.caption for c in ref.clips]
    assert story.audio.shape == ref.audio.shape
    assert np.abs(story.audio - ref.audio).max() <= 1e-3
    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics("dit_step").model_stats[0]
    rows, executions = stats.inference_count - before[0], stats.execution_count - before[1]
    # Three clips in flight at once: each iteration is one dit_step request carrying their rows.
    assert rows == 50 * len(ref.clips), rows
    assert executions < rows, f"{rows} rows in {executions} dit_step executions: the clips were not batched"
