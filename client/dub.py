"""Video dubbing on the client side: a video and its timeline in, the dubbed video out.

The server only ever sees ``SEGMENTS`` (script mode) and ``TOTAL_DURATION`` = the video's length;
no video crosses the wire. FFmpeg (Debian's ``ffmpeg``/``ffprobe`` binaries) reads the video's
length and audio, and writes the output with the video stream(s) copied, not re-encoded:

- default: the generated story is the output's only audio track;
- ``mix_db``: the original audio (first audio track, resampled to 32 kHz with soxr HQ, mono
  duplicated to both channels, more than two channels down-mixed by FFmpeg) is added under the
  story at ``mix_db`` dB, and that mix is the output's audio;
- ``keep_audio``: the original audio track(s) are copied first and the generated one added after
  them, titled "AudioStory".

The generated track's codec follows the output container (``CODECS``) unless given.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from audiostory_ensemble.model.config import OUTPUT_SAMPLE_RATE
from audiostory_ensemble.model.post import resample, write_wav

CODECS = {".mkv": "flac", ".mka": "flac", ".webm": "libopus", ".mp4": "aac", ".m4v": "aac", ".mov": "aac"}
GENERATED_TITLE = "AudioStory"


class DubError(RuntimeError):
    """FFmpeg could not read the video or write the output; the message carries its reason."""


@dataclass(frozen=True)
class MediaInfo:
    duration_s: float
    video_streams: int
    audio_streams: int
    audio_channels: int        # of the first audio stream (0 without audio)
    audio_rate: int


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise DubError(f"{name} not found: install FFmpeg (Debian: apt-get install ffmpeg; `make setup` does)")
    return path


def _run(args: list[str], what: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True)
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-6:]
        raise DubError(f"{what} failed: " + " | ".join(tail))
    return proc


def probe(video: str | Path) -> MediaInfo:
    """The video's length (its first video stream's, else the container's) and its streams."""
    if not Path(video).is_file():
        raise DubError(f"{video}: no such file")
    proc = _run([_tool("ffprobe"), "-v", "error", "-show_entries",
                 "format=duration:stream=codec_type,duration,channels,sample_rate:stream_tags=DURATION",
                 "-of", "json", str(video)], f"ffprobe {video}")
    info = json.loads(proc.stdout)
    streams = info.get("streams", [])
    videos = [s for s in streams if s.get("codec_type") == "video"]
    audios = [s for s in streams if s.get("codec_type") == "audio"]
    if not videos:
        raise DubError(f"{video}: no video stream")
    duration = _seconds(videos[0].get("duration")) or _seconds(videos[0].get("tags", {}).get("DURATION")) \
        or _seconds(info.get("format", {}).get("duration"))
    if not duration:
        raise DubError(f"{video}: its length cannot be read")
    first = audios[0] if audios else {}
    return MediaInfo(duration, len(videos), len(audios), int(first.get("channels", 0)),
                     int(first.get("sample_rate", 0) or 0))


def _seconds(v) -> float | None:
    """ffprobe's ``"4.500000"`` or a Matroska tag's ``"00:00:04.500000000"``."""
    if v in (None, "", "N/A"):
        return None
    try:
        parts = [float(p) for p in str(v).split(":")]
    except ValueError:
        return None
    seconds = 0.0
    for p in parts:
        seconds = seconds * 60 + p
    return seconds if seconds > 0 else None


def original_audio(video: str | Path, info: MediaInfo, n_samples: int) -> np.ndarray:
    """The first audio track as float32 ``[2, n_samples]`` at 32 kHz (cut or zero-padded)."""
    channels = info.audio_channels if info.audio_channels in (1, 2) else 2
    proc = _run([_tool("ffmpeg"), "-v", "error", "-i", str(video), "-map", "0:a:0", "-ac", str(channels),
                 "-f", "f32le", "-acodec", "pcm_f32le", "-"], f"decoding the audio of {video}")
    a = np.frombuffer(proc.stdout, dtype="<f4").reshape(-1, channels).T
    a = resample(a, info.audio_rate, OUTPUT_SAMPLE_RATE) if info.audio_rate != OUTPUT_SAMPLE_RATE else a
    a = np.repeat(a, 2, axis=0) if a.shape[0] == 1 else a
    out = np.zeros((2, n_samples), np.float32)
    out[:, :min(n_samples, a.shape[1])] = a[:, :n_samples]
    return out


