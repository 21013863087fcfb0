"""What the Triton python models share: request parsing, clip metadata, batched ONNX runners,
the event-loop thread, and the guard that keeps engine processes from outliving the server.

Kept free of ``triton_python_backend_utils`` so it is importable (and testable) anywhere; the
``model.py`` files pass tensors in and out as numpy arrays.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import interface as I
from . import post, script
from .config import DURATION_POLICIES, MAX_INPUT_AUDIO_S, MIN_INPUT_AUDIO_S
from .grammar import control_token_in
from .sampler import MAX_SEED


class RequestError(ValueError):
    """A bad request: the message names the field and the allowed range (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Limits:
    """Accepted ranges for request fields (configurable per deployment)."""
    max_instruction_bytes: int = 4096
    min_total_duration: float = 1.0
    max_total_duration: float = 600.0
    min_guidance: float = 1.0          # <= 1 turns guidance off (conditional velocity only)
    max_guidance: float = 20.0
    min_steps: int = 1
    max_steps: int = 200
    max_active_stories: int = 64       # admission at the front door (audiostory_stream)
    story_timeout_s: float = 1800.0    # a story still unfinished after this is failed and cancelled
    max_segments_bytes: int = 65536    # SEGMENTS JSON
    min_input_sample_rate: int = 8000
    max_input_sample_rate: int = 192000
    max_input_channels: int = 8
    max_input_audio_s: float = MAX_INPUT_AUDIO_S   # one Whisper window


@dataclass(frozen=True)
class RequestParams:
    instruction: str
    total_duration: float
    guidance: float
    seed: int
    num_steps: int
    duration_policy: str
    segments: list | None = None          # script mode: validated script.Segment list
    input_audio: np.ndarray | None = None  # continuation: [C, T] float32
    input_sample_rate: int = 0

    @property
    def mode(self) -> str:
        return "script" if self.segments else ("continuation" if self.input_audio is not None else "story")


def typed_number(value) -> float:
    """The number the caller wrote, as a Python float.

    FP32 on the wire cannot hold 12.3: it arrives as 12.300000190734863, and the prompt would ask
    the model for "12.300000190734863 seconds" where the official code (a Python float) writes
    "12.3". The shortest decimal that round-trips the wire value is what the caller typed, so it
    is the value used everywhere (prompt, duration policy, timeline). Exact for FP64 and integers.
    """
    if isinstance(value, np.floating) and np.dtype(value.dtype).itemsize < 8:
        return float(np.format_float_positional(value, unique=True))
    return float(value)


def _scalar(get: Callable[[str], np.ndarray | None], t: I.Tensor, kind: type):
    arr = get(t.name)
    if arr is None:
        if t.optional:
            return t.default
        raise RequestError(f"{t.name} is required")
    arr = np.asarray(arr)
    if arr.size != 1:
        raise RequestError(f"{t.name} must hold exactly one value, got shape {list(arr.shape)}")
    value = arr.reshape(-1)[0]
    if kind is str:
        if isinstance(value, (bytes, np.bytes_)):
            try:
                return bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(f"{t.name} must be UTF-8 text") from None
        if isinstance(value, str):
            return value
        raise RequestError(f"{t.name} must be BYTES (UTF-8 text), got {arr.dtype}")
    if kind is float:
        if arr.dtype.kind not in "fiu":
            raise RequestError(f"{t.name} must be {t.dtype}, got {arr.dtype}")
        return typed_number(value)
    if arr.dtype.kind not in "iu":
        raise RequestError(f"{t.name} must be {t.dtype} (an integer), got {arr.dtype}")
    return int(value)


def parse_request(get: Callable[[str], np.ndarray | None], limits: Limits = Limits()) -> RequestParams:
    """Validate a request's inputs (``get(name)`` returns the numpy array or None) and apply defaults."""
    raw_segments = _scalar(get, I.SEGMENTS, str)     # "" when absent
    has_audio = get(I.INPUT_AUDIO.name) is not None
    instruction_given = get(I.INSTRUCTION.name) is not None
    instruction = _scalar(get, I.INSTRUCTION, str)
    if len(instruction.encode("utf-8")) > limits.max_instruction_bytes:
        raise RequestError(f"INSTRUCTION is {len(instruction.encode())} bytes; the limit is {limits.max_instruction_bytes}")
    if not (raw_segments or has_audio):
        if not instruction_given:
            raise RequestError("INSTRUCTION is required (unless SEGMENTS or INPUT_AUDIO is given)")
        if not instruction.strip():
            raise RequestError("INSTRUCTION must not be empty or whitespace only")
    bad = control_token_in(instruction)
    if bad is not None:
        raise RequestError(f"INSTRUCTION must not contain the model's control token {bad!r} "
                           "(ChatML, think/gen, timestamp, t5 and aud tokens are the model's own)")
    total_given = get(I.TOTAL_DURATION.name) is not None
    total = _scalar(get, I.TOTAL_DURATION, float)
    if not (math.isfinite(total) and limits.min_total_duration <= total <= limits.max_total_duration):
        raise RequestError(f"TOTAL_DURATION must be a number in [{limits.min_total_duration}, "
                           f"{limits.max_total_duration}] seconds, got {total}")
    guidance = _scalar(get, I.GUIDANCE_SCALE, float)
    if not (math.isfinite(guidance) and limits.min_guidance <= guidance <= limits.max_guidance):
        raise RequestError(f"GUIDANCE_SCALE must be in [{limits.min_guidance}, {limits.max_guidance}] "
                           f"(1 = no guidance), got {guidance}")
    seed = _scalar(get, I.SEED, int)
    if not 0 <= seed <= MAX_SEED:
        raise RequestError(f"SEED must be in [0, 2^63-1], got {seed}")
    steps = _scalar(get, I.NUM_STEPS, int)
    if not limits.min_steps <= steps <= limits.max_steps:
        raise RequestError(f"NUM_STEPS must be in [{limits.min_steps}, {limits.max_steps}], got {steps}")
    policy = _scalar(get, I.DURATION_POLICY, str)
    if policy not in DURATION_POLICIES:
        raise RequestError(f"DURATION_POLICY must be one of {list(DURATION_POLICIES)}, got {policy!r}")
    params = RequestParams(instruction, float(total), float(guidance), int(seed), int(steps), policy)
    if raw_segments and has_audio:
        raise RequestError("SEGMENTS and INPUT_AUDIO cannot be combined: give a script or an audio to continue")
    if raw_segments:
        return _with_segments(params, raw_segments, total_given, limits)
    if has_audio:
        return _with_audio(params, get, limits)
    if get(I.INPUT_SAMPLE_RATE.name) is not None:
        raise RequestError("INPUT_SAMPLE_RATE is given without INPUT_AUDIO")
    return params


def _with_segments(params: RequestParams, raw: str, total_given: bool, limits: Limits) -> RequestParams:
    if len(raw.encode("utf-8")) > limits.max_segments_bytes:
        raise RequestError(f"SEGMENTS is {len(raw.encode())} bytes; the limit is {limits.max_segments_bytes}")
    if not raw.strip():
        raise RequestError("SEGMENTS must not be empty")
    try:
        segments = script.parse_segments(raw, limits.max_total_duration)
    except script.ScriptError as e:
        raise RequestError(str(e)) from None
    end = segments[-1].end
    if total_given and params.total_duration < end - 0.5 / I.SAMPLE_RATE:
        raise RequestError(f"TOTAL_DURATION {params.total_duration:g} s is shorter than the script, whose last "
                           f"segment ends at {end:g} s (leave TOTAL_DURATION out to end the story there)")
    if params.duration_policy != I.DURATION_POLICY.default:
        raise RequestError("DURATION_POLICY does not apply in script mode: the segments set the durations")
    total = script.story_length(segments, params.total_duration if total_given else None)
    return dataclasses.replace(params, segments=segments, total_duration=total)


def _with_audio(params: RequestParams, get, limits: Limits) -> RequestParams:
    audio = np.asarray(get(I.INPUT_AUDIO.name))
    if audio.dtype.kind != "f":
        raise RequestError(f"INPUT_AUDIO must be FP32 samples, got {audio.dtype}")
    if audio.ndim != 2:
        raise RequestError(f"INPUT_AUDIO must be [channels, samples], got shape {list(audio.shape)}")
    channels, samples = audio.shape
    if not 1 <= channels <= limits.max_input_channels:
        raise RequestError(f"INPUT_AUDIO must have 1 to {limits.max_input_channels} channels, got {channels} "
                           "(shape is [channels, samples])")
    if samples == 0:
        raise RequestError("INPUT_AUDIO is empty (0 samples)")
    rate = _scalar(get, I.INPUT_SAMPLE_RATE, int)    # None when absent
    if rate is None:
        raise RequestError("INPUT_SAMPLE_RATE is required with INPUT_AUDIO")
    if not limits.min_input_sample_rate <= rate <= limits.max_input_sample_rate:
        raise RequestError(f"INPUT_SAMPLE_RATE must be in [{limits.min_input_sample_rate}, "
                           f"{limits.max_input_sample_rate}] Hz, got {rate}")
    seconds = samples / rate
    if seconds > limits.max_input_audio_s + 1e-9:
        raise RequestError(f"INPUT_AUDIO is {seconds:.2f} s; the limit is {limits.max_input_audio_s:g} s "
                           "(one audio-encoder window)")
    if seconds < MIN_INPUT_AUDIO_S:
        raise RequestError(f"INPUT_AUDIO is {seconds:.3f} s; at least {MIN_INPUT_AUDIO_S:g} s is needed")
    if not np.isfinite(audio).all():
        raise RequestError("INPUT_AUDIO holds NaN or infinite samples")
    return dataclasses.replace(params, input_audio=np.ascontiguousarray(audio, dtype=np.float32),
                               input_sample_rate=int(rate))


@dataclass
class ClipMeta:
    """Travels with each clip through the ensemble (one BYTES tensor, ``_META``).

    Triton 2.51's ensemble does not pair outputs of different steps per decoupled response (a
    clip's caption can be joined to another clip's audio), so every step passes this through and
    the last step emits all public outputs together.
    """
    request_id: str
    index: int
    caption: str
    start_s: float
    duration_s: float          # the clip's length in the story
    render_s: float            # what the DiT renders: + crossfade for all but the last clip
    is_last: bool
    guidance: float
    seed: int
    num_steps: int
    arrival: float = 0.0       # wall-clock time the request reached the planner (for metrics)
    cancel_key: str = ""       # the request id the front door cancels the story by ("" = none)
    fade_in: bool = False      # script mode: crossfaded from the previous clip
    fade_out: bool = False     # script mode: crossfaded into the next clip (render_s has the tail)
    timeline_s: float = 0.0    # script mode: the story's length (clips placed by start); 0 = joined
    mode: str = "story"        # story | script | continuation (RequestParams.mode)

    @classmethod
    def of_planned(cls, clip, params: "RequestParams", request_id: str, arrival: float, cancel_key: str) -> "ClipMeta":
        """The record of a clip the planner released (``planner.PlannedClip``), in every mode:
        in script mode the rendered length and the fades are the script clip's, and the story is
        placed on its timeline; otherwise every clip but the last renders the crossfade tail."""
        sc = clip.script
        return cls(request_id, clip.index, clip.caption, clip.start_s, clip.duration,
                   sc.render_s if sc else post.render_seconds(clip.duration, fades_out=not clip.is_last),
                   clip.is_last, params.guidance, params.seed, params.num_steps, arrival, cancel_key,
                   fade_in=bool(sc and sc.fade_in), fade_out=bool(sc and sc.fade_out),
                   timeline_s=params.total_duration if sc else 0.0, mode=params.mode)

    def plan_entry(self) -> dict:
        """The clip's public plan entry (the ``PLAN`` output)."""
        return {"index": self.index, "caption": self.caption, "start": self.start_s,
                "duration": self.duration_s, "render": self.render_s, "fade_in": self.fade_in,
                "fade_out": self.fade_out, "is_last": self.is_last, "timeline": self.timeline_s,
                "mode": self.mode}

    def encode(self) -> np.ndarray:
        return np.array([json.dumps(asdict(self)).encode()], dtype=np.object_)

    @classmethod
    def decode(cls, arr: np.ndarray) -> "ClipMeta":
        raw = np.asarray(arr).reshape(-1)[0]
        return cls(**json.loads(raw.decode() if isinstance(raw, (bytes, np.bytes_)) else raw))


# ------------------------------------------------------------------------------------------------
# Batched onnxruntime runner (the CPU form of dit_step / vae_decoder)
# ------------------------------------------------------------------------------------------------

def instance_gpu(args: dict) -> int | None:
    """The GPU Triton gave this model instance (``KIND_GPU``), or None (CPU / ``KIND_MODEL``)."""
    if str(args.get("model_instance_kind", "")).upper() != "GPU":
        return None
    return int(args.get("model_instance_device_id", 0))


def visible_gpus(args: dict, configured: list[int] | None) -> str | None:
    """What ``CUDA_VISIBLE_DEVICES`` a model that starts its own GPU work (vLLM) must see: the
    configured set (``llm_gpus``, e.g. two for tensor parallelism), else the instance's own GPU,
    else None (leave the environment alone: CPU, or one GPU visible). Never silently GPU 0."""
    if configured:
        return ",".join(str(int(g)) for g in configured)
    gpu = instance_gpu(args)
    return None if gpu is None else str(gpu)


def ort_session(path: str | Path, threads: int = 0, device_id: int | None = None):
    """An onnxruntime session (CUDA EP where present, on ``device_id`` — the instance's GPU).
    Spinning is off so that idle ORT threads do not steal CPU from torch or other sessions in the
    same process."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    available = ort.get_available_providers()
    providers: list = []
    if "CUDAExecutionProvider" in available:
        providers.append(("CUDAExecutionProvider", {"device_id": int(device_id or 0)}))
    providers.append("CPUExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


class OnnxBatchRunner:
    """Runs one ONNX graph on the rows of several Triton requests at once.

    Each request carries a batch of rows (its first axis); rows are concatenated, run in one
    session call, and split back. Inputs the graph takes as ``[B]`` arrive from Triton as
    ``[b, 1]`` and are flattened.
    """

    def __init__(self, path: str | Path, threads: int = 0, device_id: int | None = None):
        self.session = ort_session(path, threads, device_id)
        self.inputs = [(i.name, len(i.shape)) for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        sizes = [r[self.inputs[0][0]].shape[0] for r in requests]
        feed = {}
        for name, rank in self.inputs:
            parts = [np.asarray(r[name], dtype=np.float32) for r in requests]
            arr = np.concatenate(parts, axis=0)
            feed[name] = arr.reshape(-1) if rank == 1 else arr
        results = self.session.run(self.outputs, feed)
        out, start = [], 0
        for n in sizes:
            out.append({name: res[start:start + n] for name, res in zip(self.outputs, results)})
            start += n
        return out


class CancelRegistry:
    """Keys of cancelled stories, remembered for ``ttl`` seconds (clips of a cancelled story can
    still be on their way between stages when the cancel arrives), and at most ``max_keys`` of them
    (the oldest forgotten first), so that a flood of cancels cannot grow it without bound."""

    def __init__(self, ttl: float = 600.0, clock: Callable[[], float] | None = None, max_keys: int = 65536):
        self.ttl = ttl
        self.max_keys = max_keys
        self._clock = clock or time.monotonic
        self._keys: dict[str, float] = {}

    def cancel(self, key: str) -> None:
        if key:
            self._prune()
            self._keys.pop(key, None)
            self._keys[key] = self._clock()
            while len(self._keys) > self.max_keys:
                self._keys.pop(next(iter(self._keys)))

    def __contains__(self, key: str) -> bool:
        return bool(key) and key in self._keys

    def _prune(self) -> None:
        now = self._clock()
        while self._keys:               # insertion order is time order: the expired ones lead
            k = next(iter(self._keys))
            if now - self._keys[k] <= self.ttl:
                break
            del self._keys[k]

    def __len__(self) -> int:
        self._prune()
        return len(self._keys)


class PriorityGate:
    """At most ``capacity`` holders at once; waiters are admitted lowest ``priority`` first
    (FIFO among equals). With ``priority = (request arrival, clip index)`` the clips of requests
    already in progress take freed slots before a newer request starts its DiT work."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.held = 0
        self._waiters: list = []     # heap of (priority, sequence, future)
        self._seq = 0

    @contextlib.asynccontextmanager
    async def slot(self, priority=0):
        if self.held < self.capacity and not self._waiters:
            self.held += 1
        else:
            fut = asyncio.get_running_loop().create_future()
            self._seq += 1
            entry = (priority, self._seq, fut)
            heapq.heappush(self._waiters, entry)
            try:
                await fut                      # the releaser counted us in ``held``
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release()            # admitted and cancelled at once: pass the slot on
                else:
                    self._waiters.remove(entry)
                    heapq.heapify(self._waiters)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)           # the slot passes straight to the next waiter
                return
        self.held -= 1

    @property
    def waiting(self) -> int:
        return len(self._waiters)


