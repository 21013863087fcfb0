"""The public interface of the served pipeline: tensor names, types, shapes, defaults.

One table that the repository generator (config.pbtxt), the models, the client and the README all
read. Internal tensors between ensemble steps are ``_PREFIXED`` so the public ones stand out.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model.config import (
    DEFAULT_DURATION_POLICY,
    DEFAULT_GUIDANCE,
    DEFAULT_NUM_STEPS,
    DEFAULT_PLAN_TEMPERATURE,
    DEFAULT_PLAN_TOP_P,
    DEFAULT_SEED,
    DEFAULT_TOTAL_DURATION_S,
    MAX_PLAN_TEMPERATURE,
    OUTPUT_SAMPLE_RATE,
)
from .names import ENSEMBLE as ENSEMBLE  # the models a client calls, re-exported (``names`` owns them)
from .names import FULL_MODEL as FULL_MODEL
from .names import STREAM_MODEL as STREAM_MODEL
from .pipeline.encode import FORMATS, PCM


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str                 # Triton config type without TYPE_ (FP32, INT64, BYTES, BOOL, INT32)
    dims: tuple
    description: str
    default: object = None     # None: required (inputs) / always present (outputs)
    optional: bool = False

    @property
    def numpy_dtype(self):
        import numpy as np
        return {"FP32": np.float32, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_,
                "BYTES": np.object_}[self.dtype]

    def pbtxt(self, optional: bool | None = None) -> str:
        opt = self.optional if optional is None else optional
        dims = ", ".join(str(d) for d in self.dims)
        config_type = "STRING" if self.dtype == "BYTES" else self.dtype  # config.pbtxt's name for BYTES
        return (f'  {{ name: "{self.name}" data_type: TYPE_{config_type} dims: [ {dims} ]'
                + (" optional: true" if opt else "") + " }")


# ---- request inputs (`audiostory_stream`, the ensemble `audiostory`, `audiostory_full`) ---------------------------
INSTRUCTION = Tensor("INSTRUCTION", "BYTES", (1,), "what the story is about (UTF-8 text); required "
                     "unless SEGMENTS or INPUT_AUDIO is given; refused if it holds one of the model's control "
                     "tokens", "", True)
TOTAL_DURATION = Tensor("TOTAL_DURATION", "FP32", (1,), "requested story length in seconds",
                        DEFAULT_TOTAL_DURATION_S, True)
GUIDANCE_SCALE = Tensor("GUIDANCE_SCALE", "FP32", (1,), "classifier-free guidance scale",
                        DEFAULT_GUIDANCE, True)
SEED = Tensor("SEED", "INT64", (1,), "seed: lead phrase, initial noise and a sampled plan (0 = the reference)",
              DEFAULT_SEED, True)
NUM_STEPS = Tensor("NUM_STEPS", "INT32", (1,), "flow-matching Euler steps", DEFAULT_NUM_STEPS, True)
DURATION_POLICY = Tensor("DURATION_POLICY", "BYTES", (1,),
                         "clip durations: model (as the LLM wrote them, the reference) or exact "
                         "(scaled to TOTAL_DURATION; clips are released once the plan is complete)",
                         DEFAULT_DURATION_POLICY, True)
SEGMENTS = Tensor("SEGMENTS", "BYTES", (1,), 'script mode: JSON list of {"start": s, "end": s, '
                  '"caption": "..."}; the plan is forced to it and the output is timeline-exact', "", True)
INPUT_AUDIO = Tensor("INPUT_AUDIO", "FP32", (-1, -1), "continuation: the audio to continue, [channels, "
                     "samples], at most 30 s", None, True)
INPUT_SAMPLE_RATE = Tensor("INPUT_SAMPLE_RATE", "INT32", (1,), "continuation: INPUT_AUDIO's sample rate "
                           "(required with it)", None, True)
PLAN_TEMPERATURE = Tensor("PLAN_TEMPERATURE", "FP32", (1,), "the plan's sampling temperature, in "
                          f"[0, {MAX_PLAN_TEMPERATURE:g}]: 0 is greedy (the official plan); above 0 each SEED gives "
                          "its own take, the same one every time; refused in script mode",
                          DEFAULT_PLAN_TEMPERATURE, True)
PLAN_TOP_P = Tensor("PLAN_TOP_P", "FP32", (1,), "the plan's nucleus sampling, in (0, 1] (1 = off; only with "
                    "PLAN_TEMPERATURE above 0); refused in script mode", DEFAULT_PLAN_TOP_P, True)
AUDIO_FORMAT = Tensor("AUDIO_FORMAT", "BYTES", (1,), f"how the audio comes back: {', '.join(FORMATS)}. pcm: the FP32 "
                      "tensors; wav (32-bit float), flac (24-bit), opus (Ogg, 48 kHz), mp3: encoded files in the "
                      "`*_ENCODED` outputs (the FP32 audio outputs are then empty)", PCM, True)
AUDIO_QUALITY = Tensor("AUDIO_QUALITY", "FP32", (1,), "opus and mp3 only: the encoder's quality in [0, 1], 1 = best "
                       "and largest (none: the codec's default, about 120 kb/s)", None, True)
REQUEST_INPUTS = (INSTRUCTION, TOTAL_DURATION, GUIDANCE_SCALE, SEED, NUM_STEPS, DURATION_POLICY, SEGMENTS,
                  INPUT_AUDIO, INPUT_SAMPLE_RATE, PLAN_TEMPERATURE, PLAN_TOP_P, AUDIO_FORMAT, AUDIO_QUALITY)
ENCODING_INPUTS = (AUDIO_FORMAT, AUDIO_QUALITY)   # read by the front doors; the stages render PCM
# `audiostory_stream` only (the ensemble cannot hold a story's state across clips)
STORY_STREAM = Tensor("STORY_STREAM", "BOOL", (1,), "also stream the story itself, in order: responses without a "
                      "clip carry the part of the crossfaded story that is final so far (`STORY_*` outputs)",
                      False, True)
STREAM_INPUTS = (STORY_STREAM,)

# ---- streamed outputs: one response per clip (`audiostory`) -------------------------------------
CLIP_AUDIO = Tensor("CLIP_AUDIO", "FP32", (2, -1), f"the clip, stereo, {OUTPUT_SAMPLE_RATE} Hz, "
                    "including the crossfade overlap for all clips but the last")
CLIP_INDEX = Tensor("CLIP_INDEX", "INT32", (1,), "clip position in the story (authoritative order)")
CAPTION = Tensor("CAPTION", "BYTES", (1,), "the clip's caption as the LLM wrote it")
CLIP_START_S = Tensor("CLIP_START_S", "FP32", (1,), "where the clip starts in the story, seconds")
CLIP_DURATION_S = Tensor("CLIP_DURATION_S", "FP32", (1,), "the clip's duration in the story, seconds")
IS_LAST = Tensor("IS_LAST", "BOOL", (1,), "true on the story's last clip")
CLIP_PLAN = Tensor("PLAN", "BYTES", (1,), "JSON: this clip's plan entry (index, caption, start, duration, "
                   "render, fade_in, fade_out, timeline, mode); how to place it in the story. Not the "
                   "`PLAN` of `audiostory_full`, which is the whole plan")
CLIP_ENCODED = Tensor("CLIP_ENCODED", "BYTES", (1,), "the clip as one file in AUDIO_FORMAT (empty for pcm)")
MIME_TYPE = Tensor("MIME_TYPE", "BYTES", (1,), "the encoded audio's media type, e.g. `audio/ogg; codecs=opus` "
                   "(empty for pcm)")
CLIP_OUTPUTS = (CLIP_AUDIO, CLIP_INDEX, CAPTION, CLIP_START_S, CLIP_DURATION_S, IS_LAST, CLIP_PLAN, CLIP_ENCODED,
                MIME_TYPE)

# ---- the ordered story (`audiostory_stream` with STORY_STREAM): responses without CLIP_AUDIO ---------
STORY_AUDIO = Tensor("STORY_AUDIO", "FP32", (2, -1), "pcm: the next samples of the story, in order (the "
                     "chunks joined are `audiostory_full`'s AUDIO); empty for encoded formats")
STORY_ENCODED = Tensor("STORY_ENCODED", "BYTES", (1,), "encoded formats: the next bytes of one file holding the "
                       "story (append them; a player can start at the first)")
STORY_OFFSET = Tensor("STORY_OFFSET", "INT64", (1,), "where this chunk starts: samples (pcm) or bytes (encoded) "
                      "sent before it")
STORY_HEADER = Tensor("STORY_HEADER", "BYTES", (1,), "on the story's last chunk: the file's first bytes as they "
                      "stand once its length is known (WAV, FLAC, MP3); a file writer writes them at offset 0, a "
                      "player ignores them; empty otherwise")
STORY_OUTPUTS = (STORY_AUDIO, STORY_ENCODED, STORY_OFFSET, STORY_HEADER, MIME_TYPE)
STREAM_OUTPUTS = CLIP_OUTPUTS + tuple(t for t in STORY_OUTPUTS if t not in CLIP_OUTPUTS)   # audiostory_stream's

# ---- whole-story outputs (`audiostory_full`) ---------------------------------------------------
AUDIO = Tensor("AUDIO", "FP32", (2, -1), f"the crossfaded story, stereo, {OUTPUT_SAMPLE_RATE} Hz")
CAPTIONS = Tensor("CAPTIONS", "BYTES", (-1,), "clip captions in story order")
CLIP_STARTS_S = Tensor("CLIP_STARTS_S", "FP32", (-1,), "clip start times, seconds")
CLIP_DURATIONS_S = Tensor("CLIP_DURATIONS_S", "FP32", (-1,), "clip durations, seconds")
PLAN = Tensor("PLAN", "BYTES", (1,), "JSON: the whole plan: the mode, the story length and every clip's plan "
              "entry (a stream sends each clip's entry as that clip's `PLAN`)")
AUDIO_ENCODED = Tensor("AUDIO_ENCODED", "BYTES", (1,), "the story as one file in AUDIO_FORMAT (empty for pcm)")
FULL_OUTPUTS = (AUDIO, CAPTIONS, CLIP_STARTS_S, CLIP_DURATIONS_S, PLAN, AUDIO_ENCODED, MIME_TYPE)

SAMPLE_RATE = OUTPUT_SAMPLE_RATE


def markdown_tables() -> str:
    """The interface as README tables (a test keeps the README in step with this module)."""
    def rows(tensors, with_default):
        out = []
        for t in tensors:
            dims = "[" + ", ".join("T" if d == -1 and i else ("K" if d == -1 else str(d))
                                   for i, d in enumerate(t.dims)) + "]"
            if t.dims == (-1, -1):
                dims = "[C, T]"
            default = ("required" if not t.optional else
                       ("none" if t.default in (None, "") else f"`{t.default}`")) if with_default else ""
            out.append(f"| `{t.name}` | {t.dtype} | {dims} | " + (f"{default} | " if with_default else "")
                       + f"{t.description} |")
        return out

    lines = ["Inputs (`audiostory_stream`, `audiostory` and `audiostory_full`):", "",
             "| name | type | shape | default | meaning |", "|---|---|---|---|---|",
             *rows(REQUEST_INPUTS, True), "",
             "`audiostory_stream` also takes:", "",
             "| name | type | shape | default | meaning |", "|---|---|---|---|---|",
             *rows(STREAM_INPUTS, True), "",
             "Streamed outputs of `audiostory_stream` and `audiostory`, one response per clip:", "",
             "| name | type | shape | meaning |", "|---|---|---|---|", *rows(CLIP_OUTPUTS, False), "",
             "With STORY_STREAM, `audiostory_stream` also sends the story in order, in responses of their own:", "",
             "| name | type | shape | meaning |", "|---|---|---|---|", *rows(STORY_OUTPUTS, False), "",
             "Outputs of `audiostory_full`:", "",
             "| name | type | shape | meaning |", "|---|---|---|---|", *rows(FULL_OUTPUTS, False)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_tables())
