"""Playback deadlines: the cost curve, the deadline policy's choice of rows, the playback clock,
the step scheduler and the clip renderer under that policy, admission, and the simulated H100."""
import asyncio
import json
import time

import numpy as np
import pytest

from audiostory_ensemble.pipeline import story
from audiostory_ensemble.pipeline.clip import ClipRenderer, RenderedClip
from audiostory_ensemble.pipeline.playback import PlaybackClock
from audiostory_ensemble.pipeline.records import ClipMeta
from audiostory_ensemble.runtime.stages import OverCapacity, down_stage, over_capacity
from audiostory_ensemble.serving.scheduler import Job, StepScheduler, choose_rows
from audiostory_ensemble.serving.simulated import (
    H100_STEP_MS,
    CostCurve,
    SimulatedBatchRunner,
    SimulatedStepEngine,
    simulated_runner,
)
from tests.test_pipeline import cond, fake_vae
from tests.test_scheduler import FakeStep, clip, solo

H100 = CostCurve.of_ms(H100_STEP_MS)

# ---- the cost curve ------------------------------------------------------------------------------


def test_the_cost_curve_interpolates_the_measured_points_and_extends_the_last_slope():
    assert H100(1) == pytest.approx(0.00709) and H100(32) == pytest.approx(0.1521)
    assert H100(6) == pytest.approx((0.0204 + 0.0404) / 2)                   # halfway between 4 and 8
    slope = (0.1521 - 0.0789) / 16
    assert H100(64) == pytest.approx(0.1521 + 32 * slope)                    # past the table: its last slope
    # The knee: the first batch within 10 % of the best cost per row (4.66 ms at 64) is 4.
    assert H100.knee(64) == 4 and H100.knee(2) == 2
    assert H100.per_row(4) > H100.per_row(32) > H100.per_row(64)


def test_a_curve_with_no_points_learns_the_engine_it_measures():
    curve = CostCurve()
    assert not curve.known and curve(3) == 3.0                               # only ratios until measured
    for _ in range(20):
        curve.observe(1, 0.010)
        curve.observe(8, 0.020)
    assert curve.known
    assert curve(8) == pytest.approx(0.020) and curve(4) == pytest.approx(0.010 + 0.010 * 3 / 7)
    assert curve.knee(8) == 7                                                 # per row 2.65 ms, within 10 % of 8's 2.5
    curve.observe(8, 0.060)                                                   # a running average, not the last
    assert 0.020 < curve(8) < 0.060


def test_a_curve_learned_from_noisy_timings_never_falls_past_its_points_and_always_has_a_knee():
    """Found in CI: timings where the larger batch came out faster (a noisy CPU) made the learned
    line fall past its last point, to negative costs, and the knee search found nothing: the
    step scheduler's thread died with StopIteration and every clip in flight hung."""
    curve = CostCurve()
    curve.observe(1, 0.050)
    curve.observe(2, 0.030)                                                   # noise: 2 rows faster than 1
    assert all(curve(b) >= curve(2) > 0 for b in range(2, 65))
    assert 1 <= curve.knee(64) <= 64


def test_the_step_loop_survives_a_failing_choice_and_steps_every_row(monkeypatch):
    from audiostory_ensemble.serving import scheduler as scheduler_module

    def broken(*a, **kw):
        raise ValueError("a bug in the policy")
    monkeypatch.setattr(scheduler_module, "choose_rows", broken)
    sched = StepScheduler(FakeStep(4), policy="deadline", cost=H100)
    results = {}
    try:
        for i in range(3):
            sched.submit(Job(done=lambda latent, error, i=i: results.__setitem__(i, (latent, error)), key=f"k{i}",
                             **clip(30 + i)))
        t = time.time() + 20
        while len(results) < 3 and time.time() < t:
            time.sleep(0.01)
    finally:
        sched.close()
    assert all(results[i][1] is None and np.array_equal(results[i][0], solo(clip(30 + i))) for i in range(3))
    assert sched.stats.choice_errors > 0 and sched.thread.is_alive() is False     # closed, not crashed


