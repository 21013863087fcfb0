"""Client library: stream a story over gRPC (``audiostory_stream``, the front door) or fetch it
whole over HTTP (``audiostory_full``). Needs numpy and tritonclient, not torch."""

from __future__ import annotations

import json
import queue
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from audiostory_ensemble import interface as I
from audiostory_ensemble.model.grammar import model_failed
from audiostory_ensemble.pipeline.stitch import Clip, Story, StoryAssembler
from audiostory_ensemble.runtime.stages import down_stage, over_capacity
from audiostory_ensemble.serving.control import BUSY

_HTTP_STATUS = {"400": "INVALID_ARGUMENT", "499": "CANCELLED", "500": "INTERNAL", "503": "UNAVAILABLE"}


class AudioStoryError(RuntimeError):
    """The server refused or failed the request; the message is the server's.

    ``status``: the gRPC status name (``UNAVAILABLE``, ``INVALID_ARGUMENT``, ...) where the transport
    carried one. Triton's streaming protocol carries only an error's message, so for a streamed
    story the status is read from it: UNAVAILABLE when the server was busy, over capacity or a stage was down,
    UNKNOWN when the model wrote no usable plan.
    ``retryable``: the same request may succeed later (UNAVAILABLE)."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        status = str(status).removeprefix("StatusCode.") if status else None
        status = _HTTP_STATUS.get(status, status)
        if status in (None, "INTERNAL") and (message.startswith(BUSY) or down_stage(message) or over_capacity(message)):
            status = "UNAVAILABLE"
        elif status in (None, "INTERNAL") and model_failed(message):
            status = "UNKNOWN"        # the model's plan failed, not the server (a stream carries no code)
        self.status = status

    @property
    def retryable(self) -> bool:
        return self.status == "UNAVAILABLE"


def request_arrays(instruction: str | None, total_duration: float | None = None, guidance: float | None = None,
                   seed: int | None = None, num_steps: int | None = None,
                   duration_policy: str | None = None, segments=None, input_audio: np.ndarray | None = None,
                   input_sample_rate: int | None = None, plan_temperature: float | None = None,
                   plan_top_p: float | None = None, audio_format: str | None = None,
                   audio_quality: float | None = None, story_stream: bool | None = None) -> dict[str, np.ndarray]:
    """The request's input tensors; ``None`` leaves an optional input out (server default).

    ``segments``: script mode, a list of ``{"start", "end", "caption"}`` dicts (or their JSON text).
    ``input_audio``: continuation, ``[channels, samples]`` (or ``[samples]``) with ``input_sample_rate``.
    ``plan_temperature`` / ``plan_top_p``: a sampled plan (a take per ``seed``); left out, greedy.
    ``audio_format`` (pcm, wav, flac, opus, mp3) and ``audio_quality``: how the audio comes back;
    ``story_stream``: ``audiostory_stream`` also sends the story in order (:class:`StoryChunk`).
    """
    if segments is not None and not isinstance(segments, (str, bytes)):
        segments = json.dumps(list(segments))
    values = {I.INSTRUCTION: instruction, I.TOTAL_DURATION: total_duration, I.GUIDANCE_SCALE: guidance,
              I.SEED: seed, I.NUM_STEPS: num_steps, I.DURATION_POLICY: duration_policy, I.SEGMENTS: segments,
              I.INPUT_SAMPLE_RATE: input_sample_rate, I.PLAN_TEMPERATURE: plan_temperature, I.PLAN_TOP_P: plan_top_p,
              I.AUDIO_FORMAT: audio_format, I.AUDIO_QUALITY: audio_quality, I.STORY_STREAM: story_stream}
    out = {}
    if input_audio is not None:
        a = np.asarray(input_audio, dtype=np.float32)
        out[I.INPUT_AUDIO.name] = np.ascontiguousarray(a[None] if a.ndim == 1 else a)
    for t, v in values.items():
        if v is None:
            continue
        if t.dtype == "BYTES":
            out[t.name] = np.array([v.encode("utf-8") if isinstance(v, str) else v], dtype=np.object_)
        else:
            out[t.name] = np.array([v], dtype=t.numpy_dtype)
    return out


def input_tensor(name: str) -> I.Tensor:
    return next(t for t in I.REQUEST_INPUTS + I.STREAM_INPUTS if t.name == name)


@dataclass
class StoryChunk:
    """The next piece of the story in order (``story_stream``): PCM samples, or the next bytes of
    one encoded file. ``offset``: samples or bytes sent before it. ``header``, on the last chunk of
    WAV, FLAC and MP3: the file's first bytes once its length is known (write them at offset 0)."""
    audio: np.ndarray
    data: bytes
    offset: int
    header: bytes
    mime: str

    @classmethod
    def from_outputs(cls, get) -> "StoryChunk":
        return cls(np.asarray(get(I.STORY_AUDIO.name), dtype=np.float32), bytes(get(I.STORY_ENCODED.name)[0]),
                   int(get(I.STORY_OFFSET.name)[0]), bytes(get(I.STORY_HEADER.name)[0]),
                   get(I.MIME_TYPE.name)[0].decode("utf-8"))


