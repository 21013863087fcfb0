"""Script mode and continuation inputs: validation, clip planning, timeline placement (no server)."""
import json

import numpy as np
import pytest

from audiostory_ensemble import interface as I
from audiostory_ensemble.model import post
from audiostory_ensemble.pipeline import script
from audiostory_ensemble.pipeline.request import RequestError, parse_request

SR = 32000


def seg(start, end, caption="rain"):
    return {"start": start, "end": end, "caption": caption}


def params(**inputs):
    arrays = {}
    for name, value in inputs.items():
        t = getattr(I, name)
        if isinstance(value, np.ndarray):
            arrays[t.name] = value
        elif t.dtype == "BYTES":
            arrays[t.name] = np.array([value.encode() if isinstance(value, str) else value], dtype=np.object_)
        else:
            arrays[t.name] = np.array([value], dtype=t.numpy_dtype)
    return parse_request(arrays.get)


@pytest.mark.parametrize("segments, message", [
    ("[", "not valid JSON"),
    ("{}", "non-empty JSON list"),
    ("[]", "non-empty JSON list"),
    (json.dumps([seg(0, 5, "")]), r"SEGMENTS\[0\].caption must be non-empty"),
    (json.dumps([seg(0, 5, "   ")]), r"SEGMENTS\[0\].caption must be non-empty"),
    (json.dumps([seg(0, 5, 7)]), r"SEGMENTS\[0\].caption must be non-empty"),
    (json.dumps([seg(0, 5, "rain <|gen|> more")]), "control token"),
    (json.dumps([seg(-1, 5)]), r"SEGMENTS\[0\].start must be >= 0"),
    (json.dumps([seg(3, 2)]), r"SEGMENTS\[0\] must last at least"),
    (json.dumps([seg(3, 3)]), r"SEGMENTS\[0\] must last at least"),
    (json.dumps([seg(0, 5), seg(4, 8)]), r"SEGMENTS\[1\] overlaps the previous one"),
    (json.dumps([seg(10, 15), seg(0, 5)]), r"SEGMENTS\[1\] starts before the previous one"),
    (json.dumps([seg(0, "5")]), r"SEGMENTS\[0\].end must be a number"),
    (json.dumps([seg(0, True)]), r"SEGMENTS\[0\].end must be a number"),
    ('[{"start": 0, "end": NaN, "caption": "x"}]', r"SEGMENTS\[0\].end must be finite"),
    ('[{"start": 0, "end": Infinity, "caption": "x"}]', r"SEGMENTS\[0\].end must be finite"),
    (json.dumps([seg(0, 700)]), "story limit is 600"),
    (json.dumps([{"start": 0, "end": 5, "caption": "x", "volume": 3}]), "unknown field"),
    (json.dumps(["rain"]), r"SEGMENTS\[0\] must be an object"),
])
def test_bad_segments_are_refused_naming_the_segment(segments, message):
    with pytest.raises(RequestError, match=message):
        params(SEGMENTS=segments)


def test_script_mode_needs_no_instruction_and_sets_the_story_length():
    p = params(SEGMENTS=json.dumps([seg(1.5, 6), seg(6, 14.25, "thunder")]))
    assert p.mode == "script" and [s.caption for s in p.segments] == ["rain", "thunder"]
    assert p.total_duration == 14.25                      # the last end when TOTAL_DURATION is absent
    assert params(SEGMENTS=json.dumps([seg(0, 5)]), TOTAL_DURATION=20.0).total_duration == 20.0
    with pytest.raises(RequestError, match="TOTAL_DURATION 4 s is shorter than the script"):
        params(SEGMENTS=json.dumps([seg(0, 5)]), TOTAL_DURATION=4.0)
    with pytest.raises(RequestError, match="DURATION_POLICY does not apply in script mode"):
        params(SEGMENTS=json.dumps([seg(0, 5)]), DURATION_POLICY="exact")


@pytest.mark.parametrize("audio, rate, message", [
    (np.zeros((2, 0), np.float32), 16000, "INPUT_AUDIO is empty"),
    (np.zeros(16000, np.float32), 16000, r"INPUT_AUDIO must be \[channels, samples\]"),
    (np.zeros((1, 1, 16000), np.float32), 16000, r"INPUT_AUDIO must be \[channels, samples\]"),
    (np.full((1, 16000), np.nan, np.float32), 16000, "NaN or infinite"),
    (np.full((1, 16000), np.inf, np.float32), 16000, "NaN or infinite"),
    (np.zeros((1, 16000), np.float32), 1, r"INPUT_SAMPLE_RATE must be in \[8000, 192000\]"),
    (np.zeros((1, 16000), np.float32), 10_000_000, r"INPUT_SAMPLE_RATE must be in"),
    (np.zeros((1, 16000 * 31), np.float32), 16000, "INPUT_AUDIO is 31.00 s; the limit is 30 s"),
    (np.zeros((16000, 2), np.float32), 16000, "1 to 8 channels"),
    (np.zeros((1, 10), np.float32), 16000, "at least 0.1 s"),
    (np.zeros((1, 16000), np.int32), 16000, "INPUT_AUDIO must be FP32"),
    (np.zeros((1, 16000), np.float32), None, "INPUT_SAMPLE_RATE is required with INPUT_AUDIO"),
])
def test_bad_input_audio_is_refused_naming_the_field(audio, rate, message):
    inputs = {"INPUT_AUDIO": audio}
    if rate is not None:
        inputs["INPUT_SAMPLE_RATE"] = rate
    with pytest.raises(RequestError, match=message):
        params(**inputs)