# ---- the deadline policy's choice ------------------------------------------------------------------

NOW = 1000.0


def job(deadline, remaining=50, steps=50):
    j = Job(None, None, 0.0, 0.0, np.zeros(steps + 1, np.float32), lambda *_: None, deadline=deadline)
    j.steps_done = steps - remaining
    return j


def test_a_first_clip_goes_with_the_earliest_deadlines_in_a_knee_sized_batch_not_with_every_row():
    later = [job(NOW + 10 + i) for i in range(30)]          # later clips, seconds of slack each
    first = job(NOW - 0.4)                                  # a first clip: due at its story's arrival
    rows = later[:10] + [first] + later[10:]
    pick = choose_rows(rows, NOW, H100, knee=4, margin_s=0.5)
    assert pick.rows[0] == 10, "the first clip is not stepped first"
    assert pick.rows == [10, 0, 1, 2]                       # the knee: the first clip and 3 earliest others
    # The old policy would step all 31 rows: 152 ms a step against 20 ms here, 7.6 s to the first clip.
    assert H100(len(pick.rows)) * 50 < 1.1


def test_rows_at_risk_join_the_batch_and_late_rows_beyond_the_knee_wait_their_turn():
    burst = [job(NOW - 1 - i * 0.01) for i in range(12)]    # 12 first clips at once: all late
    at_risk = job(NOW + 0.5 + 50 * 0.015)                   # on time only if stepped every iteration
    roomy = job(NOW + 60)
    rows = burst + [at_risk, roomy]
    pick = choose_rows(rows, NOW, H100, knee=4, margin_s=0.5)
    late_chosen = [r for r in pick.rows if r < 12]
    assert late_chosen == [11, 10, 9, 8], "the earliest-due late rows, as many as the knee"
    assert 12 in pick.rows and 13 not in pick.rows
    # Planted fault: stepping every late row at once (the first fix that comes to mind) is what
    # the policy exists to avoid; it would take every one of them 8x longer.
    assert len(pick.rows) == 5


def test_with_nothing_late_or_at_risk_the_batch_grows_while_every_row_keeps_its_deadline():
    rows = [job(NOW + 30 + i) for i in range(40)]           # 30 s of slack, 50 steps: pace 0.59 s a step
    assert len(choose_rows(rows, NOW, H100, knee=4, margin_s=0.5).rows) == 40
    tight = [job(NOW + 0.5 + 50 * 0.045)] + rows            # fits a step of up to 45 ms: 8 rows (40.4 ms)
    assert len(choose_rows(tight, NOW, H100, knee=4, margin_s=0.5).rows) == 8


def test_a_clip_without_a_deadline_is_due_when_submitted_and_min_batch_is_kept():
    rows = [job(None), job(NOW + 100)]
    assert choose_rows(rows, NOW, H100, knee=1, margin_s=0.5).rows == [0]
    assert sorted(choose_rows(rows, NOW, H100, knee=1, margin_s=0.5, floor=2).rows) == [0, 1]


def test_no_clip_starves_behind_a_stream_of_first_clips():
    """Virtual time: a first clip arrives every 0.3 s for a minute (each due at once) while one
    later clip due in 20 s waits. The later clip must be done by its deadline."""
    now, rows, arrivals, done = NOW, [job(NOW + 20.0)], 0, []
    waiting = rows[0]
    while now < NOW + 60:
        while arrivals * 0.3 <= now - NOW:
            rows.append(job(NOW + arrivals * 0.3))
            arrivals += 1
        pick = choose_rows(rows, now, H100, knee=4, margin_s=0.5)
        now += H100(len(pick.rows)) if pick.rows else 0.01
        for r in sorted(pick.rows, reverse=True):
            rows[r].steps_done += 1
            if rows[r].remaining == 0:
                done.append((rows.pop(r), now))
    assert [t for j, t in done if j is waiting][0] <= NOW + 20.0
    assert len(done) > 150                                  # and the first clips kept flowing


# ---- the playback clock ------------------------------------------------------------------------------


