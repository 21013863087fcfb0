"""One clip from its conditioning to its public outputs, without Triton.

:class:`ClipRenderer` is ``dit_sampler``'s job: two gates in front of the step scheduler, the
denoising (the clip's rows stepped with every other clip in flight), the VAE decode (a stage
client handed in: Triton's BLS in the server, an onnxruntime session in the tests), then the
clip's post-processing (:func:`post.clip_audio`: trim to the rendered length, resample to 32 kHz).

Gates, in order:

- per story, at most ``clips_per_story`` clips denoise at once, in story order (the listener
  needs clip 0 first, and clips of other stories keep the batches full);
- overall, at most ``max_clips`` clips denoise at once; a freed slot goes to the clip of the
  oldest story (then the lowest index), so stories in progress finish before a newer one starts —
  or, under the scheduler's ``deadline`` policy, to the clip the listener needs first.

Deadlines (``playback.PlaybackClock``): each clip is handed to the scheduler with the time its
listener needs it, less ``lead_s`` for the decode after it; when a story's first clip is delivered
(or a late clip moves its playback back) the story's clips still denoising get their new deadlines.
Admission (``admit_backlog_s`` > 0): a story's first clip is refused (``OverCapacity``) while the
rows already at risk of missing their deadlines hold more than that many seconds of engine work:
a story admitted then would stall, and make the ones in progress stall.

Cancellation: the caller cancels the task running :meth:`ClipRenderer.render` (the stage's
``CancelScope`` does, by story key), or ``is_cancelled()`` turns true (a direct caller's cancel,
polled every ``poll_s``). Either way the clip leaves the scheduler before its next step and the
result is a :class:`Stopped`; a clip cancelled while it decodes is stopped too.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np

from ..model import post
from ..model.sampler import flow_sigmas, initial_noise
from ..runtime.gates import PerKeyLimiter, PriorityGate
from ..runtime.stages import OverCapacity
from .playback import PlaybackClock
from .records import ClipMeta

Decode = Callable[[np.ndarray], Awaitable[np.ndarray]]     # latent [1, 645, 64] -> wave [1, 2, T] at 44.1 kHz


@dataclass(frozen=True)
class RenderedClip:
    meta: ClipMeta
    audio: np.ndarray        # [2, T] float32 at 32 kHz
    silence_s: float = 0.0   # how late it was delivered for its listener (a stall), 0 in time


@dataclass(frozen=True)
class Stopped:
    """A clip cancelled before it was delivered: how many of its steps ran, and how many of those
    ran after the cancel reached the scheduler (the one in flight, at most)."""
    meta: ClipMeta
    steps_done: int = 0
    steps_after_cancel: int | None = None     # None: the clip never reached the scheduler

    @property
    def steps_saved(self) -> int:
        return self.meta.num_steps - self.steps_done


class ClipRenderer:
    def __init__(self, scheduler, decode: Decode, clips_per_story: int = 1, max_clips: int = 32,
                 poll_s: float = 0.25, max_seeds: int = 64, lead_s: float = 0.3, admit_backlog_s: float = 0.0,
                 stage: str = "dit_sampler"):
        self.scheduler = scheduler
        self.decode = decode
        self.by_deadline = getattr(scheduler, "policy", "all") == "deadline"
        self.clock = PlaybackClock()
        self.lead_s = lead_s
        self.admit_backlog_s = admit_backlog_s
        self.stage = stage
        self._in_flight: dict[str, dict] = {}     # plan id -> {job: meta} of its clips denoising
        self.limiter = PerKeyLimiter(clips_per_story)
        self.gate = PriorityGate(max_clips)
        self.poll_s = poll_s
        self.max_seeds = max_seeds
        self._noise = {0: initial_noise(0).numpy()[0]}
        self._sigmas: dict[int, np.ndarray] = {}

    def noise(self, seed: int) -> np.ndarray:
        """The clip's initial latent ``[645, 64]`` (every clip of a story starts from its seed's)."""
        if seed not in self._noise:
            if len(self._noise) > self.max_seeds:
                self._noise = {0: self._noise[0]}
            self._noise[seed] = initial_noise(seed).numpy()[0]
        return self._noise[seed]

    def sigmas(self, num_steps: int) -> np.ndarray:
        if num_steps not in self._sigmas:
            self._sigmas[num_steps] = flow_sigmas(num_steps).numpy()
        return self._sigmas[num_steps]

    def tracked(self) -> dict[str, int]:
        return {"request_limiter": len(self.limiter), "noise_cache": len(self._noise),
                "sigma_cache": len(self._sigmas), "playback_clock": len(self.clock),
                "deadline_stories": len(self._in_flight), **self.scheduler.tracked()}

    async def render(self, meta: ClipMeta, cond: np.ndarray,
                     is_cancelled: Callable[[], bool] = lambda: False) -> RenderedClip | Stopped:
        """The clip's audio, or :class:`Stopped`. Errors of the engine or the VAE are raised."""
        if is_cancelled():
            return Stopped(meta)
        backlog = getattr(self.scheduler, "backlog_s", 0.0)
        if meta.index == 0 and self.admit_backlog_s > 0 and backlog > self.admit_backlog_s:
            raise OverCapacity(self.stage, f"{backlog:.1f} s of DiT steps are at risk of missing their deadlines "
                                           f"(admit_backlog_s = {self.admit_backlog_s:g})")
        priority = (self.clock.due(meta), meta.arrival, meta.index) if self.by_deadline else (meta.arrival, meta.index)
        try:
            async with self.limiter.slot(meta.plan_id), self.gate.slot(priority):
                latent = await self._denoise(meta, cond, is_cancelled)
        except asyncio.CancelledError:
            return Stopped(meta)        # cancelled while waiting for a gate
        if isinstance(latent, Stopped):
            return latent
        try:        # the gates are free again while this clip decodes
            wave = (await self.decode(latent[None]))[0]
        except asyncio.CancelledError:
            return Stopped(meta, meta.num_steps, 0)
        audio = await asyncio.to_thread(post.clip_audio, wave, meta.render_s)
        silence = self.clock.delivered(meta, time.time())
        if meta.index == 0 or silence > 0:          # the story's playback (re)started: new deadlines
            for job, m in self._in_flight.get(meta.plan_id, {}).items():
                job.deadline = self.clock.due(m) - self.lead_s
        return RenderedClip(meta, audio, silence)

    async def _denoise(self, meta: ClipMeta, cond: np.ndarray, is_cancelled) -> np.ndarray | Stopped:
        job, fut = self.scheduler.render(self.noise(meta.seed), cond, meta.render_s, meta.guidance,
                                         self.sigmas(meta.num_steps), meta.story_key,
                                         self.clock.due(meta) - self.lead_s)
        clips = self._in_flight.setdefault(meta.plan_id, {})
        clips[job] = meta
        try:
            while not fut.done():
                await asyncio.wait({fut}, timeout=self.poll_s)
                if not fut.done() and is_cancelled():
                    job.cancel()
        except asyncio.CancelledError:
            job.cancel()                # out before its next step; wait for the scheduler to say so
            await asyncio.wait({fut})
        finally:
            clips.pop(job, None)
            if not clips:
                self._in_flight.pop(meta.plan_id, None)
        latent = fut.result()
        if latent is None or job.cancelled:
            return Stopped(meta, job.steps_done, job.steps_after_cancel)
        return latent