_HEARTBEATS: dict[int, asyncio.Task] = {}


def ensure_heartbeat(interval: float = 0.05) -> None:
    """Keep the running event loop waking up every ``interval`` seconds.

    The python backend's stub completes ``async_exec`` futures from its own threads; when every
    coroutine of a model is awaiting such a future and nothing else happens, the loop can sleep
    through the completion (measured: at concurrency 16 a few stories in a hundred stalled until
    some unrelated event woke the loop, and the last ones never finished). A periodic wake-up makes
    the loop run the callbacks it was handed.
    """
    loop = asyncio.get_running_loop()
    task = _HEARTBEATS.get(id(loop))
    if task is None or task.done():
        async def beat():
            while True:
                await asyncio.sleep(interval)
        _HEARTBEATS[id(loop)] = loop.create_task(beat())


class PerKeyLimiter:
    """At most ``limit`` holders per key at once, served first come first served (asyncio)."""

    def __init__(self, limit: int = 1):
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._sems: dict[str, asyncio.Semaphore] = {}
        self._users: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def slot(self, key: str):
        sem = self._sems.setdefault(key, asyncio.Semaphore(self.limit))
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with sem:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:        # nobody holds or waits: forget the key
                del self._users[key], self._sems[key]

    def __len__(self) -> int:
        return len(self._sems)


