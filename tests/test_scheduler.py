"""The step scheduler (continuous batching of DiT steps), on a fake engine and on the real graph."""
import asyncio
import threading
import time

import numpy as np
import pytest

from audiostory_ensemble.model.sampler import flow_sigmas, initial_noise
from audiostory_ensemble.serving.scheduler import Job, StepScheduler
from audiostory_ensemble.serving.step_engines import OnnxStepEngine, StepEngine

N = 3


class FakeStep(StepEngine):
    """A row-wise Euler step whose velocity depends on every per-row input (so a row mixed up with
    another, a skipped step or a wrong sigma changes the result). ``delay`` makes a step take time."""

    def __init__(self, capacity=8, delay=0.0, fail_at=None):
        super().__init__(capacity, N)
        self.delay, self.fail_at, self.calls, self.batches = delay, fail_at, 0, []

    def _run(self, x, cond, duration, sigma, sigma_next, guidance):
        self.calls += 1
        self.batches.append(x.shape[0])
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("engine on fire")
        if self.delay:
            time.sleep(self.delay)
        v = (np.sin(x * guidance[:, None, None]) + cond.mean(axis=(1, 2))[:, None, None]
             + 0.01 * duration[:, None, None] + sigma[:, None, None])
        return (x + (sigma_next - sigma)[:, None, None] * v).astype(np.float32)


def clip(seed, steps=6):
    rng = np.random.default_rng(seed)
    return dict(x0=initial_noise(seed).numpy()[0], cond=rng.standard_normal((N, 1024)).astype(np.float32),
                duration=float(rng.uniform(1, 30)), guidance=float(rng.uniform(1, 8)),
                sigmas=flow_sigmas(steps).numpy())


def solo(c):
    """The clip stepped alone, in a plain loop: what every scheduled render must equal bit for bit."""
    e = FakeStep(1)
    e.load(0, c["x0"], c["cond"], c["duration"], c["guidance"])
    s = c["sigmas"]
    for i in range(len(s) - 1):
        e.step(1, s[i:i + 1], s[i + 1:i + 2])
    return e.latent(0)


class Collect:
    def __init__(self):
        self.results, self.event = {}, threading.Event()

    def done_for(self, name, expect):
        def done(latent, error):
            self.results[name] = (latent, error)
            if len(self.results) == expect:
                self.event.set()
        return done


def run_jobs(engine, clips, stagger=0.0, min_batch=1):
    sched = StepScheduler(engine, min_batch=min_batch)
    got = Collect()
    jobs = {}
    try:
        for name, c in clips.items():
            jobs[name] = Job(done=got.done_for(name, len(clips)), key=f"k{name}", **c)
            sched.submit(jobs[name])
            time.sleep(stagger)
        assert got.event.wait(30)
    finally:
        sched.close()
    return got.results, jobs, sched


def test_batched_clips_at_different_timesteps_equal_their_solo_renders_bit_for_bit():
    clips = {i: clip(i, steps=4 + i) for i in range(5)}
    engine = FakeStep(8, delay=0.002)
    results, _, sched = run_jobs(engine, clips, stagger=0.003)   # later clips join mid-flight
    for i, c in clips.items():
        latent, error = results[i]
        assert error is None
        assert np.array_equal(latent, solo(c)), i
    assert max(engine.batches) > 1, "the clips were never batched"
    assert sum(engine.batches) == sum(c["sigmas"].size - 1 for c in clips.values())   # no step lost or repeated
    assert sched.stats.rows == sum(engine.batches) and sched.stats.iterations == engine.calls


def test_more_clips_than_rows_wait_for_a_free_row():
    clips = {i: clip(10 + i) for i in range(7)}
    engine = FakeStep(capacity=3)
    results, _, _ = run_jobs(engine, clips)
    assert all(results[i][0] is not None and np.array_equal(results[i][0], solo(c)) for i, c in clips.items())
    assert max(engine.batches) == 3


def test_a_cancelled_clip_leaves_within_one_step_and_the_others_finish():
    engine = FakeStep(4, delay=0.01)
    sched = StepScheduler(engine)
    got = Collect()
    long_one = Job(done=got.done_for("long", 2), key="a", **clip(1, steps=200))
    other = Job(done=got.done_for("other", 2), key="b", **clip(2, steps=20))
    sched.submit(long_one)
    sched.submit(other)
    while long_one.steps_done < 5:
        time.sleep(0.001)
    assert sched.cancel("a") == 1 and sched.cancel("nobody") == 0
    at_cancel = long_one.steps_done
    assert got.event.wait(30)
    sched.close()
    assert got.results["long"] == (None, None)
    assert long_one.steps_done - at_cancel <= 1, "more than the step in flight ran after the cancel"
    assert long_one.steps_after_cancel <= 1 and other.steps_after_cancel == 0   # the job's own count agrees
    assert np.array_equal(got.results["other"][0], solo(clip(2, steps=20)))


