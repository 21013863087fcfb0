"""The pipeline layer without Triton: ``ClipRenderer`` (dit_sampler's job) on the real step
scheduler over a fake step engine and a fake VAE, and ``StoryRunner`` (the front door's story)
over fake stage clients — the same objects the served models hand their BLS clients to."""
import asyncio
import threading
import time

import numpy as np
import pytest

from audiostory_ensemble.model import post
from audiostory_ensemble.model.grammar import MODEL_FAILED
from audiostory_ensemble.pipeline import story
from audiostory_ensemble.pipeline.clip import ClipRenderer, RenderedClip, Stopped
from audiostory_ensemble.pipeline.records import ClipMeta
from audiostory_ensemble.runtime import stages
from audiostory_ensemble.runtime.gates import CancelScope
from audiostory_ensemble.runtime.loop import DaemonCalls
from audiostory_ensemble.serving.scheduler import StepScheduler
from tests.test_scheduler import FakeStep, N

# ---- the clip renderer ---------------------------------------------------------------------------


def meta(index=0, steps=6, key="story-a", render_s=4.5, seed=0):
    return ClipMeta("plan-a", index, f"clip {index}", 0.0, render_s, render_s, False, 4.0, seed, steps,
                    arrival=1.0, story_key=key)


def cond(seed):
    return np.random.default_rng(seed).standard_normal((N, 1024)).astype(np.float32)


async def fake_vae(latent):
    """[1, 645, 64] -> [1, 2, T] at 44.1 kHz: a wave that depends on every latent value."""
    await asyncio.sleep(0)
    row = np.tanh(latent[0]).reshape(-1)
    return np.stack([np.resize(row, 44100 * 6), np.resize(row[::-1], 44100 * 6)])[None].astype(np.float32)


@pytest.fixture
def renderer():
    engine = FakeStep(4, delay=0.005)
    scheduler = StepScheduler(engine)
    yield ClipRenderer(scheduler, fake_vae, clips_per_story=2, max_clips=4, poll_s=0.01)
    scheduler.close()


def test_a_rendered_clip_is_its_denoised_latent_decoded_trimmed_and_resampled(renderer):
    m = meta(steps=5, render_s=4.25)
    got = asyncio.run(renderer.render(m, cond(1)))
    assert isinstance(got, RenderedClip) and got.meta is m
    # The same clip denoised alone in a plain loop, then the reference's post-processing.
    e = FakeStep(1)
    e.load(0, renderer.noise(0), cond(1), 4.25, 4.0)
    s = renderer.sigmas(5)
    for i in range(5):
        e.step(1, s[i:i + 1], s[i + 1:i + 2])
    want = post.clip_audio(asyncio.run(fake_vae(e.latent(0)[None]))[0], 4.25)
    assert got.audio.shape == (2, int(np.ceil(int(4.25 * 44100) * 32000 / 44100)))
    assert np.array_equal(got.audio, want)


def test_cancelling_a_clip_task_takes_it_out_of_the_scheduler_within_one_step(renderer):
    """What a story's cancel does (the stage's CancelScope cancels the clip's task): the clip
    leaves before its next step, the other clip finishes, and the result says what was saved."""
    scope = CancelScope()

    async def main():
        async def one(m, c):
            with scope.track(m.story_key):
                return await renderer.render(m, c)
        a = asyncio.ensure_future(one(meta(0, steps=400, key="a"), cond(1)))
        b = asyncio.ensure_future(one(meta(0, steps=20, key="b"), cond(2)))
        while renderer.scheduler.active < 2:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        assert scope.cancel("a") == 1 and scope.cancel("nobody") == 0
        return await a, await b

    stopped, done = asyncio.run(main())
    assert isinstance(stopped, Stopped) and isinstance(done, RenderedClip)
    assert 0 < stopped.steps_done < 400 and stopped.steps_saved == 400 - stopped.steps_done
    assert stopped.steps_after_cancel is not None and stopped.steps_after_cancel <= 1
    assert renderer.scheduler.tracked() == {"scheduler_rows": 0, "scheduler_pending": 0}
    with pytest.raises(asyncio.CancelledError):     # a clip of the story arriving later is refused
        with scope.track("a"):
            pass


