"""The client without a server: its request tensors through tritonclient's wire encoding and back to
the server's validator, the server's clip outputs into clips and a story, continuation input.
(Runs under numpy 1 and, in tests/test_numpy2.py, under the image's numpy 2.)"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import soundfile as sf
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype

from audiostory_ensemble import interface as I
from audiostory_ensemble.model.config import CROSSFADE_S, OUTPUT_SAMPLE_RATE
from audiostory_ensemble.pipeline.request import parse_request
from audiostory_ensemble.pipeline.stitch import Clip, StoryAssembler
from client.__main__ import _params, prepend_input
from client.api import input_tensor, request_arrays

REQUESTS = {
    "story": dict(instruction="rain on a tin roof – at night", total_duration=12.5, guidance=3.5, seed=7,
                  num_steps=20, duration_policy="exact"),
    "script": dict(instruction=None, segments=[{"start": 0.5, "end": 4.0, "caption": "a dog barks"},
                                               {"start": 4.0, "end": 9.25, "caption": "thunder, far away"}]),
    "continuation": dict(instruction="footsteps", total_duration=8.0,
                         input_audio=np.linspace(-0.5, 0.5, 2 * 16000, dtype=np.float32).reshape(2, -1),
                         input_sample_rate=16000),
    "encoded": dict(instruction="a kettle whistles", audio_format="opus", audio_quality=0.25, story_stream=True),
}


def over_the_wire(name: str, arr: np.ndarray) -> np.ndarray:
    """What the server receives for an input: tritonclient's encoding, decoded as Triton does."""
    dtype = input_tensor(name).dtype
    for lib in (grpcclient, httpclient):
        lib.InferInput(name, list(arr.shape), dtype).set_data_from_numpy(arr)   # refuses a dtype mismatch
    if dtype == "BYTES":
        wire = serialize_byte_tensor(arr).item()
        return deserialize_bytes_tensor(wire).reshape(arr.shape)
    return np.frombuffer(arr.tobytes(), dtype=triton_to_np_dtype(dtype)).reshape(arr.shape)


@pytest.mark.parametrize("kind", sorted(REQUESTS))
def test_request_tensors_cross_the_wire_and_validate_as_sent(kind):
    arrays = request_arrays(**REQUESTS[kind])
    received = {name: over_the_wire(name, arr) for name, arr in arrays.items()}
    for name, arr in arrays.items():
        t = input_tensor(name)
        assert arr.dtype == (np.object_ if t.dtype == "BYTES" else t.numpy_dtype), name
    sent, got = parse_request(arrays.get), parse_request(received.get)
    assert (got.mode, got.instruction, got.total_duration, got.seed, got.num_steps) == \
        (sent.mode, sent.instruction, sent.total_duration, sent.seed, sent.num_steps)
    assert type(got.total_duration) is float and type(got.seed) is int
    if kind == "story":
        assert got.instruction == REQUESTS[kind]["instruction"] and got.duration_policy == "exact"
    if kind == "script":
        assert [(s.start, s.end, s.caption) for s in got.segments] == \
            [(0.5, 4.0, "a dog barks"), (4.0, 9.25, "thunder, far away")]
    if kind == "continuation":
        np.testing.assert_array_equal(got.input_audio, REQUESTS[kind]["input_audio"])
    if kind == "encoded":
        assert (got.audio_format, got.audio_quality) == ("opus", 0.25)
        assert received[I.STORY_STREAM.name].dtype == np.bool_ and bool(received[I.STORY_STREAM.name][0])
    else:
        assert (got.audio_format, got.audio_quality) == ("pcm", None)