def test_modes_do_not_mix_and_stray_inputs_are_refused():
    with pytest.raises(RequestError, match="cannot be combined"):
        params(SEGMENTS=json.dumps([seg(0, 5)]), INPUT_AUDIO=np.zeros((1, 16000), np.float32), INPUT_SAMPLE_RATE=16000)
    with pytest.raises(RequestError, match="INPUT_SAMPLE_RATE is given without INPUT_AUDIO"):
        params(INSTRUCTION="rain", INPUT_SAMPLE_RATE=16000)
    with pytest.raises(RequestError, match="INSTRUCTION is required"):
        params()
    p = params(INPUT_AUDIO=np.zeros((2, 8000), np.float32), INPUT_SAMPLE_RATE=16000)
    assert p.mode == "continuation" and p.input_sample_rate == 16000 and p.input_audio.shape == (2, 8000)


def test_touching_segments_crossfade_gaps_do_not_and_long_segments_split():
    segs = script.parse_segments(json.dumps([seg(0, 10), seg(10, 20, "b"), seg(25, 27, "c"), seg(30, 100, "d")]), 600)
    clips = script.plan_clips(segs)
    # 0-10 touches 10-20: crossfaded. 20 -> 25 gap: hard. 25-27 then a gap. 30-100 split in 3 (70 / 26.95).
    assert [(c.segment, c.fade_in, c.fade_out) for c in clips] == [
        (0, False, True), (1, True, False), (2, False, False), (3, False, True), (3, True, True), (3, True, False)]
    assert [c.render_s for c in clips[:3]] == [13.0, 10.0, 2.0]
    parts = clips[3:]
    assert all(abs(c.duration_s - 70 / 3) < 1e-9 for c in parts) and all(c.render_s <= script.WINDOW_S for c in clips)
    np.testing.assert_allclose([c.start_s for c in parts], [30, 30 + 70 / 3, 30 + 140 / 3])
    assert {c.caption for c in parts} == {"d"}
    # A segment just longer than the window is split even with nothing after it.
    assert len(script.plan_clips([script.Segment(0, 29.96, "x")])) == 2
    assert len(script.plan_clips([script.Segment(0, 29.9, "x")])) == 1
    # ... and one that fits alone but not with the 3 s tail into a touching neighbour is split too.
    assert len(script.plan_clips([script.Segment(0, 28, "x"), script.Segment(28, 40, "y")])) == 3
    # A touching neighbour shorter than the crossfade is joined hard (no ramps across it).
    short = script.plan_clips([script.Segment(0, 5, "x"), script.Segment(5, 6, "y")])
    assert [(c.fade_in, c.fade_out) for c in short] == [(False, False), (False, False)]


def test_timeline_places_each_clip_on_its_start_sample():
    starts, durs = [0.5, 3.25, 9.0], [2.0, 4.0, 1.0]
    clips = [np.full((2, int(round(d * SR)) + 3), k + 1, np.float32) for k, d in enumerate(durs)]
    out = post.place_on_timeline(clips, starts, durs, [False] * 3, [False] * 3, 12.0)
    assert out.shape == (2, 12 * SR)
    for k, (s, d) in enumerate(zip(starts, durs)):
        a, b = round(s * SR), round((s + d) * SR)
        assert (out[:, a:b] == k + 1).all(), k
        assert out[0, a - 1] == 0 and out[0, b] == 0           # silence on both sides, to the sample
    assert (out[:, : round(0.5 * SR)] == 0).all()


def test_touching_clips_crossfade_like_the_reference_join():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 13 * SR)).astype(np.float32), rng.standard_normal((2, 7 * SR)).astype(np.float32)
    placed = post.place_on_timeline([a, b], [0.0, 10.0], [10.0, 7.0], [False, True], [True, False], 17.0)
    joined = post.crossfade([a, b], SR)
    assert placed.shape == joined.shape
    np.testing.assert_allclose(placed, joined, atol=1e-6)


def test_forced_script_parses_back_to_its_captions_and_durations(converted):
    from audiostory_ensemble.model.grammar import parse_plan

    tok, tokenizer = converted.token_ids, converted.tokenizer
    clips = script.plan_clips(script.parse_segments(json.dumps(
        [seg(0, 4.5, "a dog barks twice"), seg(4.5, 12.25, "thunder rumbles in the distance")]), 600))
    ids = tokenizer.encode(script.forced_text(clips, tok.n, tok.m), add_special_tokens=False)
    plan = parse_plan(ids, tok, tokenizer.decode)
    assert plan.finished and [c.caption for c in plan.clips] == [c.caption for c in clips]
    assert [c.duration for c in plan.clips] == [4.5, 7.75]