def meta(index, start, plan="p", arrival=100.0, is_last=False, steps=4, render_s=4.0):
    return ClipMeta(plan, index, f"clip {index}", start, render_s, render_s, is_last, 4.0, 0, steps,
                    arrival=arrival, story_key=f"key-{plan}")


def test_deadlines_follow_playback_and_a_late_clip_moves_playback_back():
    clock = PlaybackClock()
    c0, c1, c2 = meta(0, 0.0), meta(1, 8.5), meta(2, 17.0, is_last=True)
    assert clock.due(c0) == 100.0                           # at once: at the story's arrival
    assert clock.due(c1) == 108.5                           # until clip 0 is out: from the arrival
    assert clock.delivered(c1, 101.0) == 0.0                # before clip 0: nothing plays yet
    assert clock.delivered(c0, 102.0) == 0.0
    assert clock.due(c1) == 110.5 and clock.due(c2) == 119.0
    assert clock.delivered(c1, 111.5) == pytest.approx(1.0)  # a second of silence ...
    assert clock.due(c2) == 120.0                           # ... and everything after moves back by it
    assert clock.delivered(c2, 119.0) == 0.0
    assert len(clock) == 0                                  # the last clip forgets the story


def test_the_clock_keeps_a_bounded_number_of_stories():
    clock = PlaybackClock(max_stories=3)
    for i in range(10):
        clock.delivered(meta(0, 0.0, plan=f"p{i}"), 200.0 + i)
    assert len(clock) == 3
    assert clock.due(meta(1, 5.0, plan="p9")) == 214.0 and clock.due(meta(1, 5.0, plan="p0")) == 105.0


# ---- the scheduler and the renderer under the deadline policy -----------------------------------------


def test_under_the_deadline_policy_every_clip_still_equals_its_solo_render_bit_for_bit():
    """Which rows step when changes with the deadlines; what each clip renders must not. With
    min_batch 2 (the fake engine, like onnxruntime, is row-wise) every result is its solo render."""
    engine = FakeStep(8, delay=0.002)
    sched = StepScheduler(engine, min_batch=2, policy="deadline", cost=CostCurve.of_ms({1: 2.0, 8: 16.0}))
    clips = {i: clip(i, steps=6 + i) for i in range(7)}
    results, events = {}, []
    try:
        now = time.time()
        for i, c in clips.items():      # mixed deadlines: some late, some far
            j = Job(done=lambda latent, error, i=i: results.__setitem__(i, (latent, error)), key=f"k{i}",
                    deadline=now + (-1 if i % 3 == 0 else 30 + i), **c)
            sched.submit(j)
            events.append(j)
        deadline = time.time() + 30
        while len(results) < len(clips) and time.time() < deadline:
            time.sleep(0.01)
    finally:
        sched.close()
    assert len(results) == len(clips)
    for i, c in clips.items():
        assert results[i][1] is None and np.array_equal(results[i][0], solo(c)), i
    assert sched.stats.waiting_rows > 0, "the policy never left a row out: nothing was scheduled"
    assert min(engine.batches) >= 2


def test_a_cancelled_clip_and_a_failing_engine_behave_as_under_the_old_policy():
    engine = FakeStep(4, delay=0.005, fail_at=30)
    sched = StepScheduler(engine, policy="deadline", cost=CostCurve.of_ms({1: 5.0, 4: 8.0}))
    results = {}
    try:
        far = Job(done=lambda *r: results.__setitem__("far", r), key="a", deadline=time.time() + 60,
                  **clip(1, steps=100))
        near = Job(done=lambda *r: results.__setitem__("near", r), key="b", deadline=time.time() - 1,
                   **clip(2, steps=100))
        sched.submit(far, near)
        while near.steps_done < 3:
            time.sleep(0.001)
        assert sched.cancel("b") == 1
        t = time.time() + 10
        while len(results) < 2 and time.time() < t:
            time.sleep(0.005)
    finally:
        sched.close()
    assert results["near"] == (None, None) and near.steps_after_cancel <= 1
    assert isinstance(results["far"][1], RuntimeError) and "on fire" in str(results["far"][1])


