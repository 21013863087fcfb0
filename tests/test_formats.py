"""Encoded audio and the ordered story, without a server: the story streamed final part by final
part equals the joined story sample for sample (every arrival order, short clips, script gaps);
each format round-trips within its stated tolerance; a stream written in pieces is the file
written whole; bad formats are refused naming the field."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from audiostory_ensemble import interface as I
from audiostory_ensemble.model.config import CROSSFADE_S, OUTPUT_SAMPLE_RATE
from audiostory_ensemble.pipeline.encode import (
    CODECS,
    FormatError,
    StreamEncoder,
    clip_payload,
    codec,
    decode,
    encode,
    patched,
)
from audiostory_ensemble.pipeline.output import StoryOutput
from audiostory_ensemble.pipeline.request import RequestError, parse_request
from audiostory_ensemble.pipeline.stitch import Clip, StoryAssembler, StoryStream
from tests.fake_triton import FakeTriton

SR = OUTPUT_SAMPLE_RATE
TS = int(CROSSFADE_S * SR)
STEP_24 = 2.0 ** -23      # one step of 24-bit FLAC


def noise(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.8, 0.8, (2, n)).astype(np.float32)


def sound(seconds: float, seed: int = 0) -> np.ndarray:
    """Something a lossy codec can keep: tones and a little noise, stereo."""
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    left = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1234 * t) + 0.01 * rng.standard_normal(t.size)
    right = 0.3 * np.sin(2 * np.pi * 660 * t + 1.0) + 0.01 * rng.standard_normal(t.size)
    return np.stack([left, right]).astype(np.float32)


def joined_clips(lengths: list[int]) -> list[Clip]:
    return [Clip(i, f"clip {i}", noise(n, i), 0.0, 0.0, i == len(lengths) - 1) for i, n in enumerate(lengths)]


def script_clips(plan, total: float) -> list[Clip]:
    """Script-mode clips as dit_sampler sends them: a sample or two off their slots."""
    rng = np.random.default_rng(5)
    clips = []
    for i, (start, dur, fade_in, fade_out) in enumerate(plan):
        n = int(round((dur + (CROSSFADE_S if fade_out else 0)) * SR)) + int(rng.integers(-2, 3))
        clips.append(Clip(i, f"clip {i}", noise(n, 10 + i), start, dur, i == len(plan) - 1,
                          {"start": start, "duration": dur, "fade_in": fade_in, "fade_out": fade_out,
                           "timeline": total}))
    return clips


def streamed(clips: list[Clip], order, end_of_stream: bool = True) -> tuple[np.ndarray, list[int]]:
    s = StoryStream()
    parts = [s.add(clips[i]) for i in order]
    if end_of_stream:
        parts.append(s.finish())
    return np.concatenate(parts, axis=1), [p.shape[1] for p in parts]


def assembled(clips: list[Clip]) -> np.ndarray:
    a = StoryAssembler()
    for c in clips:
        a.add_clip(c)
    return a.finish().audio


# Lengths around the fade: a first clip shorter than it, a middle one shorter (a plain join), one of
# exactly the fade, a last clip of one sample.
JOINED = [[5 * SR, 4 * SR, 3 * SR + 777], [TS - 1, 5 * SR, 4 * SR], [5 * SR, TS - 5, 4 * SR, 1], [TS, TS, TS],
          [7 * SR + 3]]


@pytest.mark.parametrize("lengths", JOINED, ids=lambda v: "-".join(map(str, v)))
def test_the_ordered_story_equals_the_joined_story_in_every_arrival_order(lengths):
    clips = joined_clips(lengths)
    want = assembled(clips)
    for order in itertools.permutations(range(len(clips))):
        got, sizes = streamed(clips, order)
        assert got.shape == want.shape and np.array_equal(got, want), order
        assert sizes[-1] == 0, "the last clip in completes the story: nothing is left for the stream's end"


def test_the_ordered_story_holds_back_exactly_the_fade():
    """What is sent after a clip is everything a later clip cannot change, and no more."""
    clips = joined_clips([5 * SR, 4 * SR, 3 * SR])
    s = StoryStream()
    assert s.add(clips[1]).shape[1] == 0                    # clip 1 alone: nothing is final before clip 0
    first = s.add(clips[0])                                 # clips 0 and 1 joined; clip 2's fade still open
    assert first.shape[1] == 5 * SR + 4 * SR - TS - TS
    assert s.add(clips[2]).shape[1] == (5 + 4 + 3) * SR - 2 * TS - first.shape[1]   # the rest, fade included


SCRIPT = [(0.5, 5.5, False, True), (6.0, 4.0, True, False), (12.25, 5.0, False, False), (17.25, 2.0, False, False)]


def test_the_ordered_story_in_script_mode_keeps_the_timeline_and_its_gaps():
    clips = script_clips(SCRIPT, 21.0)
    want = assembled(clips)
    assert want.shape[1] == 21 * SR
    for order in itertools.permutations(range(len(clips))):
        got, _ = streamed(clips, order)
        assert got.shape == want.shape and np.array_equal(got, want), order
    s = StoryStream()
    assert s.add(clips[0]).shape[1] == int(round(6.0 * SR))      # up to its slot's end; its fade is held
    assert s.add(clips[1]).shape[1] == int(round(4.0 * SR))      # clip 2 starts at 12.25: the gap waits for it


def test_a_stream_that_ends_without_a_last_clip_ends_the_story_there():
    clips = joined_clips([5 * SR, 4 * SR, 3 * SR])
    clips[2].is_last = False                                # the planner dropped a trailing clip
    want = assembled(clips)
    got, sizes = streamed(clips, [0, 2, 1])
    assert np.array_equal(got, want) and sizes[-1] == TS     # the held fade goes out at the end
    s = StoryStream()
    s.add(clips[0])
    s.add(clips[2])
    with pytest.raises(ValueError, match=r"clips \[1\] never arrived"):
        s.finish()
    with pytest.raises(ValueError, match="arrived twice"):
        s.add(clips[0])


# ---- formats --------------------------------------------------------------------------------------

def test_wav_is_the_samples_and_flac_is_them_in_24_bits():
    x = noise(3 * SR + 11, 1)
    x[0, :3] = [1.5, -1.5, 1.0]                             # past full scale: FLAC clips, WAV keeps
    wav, rate = decode(encode(x, "wav"))
    assert rate == SR and np.array_equal(wav, x)
    flac, rate = decode(encode(x, "flac"))
    assert rate == SR and flac.shape == x.shape
    err = np.abs(flac - np.clip(x, -1.0, 1.0))
    assert err.max() <= STEP_24, err.max()


def test_samples_no_encoder_takes_are_made_safe_not_fatal():
    """NaN, infinite and huge samples: LAME aborts its process on them (an assertion) and FLAC
    refuses NaN. Each format encodes them (in a child process: a regression must not take pytest
    down), wav keeps them as they are."""
    import subprocess
    import sys

    code = """
