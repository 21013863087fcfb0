"""Host-side post-processing: durations, trim, resample (soxr HQ), crossfade, WAV."""
from __future__ import annotations

import numpy as np
import pytest
import soxr
import torch

from audiostory_ensemble.model.config import CROSSFADE_S, OUTPUT_SAMPLE_RATE, VAE_SAMPLE_RATE, WAVE_SAMPLES
from audiostory_ensemble.model.post import (
    clip_durations,
    crossfade,
    linspace_f32,
    resample,
    stitched_length,
    trim,
    write_wav,
)

TS = int(CROSSFADE_S * OUTPUT_SAMPLE_RATE)  # 96000


def _rand(c, t, seed=0):
    return np.random.default_rng(seed).standard_normal((c, t)).astype(np.float32)


def test_clip_durations():
    assert clip_durations([10.0, 12.5, 8.0]) == [13.0, 15.5, 8.0]
    assert clip_durations([7.0]) == [7.0]
    assert clip_durations([]) == []
    assert clip_durations([1, 2], crossfade=0.5) == [1.5, 2.0]


def test_trim():
    w = _rand(2, 1000)
    assert trim(w, 0.01).shape == (2, 441)
    np.testing.assert_array_equal(trim(w, 0.01), w[:, :441])


def test_resample_is_soxr_hq_along_time():
    w = _rand(2, VAE_SAMPLE_RATE)
    out = resample(w)
    assert out.shape == (2, 32000) and out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
    direct = np.stack([soxr.resample(ch, VAE_SAMPLE_RATE, OUTPUT_SAMPLE_RATE, quality="soxr_hq") for ch in w])
    np.testing.assert_array_equal(out, direct)
    # a length where soxr returns one sample fewer than librosa's ceil(): zero-padded like fix_length
    w2 = _rand(2, 3 * 44100 + 7, seed=1)
    out2 = resample(w2)
    assert out2.shape == (2, 96006)
    raw = soxr.resample(w2.T.copy(), VAE_SAMPLE_RATE, OUTPUT_SAMPLE_RATE, quality="HQ").T
    np.testing.assert_array_equal(out2[:, : raw.shape[1]], raw)
    assert np.all(out2[:, raw.shape[1]:] == 0)


def test_crossfade_lengths_and_ramps():
    sr, ts = 100, 30  # transition 0.3 s at 100 Hz
    a, b, c = _rand(2, 100, 1), _rand(2, 80, 2), _rand(2, 50, 3)
    out = crossfade([a, b, c], sr=sr, transition_s=0.3)
    assert out.shape == (2, 100 + 80 + 50 - 2 * ts) and out.dtype == np.float32
    fo = torch.linspace(1, 0, ts).numpy()
    fi = torch.linspace(0, 1, ts).numpy()
    assert fo[0] == 1 and fo[-1] == 0 and fi[0] == 0 and fi[-1] == 1
    np.testing.assert_array_equal(out[:, :70], a[:, :70])
    np.testing.assert_array_equal(out[:, 70:100], a[:, 70:] * fo + b[:, :30] * fi)
    np.testing.assert_array_equal(out[:, 100:120], b[:, 30:50])
    np.testing.assert_array_equal(out[:, 120:150], b[:, 50:] * fo + c[:, :30] * fi)
    np.testing.assert_array_equal(out[:, 150:], c[:, 30:])


def test_crossfade_short_clip_hard_concat_and_edge_cases():
    a, short, b = _rand(2, 100, 1), _rand(2, 20, 2), _rand(2, 100, 3)
    out = crossfade([a, short, b], sr=100, transition_s=0.3)
    # a+short: short < ts -> hard concat (120); then 120 >= 30 and b >= 30 -> crossfade
    assert out.shape == (2, 100 + 20 + 100 - 30)
    np.testing.assert_array_equal(out[:, :120 - 30], np.concatenate([a, short], 1)[:, :90])
    # running result shorter than ts
    out2 = crossfade([short, a], sr=100, transition_s=0.3)
    np.testing.assert_array_equal(out2, np.concatenate([short, a], 1))
    # ts == 0 -> plain concat; single clip unchanged; empty -> [2, 0]
    np.testing.assert_array_equal(crossfade([a, b], sr=100, transition_s=0.0), np.concatenate([a, b], 1))
    np.testing.assert_array_equal(crossfade([a]), a)
    e = crossfade([])
    assert e.shape == (2, 0) and e.dtype == np.float32
    # 1-D clips become [1, T]
    assert crossfade([np.ones(100), np.ones(100)], sr=100, transition_s=0.3).shape == (1, 170)


def test_stitched_length_matches_pipeline():
    durations = [1.0, 0.5, 0.25]                    # seconds, small so the test stays fast
    xf = 0.1
    sr = OUTPUT_SAMPLE_RATE
    clips = []
    for d in clip_durations(durations, xf):
        w = np.zeros((2, int(d * VAE_SAMPLE_RATE) + 500), np.float32)
        clips.append(resample(trim(w, d)))
    out = crossfade(clips, sr=sr, transition_s=xf)
    assert out.shape[1] == stitched_length(durations, crossfade_s=xf)
    # full-size defaults: 50 s planned as 3 clips
    n = stitched_length([20.0, 20.0, 10.0])
    assert n == (int(23 * 32000) + int(23 * 32000) + 10 * 32000) - 2 * 96000 == 50 * 32000
    assert stitched_length([]) == 0
    assert stitched_length([40.0]) == int(np.ceil(WAVE_SAMPLES * 32000 / 44100))


def test_write_wav(tmp_path):
    sf = pytest.importorskip("soundfile")
    w = _rand(2, 320) * 0.1
    p = tmp_path / "x.wav"
    write_wav(p, w, 32000)
    data, sr = sf.read(str(p), dtype="float32", always_2d=True)
    info = sf.info(str(p))
    assert sr == 32000 and info.subtype == "FLOAT" and info.channels == 2
    np.testing.assert_array_equal(data.T, w)


def test_the_crossfade_ramps_are_torch_linspace_bit_for_bit():
    """The client stitches without torch; its ramps must still be the reference's torch.linspace
    values exactly (every length up to 2,048, and the crossfades of the real sample rates)."""
    for n in [*range(0, 2049), 44100, 48000, 96000, 96001, 132300, 1 << 20]:
        for a, b in ((1, 0), (0, 1)):
            want = torch.linspace(a, b, n, dtype=torch.float32).numpy()
            assert linspace_f32(a, b, n).tobytes() == want.tobytes(), (n, a, b)
