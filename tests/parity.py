"""The comparisons that prove a served result equals the reference, shared by the parity tests and
by the checks that show they fail under a planted fault (tests/test_fidelity.py)."""
from __future__ import annotations

import numpy as np

AUDIO_TOLERANCE = 1e-3      # max abs, 32 kHz story and clip audio (float32 end to end)


def assert_story_parity(audio: np.ndarray, clip_audios: list[np.ndarray], reference) -> None:
    """A story (and each of its clips) equals the reference's within ``AUDIO_TOLERANCE``."""
    assert audio.shape == reference.audio.shape, (audio.shape, reference.audio.shape)
    assert np.abs(audio - reference.audio).max() <= AUDIO_TOLERANCE
    assert len(clip_audios) == len(reference.clips)
    for k, (got, want) in enumerate(zip(clip_audios, reference.clips)):
        assert got.shape == want.audio.shape, (k, got.shape, want.audio.shape)
        assert np.abs(got - want.audio).max() <= AUDIO_TOLERANCE, k


def assert_plan_parity(captions: list[str], durations: list[float], reference) -> None:
    """The served plan is the reference's: same captions, same clip durations."""
    assert captions == [c.caption for c in reference.clips]
    np.testing.assert_allclose(durations, [c.duration for c in reference.clips], rtol=0, atol=1e-4)
