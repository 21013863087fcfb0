"""The clip record that travels with each clip through the stages (one BYTES tensor)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from ..model import post
from .request import RequestParams


@dataclass
class ClipMeta:
    """Travels with each clip through the ensemble (one BYTES tensor, ``_META``).

    Triton 2.51's ensemble does not pair outputs of different steps per decoupled response (a
    clip's caption can be joined to another clip's audio), so every step passes this through and
    the last step emits all public outputs together.
    """
    plan_id: str               # the planner's id of the story's plan (its vLLM requests)
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
    story_key: str = ""        # the front door's story key, which a cancel names ("" = none)
    fade_in: bool = False      # script mode: crossfaded from the previous clip
    fade_out: bool = False     # script mode: crossfaded into the next clip (render_s has the tail)
    timeline_s: float = 0.0    # script mode: the story's length (clips placed by start); 0 = joined
    mode: str = "story"        # story | script | continuation (RequestParams.mode)
    audio_format: str = "pcm"  # AUDIO_FORMAT: the clip's encoding (dit_sampler encodes in the ensemble)
    audio_quality: float | None = None

    @classmethod
    def of_planned(cls, clip, params: RequestParams, plan_id: str, arrival: float, story_key: str) -> "ClipMeta":
        """The record of a clip the planner released (``planner.PlannedClip``), in every mode:
        in script mode the rendered length and the fades are the script clip's, and the story is
        placed on its timeline; otherwise every clip but the last renders the crossfade tail."""
        sc = clip.script
        fades = not clip.is_last
        return cls(plan_id, clip.index, clip.caption, clip.start_s,
                   clip.duration if sc else post.heard_seconds(clip.duration, fades_out=fades),
                   sc.render_s if sc else post.render_seconds(clip.duration, fades_out=fades),
                   clip.is_last, params.guidance, params.seed, params.num_steps, arrival, story_key,
                   fade_in=bool(sc and sc.fade_in), fade_out=bool(sc and sc.fade_out),
                   timeline_s=params.total_duration if sc else 0.0, mode=params.mode,
                   audio_format=params.audio_format, audio_quality=params.audio_quality)

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
