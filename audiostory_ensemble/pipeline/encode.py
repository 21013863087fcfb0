"""Audio as applications take it: the story's samples encoded (WAV, FLAC, Ogg Opus, MP3) with
libsndfile (``soundfile``), whole or as one continuous stream written piece by piece.

Formats (``AUDIO_FORMAT``):

- ``pcm``: no encoding; the FP32 tensors, as always (the default).
- ``wav``: 32-bit float WAV at 32 kHz: exactly the model's samples.
- ``flac``: 24-bit FLAC at 32 kHz: lossless of the samples rounded to 24 bits.
- ``opus``: Ogg Opus, resampled to 48 kHz (Opus codes 8/12/16/24/48 kHz only) with soxr's HQ
  filter, the pipeline's own resampler; lossy.
- ``mp3``: MPEG-1 Layer III at 32 kHz (LAME); lossy.

Every format but wav takes samples in [-1, 1]: beyond is clipped, NaN is silence (LAME would
abort the process on an infinite sample).

``AUDIO_QUALITY`` (opus and mp3 only): in [0, 1], 1 the best and largest; left out, the codec's
default (Opus about 120 kb/s, MP3 about 110 kb/s VBR on this model's audio). It sets libsndfile's
compression level to ``1 - quality``.

A stream (:class:`StreamEncoder`) is one file written in pieces: each ``write`` returns the bytes
the encoder produced so far, which a player appends. Formats whose header holds the length (WAV's
sizes, FLAC's STREAMINFO, MP3's VBR frame) get it only at the end: libsndfile rewrites the header
on close, and :meth:`StreamEncoder.close` returns that rewritten head separately. A player needs
none of it (the streamed head says "length unknown"); a file writer writes it at offset 0 and the
file is byte for byte what :func:`encode` writes (for Ogg, whose serial number is random, the
decoded audio is the same instead).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from ..model.config import OUTPUT_SAMPLE_RATE


@dataclass(frozen=True)
class Codec:
    name: str
    container: str = ""        # libsndfile's format ("" for pcm: no encoding)
    subtype: str = ""
    mime: str = ""
    suffix: str = ""
    sample_rate: int = OUTPUT_SAMPLE_RATE
    has_quality: bool = False  # AUDIO_QUALITY applies


PCM = "pcm"
CODECS = {c.name: c for c in (
    Codec(PCM),
    Codec("wav", "WAV", "FLOAT", "audio/wav", ".wav"),
    Codec("flac", "FLAC", "PCM_24", "audio/flac", ".flac"),
    Codec("opus", "OGG", "OPUS", "audio/ogg; codecs=opus", ".opus", 48000, has_quality=True),
    Codec("mp3", "MP3", "MPEG_LAYER_III", "audio/mpeg", ".mp3", has_quality=True),
)}
FORMATS = tuple(CODECS)


class FormatError(ValueError):
    """An unknown format or a quality the format does not take (the message names the field)."""


def codec(name: str, quality: float | None = None) -> Codec:
    """The codec for ``AUDIO_FORMAT`` = ``name``; raises :class:`FormatError` naming the field."""
    c = CODECS.get(name)
    if c is None:
        raise FormatError(f"AUDIO_FORMAT must be one of {list(FORMATS)}, got {name!r}")
    if quality is not None:
        if not c.has_quality:
            raise FormatError(f"AUDIO_QUALITY applies to {[n for n, k in CODECS.items() if k.has_quality]} only, "
                              f"not to AUDIO_FORMAT {name!r}")
        if not (np.isfinite(quality) and 0.0 <= quality <= 1.0):
            raise FormatError(f"AUDIO_QUALITY must be in [0, 1] (1 = best), got {quality}")
    return c


def _compression_level(quality: float | None) -> float | None:
    if quality is None:
        return None
    # libsndfile: 0 = the highest bitrate; LAME's VBR quality (10 x level) must stay below 10.
    return min(1.0 - float(quality), 0.999)


HEAD_BYTES = 1 << 16   # a stream's first bytes kept for its header's rewrite (headers live there)


class _AppendOnly:
    """A write-only file for libsndfile that hands out what was appended since the last ``take``
    and keeps the writes that land on bytes already handed out (a header rewritten on close)
    over a copy of the file's first ``HEAD_BYTES``."""

    def __init__(self):
        self.size = 0              # bytes appended so far
        self.pos = 0
        self.fresh = bytearray()   # appended, not yet taken
        self.head = bytearray()    # the file's first bytes (up to HEAD_BYTES), with later rewrites applied
        self.rewritten = 0         # the head's length that holds rewrites

    def write(self, data) -> int:
        data = bytes(data)
        n, start = len(data), self.pos
        if start < self.size:      # a rewrite of bytes already written
            end = min(start + n, self.size)
            if end > len(self.head):
                raise OSError(f"encoder rewrote bytes {start}-{end}, past the {len(self.head)} kept of the head")
            self.head[start:end] = data[: end - start]
            self.rewritten = max(self.rewritten, end)
            data, start = data[end - start:], end
        if data:
            if start != self.size:
                raise OSError(f"encoder wrote at {start}, past the end of the file ({self.size})")
            self.fresh += data
            self.size += len(data)
            if len(self.head) < HEAD_BYTES:
                self.head += data[: HEAD_BYTES - len(self.head)]
        self.pos = start + len(data)
        return n

    def seek(self, offset, whence=io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n=-1) -> bytes:       # libsndfile never reads a file it writes
        return b""

    def take(self) -> bytes:
        out, self.fresh = bytes(self.fresh), bytearray()
        return out