import numpy as np
from audiostory_ensemble.pipeline.encode import decode, encode
x = np.zeros((2, 5000), np.float32)
x[:, 100], x[:, 200], x[:, 300], x[:, 400] = np.nan, np.inf, -1e30, 1e30
for fmt in ("flac", "opus", "mp3"):
    y, _ = decode(encode(x, fmt))
    assert np.isfinite(y).all() and np.abs(y).max() <= 1.5, fmt
y, _ = decode(encode(x, "wav"))
assert np.isnan(y[:, 100]).all() and np.isinf(y[:, 200]).all()
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("fmt", ["opus", "mp3"])
def test_lossy_formats_keep_the_sound(fmt):
    """Within the codec's tolerance: a signal-to-error ratio above 20 dB on tones (both codecs
    measure 30 dB or more here), at the codec's rate (Opus 48 kHz, resampled by soxr HQ)."""
    import soxr

    x = sound(4.0)
    y, rate = decode(encode(x, fmt))
    c = CODECS[fmt]
    assert rate == c.sample_rate
    ref = x if rate == SR else soxr.resample(x.T, SR, rate, quality="HQ").T
    assert y.shape == ref.shape
    core = slice(rate // 10, -rate // 10)                   # the edges hold the codec's warm-up
    snr = 10 * np.log10(np.sum(ref[:, core] ** 2) / np.sum((y[:, core] - ref[:, core]) ** 2))
    assert snr > 20.0, snr


@pytest.mark.parametrize("fmt", ["wav", "flac", "opus", "mp3"])
def test_a_stream_written_in_pieces_is_the_file_written_whole(fmt):
    x = sound(6.0, 2)
    cuts = [0, 1, 12345, 2 * SR, 2 * SR + 7, 5 * SR, x.shape[1]]
    enc = StreamEncoder(fmt)
    pieces = [enc.write(x[:, a:b]) for a, b in zip(cuts, cuts[1:])]
    tail, head = enc.close()
    stream = b"".join(pieces) + tail
    whole = encode(x, fmt)
    assert len(stream) == len(whole)
    # The file streams out as it is written, not at its close (an Ogg page holds about a second).
    assert sum(map(len, pieces)) > 0.75 * len(stream)
    if fmt in ("flac", "mp3"):
        assert patched(stream, head) == whole               # the head completed: the same file, byte for byte
    a, _ = decode(patched(stream, head))
    b, _ = decode(whole)
    assert np.array_equal(a, b)
    if fmt != "mp3":       # a stream without its head plays the same samples (MP3: plus the encoder's delay)
        assert np.array_equal(decode(stream)[0], b)


def test_quality_changes_the_size_and_formats_are_checked():
    x = sound(4.0, 3)
    small, large = len(encode(x, "opus", 0.1)), len(encode(x, "opus", 0.9))
    assert small * 2 < large
    assert len(encode(x, "mp3", 0.0)) < len(encode(x, "mp3", 1.0))
    with pytest.raises(FormatError, match=r"AUDIO_FORMAT must be one of \['pcm', 'wav', 'flac', 'opus', 'mp3'\]"):
        codec("aac")
    with pytest.raises(FormatError, match="AUDIO_QUALITY applies to .*opus.*mp3.* not to AUDIO_FORMAT 'flac'"):
        codec("flac", 0.5)
    with pytest.raises(FormatError, match=r"AUDIO_QUALITY must be in \[0, 1\]"):
        codec("opus", 1.5)
    assert clip_payload(x, "pcm")[0] is x and clip_payload(x, "pcm")[1:] == (b"", "")
    audio, data, mime = clip_payload(x, "flac")
    assert audio.shape == (2, 0) and mime == "audio/flac" and decode(data)[0].shape == x.shape


@pytest.mark.parametrize("inputs, message", [
    ({I.AUDIO_FORMAT.name: [b"aac"]}, "AUDIO_FORMAT must be one of"),
    ({I.AUDIO_FORMAT.name: [b"flac"], I.AUDIO_QUALITY.name: np.array([0.5], np.float32)}, "AUDIO_QUALITY applies"),
    ({I.AUDIO_FORMAT.name: [b"mp3"], I.AUDIO_QUALITY.name: np.array([np.nan], np.float32)}, "AUDIO_QUALITY must be"),
    ({I.AUDIO_QUALITY.name: np.array([0.5], np.float32)}, "not to AUDIO_FORMAT 'pcm'"),
])
def test_requests_with_a_bad_format_are_refused_naming_the_field(inputs, message):
    arrays = {I.INSTRUCTION.name: np.array([b"rain"], np.object_)}
    arrays.update({k: np.array(v, np.object_) if isinstance(v, list) else v for k, v in inputs.items()})
    with pytest.raises(RequestError, match=message):
        parse_request(arrays.get)
    ok = parse_request({**arrays, I.AUDIO_FORMAT.name: np.array([b" Opus "], np.object_),
                        I.AUDIO_QUALITY.name: np.array([0.25], np.float32)}.get)
    assert (ok.audio_format, ok.audio_quality) == ("opus", 0.25)


def clip_outputs(c: Clip) -> dict:
    import json

    return {I.CLIP_AUDIO.name: c.audio, I.CLIP_INDEX.name: np.array([c.index], np.int32),
            I.CAPTION.name: np.array([c.caption.encode()], np.object_),
            I.CLIP_START_S.name: np.array([c.start_s], np.float32),
            I.CLIP_DURATION_S.name: np.array([c.duration_s], np.float32),
            I.IS_LAST.name: np.array([c.is_last]),
            I.CLIP_PLAN.name: np.array([json.dumps(c.plan).encode()], np.object_),
            I.CLIP_ENCODED.name: np.array([b""], np.object_), I.MIME_TYPE.name: np.array([b""], np.object_)}


@pytest.mark.parametrize("fmt", ["pcm", "flac", "opus"])
def test_the_front_doors_story_output_sends_the_story_once_in_order(fmt):
    """``StoryOutput`` as the front door drives it: clips out of order, chunks with contiguous
    offsets, joined (with the head, for a file) equal to the story encoded whole."""
    clips = script_clips(SCRIPT, 21.0)
    want = assembled(clips)
    out = StoryOutput(fmt, story=True)
    chunks = []
    for i in (1, 0, 3, 2):
        sent = out.clip(clip_outputs(clips[i]))
        assert (sent[I.CLIP_AUDIO.name].shape[1] == 0) == (fmt != "pcm")
        assert bool(sent[I.CLIP_ENCODED.name][0]) == (fmt != "pcm")
        chunks += out.after_clip(clip_outputs(clips[i]))
    assert list(out.at_end()) == [], "the story was whole at its last clip"
    offsets = [int(c[I.STORY_OFFSET.name][0]) for c in chunks]
    if fmt == "pcm":
        audio = np.concatenate([c[I.STORY_AUDIO.name] for c in chunks], axis=1)
        assert np.array_equal(audio, want)
        assert offsets == list(np.cumsum([0] + [c[I.STORY_AUDIO.name].shape[1] for c in chunks])[:-1])
        return
    data = [c[I.STORY_ENCODED.name][0] for c in chunks]
    assert offsets == list(np.cumsum([0] + [len(d) for d in data])[:-1])
    assert all(c[I.MIME_TYPE.name][0] == CODECS[fmt].mime.encode() for c in chunks)
    head = chunks[-1][I.STORY_HEADER.name][0]
    assert np.array_equal(decode(patched(b"".join(data), head))[0], decode(encode(want, fmt))[0])


class _Sender:
    def __init__(self):
        self.sent = []

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))

    def is_cancelled(self):
        return False


