"""What the front door sends a streaming client besides each clip, by the request's
``AUDIO_FORMAT`` and ``STORY_STREAM``: the clip in its format, and the story itself in order
(:class:`stitch.StoryStream`), as PCM chunks or as one encoded file sent piece by piece
(:class:`encode.StreamEncoder`). Tensors in and out as ``{name: array}``; no Triton here.
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np

from .. import interface as I
from ..model.config import OUTPUT_SAMPLE_RATE
from .encode import PCM, StreamEncoder, clip_payload, codec
from .stitch import Clip, StoryStream

PIECE_S = 2.0      # audio encoded per story chunk: the first bytes wait for this much, not a whole part


def _bytes(b: bytes) -> np.ndarray:
    return np.array([b], dtype=np.object_)


class StoryOutput:
    """One story's outputs to its client. Not thread-safe: one call at a time, in story order."""

    def __init__(self, audio_format: str = PCM, quality: float | None = None, story: bool = False,
                 clip_files: bool = True):
        self.codec = codec(audio_format, quality)
        self.quality = quality
        self.clip_files = clip_files       # CLIP_ENCODED was asked for (else no clip is encoded)
        self.story = StoryStream() if story else None
        self.encoder = None
        self.offset = 0            # samples (pcm) or bytes (encoded) of the story sent
        self.ended = False
        self.encoded_audio_s = 0.0     # for the encode counters: audio encoded, and the time it took
        self.encode_s = 0.0

    @property
    def encoded(self) -> bool:
        return self.codec.name != PCM

    def clip(self, outputs: dict) -> dict:
        """A clip's outputs (``I.CLIP_OUTPUTS`` by name, PCM as ``dit_sampler`` sends it to the front
        door) in the requested format."""
        out = dict(outputs)
        audio = outputs[I.CLIP_AUDIO.name]
        if self.encoded and not self.clip_files:
            audio, encoded, mime = np.zeros((audio.shape[0], 0), np.float32), b"", self.codec.mime
        else:
            t = time.perf_counter()
            audio, encoded, mime = clip_payload(audio, self.codec.name, self.quality)
            if self.encoded:
                self._count(outputs[I.CLIP_AUDIO.name].shape[1], time.perf_counter() - t)
        out[I.CLIP_AUDIO.name] = np.ascontiguousarray(audio, dtype=np.float32)
        out[I.CLIP_ENCODED.name] = _bytes(encoded)
        out[I.MIME_TYPE.name] = _bytes(mime.encode())
        return out

    def after_clip(self, outputs: dict) -> Iterator[dict]:
        """The story chunks a clip made final (none without STORY_STREAM, or if nothing new is).
        The story advances now; the chunks are encoded as they are taken, ``PIECE_S`` of audio at
        a time, so that the first bytes go out before the whole part is encoded."""
        if self.story is None or self.ended:
            return iter(())
        audio = self.story.add(Clip.from_outputs(outputs.get))
        return self._chunks(audio, last=self.story.done)

    def at_end(self) -> Iterator[dict]:
        """The stream ended (every clip delivered): what the story still holds, and the file's end."""
        if self.story is None or self.ended:
            return iter(())
        return self._chunks(self.story.finish(), last=True)

    def close(self) -> None:
        """The story ended some other way: drop the encoder."""
        self.ended = True
        if self.encoder is not None:
            self.encoder.abort()

    def _chunks(self, audio: np.ndarray, last: bool) -> Iterator[dict]:
        if last:
            self.ended = True
        channels = audio.shape[0] or 2
        if not self.encoded:
            if audio.shape[1]:
                yield self._chunk(np.ascontiguousarray(audio, dtype=np.float32), b"", b"", audio.shape[1])
            return
        if self.encoder is None:
            self.encoder = StreamEncoder(self.codec.name, self.quality, channels=channels)
        empty = np.zeros((channels, 0), np.float32)
        step = int(PIECE_S * self.encoder.in_rate)
        for start in range(0, audio.shape[1], step):
            t = time.perf_counter()
            piece = audio[:, start:start + step]
            data = self.encoder.write(piece)
            self._count(piece.shape[1], time.perf_counter() - t)
            if data:
                yield self._chunk(empty, data, b"", len(data))
        if last:
            data, header = self.encoder.close()
            if data or header:
                yield self._chunk(empty, data, header, len(data))

    def _count(self, samples: int, seconds: float) -> None:
        self.encoded_audio_s += samples / OUTPUT_SAMPLE_RATE
        self.encode_s += seconds

    def _chunk(self, audio: np.ndarray, data: bytes, header: bytes, size: int) -> dict:
        chunk = {I.STORY_AUDIO.name: audio, I.STORY_ENCODED.name: _bytes(data),
                 I.STORY_OFFSET.name: np.array([self.offset], np.int64), I.STORY_HEADER.name: _bytes(header),
                 I.MIME_TYPE.name: _bytes(self.codec.mime.encode())}
        self.offset += size
        return chunk
