"""Parity with teeth: the audio comparison the served tests use fails when a fault is planted in
the served path — swapped conditioning, the duration one second off, one Euler step skipped, the
crossfade one sample long — and passes without one.

The served path is run in process from the modules the server runs: the step scheduler on the
exported graph (dit_sampler's loop), the exported VAE on onnxruntime, trim and resample, and the
client's stitching; the plan and its conditioning are the reference's own (the planner's and the
bridge's parity are tested against the reference in test_planner and test_e2e)."""
import numpy as np
import pytest

from audiostory_ensemble.model import post
from audiostory_ensemble.model.config import CROSSFADE_S, OUTPUT_SAMPLE_RATE, VAE_SAMPLE_RATE
from audiostory_ensemble.model.sampler import flow_sigmas, initial_noise
from audiostory_ensemble.serving.onnx_runner import ort_session
from audiostory_ensemble.serving.scheduler import Job, StepScheduler
from audiostory_ensemble.serving.step_engines import OnnxStepEngine
from tests.parity import assert_story_parity

FAULTS = ("swapped conditioning", "duration off by one second", "one Euler step skipped",
          "crossfade one sample long")


@pytest.fixture(scope="module")
def served(exported, converted):
    scheduler = StepScheduler(OnnxStepEngine(exported / "dit_step.onnx", 4, converted.config.num_t5_tokens, threads=2))
    vae = ort_session(exported / "vae_decoder.onnx", threads=2)
    yield scheduler, vae
    scheduler.close()


def render(served, ref, fault=None, steps=50):
    """The story as the server renders it from the reference's plan, with ``fault`` planted."""
    import threading

    scheduler, vae = served
    clips = ref.clips
    audios = []
    for k, clip in enumerate(clips):
        cond = clips[(k + 1) % len(clips)].cond if fault == "swapped conditioning" else clip.cond
        dit_duration = clip.render_duration + (1.0 if fault == "duration off by one second" else 0.0)
        sigmas = flow_sigmas(steps).numpy()
        if fault == "one Euler step skipped":
            sigmas = np.delete(sigmas, steps // 2)
        done, box = threading.Event(), {}
        scheduler.submit(Job(initial_noise(0).numpy()[0], cond.numpy(), dit_duration, 4.0, sigmas,
                             lambda latent, error: (box.update(latent=latent, error=error), done.set())))
        assert done.wait(120) and box["error"] is None
        wave = vae.run(None, {"latent": box["latent"][None]})[0][0]
        audios.append(post.resample(post.trim(wave, clip.render_duration), VAE_SAMPLE_RATE, OUTPUT_SAMPLE_RATE))
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
        n = min(c.shape[1] for c in clips)
        heard = [float(np.abs(c[:, :n] - r.audio[:, :n]).max()) for c, r in zip(clips, story.clips)]
        assert max(heard) >= 0.1, (fault, heard)