def test_the_renderer_hands_each_clip_its_deadline_and_moves_them_when_playback_starts():
    engine = FakeStep(4, delay=0.003)
    sched = StepScheduler(engine, policy="deadline", cost=CostCurve.of_ms({1: 3.0, 4: 6.0}))
    renderer = ClipRenderer(sched, fake_vae, clips_per_story=2, max_clips=4, poll_s=0.01, lead_s=0.25)
    seen = {}
    real = sched.render

    def spy(*a, **kw):
        j, fut = real(*a, **kw)
        seen[a[2]] = j                  # by rendered length: which clip it is
        return j, fut
    sched.render = spy
    arrival = time.time()
    c0 = meta(0, 0.0, arrival=arrival, steps=4, render_s=4.0)
    c1 = meta(1, 9.0, arrival=arrival, steps=400, render_s=5.0)

    async def main():
        second = asyncio.ensure_future(renderer.render(c1, cond(1)))
        first = await renderer.render(c0, cond(0))
        await asyncio.sleep(0.05)
        moved = seen[5.0].deadline
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        return first, moved

    try:
        first, moved = asyncio.run(main())
    finally:
        sched.close()
    assert isinstance(first, RenderedClip) and first.silence_s == 0.0
    assert seen[4.0].deadline == pytest.approx(arrival - 0.25)            # clip 0: at once, less the decode
    delivered = moved + 0.25 - 9.0                                       # clip 1: due 9 s after clip 0's delivery
    assert arrival < delivered < time.time()
    assert renderer.tracked()["deadline_stories"] == 0                    # nothing kept once a clip is out


def test_a_new_story_is_refused_while_the_work_at_risk_exceeds_admit_backlog_s():
    engine = FakeStep(8, delay=0.02)
    sched = StepScheduler(engine, policy="deadline", cost=CostCurve.of_ms({1: 20.0, 8: 40.0}))
    renderer = ClipRenderer(sched, fake_vae, clips_per_story=1, max_clips=8, poll_s=0.01, admit_backlog_s=1.0)
    late = [Job(done=lambda *_: None, key=f"k{i}", deadline=time.time() - 5, **clip(i, steps=200)) for i in range(6)]
    try:
        sched.submit(*late)
        t = time.time() + 5
        while sched.backlog_s <= 1.0 and time.time() < t:
            time.sleep(0.01)
        with pytest.raises(OverCapacity) as refused:
            asyncio.run(renderer.render(meta(0, 0.0, plan="new", arrival=time.time()), cond(3)))
        # A later clip of a story already admitted is not refused: it is that story's next sound.
        got = asyncio.run(asyncio.wait_for(renderer.render(meta(1, 5.0, plan="old", steps=2), cond(4)), 20))
    finally:
        for j in late:
            j.cancel()
        sched.close()
    message = str(refused.value)
    assert over_capacity(message) == "dit_sampler" and down_stage(message) is None
    assert "admit_backlog_s = 1" in message and "retry later" in message
    assert isinstance(got, RenderedClip)


def test_a_refusal_ends_the_story_unavailable_with_its_reason_and_cancels_every_stage():
    loop = story.StoryLoop("llm", "dit_sampler", timeout_s=30.0, started_at=0.0)
    loop.response(story.PLAN, story.ENTRY)
    error = str(OverCapacity("dit_sampler", "3.2 s of DiT steps are at risk"))
    stop = loop.response("clip0", story.ERROR, error=error)
    end = stop.ending()
    assert (stop.reason, stop.stage) == (story.Reason.OVERLOADED, "")     # no stage is down: both get the cancel
    assert (end.code, end.counter, end.message) == (story.Code.UNAVAILABLE, "overloaded", error)


# ---- the simulated H100 ----------------------------------------------------------------------------