def _front_door(output):
    from audiostory_ensemble.serving.stage_clients import BlsStageClients, ThreadedSends

    sender, logged = _Sender(), []
    clients = BlsStageClients(FakeTriton, ("llm", "bridge", "dit_sampler"), sender, [], "key",
                              ThreadedSends(FakeTriton, 4, 5.0), None, logged.append, output)
    return clients, sender, logged


def _as_response(c: Clip):
    return FakeTriton.InferenceResponse([FakeTriton.Tensor(n, v) for n, v in clip_outputs(c).items()])


def test_the_front_door_sends_each_clip_then_the_story_part_it_made_final():
    import asyncio

    clips = joined_clips([5 * SR, 4 * SR])
    clients, sender, _ = _front_door(StoryOutput("pcm", story=True))

    async def run():
        return [await clients.send(_as_response(c)) for c in clips] + [await clients.finish()]
    assert asyncio.run(run())[:2] == [True, True]
    get = FakeTriton.get_output_tensor_by_name
    kinds = [("final" if r is None else "clip" if get(r, I.CLIP_INDEX.name) else "story") for r, _ in sender.sent]
    assert kinds == ["clip", "story", "clip", "story", "final"]
    story = np.concatenate([FakeTriton.get_output_tensor_by_name(r, I.STORY_AUDIO.name).value
                            for r, _ in sender.sent if r is not None and
                            FakeTriton.get_output_tensor_by_name(r, I.STORY_AUDIO.name) is not None], axis=1)
    assert np.array_equal(story, assembled(clips))