def mix(story: np.ndarray, original: np.ndarray, gain_db: float) -> np.ndarray:
    """The story with the original under it at ``gain_db`` dB (both ``[2, T]`` at 32 kHz)."""
    return (story + np.float32(10.0 ** (gain_db / 20.0)) * original).astype(np.float32)


def mux(video: str | Path, audio: np.ndarray, out: str | Path, *, keep_audio: bool = False,
        audio_codec: str | None = None, info: MediaInfo | None = None) -> Path:
    """Writes ``out``: the video's video streams copied, ``audio`` (``[2, T]`` at 32 kHz) as the
    generated track (after the original tracks, copied, with ``keep_audio``)."""
    info = info or probe(video)
    out = Path(out)
    codec = audio_codec or CODECS.get(out.suffix.lower(), "flac")
    if keep_audio and info.audio_streams == 0:
        raise DubError(f"{video} has no audio track to keep")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="audiostory-dub-") as tmp:
        wav = Path(tmp) / "story.wav"
        write_wav(wav, audio, OUTPUT_SAMPLE_RATE)
        kept = info.audio_streams if keep_audio else 0
        args = [_tool("ffmpeg"), "-v", "error", "-y", "-i", str(video), "-i", str(wav), "-map", "0:v"]
        if kept:
            args += ["-map", "0:a"]
        args += ["-map", "1:a", "-c", "copy", f"-c:a:{kept}", codec,
                 f"-metadata:s:a:{kept}", f"title={GENERATED_TITLE}"]
        if codec == "libopus":            # Opus runs at 48 kHz only
            args += [f"-ar:a:{kept}", "48000"]
        _run(args + [str(out)], f"writing {out}")
    return out


def render(video: str | Path, story_audio: np.ndarray, out: str | Path, *, info: MediaInfo | None = None,
           mix_db: float | None = None, keep_audio: bool = False, audio_codec: str | None = None) -> Path:
    """The story (``[2, T]`` at 32 kHz) into the video: alone, mixed over the original at ``mix_db``
    dB, and/or after the original track(s) (``keep_audio``)."""
    info = info or probe(video)
    audio = story_audio
    if mix_db is not None:
        if info.audio_streams == 0:
            raise DubError(f"{video} has no audio track to mix under the story")
        audio = mix(audio, original_audio(video, info, audio.shape[1]), mix_db)
    return mux(video, audio, out, keep_audio=keep_audio, audio_codec=audio_codec, info=info)


def dub(video: str | Path, segments: list[dict], out: str | Path, *, url: str = "127.0.0.1:8001",
        instruction: str | None = None, mix_db: float | None = None, keep_audio: bool = False,
        audio_codec: str | None = None, on_clip=None, timeout: float = 600.0, **params):
    """Asks the server for a script-mode story exactly as long as the video and writes ``out``.
    Returns ``(story, out)``; ``story.audio`` is what the server returned (before any mix)."""
    from .api import AudioStoryClient

    info = probe(video)
    if (mix_db is not None or keep_audio) and info.audio_streams == 0:
        raise DubError(f"{video} has no audio track to {'mix under the story' if mix_db is not None else 'keep'}")
    story = AudioStoryClient(url).generate(instruction, segments=segments, total_duration=info.duration_s,
                                           on_clip=on_clip, timeout=timeout, **params)
    return story, render(video, story.audio, out, info=info, mix_db=mix_db, keep_audio=keep_audio,
                         audio_codec=audio_codec)