def test_the_simulated_engine_passes_latents_through_and_takes_its_batch_time():
    calls = []

    class Curve(CostCurve):
        def __call__(self, batch):
            calls.append(batch)
            return 0.0
    engine = SimulatedStepEngine(4, 3, Curve({1: 1.0}))
    c = clip(5)
    engine.load(0, c["x0"], c["cond"], 3.0, 4.5)
    engine.load(1, c["x0"] * 2, c["cond"], 3.0, 4.5)
    engine.step(2, np.zeros(2, np.float32), np.ones(2, np.float32))
    assert calls == [2]
    assert np.array_equal(engine.latent(0), c["x0"]) and np.array_equal(engine.latent(1), c["x0"] * 2)
    assert SimulatedStepEngine(4, 3).cost.knee(64) == 4                       # the H100 table by default


def test_the_simulated_vae_answers_silence_of_the_graphs_shape(tmp_path):
    runner = SimulatedBatchRunner({"latent": ["B", 645, 64]}, {"wave": ["B", 2, 1000]}, CostCurve({1: 1e-4}))
    out = runner.run([{"latent": np.zeros((1, 645, 64), np.float32)}, {"latent": np.zeros((2, 645, 64), np.float32)}])
    assert [o["wave"].shape for o in out] == [(1, 2, 1000), (2, 2, 1000)]
    assert not any(o["wave"].any() for o in out)
    (tmp_path / "manifest.json").write_text(json.dumps({"graphs": {"vae_decoder": {
        "file": "vae_decoder.onnx", "inputs": {"latent": ["B", 645, 64]}, "outputs": {"wave": ["B", 2, 77]}}}}))
    assert simulated_runner(tmp_path / "vae_decoder.onnx").output_shapes == {"wave": [2, 77]}
    with pytest.raises(ValueError, match="simulate must be h100"):
        simulated_runner(tmp_path / "vae_decoder.onnx", "a100")


# ---- the repository settings, and a real server on the simulated H100 -----------------------------


@pytest.mark.parametrize("settings, named", [
    ({"step_policy": "fifo"}, "step_policy must be one of all, deadline"),
    ({"vae_engine": "tensorrt"}, "vae_engine must be one of graph, simulated"),
    ({"admit_backlog_s": -1}, "admit_backlog_s must be a number of seconds in [0, 600]"),
    ({"deadline_lead_s": "0.3"}, "deadline_lead_s must be a number of seconds"),
    ({"dit_engine": "gpu"}, "dit_engine must be one of ['onnx', 'simulated', 'triton']"),
])
def test_bad_scheduling_settings_are_refused_naming_the_setting(settings, named, exported, tmp_path):
    from export.make_repo import make_repo

    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings))
    with pytest.raises(SystemExit, match=named.replace("[", r"\[").replace("]", r"\]")):
        make_repo("cpu", "tiny", tmp_path / "repo", path)


@pytest.fixture(scope="module")
def simulated(exported, test_build_dir):
    from tests.serverutil import served

    with served(test_build_dir, "simulated", {"dit_engine": "simulated", "vae_engine": "simulated",
                                               "clips_in_flight_per_request": 2, "step_policy": "deadline",
                                               "admit_backlog_s": 0.5, "full_instances": 1}) as s:
        yield s


def test_served_on_a_simulated_h100_stories_past_capacity_are_refused_unavailable_and_the_rest_play(
        simulated, sample_instructions):
    """A real tritonserver whose DiT step and VAE take an H100's time: 12 stories sent 0.1 s apart,
    100 steps each (a first clip is ≈ 0.5 s of engine work; the limit is 0.5 s of work at risk).
    Some must be refused — UNAVAILABLE, retryable, saying why — and every admitted one plays whole."""
    from concurrent.futures import ThreadPoolExecutor

    from client.api import AudioStoryClient, AudioStoryError
    from tests.serverutil import metric, wait_for

    def one(i):
        time.sleep(0.1 * i)
        caption, total = sample_instructions[i % len(sample_instructions)]
        try:
            return AudioStoryClient(simulated.grpc_url).generate(caption, total_duration=total, num_steps=100,
                                                                 timeout=120)
        except AudioStoryError as e:
            return e

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(one, range(12)))
    refused = [o for o in outcomes if isinstance(o, AudioStoryError)]
    played = [o for o in outcomes if not isinstance(o, AudioStoryError)]
    assert refused and played, f"{len(refused)} refused, {len(played)} played"
    for e in refused:
        assert e.status == "UNAVAILABLE" and e.retryable, e
        assert "stage dit_sampler is over capacity" in str(e) and "admit_backlog_s = 0.5" in str(e)
    for whole in played:
        assert whole.audio.shape[0] == 2 and whole.audio.shape[1] > 0 and len(whole.clips) >= 2
    assert metric(simulated, "audiostory_requests_overloaded_total", "audiostory_stream") == len(refused)
    assert metric(simulated, "audiostory_stories_refused_total", "dit_sampler") >= len(refused)
    wait_for(lambda: metric(simulated, "audiostory_active_stories", "audiostory_stream") == 0,
             what="every story to end")


