"""Parity with teeth: the audio comparison the served tests use fails when a fault is planted in
the served path — swapped conditioning, the duration one second off, one Euler step skipped, the
crossfade one sample long — and passes without one.

The served path is run in process: ``dit_sampler``'s own clip renderer (``pipeline.clip``: the
step scheduler on the exported graph, then the VAE — here the exported graph on onnxruntime — trim
and resample) and the client's stitching; the plan and its conditioning are the reference's own
(the planner's and the bridge's parity are tested against the reference in test_planner and
test_e2e)."""
import asyncio

import numpy as np
import pytest

from audiostory_ensemble.model import post
from audiostory_ensemble.model.config import CROSSFADE_S, OUTPUT_SAMPLE_RATE
from audiostory_ensemble.pipeline.clip import ClipRenderer, RenderedClip
from audiostory_ensemble.pipeline.records import ClipMeta
from audiostory_ensemble.serving.onnx_runner import ort_session
from audiostory_ensemble.serving.scheduler import StepScheduler
from audiostory_ensemble.serving.step_engines import OnnxStepEngine
from tests.parity import assert_story_parity

FAULTS = ("swapped conditioning", "duration off by one second", "one Euler step skipped",
          "crossfade one sample long")


@pytest.fixture(scope="module")
def served(exported, converted):
    scheduler = StepScheduler(OnnxStepEngine(exported / "dit_step.onnx", 4, converted.config.num_t5_tokens, threads=2))
    vae = ort_session(exported / "vae_decoder.onnx", threads=2)

    async def decode(latent):
        return vae.run(None, {"latent": latent})[0]
    yield scheduler, decode
    scheduler.close()


def render(served, ref, fault=None, steps=50):
    """The story as the server renders it from the reference's plan, with ``fault`` planted."""
    scheduler, decode = served
    renderer = ClipRenderer(scheduler, decode, clips_per_story=1, max_clips=4)
    if fault == "one Euler step skipped":
        sigmas = renderer.sigmas
        renderer.sigmas = lambda n: np.delete(sigmas(n), n // 2)
    clips = ref.clips
    metas = [ClipMeta("fidelity", k, clip.caption, 0.0, clip.duration,
                      clip.render_duration + (1.0 if fault == "duration off by one second" else 0.0),
                      k + 1 == len(clips), 4.0, 0, steps) for k, clip in enumerate(clips)]
    conds = [clips[(k + 1) % len(clips)].cond if fault == "swapped conditioning" else clip.cond
             for k, clip in enumerate(clips)]

    async def all_clips():
        return await asyncio.gather(*(renderer.render(m, c.numpy()) for m, c in zip(metas, conds)))
    results = asyncio.run(all_clips())
    assert all(isinstance(r, RenderedClip) for r in results), results
    audios = [r.audio for r in results]
    transition = CROSSFADE_S
    if fault == "crossfade one sample long":
        transition = (int(CROSSFADE_S * OUTPUT_SAMPLE_RATE) + 1.5) / OUTPUT_SAMPLE_RATE
    return post.crossfade(audios, OUTPUT_SAMPLE_RATE, transition), audios


@pytest.fixture(scope="module")
def story(reference_result, sample_instructions):
    caption, total = sample_instructions[0]
    return reference_result(caption, total)


def test_the_served_path_equals_the_reference(served, story):
    audio, clips = render(served, story)
    assert_story_parity(audio, clips, story)


@pytest.mark.parametrize("fault", FAULTS)
def test_the_audio_parity_fails_under_a_planted_fault(served, story, fault):
    audio, clips = render(served, story, fault)
    with pytest.raises(AssertionError):
        assert_story_parity(audio, clips, story)
    if fault != "crossfade one sample long":    # a clip-level fault: every faulted clip is heard
        heard = [float(np.abs(c[:, :n] - r.audio[:, :n]).max())
                 for c, r in zip(clips, story.clips) for n in [min(c.shape[1], r.audio.shape[1])]]
        assert max(heard) >= 0.1, (fault, heard)