def _as_frames(audio: np.ndarray) -> np.ndarray:
    """[C, T] float32 (the pipeline's layout) -> [T, C] for libsndfile."""
    a = np.asarray(audio, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"audio must be [channels, samples], got shape {list(a.shape)}")
    return np.ascontiguousarray(a.T)


class StreamEncoder:
    """One encoded file, written as the audio arrives (32 kHz ``[C, T]`` pieces, in order)."""

    def __init__(self, fmt: str, quality: float | None = None, channels: int = 2,
                 sample_rate: int = OUTPUT_SAMPLE_RATE):
        import soundfile as sf

        self.codec = codec(fmt, quality)
        if self.codec.name == PCM:
            raise FormatError("pcm is not encoded: its samples are sent as they are")
        self.channels, self.in_rate = channels, sample_rate
        self.sink = _AppendOnly()
        self.resampler = None
        if self.codec.sample_rate != sample_rate:
            import soxr

            self.resampler = soxr.ResampleStream(sample_rate, self.codec.sample_rate, channels, dtype="float32",
                                                 quality="HQ")
        self.file = sf.SoundFile(self.sink, "w", self.codec.sample_rate, channels, self.codec.subtype,
                                 format=self.codec.container,
                                 compression_level=_compression_level(quality))
        self.closed = False

    def write(self, audio: np.ndarray) -> bytes:
        """Encode ``audio`` ([C, T]); returns the bytes that follow those returned before."""
        if self.closed:
            raise ValueError("the stream is closed")
        frames = _as_frames(audio)
        if frames.shape[1] != self.channels:
            raise ValueError(f"audio has {frames.shape[1]} channels; the stream has {self.channels}")
        if self.codec.name != "wav":
            # LAME aborts the process on a non-finite or huge sample, libsndfile's FLAC refuses a
            # NaN: these formats take [-1, 1] (FLAC clips there anyway), NaN as silence.
            frames = np.clip(np.nan_to_num(frames, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
        if self.resampler is not None:
            frames = self.resampler.resample_chunk(frames)
        if len(frames):
            self.file.write(frames)
        return self.sink.take()

    def close(self) -> tuple[bytes, bytes]:
        """Ends the stream: (the last bytes, the head to write at offset 0 of a saved file; empty
        when the format rewrites nothing)."""
        if self.closed:
            return b"", b""
        if self.resampler is not None:
            tail = self.resampler.resample_chunk(np.zeros((0, self.channels), np.float32), last=True)
            if len(tail):
                self.file.write(tail)
        self.file.close()
        self.closed = True
        return self.sink.take(), bytes(self.sink.head[: self.sink.rewritten])

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.file.close()
            except Exception:  # noqa: BLE001 - a stream given up on: nothing to deliver
                pass


def patched(stream: bytes, head: bytes) -> bytes:
    """A streamed file as a file on disk: its head rewritten (what a file writer does at the end)."""
    return head + stream[len(head):] if head else stream


def encode(audio: np.ndarray, fmt: str, quality: float | None = None) -> bytes:
    """``audio`` ([C, T] at 32 kHz) as one complete file in ``fmt`` (length in its header)."""
    enc = StreamEncoder(fmt, quality, channels=_as_frames(audio).shape[1])
    body = enc.write(audio)
    last, head = enc.close()
    return patched(body + last, head)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """An encoded file (a complete one, or a stream whose length is unknown) as float32 ``[C, T]``
    and its rate. libsndfile reads a streamed FLAC's unknown length as "endless", so frames are
    read block by block without seeking."""
    import soundfile as sf

    blocks = []
    with sf.SoundFile(io.BytesIO(data)) as f:
        rate, channels = f.samplerate, f.channels
        read = sf._snd.sf_readf_float
        buf = np.empty((65536, channels), np.float32)
        while True:
            n = read(f._file, sf._ffi.cast("float *", buf.ctypes.data), len(buf))
            if n <= 0:
                break
            blocks.append(buf[:n].copy())
    frames = np.concatenate(blocks) if blocks else np.zeros((0, channels), np.float32)
    return np.ascontiguousarray(frames.T), rate


def clip_payload(audio: np.ndarray, fmt: str, quality: float | None = None) -> tuple[np.ndarray, bytes, str]:
    """A clip's public audio outputs in ``fmt``: (CLIP_AUDIO, CLIP_ENCODED, MIME_TYPE). pcm keeps
    the samples; an encoded format sends the file and an empty ``[C, 0]`` CLIP_AUDIO."""
    c = codec(fmt, quality)
    if c.name == PCM:
        return audio, b"", ""
    a = np.asarray(audio, dtype=np.float32)
    return np.zeros((a.shape[0], 0), np.float32), encode(a, fmt, quality), c.mime