def test_on_the_exported_graph_a_deadline_schedule_renders_each_clip_as_it_renders_alone(converted, exported):
    """onnxruntime on the tiny DiT step: a late clip stepped ahead of two with time to spare (left
    out of iterations, swapped between rows) still renders, bit for bit, what it renders alone
    padded to two rows (``dit_min_batch: 2``)."""
    import torch

    from audiostory_ensemble.model.sampler import flow_sigmas, initial_noise
    from audiostory_ensemble.serving.step_engines import OnnxStepEngine
    from tests.test_scheduler import run_jobs

    n = converted.config.num_t5_tokens
    g = torch.Generator().manual_seed(5)
    steps = {0: 9, 1: 6, 2: 7}
    clips = {i: dict(x0=initial_noise(10 + i).numpy()[0], cond=(torch.randn(n, 1024, generator=g) * 0.1).numpy(),
                     duration=[11.0, 4.5, 27.0][i], guidance=[3.0, 5.5, 1.5][i], sigmas=flow_sigmas(s).numpy())
             for i, s in steps.items()}
    sched = StepScheduler(OnnxStepEngine(exported / "dit_step.onnx", 4, n, threads=2), min_batch=2,
                          policy="deadline", cost=CostCurve({1: 0.01, 4: 0.04}))
    results = {}
    try:
        now = time.time()
        sched.submit(*[Job(done=lambda latent, error, i=i: results.__setitem__(i, (latent, error)), key=f"k{i}",
                           deadline=now + (-1.0 if i == 1 else 60.0), **c) for i, c in clips.items()])
        t = time.time() + 120
        while len(results) < 3 and time.time() < t:
            time.sleep(0.01)
    finally:
        sched.close()
    assert sched.stats.waiting_rows > 0, "every row was stepped every time: no schedule was tested"
    for i, c in clips.items():
        alone, _, _ = run_jobs(OnnxStepEngine(exported / "dit_step.onnx", 2, n, threads=2), {i: c}, min_batch=2)
        assert results[i][1] is None and np.array_equal(results[i][0], alone[i][0]), f"clip {i}"


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_an_engine_swaps_two_rows_whole(kind):
    """The deadline policy brings its rows to the front by swapping: every per-row input moves."""
    import torch

    from audiostory_ensemble.serving.step_engines import StepEngine, TorchStepEngine

    engine = StepEngine(3, 2) if kind == "numpy" else TorchStepEngine(torch.nn.Linear(1, 1), 3, 2, dtype=torch.float32)
    rows = [clip(20 + r) for r in range(3)]
    for r, c in enumerate(rows):
        engine.load(r, c["x0"], c["cond"][:2], c["duration"], c["guidance"])
    engine.swap(0, 2)
    as_np = (lambda a: a) if kind == "numpy" else (lambda t: t.numpy())
    for r, src in ((0, 2), (1, 1), (2, 0)):
        assert np.array_equal(engine.latent(r), rows[src]["x0"])
        assert np.array_equal(as_np(engine.cond[r]), rows[src]["cond"][:2])
        assert float(engine.duration[r]) == pytest.approx(rows[src]["duration"])
        assert float(engine.guidance[r]) == pytest.approx(rows[src]["guidance"])
