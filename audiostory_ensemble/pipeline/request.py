"""Request validation: every input read, typed and range-checked, with a message that names the
field and the allowed range (INVALID_ARGUMENT)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import interface as I
from ..model.config import DURATION_POLICIES, MAX_INPUT_AUDIO_S, MAX_PLAN_TEMPERATURE, MAX_SEED, MIN_INPUT_AUDIO_S
from ..model.grammar import control_token_in
from . import script
from .encode import FormatError, codec


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
    plan_temperature: float = I.PLAN_TEMPERATURE.default
    plan_top_p: float = I.PLAN_TOP_P.default
    audio_format: str = I.AUDIO_FORMAT.default
    audio_quality: float | None = None

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


def story_stream(get: Callable[[str], np.ndarray | None]) -> bool:
    """``STORY_STREAM`` (``audiostory_stream`` only): also stream the ordered story."""
    arr = get(I.STORY_STREAM.name)
    if arr is None:
        return bool(I.STORY_STREAM.default)
    arr = np.asarray(arr)
    if arr.size != 1 or arr.dtype.kind != "b":
        raise RequestError(f"STORY_STREAM must be one BOOL, got {arr.dtype} of shape {list(arr.shape)}")
    return bool(arr.reshape(-1)[0])


def parse_request(get: Callable[[str], np.ndarray | None], limits: Limits = Limits()) -> RequestParams:
    """Validate a request's inputs (``get(name)`` returns the numpy array or None) and apply defaults."""
    raw_segments = _scalar(get, I.SEGMENTS, str)     # "" when absent
    has_audio = get(I.INPUT_AUDIO.name) is not None
    instruction_given = get(I.INSTRUCTION.name) is not None
    instruction = _scalar(get, I.INSTRUCTION, str)
    if len(instruction.encode("utf-8")) > limits.max_instruction_bytes:
        raise RequestError(f"INSTRUCTION is {len(instruction.encode())} bytes; "
                           f"the limit is {limits.max_instruction_bytes}")
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
    temperature = _scalar(get, I.PLAN_TEMPERATURE, float)
    if not (math.isfinite(temperature) and 0.0 <= temperature <= MAX_PLAN_TEMPERATURE):
        raise RequestError(f"PLAN_TEMPERATURE must be in [0, {MAX_PLAN_TEMPERATURE:g}] (0 = greedy), got {temperature}")
    top_p = _scalar(get, I.PLAN_TOP_P, float)
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise RequestError(f"PLAN_TOP_P must be in (0, 1] (1 = off), got {top_p}")
    audio_format = _scalar(get, I.AUDIO_FORMAT, str).strip().lower()
    quality = _scalar(get, I.AUDIO_QUALITY, float)
    try:
        codec(audio_format, quality)
    except FormatError as e:
        raise RequestError(str(e)) from None
    params = RequestParams(instruction, float(total), float(guidance), int(seed), int(steps), policy,
                           plan_temperature=float(temperature), plan_top_p=float(top_p),
                           audio_format=audio_format, audio_quality=quality)
    if raw_segments and has_audio:
        raise RequestError("SEGMENTS and INPUT_AUDIO cannot be combined: give a script or an audio to continue")
    if raw_segments:
        for t in (I.PLAN_TEMPERATURE, I.PLAN_TOP_P):
            if get(t.name) is not None:
                raise RequestError(f"{t.name} does not apply in script mode: the segments are the plan, nothing "
                                   "is sampled")
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