def test_an_encoder_that_fails_ends_the_story_with_its_error_not_a_silent_stream():
    """The stream's error names the encoder and is final; the runner stops (False) and cancels."""
    import asyncio

    class Failing(StoryOutput):
        def clip(self, outputs):
            raise RuntimeError("libsndfile: out of memory")

    clients, sender, logged = _front_door(Failing("opus", story=True))
    assert asyncio.run(clients.send(_as_response(joined_clips([5 * SR])[0]))) is False
    (response, flags), = sender.sent
    assert flags == FakeTriton.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    assert response.error.message == ("audiostory_stream: encoding the story as opus: RuntimeError: "
                                      "libsndfile: out of memory")
    assert logged and "encoding the story as opus" in logged[0]

    class FailingLater(StoryOutput):       # the story's pieces, after the clip went out
        def after_clip(self, outputs):
            def parts():
                raise OSError("disk full")
                yield
            return parts()

    clients, sender, _ = _front_door(FailingLater("flac", story=True))
    assert asyncio.run(clients.send(_as_response(joined_clips([5 * SR])[0]))) is False
    assert FakeTriton.get_output_tensor_by_name(sender.sent[0][0], I.CLIP_INDEX.name) is not None
    assert "OSError: disk full" in sender.sent[-1][0].error.message and sender.sent[-1][1] == 1


def test_a_header_rewritten_on_close_keeps_the_bytes_around_it():
    """The append-only sink keeps the file's first bytes whatever the writes' sizes, so that a
    rewrite of part of the header is laid over the real bytes (not over zeros)."""
    from audiostory_ensemble.pipeline.encode import HEAD_BYTES, _AppendOnly

    sink = _AppendOnly()
    body = bytes(range(256)) * 400                     # one write, past the kept head
    sink.write(body)
    assert sink.take() == body
    sink.seek(4)
    sink.write(b"LEN!")
    sink.seek(0, 2)
    sink.write(b"tail")
    assert sink.take() == b"tail"
    assert bytes(sink.head[: sink.rewritten]) == body[:4] + b"LEN!"
    assert patched(body + b"tail", bytes(sink.head[: sink.rewritten])) == body[:4] + b"LEN!" + body[8:] + b"tail"
    sink.seek(HEAD_BYTES)
    with pytest.raises(OSError, match="past the 65536 kept"):
        sink.write(b"x")
