"""Host-side audio post-processing (numpy in/out, float32), as in AudioStory ``evaluate/inference.py``.

Per clip k (K clips, planned durations d_k): the DiT is asked for ``d_k + crossfade`` seconds for
every clip but the last (``clip_durations``); the decoded 44.1 kHz wave is trimmed to that length
(``trim``), resampled to 32 kHz (``resample``: librosa's default ``soxr_hq``), and the clips are
joined with linear crossfades (``crossfade``: the reference's ``smooth_concatenate``).
"""

from __future__ import annotations

import numpy as np
import soxr

from .config import AUDIO_CHANNELS, CROSSFADE_S, OUTPUT_SAMPLE_RATE, VAE_SAMPLE_RATE, WAVE_SAMPLES


def render_seconds(duration: float, fades_out: bool, crossfade: float = CROSSFADE_S) -> float:
    """What the DiT renders for a clip that lasts ``duration`` s in the story: the crossfade tail
    too when the clip fades into the next one (every clip but the last of a planned story; a
    segment touching the next in script mode). The one place this rule is written."""
    return float(duration) + crossfade if fades_out else float(duration)


WINDOW_S = WAVE_SAMPLES / VAE_SAMPLE_RATE   # 29.954 s: the most audio one clip can hold


def heard_seconds(duration: float, fades_out: bool, crossfade: float = CROSSFADE_S) -> float:
    """How long a clip lasts in a joined story, from its start to the next clip's: its duration,
    unless the DiT's window cut the audio shorter than :func:`render_seconds` asked (a clip that
    fades out and lasts over 26.95 s, a last clip over 29.95 s); then what the window holds, less
    the crossfade the next clip overlaps. The audio is the reference's either way (the crossfade
    joins what was rendered); this keeps a clip's reported start and duration true to it."""
    return min(float(duration), WINDOW_S - (crossfade if fades_out else 0.0))


def clip_durations(durations: list[float], crossfade: float = CROSSFADE_S) -> list[float]:
    """Seconds requested from the DiT per clip: ``d_k + crossfade`` except for the last clip."""
    return [render_seconds(d, k + 1 < len(durations), crossfade) for k, d in enumerate(durations)]


def trim(wave: np.ndarray, duration_s: float, sr: int = VAE_SAMPLE_RATE) -> np.ndarray:
    """``wave[:, :int(duration_s * sr)]`` (a duration beyond the wave keeps the whole wave)."""
    return wave[:, : int(duration_s * sr)]


def clip_audio(wave: np.ndarray, render_s: float) -> np.ndarray:
    """A decoded clip as the story hears it: the VAE's 44.1 kHz ``wave`` trimmed to the rendered
    length, resampled to 32 kHz (the reference's per-clip post-processing, written once)."""
    return resample(trim(wave, render_s), VAE_SAMPLE_RATE, OUTPUT_SAMPLE_RATE)


def _resampled_length(n: int, orig_sr: int, target_sr: int) -> int:
    # librosa: n_samples = int(np.ceil(y.shape[axis] * ratio)), ratio = float(target_sr) / orig_sr
    return int(np.ceil(n * (float(target_sr) / orig_sr)))


def resample(wave: np.ndarray, orig_sr: int = VAE_SAMPLE_RATE,
             target_sr: int = OUTPUT_SAMPLE_RATE) -> np.ndarray:
    """``[C, T] -> [C, ceil(T * target/orig)]`` float32, = ``librosa.resample(wave, orig_sr=...,
    target_sr=..., axis=-1)`` with its default ``res_type="soxr_hq"``.

    librosa passes ``y.T`` ([T, C], channels independent) to ``soxr.resample(quality="soxr_hq")``
    (same as ``"HQ"``), then ``fix_length`` zero-pads/trims the time axis to
    ``ceil(T * ratio)`` (soxr itself may return one sample fewer).
    """
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 1:
        return resample(wave[None], orig_sr, target_sr)[0]
    if orig_sr == target_sr:
        return wave.copy()
    out = soxr.resample(np.ascontiguousarray(wave.T), orig_sr, target_sr, quality="HQ").T
    n = _resampled_length(wave.shape[-1], orig_sr, target_sr)
    if out.shape[-1] >= n:
        out = out[:, :n]
    else:
        out = np.pad(out, ((0, 0), (0, n - out.shape[-1])))
    return np.ascontiguousarray(out, dtype=np.float32)


def linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` bit for bit, in numpy.

    torch's CPU kernel computes ``step = (end - start) / (steps - 1)`` in float32 and element ``i``
    as ``start + step * i`` below ``steps // 2`` and ``end - step * (steps - 1 - i)`` from there,
    each with one rounding (a fused multiply-add). Both products are exact in float64 for any
    length a crossfade has (below 2**29 samples), so float64 arithmetic rounded once to float32
    gives the same values. The reference joins clips with torch's ramps; the client and the web
    page stitch without torch (``tests/test_post.py`` holds this to torch across lengths).
    """
    if steps <= 0:
        return np.zeros(0, np.float32)
    if steps == 1:
        return np.array([start], np.float32)
    first, last = np.float32(start), np.float32(end)
    step = np.float64((last - first) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    half = steps // 2
    out = np.empty(steps, np.float64)
    out[:half] = np.float64(first) + step * i[:half]
    out[half:] = np.float64(last) - step * (steps - 1 - i[half:])
    return out.astype(np.float32)


def _ramps(ts: int) -> tuple[np.ndarray, np.ndarray]:
    # The reference's torch.linspace ramps (float32, both endpoints included).
    return linspace_f32(1, 0, ts), linspace_f32(0, 1, ts)


def crossfade(clips: list[np.ndarray], sr: int = OUTPUT_SAMPLE_RATE,
              transition_s: float = CROSSFADE_S) -> np.ndarray:
    """Joins ``[C, T_k]`` clips left to right with linear crossfades of ``int(transition_s*sr)``.

    Rules (reference ``smooth_concatenate``): 1-D clips become ``[1, T]``; ``ts = max(0,
    int(transition_s * sr))``; ``ts == 0`` -> plain concatenation; a join where the running result
    or the next clip is shorter than ``ts`` is a hard concatenation; otherwise the last ``ts``
    samples (times ``linspace(1, 0, ts)``) and the next clip's first ``ts`` (times
    ``linspace(0, 1, ts)``) are summed. An empty list gives an empty ``[2, 0]`` float32 array
    (the reference returns a 1-D empty tensor; [2, 0] keeps the output stereo-shaped).
    """
    arrays = []
    for c in clips:
        a = np.asarray(c, dtype=np.float32)
        if a.ndim == 1:
            a = a[None]
        elif a.ndim != 2:
            raise ValueError(f"each clip must be 1-D or 2-D, got shape {a.shape}")
        arrays.append(a)
    if not arrays:
        return np.zeros((AUDIO_CHANNELS, 0), dtype=np.float32)
    ts = max(0, int(transition_s * sr))
    if ts == 0:
        return np.ascontiguousarray(np.concatenate(arrays, axis=1))
    fade_out, fade_in = _ramps(ts)
    result = arrays[0]
    for nxt in arrays[1:]:
        if result.shape[1] < ts or nxt.shape[1] < ts:
            result = np.concatenate([result, nxt], axis=1)
            continue
        merged = result[:, -ts:] * fade_out + nxt[:, :ts] * fade_in
        result = np.concatenate([result[:, :-ts], merged, nxt[:, ts:]], axis=1)
    return np.ascontiguousarray(result, dtype=np.float32)


def place_on_timeline(clips: list[np.ndarray], starts_s: list[float], durations_s: list[float],
                      fade_in: list[bool], fade_out: list[bool], total_s: float,
                      sr: int = OUTPUT_SAMPLE_RATE, transition_s: float = CROSSFADE_S) -> np.ndarray:
    """Script mode: each clip at ``round(start * sr)``, silence elsewhere, ``round(total * sr)`` long.

    A clip's slot is ``round(start*sr) .. round((start+duration)*sr)``, plus ``int(transition_s*sr)``
    samples when it fades out into the next clip (which starts where this slot ends). The clip is
    cut or zero-padded to its slot (the DiT's trim and the resampler leave it within a sample or two,
    or short by the window's end); the fades are the reference's linear ramps, so two touching clips
    are crossfaded exactly as :func:`crossfade` joins them, with the boundary on the given time.
    """
    n_total = int(round(total_s * sr))
    out = np.zeros((AUDIO_CHANNELS, n_total), dtype=np.float32)
    for audio, start, dur, fin, fout in zip(clips, starts_s, durations_s, fade_in, fade_out):
        s0, _, seg = timeline_segment(audio, start, dur, fin, fout, sr, transition_s, out.shape[0])
        end = min(s0 + seg.shape[1], n_total)
        if end > s0:
            out[:, s0:end] += seg[:, : end - s0]
    return out


def timeline_segment(audio: np.ndarray, start_s: float, duration_s: float, fade_in: bool, fade_out: bool,
                     sr: int = OUTPUT_SAMPLE_RATE, transition_s: float = CROSSFADE_S,
                     channels: int = AUDIO_CHANNELS) -> tuple[int, int, np.ndarray]:
    """One clip's slot on a script's timeline (:func:`place_on_timeline`'s rule): its first sample,
    where its slot ends before any fade into the next clip, and the clip cut or padded to the slot
    with its fades applied, ``[C, slot]``."""
    ts = max(0, int(transition_s * sr))
    a = np.asarray(audio, dtype=np.float32)
    a = a[None] if a.ndim == 1 else a
    s0 = int(round(start_s * sr))
    s_end = int(round((start_s + duration_s) * sr))
    seg = np.zeros((channels, s_end + (ts if fade_out else 0) - s0), dtype=np.float32)
    n = min(seg.shape[1], a.shape[1])
    seg[:, :n] = a[:, :n]
    if ts and seg.shape[1] >= ts:
        fade_out_ramp, fade_in_ramp = _ramps(ts)
        if fade_in:
            seg[:, :ts] *= fade_in_ramp
        if fade_out:
            seg[:, -ts:] *= fade_out_ramp
    return s0, s_end, seg


def stitched_length(durations: list[float], crossfade_s: float = CROSSFADE_S,
                    sr: int = OUTPUT_SAMPLE_RATE, vae_sr: int = VAE_SAMPLE_RATE,
                    wave_samples: int = WAVE_SAMPLES) -> int:
    """Final sample count for planned clip durations ``d_k`` (before ``clip_durations``)."""
    ts = max(0, int(crossfade_s * sr))
    total = None
    for d in clip_durations(durations, crossfade_s):
        n = _resampled_length(min(max(int(d * vae_sr), 0), wave_samples), vae_sr, sr)
        if total is None:
            total = n
        elif ts == 0 or total < ts or n < ts:
            total += n
        else:
            total += n - ts
    return 0 if total is None else total


def write_wav(path, wave: np.ndarray, sr: int = OUTPUT_SAMPLE_RATE) -> None:
    """Writes ``[C, T]`` as a float32 WAV (``subtype='FLOAT'``, like torchaudio on float32)."""
    import soundfile as sf

    sf.write(str(path), np.ascontiguousarray(np.asarray(wave, dtype=np.float32).T), sr,
             subtype="FLOAT")