class SlowLoad(FakeStep):
    """Loading a row waits for ``release``: a cancel can arrive while a clip is being admitted."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.loading, self.release = threading.Event(), threading.Event()

    def load(self, row, *a):
        self.loading.set()
        assert self.release.wait(30)
        super().load(row, *a)


def test_a_clip_cancelled_while_it_is_admitted_never_steps():
    engine = SlowLoad(4)
    sched = StepScheduler(engine)
    got = Collect()
    job = Job(done=got.done_for("admitted", 1), key="a", **clip(1, steps=20))
    sched.submit(job)
    assert engine.loading.wait(30)          # the loop has taken the job from the queue: loading it
    assert sched.cancel("a") == 1, "the cancel missed a clip that was being admitted"
    engine.release.set()
    assert got.event.wait(30)
    sched.close()
    assert got.results["admitted"] == (None, None) and job.steps_done == 0 and engine.calls == 0


def test_an_engine_failure_fails_the_clips_in_it_and_the_scheduler_goes_on():
    engine = FakeStep(4, fail_at=3)
    sched = StepScheduler(engine)
    got = Collect()
    sched.submit(*(Job(done=got.done_for(i, 3), **clip(i)) for i in range(2)))   # both in every call
    while len(got.results) < 2:
        time.sleep(0.001)
    assert all(isinstance(err, RuntimeError) and "on fire" in str(err) for _, err in got.results.values())
    sched.submit(Job(done=got.done_for("after", 3), **clip(5)))
    assert got.event.wait(30)
    sched.close()
    assert np.array_equal(got.results["after"][0], solo(clip(5)))


def test_closing_fails_what_is_left_and_refuses_new_clips():
    engine = FakeStep(2, delay=0.01)
    sched = StepScheduler(engine)
    got = Collect()
    sched.submit(Job(done=got.done_for(0, 1), **clip(0, steps=500)))
    time.sleep(0.05)
    sched.close()
    assert isinstance(got.results[0][1], RuntimeError)
    with pytest.raises(RuntimeError, match="closed"):
        sched.submit(Job(done=lambda *a: None, **clip(1)))
    assert not sched.thread.is_alive()


def test_render_from_asyncio():
    async def main():
        sched = StepScheduler(FakeStep(4))
        try:
            futs = [sched.render(**clip(i))[1] for i in range(3)]
            return await asyncio.gather(*futs)
        finally:
            sched.close()
    latents = asyncio.run(main())
    for i, latent in enumerate(latents):
        assert np.array_equal(latent, solo(clip(i)))


# ---- the real graph ----------------------------------------------------------------------------

def test_onnx_engine_batched_equals_solo_and_the_torch_sampler(converted, exported):
    """The served loop on the exported tiny graph. A clip batched with others at other timesteps
    equals its solo render: bit for bit with ``min_batch=2`` (onnxruntime computes a batch of one
    on another kernel path), within 1e-5 of the clip's scale without (float rounding, grown over
    the steps); and the torch loop within the export tolerance."""
    import torch

    from audiostory_ensemble.model.sampler import sample_latent
    step = converted.guided_step()
    n = converted.config.num_t5_tokens
    g = torch.Generator().manual_seed(3)
    conds = [(torch.randn(n, 1024, generator=g) * 0.1).numpy() for _ in range(3)]

    def real(i, steps):
        return dict(x0=initial_noise(i).numpy()[0], cond=conds[i], duration=[12.0, 7.5, 29.0][i],
                    guidance=[4.0, 1.0, 6.5][i], sigmas=flow_sigmas(steps).numpy())

    def engine(capacity):
        return OnnxStepEngine(exported / "dit_step.onnx", capacity, n, threads=2)

    steps = {0: 12, 1: 5, 2: 9}
    clips = {i: real(i, s) for i, s in steps.items()}
    batched, _, _ = run_jobs(engine(4), clips, stagger=0.02, min_batch=2)
    for i, s in steps.items():
        got = batched[i][0]
        exact, _, _ = run_jobs(engine(2), {i: real(i, s)}, min_batch=2)
        assert np.array_equal(got, exact[i][0]), f"clip {i}: batched differs from its padded solo render"
        alone, _, _ = run_jobs(engine(1), {i: real(i, s)})
        scale = np.abs(got).max()
        assert 0 < np.abs(got - alone[i][0]).max() / scale <= 1e-5
        c = real(i, s)
        with torch.no_grad():
            want = sample_latent(step, torch.from_numpy(c["cond"])[None], c["duration"], c["guidance"], s,
                                 noise=torch.from_numpy(c["x0"])[None]).numpy()[0]
        assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def test_the_gpu_loop_check_runs_at_tiny_size_on_cpu(tmp_path):
    """benchmarks/gpu_loop.py is the one device call that times this loop at full size on a GPU;
    its CPU dry run keeps it working."""
    import json

    from benchmarks.gpu_loop import main

    assert main(["--out", str(tmp_path), "--config", "tiny", "--clips", "1", "3", "--steps", "3", "--repeat", "2"]) == 0
    report = json.loads((tmp_path / "gpu_loop.json").read_text())
    assert [r["clips"] for r in report["rows"]] == [1, 3]
    for row in report["rows"]:
        assert row["loop_clip_steps_per_s"] > 0 and row["bare_clip_steps_per_s"] > 0 and row["clip_latency_ms"] > 0
    assert report["rows"][1]["mean_batch"] == 3.0     # the three clips stepped together