def test_a_direct_callers_cancel_is_polled_and_an_engine_failure_is_raised():
    engine = FakeStep(4, delay=0.005, fail_at=3)
    scheduler = StepScheduler(engine)
    r = ClipRenderer(scheduler, fake_vae, poll_s=0.01)
    try:
        with pytest.raises(RuntimeError, match="engine on fire"):
            asyncio.run(r.render(meta(steps=10), cond(1)))
        flag = threading.Event()
        threading.Timer(0.05, flag.set).start()
        got = asyncio.run(r.render(meta(steps=2000), cond(1), flag.is_set))
        assert isinstance(got, Stopped) and got.steps_done < 2000 and got.steps_after_cancel <= 1
        assert isinstance(asyncio.run(r.render(meta(), cond(1), lambda: True)), Stopped)   # before it starts
    finally:
        scheduler.close()


def test_clips_take_the_gates_oldest_story_and_lowest_index_first_and_a_story_at_most_its_share():
    """A freed slot goes to the oldest story's lowest clip index (the clip a listener needs next),
    and at most ``clips_per_story`` clips of one story denoise at once."""
    scheduler = StepScheduler(FakeStep(8, delay=0.002))
    order, most = [], [0]
    real = scheduler.render

    def spy(*a, **kw):
        order.append(a[2])              # the clip's rendered length tells which clip it is
        most[0] = max(most[0], scheduler.active + 1)
        return real(*a, **kw)
    scheduler.render = spy

    def clip_of(story_at, k, steps=3):
        m = meta(k, steps=steps, render_s=story_at + k)
        return ClipMeta(**{**m.__dict__, "plan_id": f"plan-{story_at}", "arrival": story_at})

    async def main(renderer, clips):
        first = asyncio.ensure_future(renderer.render(clips[0], cond(0)))
        await asyncio.sleep(0.01)       # holds the only slot; the others queue in reverse order
        rest = [asyncio.ensure_future(renderer.render(m, cond(1))) for m in clips[1:]]
        return await asyncio.gather(first, *rest)
    try:
        one_slot = ClipRenderer(scheduler, fake_vae, clips_per_story=5, max_clips=1)
        clips = [clip_of(20.0, 9, steps=100), clip_of(20.0, 3), clip_of(10.0, 2), clip_of(20.0, 1), clip_of(10.0, 1)]
        assert all(isinstance(x, RenderedClip) for x in asyncio.run(main(one_slot, clips)))
        assert order == [29.0, 11.0, 12.0, 21.0, 23.0]
        order.clear()
        two_per_story = ClipRenderer(scheduler, fake_vae, clips_per_story=2, max_clips=8)
        many = [clip_of(1.0, k) for k in range(6)]
        assert all(isinstance(x, RenderedClip) for x in asyncio.run(main(two_per_story, many)))
        assert most[0] == 2 and sorted(order) == [1.0 + k for k in range(6)]
    finally:
        scheduler.close()


# ---- the story runner ----------------------------------------------------------------------------


class Response:
    def __init__(self, kind, payload=None, error=""):
        self.kind, self.payload, self.error = kind, payload, error


class FakeStages:
    """Stage clients for one story: a plan of ``clips`` entries; each clip's stream answers with a
    clip (or ``render_error``); the client takes what it is sent unless ``gone``."""

    llm, sampler = "llm", "dit_sampler"

    def __init__(self, clips=3, plan_error="", render_error="", cancel_after=None, gone=False, board=None,
                 render_delay=0.0):
        self.clips, self.plan_error, self.render_error = clips, plan_error, render_error
        self.cancel_after, self.gone, self.board, self.render_delay = cancel_after, gone, board, render_delay
        self.sent, self.failed, self.finished, self.cancels = [], [], 0, []

    def plan(self):
        for k in range(self.clips):
            yield Response(story.ENTRY, k)
        if self.plan_error:
            yield Response(story.ERROR, error=self.plan_error)

    async def bridge(self, entry):
        return ("cond", entry.payload)

    def render(self, cond):
        time.sleep(self.render_delay)
        if self.render_error:
            yield Response(story.ERROR, error=self.render_error)
            return
        yield Response(story.CLIP, cond[1])
        yield Response(story.EMPTY)

    def kind(self, response):
        return response.kind, response.error

    async def send(self, response):
        if self.gone:
            return False
        self.sent.append(response.payload)
        return True

    async def fail(self, message, code):
        self.failed.append((message, code))

    async def finish(self):
        self.finished += 1

    async def cancel(self, names):
        self.cancels.append(names)

    def cancelled(self):
        return self.cancel_after is not None and len(self.sent) >= self.cancel_after

    def stages(self):
        return self.board