# ------------------------------------------------------------------------------------------------
# An asyncio loop on its own thread (for vLLM's AsyncLLM inside a python model)
# ------------------------------------------------------------------------------------------------

class LoopThread:
    def __init__(self, name: str = "audiostory-loop"):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout: float | None = None):
        return self.submit(coro).result(timeout)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


# ------------------------------------------------------------------------------------------------
# Orphan guard
# ------------------------------------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    """Every process below ``pid``. Children are listed per thread (``task/<tid>/children``), and
    engines started from a loop thread are children of that thread, not of the main one."""
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for c in children:
                out.append(int(c))
                frontier.append(int(c))
    return out


def shm_mappings(pids: list[int]) -> list[str]:
    """The ``/dev/shm`` files the processes have mapped (vLLM's message queues, Triton's regions)."""
    out = set()
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                path = fields[5] if len(fields) == 6 else ""
                if path.startswith("/dev/shm/") and not path.endswith("(deleted)"):
                    out.add(path)
        except OSError:
            continue
    return sorted(out)


def mapped_shm() -> set[str]:
    """The ``/dev/shm`` files some live process has mapped (in use by someone)."""
    pids = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]
    return set(shm_mappings(pids))


def unlink_unmapped_shm(pids: list[int], paths: list[str], timeout: float = 10.0) -> list[str]:
    """After stopping ``pids``: wait (up to ``timeout``) for them to exit, then remove those of
    ``paths`` that no live process maps any more (a process killed at shutdown cannot unlink its
    shared memory); returns what was removed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    in_use = mapped_shm()
    removed = []
    for path in paths:
        if path not in in_use:
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie is dead for our purposes)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def guard_children(parent_pid: int | None = None) -> subprocess.Popen | None:
    """Start a watchdog that kills this process's current descendants when this process dies.

    vLLM's engine processes outlive a killed python-backend stub (gigabytes, and leaked shared
    memory). The watchdog gets SIGKILL-proof notice through a pipe: when the stub dies for any
    reason its end of the pipe closes, and the watchdog kills the recorded process tree and removes
    the shared-memory files they had mapped. :func:`release_guard` tells it to exit quietly.
    """
    parent = parent_pid or os.getpid()
    pids = descendants(parent)
    if not pids:
        return None
    engine_shm = shm_mappings(pids)
    own_shm = [p for p in shm_mappings([parent]) if p not in engine_shm]
    server = int(Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[1])
    read_fd, write_fd = os.pipe()
    # The package's folder on the watchdog's path: a stub may import it from a path of its own.
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "audiostory_ensemble.watchdog", str(read_fd), str(server),
                             ",".join(map(str, pids)), ",".join(engine_shm), ",".join(own_shm)], pass_fds=(read_fd,),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    os.close(read_fd)
    # Keep write_fd open for the life of this process; it closes when the process dies.
    _KEEP.append(write_fd)
    return proc


_KEEP: list[int] = []


def release_guard() -> None:
    """Normal shutdown: the engines were stopped cleanly, the watchdog may exit quietly."""
    while _KEEP:
        fd = _KEEP.pop()
        try:
            os.write(fd, b"q")
            os.close(fd)
        except OSError:
            pass