@dataclass
class SavedStory:
    """An encoded story written by :meth:`AudioStoryClient.save`."""
    path: Path
    clips: list[Clip]
    size: int                  # bytes in the file
    mime: str
    first_chunk_s: float       # seconds from the request to the story's first bytes


class AudioStoryClient:
    """Streams clips over gRPC from ``audiostory_stream`` (the front door; ``model="audiostory"``
    talks to the ensemble itself). Leaving the iterator early cancels the story on the server."""

    def __init__(self, url: str = "127.0.0.1:8001", model: str = I.STREAM_MODEL):
        import tritonclient.grpc as grpcclient
        self._grpc = grpcclient
        self.url = url
        self.model = model

    def stream(self, instruction: str | None, *, timeout: float = 600.0, **params) -> Iterator[Clip]:
        """Yields clips as they arrive (possibly out of order; ``Clip.index`` is authoritative)."""
        for item in self.events(instruction, timeout=timeout, **params):
            if isinstance(item, Clip):
                yield item

    def events(self, instruction: str | None, *, timeout: float = 600.0, clip_audio: bool = True,
               **params) -> Iterator[Clip | StoryChunk]:
        """Clips as they arrive and, with ``story_stream=True``, the story in order as
        :class:`StoryChunk` items (from ``audiostory_stream``). ``clip_audio=False``: the clips
        come without their audio (neither samples nor files; the server then encodes no clip)."""
        g = self._grpc
        client = g.InferenceServerClient(self.url)
        responses: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        inputs = []
        for name, arr in request_arrays(instruction, **params).items():
            inp = g.InferInput(name, list(arr.shape), input_tensor(name).dtype)
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        outputs = [g.InferRequestedOutput(t.name)
                   for t in (I.STREAM_OUTPUTS if params.get("story_stream") else I.CLIP_OUTPUTS)
                   if clip_audio or t not in (I.CLIP_AUDIO, I.CLIP_ENCODED)]
        deadline = time.monotonic() + timeout
        finished = False        # the server ended the request (its final response, or an error)
        try:
            try:
                client.async_stream_infer(self.model, inputs, outputs=outputs, request_id=uuid.uuid4().hex,
                                          enable_empty_final_response=True)
            except g.InferenceServerException as e:
                # The stream broke before the request went out (no server there, or a server
                # restarting): tritonclient says only "no longer in valid state"; the reason went to
                # the callback. A connection that never carried the request: UNAVAILABLE, retry later.
                finished = True
                try:
                    _, error = responses.get(timeout=10.0)   # the stream thread reports it; slow when loaded
                except queue.Empty:
                    error = None
                detail = error.message() if hasattr(error, "message") else e.message()
                raise AudioStoryError(f"the server at {self.url} could not take the stream: {detail}",
                                      "UNAVAILABLE") from None
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no complete story within {timeout:.0f} s")
                try:
                    result, error = responses.get(timeout=left)
                except queue.Empty:
                    continue
                if error is not None:
                    finished = True
                    raise AudioStoryError(str(error.message() if hasattr(error, "message") else error),
                                          error.status() if hasattr(error, "status") else None)
                response = result.get_response()
                if result.as_numpy(I.CLIP_INDEX.name) is not None:
                    yield Clip.from_outputs(result.as_numpy)
                elif result.as_numpy(I.STORY_OFFSET.name) is not None:
                    yield StoryChunk.from_outputs(result.as_numpy)
                final = response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    finished = True
                    return
        finally:
            close_stream(client, cancel=not finished)
            client.close()

    def generate(self, instruction: str | None, *, on_clip=None, timeout: float = 600.0, **params) -> Story:
        """The whole story, stitched client-side exactly as ``audiostory_full`` does."""
        story = StoryAssembler()
        for clip in self.stream(instruction, timeout=timeout, **params):
            story.add_clip(clip)
            if on_clip is not None:
                on_clip(clip)
        try:
            return story.finish()
        except ValueError as e:
            raise AudioStoryError(f"incomplete story: {e}") from None


    def save(self, instruction: str | None, path, audio_format: str, *, on_clip=None, clip_files: bool = False,
             timeout: float = 600.0, **params) -> SavedStory:
        """The story encoded by the server as one file in ``audio_format``, written to ``path`` as
        it streams (a player can open the file before it is finished); at the end its header is
        completed (the length, for WAV, FLAC and MP3). ``clip_files``: each clip's own file too
        (``Clip.encoded``, for ``on_clip``); without, the server encodes only the story."""
        path = Path(path)
        clips, size, mime, first = [], 0, "", None
        t0 = time.monotonic()
        with open(path, "wb") as f:
            for item in self.events(instruction, timeout=timeout, audio_format=audio_format, story_stream=True,
                                    clip_audio=clip_files, **params):
                if isinstance(item, Clip):
                    clips.append(item)
                    if on_clip is not None:
                        on_clip(item)
                    continue
                if item.offset != size:
                    raise AudioStoryError(f"story chunk at byte {item.offset}, expected {size}: a chunk was lost")
                first = time.monotonic() - t0 if first is None else first
                f.write(item.data)
                f.flush()
                size += len(item.data)
                mime = item.mime
                if item.header:
                    f.seek(0)
                    f.write(item.header)
                    f.seek(0, 2)
        if not size:
            raise AudioStoryError("the story stream ended without audio")
        return SavedStory(path, sorted(clips, key=lambda c: c.index), size, mime, first or 0.0)


