"""What the front door sends a streaming client besides each clip, by the request's
``AUDIO_FORMAT`` and ``STORY_STREAM``: the clip in its format, and the story itself in order
(:class:`stitch.StoryStream`), as PCM chunks or as one encoded file sent piece by piece
(:class:`encode.StreamEncoder`). Tensors in and out as ``{name: array}``; no Triton here.
"""

from __future__ import annotations

import numpy as np

from .. import interface as I
from .encode import PCM, StreamEncoder, clip_payload, codec
from .stitch import Clip, StoryStream


def _bytes(b: bytes) -> np.ndarray:
    return np.array([b], dtype=np.object_)


class StoryOutput:
    """One story's outputs to its client. Not thread-safe: one call at a time, in story order."""

    def __init__(self, audio_format: str = PCM, quality: float | None = None, story: bool = False):
        self.codec = codec(audio_format, quality)
        self.quality = quality
        self.story = StoryStream() if story else None
        self.encoder = None
        self.offset = 0            # samples (pcm) or bytes (encoded) of the story sent
        self.ended = False

    @property
    def encoded(self) -> bool:
        return self.codec.name != PCM

    def clip(self, outputs: dict) -> dict:
        """A clip's outputs (``I.CLIP_OUTPUTS`` by name, PCM as ``dit_sampler`` sends it to the front
        door) in the requested format."""
        out = dict(outputs)
        audio, encoded, mime = clip_payload(outputs[I.CLIP_AUDIO.name], self.codec.name, self.quality)
        out[I.CLIP_AUDIO.name] = np.ascontiguousarray(audio, dtype=np.float32)
        out[I.CLIP_ENCODED.name] = _bytes(encoded)
        out[I.MIME_TYPE.name] = _bytes(mime.encode())
        return out

    def after_clip(self, outputs: dict) -> list[dict]:
        """The story chunk a clip made final (none without STORY_STREAM, or if nothing new is)."""
        if self.story is None or self.ended:
            return []
        audio = self.story.add(Clip.from_outputs(outputs.get))
        return self._chunk(audio, last=self.story.done)

    def at_end(self) -> list[dict]:
        """The stream ended (every clip delivered): what the story still holds, and the file's end."""
        if self.story is None or self.ended:
            return []
        return self._chunk(self.story.finish(), last=True)

    def close(self) -> None:
        """The story ended some other way: drop the encoder."""
        self.ended = True
        if self.encoder is not None:
            self.encoder.abort()

    def _chunk(self, audio: np.ndarray, last: bool) -> list[dict]:
        header = b""
        if not self.encoded:
            data = b""
            size = audio.shape[1]
        else:
            if self.encoder is None:
                self.encoder = StreamEncoder(self.codec.name, self.quality, channels=audio.shape[0] or 2)
            data = self.encoder.write(audio) if audio.shape[1] else b""
            if last:
                tail, header = self.encoder.close()
                data += tail
            size = len(data)
            audio = np.zeros((audio.shape[0] or 2, 0), np.float32)
        if last:
            self.ended = True
        if not size and not (last and header):
            return []
        chunk = {I.STORY_AUDIO.name: np.ascontiguousarray(audio, dtype=np.float32),
                 I.STORY_ENCODED.name: _bytes(data), I.STORY_OFFSET.name: np.array([self.offset], np.int64),
                 I.STORY_HEADER.name: _bytes(header), I.MIME_TYPE.name: _bytes(self.codec.mime.encode())}
        self.offset += size
        return [chunk]