def run_story(clients, timeout_s=30.0):
    counted = []
    runner = story.StoryRunner(clients, DaemonCalls(64, "test"), timeout_s, 0.01, counted.append)
    stop = asyncio.run(runner.run())
    return stop, counted


def test_a_story_sends_every_clip_then_its_final_response():
    clients = FakeStages(clips=3)
    stop, counted = run_story(clients)
    assert stop.reason is story.Reason.DONE and counted == []
    assert sorted(clients.sent) == [0, 1, 2] and clients.finished == 1
    assert clients.failed == [] and clients.cancels == []


@pytest.mark.parametrize("case", ["render error", "unusable plan", "timeout", "client cancel", "caller gone",
                                  "stage down", "stage died under a clip"])
def test_how_a_story_ends_is_decided_once_what_the_client_hears_and_which_stages_stop(case):
    board = {"llm": stages.Stage(), "dit_sampler": stages.Stage()}
    clients = {
        "render error": FakeStages(render_error="bridge: shape mismatch"),
        "unusable plan": FakeStages(clips=1, plan_error=f"llm: {MODEL_FAILED}: no clip", render_delay=0.5),
        "timeout": FakeStages(render_delay=1.0),
        "client cancel": FakeStages(cancel_after=1, render_delay=0.05),
        "caller gone": FakeStages(gone=True),
        "stage down": FakeStages(render_delay=1.0, board=board),
        "stage died under a clip": FakeStages(board=board,
                                              render_error="Stub process 'dit_sampler_0_0' is not healthy."),
    }[case]
    if case == "stage down":
        threading.Timer(0.1, lambda: board.update(
            dit_sampler=stages.Stage(stages.RESTARTING, 1, "its process died"))).start()
    stop, counted = run_story(clients, timeout_s=0.3 if case == "timeout" else 30.0)
    both = [["llm", "dit_sampler"]]
    expected = {   # (why, what the client is told, the final response, which stages get the cancel, counter)
        "render error": (story.Reason.ERROR, [("dit_sampler: bridge: shape mismatch", story.Code.INTERNAL)], 0,
                         both, []),
        "unusable plan": (story.Reason.ERROR, [(f"llm: {MODEL_FAILED}: no clip", story.Code.UNKNOWN)], 0, both, []),
        "timeout": (story.Reason.TIMEOUT, [("story not finished within story_timeout_s = 0.3 s; cancelled",
                                            story.Code.INTERNAL)], 0, both, ["timed_out"]),
        "client cancel": (story.Reason.CANCELLED, [], 1, both, ["cancelled"]),
        "caller gone": (story.Reason.CANCELLED, [], 0, both, ["cancelled"]),
        "stage down": (story.Reason.UNAVAILABLE, None, 0, [["llm"]], ["unavailable"]),
        "stage died under a clip": (story.Reason.UNAVAILABLE, None, 0, [["llm"]], ["unavailable"]),
    }[case]
    reason, failed, finished, cancels, counters = expected
    assert stop.reason is reason
    if failed is None:
        assert [c for _, c in clients.failed] == [story.Code.UNAVAILABLE]
        assert clients.failed[0][0].startswith("stage dit_sampler is down: "), clients.failed
    else:
        assert clients.failed == failed
    assert (clients.finished, clients.cancels, counted) == (finished, cancels, counters)


def test_a_stream_past_the_thread_limit_fails_the_story_at_once_with_the_reason():
    """Blocking streams run on a bounded set of threads; a clip whose stream finds none ends the
    story with an error naming the limit (it used to wait, unanswered, for the story's timeout)."""
    clients = FakeStages(clips=3, render_delay=0.2)
    counted = []
    runner = story.StoryRunner(clients, DaemonCalls(2, "story"), 30.0, 0.01, counted.append)
    t0 = time.monotonic()
    stop = asyncio.run(runner.run())
    assert time.monotonic() - t0 < 5
    assert stop.reason is story.Reason.ERROR
    assert clients.failed == [("dit_sampler: story: 2 blocking calls running (limit 2)", story.Code.INTERNAL)]