def close_stream(client, cancel: bool) -> None:
    """Stop ``client``'s stream; ``cancel``: the requests still in flight are cancelled on the
    server (a client leaving early). tritonclient (2.x) ends gRPC's request-stream thread only on a
    clean stop: after ``stop_stream(cancel_requests=True)`` that thread waits for good for a next
    request (one thread per story left early; the fault benchmark's clients had about 1,000). The
    end-of-stream marker is put in here, as the clean stop does."""
    stream = getattr(client, "_stream", None)
    client.stop_stream(cancel_requests=cancel)
    if cancel and stream is not None and hasattr(stream, "_request_queue"):
        stream._request_queue.put(None)


def generate_http(instruction: str | None, url: str = "127.0.0.1:8000", model: str = I.FULL_MODEL,
                  timeout: float = 600.0, **params) -> Story:
    """The whole story from ``audiostory_full`` over HTTP."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
    inputs = []
    for name, arr in request_arrays(instruction, **params).items():
        inp = httpclient.InferInput(name, list(arr.shape), input_tensor(name).dtype)
        inp.set_data_from_numpy(arr, binary_data=True)
        inputs.append(inp)
    outputs = [httpclient.InferRequestedOutput(t.name, binary_data=True) for t in I.FULL_OUTPUTS]
    try:
        result = client.infer(model, inputs, outputs=outputs, timeout=int(timeout * 1e6))
    except InferenceServerException as e:
        raise AudioStoryError(e.message(), e.status()) from None
    finally:
        client.close()
    captions = [c.decode("utf-8") for c in result.as_numpy(I.CAPTIONS.name)]
    starts = result.as_numpy(I.CLIP_STARTS_S.name)
    durations = result.as_numpy(I.CLIP_DURATIONS_S.name)
    plan = json.loads(result.as_numpy(I.PLAN.name)[0])
    entries = plan.get("clips", [])
    clips = [Clip(i, c, np.zeros((2, 0), np.float32), float(s), float(d), i == len(captions) - 1,
                  entries[i] if i < len(entries) else {})
             for i, (c, s, d) in enumerate(zip(captions, starts, durations))]
    story = Story(result.as_numpy(I.AUDIO.name), clips)
    story.encoded = bytes(result.as_numpy(I.AUDIO_ENCODED.name)[0])
    story.mime = result.as_numpy(I.MIME_TYPE.name)[0].decode("utf-8")
    return story


HEALTH_INSTRUCTION = "a short test tone"


def health_check(url: str = "127.0.0.1:8001", timeout: float = 60.0, model: str = I.STREAM_MODEL,
                 num_steps: int = 1, total_duration: float = 2.0, story: bool = False) -> float:
    """Is the server ready to serve stories? Returns the check's latency in seconds, or raises
    :class:`AudioStoryError` saying why not (``TimeoutError`` past ``timeout``).

    By default the check renders nothing: the server is live and ready and ``model`` is ready. That
    is the truth when the server runs under its supervisor (``make serve``, the container): a stage
    that dies is reloaded at once, and Triton reports the server not ready until it is back.
    ``story=True`` sends one real small story through the whole pipeline instead (a few DiT steps
    of GPU time per probe): for a server started without the supervisor, where a dead python stub
    stays "ready" (Triton 2.51 and 25.10).
    """
    t0 = time.monotonic()
    if not story:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(url)
        try:
            if not client.is_server_live(client_timeout=timeout):
                raise AudioStoryError(f"server at {url} is not live")
            if not client.is_server_ready(client_timeout=timeout):
                raise AudioStoryError(f"server at {url} is not ready (a stage is loading or restarting)",
                                      "UNAVAILABLE")
            if not client.is_model_ready(model, client_timeout=timeout):
                raise AudioStoryError(f"model {model} is not ready", "UNAVAILABLE")
        except InferenceServerException as e:
            raise AudioStoryError(e.message(), e.status()) from None
        finally:
            client.close()
        return time.monotonic() - t0
    story = AudioStoryClient(url, model=model).generate(
        HEALTH_INSTRUCTION, timeout=timeout, total_duration=total_duration, num_steps=num_steps)
    if story.audio.ndim != 2 or story.audio.shape[1] == 0 or not np.isfinite(story.audio).all():
        raise AudioStoryError(f"health check: unusable audio of shape {list(story.audio.shape)}")
    return time.monotonic() - t0