def server_outputs(index, caption, start, duration, is_last, samples):
    """A clip's outputs built the way dit_sampler builds them (dtypes of the interface)."""
    plan = {"index": index, "caption": caption, "start": start, "duration": duration, "is_last": is_last}
    out = {I.CLIP_AUDIO.name: np.full((2, samples), 0.1 * (index + 1), dtype=np.float32),
           I.CLIP_INDEX.name: np.array([index], dtype=np.int32),
           I.CAPTION.name: np.array([caption.encode()], dtype=np.object_),
           I.CLIP_START_S.name: np.array([start], dtype=np.float32),
           I.CLIP_DURATION_S.name: np.array([duration], dtype=np.float32),
           I.IS_LAST.name: np.array([is_last], dtype=np.bool_),
           I.CLIP_PLAN.name: np.array([json.dumps(plan).encode()], dtype=np.object_)}
    return {k: (deserialize_bytes_tensor(serialize_byte_tensor(v).item()) if v.dtype == np.object_ else v)
            for k, v in out.items()}


def test_server_clips_become_python_values_and_a_story():
    story = StoryAssembler()
    for index, start, duration, last in ((1, 4.0, 5.5, True), (0, 0.0, 4.0, False)):   # out of order
        clip = Clip.from_outputs(server_outputs(index, f"clip {index}", start, duration, last,
                                         int((duration + (0 if last else CROSSFADE_S)) * OUTPUT_SAMPLE_RATE)).get)
        types = (type(clip.index), type(clip.start_s), type(clip.duration_s), type(clip.is_last))
        assert types == (int, float, float, bool)
        story.add_clip(clip)
    done = story.finish()
    assert done.captions == ["clip 0", "clip 1"] and done.starts == [0.0, 4.0]
    assert done.audio.dtype == np.float32 and done.audio.shape == (2, round(9.5 * OUTPUT_SAMPLE_RATE))
    text = done.plan_json()
    assert json.loads(text)["duration"] == 9.5


def test_continuation_input_is_read_and_prepended(tmp_path):
    wav = tmp_path / "in.wav"
    rate = 22050
    mono = (0.25 * np.sin(np.arange(rate * 4) * 2 * np.pi * 440 / rate)).astype(np.float32)
    sf.write(str(wav), mono, rate)
    args = argparse.Namespace(duration=6.0, guidance=None, seed=None, steps=None, duration_policy=None,
                              plan_temperature=None, plan_top_p=None, script=None, continue_from=str(wav))
    params = _params(args)
    assert params["input_audio"].shape == (1, rate * 4) and params["input_audio"].dtype == np.float32
    assert type(params["input_sample_rate"]) is int
    arrays = request_arrays("more of it", **params)
    assert arrays[I.INPUT_SAMPLE_RATE.name].dtype == np.int32 and arrays[I.INPUT_AUDIO.name].dtype == np.float32
    story = np.zeros((2, 6 * OUTPUT_SAMPLE_RATE), dtype=np.float32)
    joined = prepend_input(story, params["input_audio"], params["input_sample_rate"])
    assert joined.shape == (2, (4 + 6 - int(CROSSFADE_S)) * OUTPUT_SAMPLE_RATE) and joined.dtype == np.float32


def test_no_server_to_stream_to_is_unavailable_with_the_reason():
    """Whether the connection fails before the request goes out (tritonclient then says only that its
    stream is "no longer in valid state"; the client adds the reason) or after (the reason comes
    through the stream), the error is UNAVAILABLE (retry later) and says why."""
    from audiostory_ensemble.serving.triton_server import free_port
    from client.api import AudioStoryClient, AudioStoryError

    with pytest.raises(AudioStoryError) as e:
        AudioStoryClient(f"127.0.0.1:{free_port()}").generate("rain", total_duration=5.0, timeout=30)
    assert e.value.status == "UNAVAILABLE" and e.value.retryable
    assert "onnect" in str(e.value) and "no longer in valid state" not in str(e.value)


@pytest.mark.parametrize("message, status", [
    ("llm: the model wrote no usable plan: malformed plan at clip 0", "UNKNOWN"),
    ("stage llm is down: the generate engine died; it is restarting, retry in a few seconds", "UNAVAILABLE"),
    ("dit_sampler: something else broke", None),
])
def test_a_streamed_error_gets_its_status_from_the_message(message, status):
    from client.api import AudioStoryError

    assert AudioStoryError(message).status == status
    assert AudioStoryError(message, "StatusCode.INTERNAL").status == (status or "INTERNAL")
