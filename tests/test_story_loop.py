"""What every model.py does with the python backend (serving/adapter.py: parameters, error
responses, a BLS request re-sent after silence), the cancel fan-out
(serving/control.py) and the front door's story loop (pipeline/story.py), on a small fake of
``triton_python_backend_utils``: the orchestration, testable without a server."""
import pytest

from audiostory_ensemble.pipeline.request import RequestError
from tests.fake_triton import FakeTriton


def test_model_parameters_are_read_one_way():
    import json

    from audiostory_ensemble.serving.adapter import Parameters

    config = {"parameters": {"threads": {"string_value": "3"}, "limits": {"string_value": '{"max_steps": 9}'},
                             "gpus": {"string_value": "[1, 2]"}, "poll_s": {"string_value": "0.5"}}}
    p = Parameters({"model_config": json.dumps(config), "model_name": "bridge"})
    assert (p.int("threads", 1), p.int("absent", 7), p.float("poll_s", 1.0), p.json("gpus", [])) == (3, 7, 0.5, [1, 2])
    assert p.get("absent") is None and p.get("absent", "x") == "x" and p.json("absent", {}) == {}
    assert p.limits().max_steps == 9 and p.limits().min_steps == 1
    with pytest.raises(KeyError, match="bridge: the config has no parameter 'checkpoint'"):
        p.require("checkpoint")


def test_error_responses_carry_the_code_a_client_can_act_on():
    from audiostory_ensemble.serving.adapter import error_response, send_error

    pb = FakeTriton
    bad = error_response(pb, RequestError("SEED must be an integer"))
    assert (bad.error.message, bad.error.code) == ("SEED must be an integer", "INVALID_ARG")
    assert error_response(pb, RuntimeError("engine died")).error.code == "INTERNAL"
    assert error_response(pb, "busy", pb.TritonError.UNAVAILABLE).error.code == "UNAVAILABLE"
    sent = []

    class Sender:
        def send(self, response, flags=0):
            sent.append((response, flags))
    send_error(pb, Sender(), RequestError("x"))
    assert sent[0][0].error.code == "INVALID_ARG" and sent[0][1] == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class _Result:
    """A BLS result that is its own error and its own output tensor: an error when its answer is
    text, else the answer is the output."""

    def __init__(self, answer):
        self.answer = answer

    def has_error(self):
        return isinstance(self.answer, str)

    def error(self):
        return self

    def message(self):
        return "model instance failed"

    def as_numpy(self):
        return self.answer


def _bls_fake(answers: list):
    """A python backend whose BLS requests take their answers, in order, from ``answers``:
    "silent" (no answer), "error", or an array (the output)."""
    import asyncio

    sent = []

    class Request:
        def __init__(self, model_name, inputs, requested_output_names):
            sent.append((model_name, inputs, requested_output_names))
            self.answer = answers[len(sent) - 1]

        async def async_exec(self):
            if isinstance(self.answer, str) and self.answer == "silent":
                await asyncio.sleep(3600)
            return _Result(self.answer)

    class Pb(FakeTriton):
        InferenceRequest = Request

        @staticmethod
        def get_output_tensor_by_name(result, name):
            return result

    return Pb, sent


def test_a_bls_request_with_no_answer_is_sent_again_and_an_error_answer_is_not():
    import asyncio

    import numpy as np

    from audiostory_ensemble.serving.adapter import bls_output

    def call(answers, attempts=3):
        pb, sent = _bls_fake(answers)
        retries = []
        try:
            out = asyncio.run(bls_output(pb, "vae_decoder", ["latent"], "wave", 0.05, attempts,
                                         lambda model, attempt: retries.append(attempt)))
        except RuntimeError as e:
            out = str(e)
        return out, len(sent), retries

    wave = np.arange(4.0)
    out, sends, retries = call(["silent", "silent", wave])
    assert out is wave and sends == 3 and retries == [1, 2]
    assert call([wave]) == (wave, 1, [])
    assert call(["error", wave]) == ("vae_decoder: model instance failed", 1, [])       # not re-sent
    assert call(["silent"] * 3) == ("vae_decoder: no answer within 0.05 s, 3 attempts", 3, [1, 2])
    pb, sent = _bls_fake([wave])
    asyncio.run(bls_output(pb, "vae_decoder", ["latent"], "wave", 1.0, 1))
    assert sent == [("vae_decoder", ["latent"], ["wave"])]


def test_a_dit_step_chunk_with_no_answer_is_sent_again_and_an_error_fails_the_iteration():
    """The Triton step engine (dit_sampler's gpu path) re-sends a chunk whose BLS request is not
    answered in time (its rows travel with the request) and fails the iteration only after silence
    every time or an error answer."""
    import threading
    import time

    import numpy as np

    from audiostory_ensemble.serving.step_engines import TritonStepEngine

    def engine(answers, attempts=3, max_batch=2):
        sent, lock = [], threading.Lock()

        class Request:
            def __init__(self, model_name, inputs, requested_output_names, timeout):
                self.inputs = {t.name: t.array for t in inputs}
                with lock:
                    sent.append((model_name, timeout))
                    self.answer = answers[len(sent) - 1]

            def exec(self):
                if self.answer == "silent":
                    time.sleep(1.0)          # longer than the timeout: the engine stops waiting
                return _Result("error" if self.answer == "error" else self.inputs["x"] + 1)

        class Pb(FakeTriton):
            InferenceRequest = Request

            class Tensor:
                def __init__(self, name, array):
                    self.name, self.array = name, array

            @staticmethod
            def get_output_tensor_by_name(result, name):
                return result

        retries = []
        e = TritonStepEngine(Pb, "dit_step", 4, 3, max_batch, timeout_s=0.1, attempts=attempts,
                             on_retry=lambda model, attempt: retries.append((model, attempt)))
        e.x[:] = np.arange(4, dtype=np.float32)[:, None, None]
        try:
            e.step(3, np.ones(3, np.float32), np.zeros(3, np.float32))
            out = e.x[:3, 0, 0].tolist()
        except RuntimeError as err:
            out = str(err)
        finally:
            e.close()
        return out, sent, retries

    out, sent, retries = engine(["silent", "ok", "ok"])     # chunk 0 (rows 0-1) silent once, then answered
    assert out == [1.0, 2.0, 3.0] and len(sent) == 3 and retries == [("dit_step", 1)]
    assert sent[0] == ("dit_step", 100_000)                 # Triton's timeout, in microseconds
    assert engine(["ok", "error"])[0] == "dit_step: model instance failed"
    out, sent, retries = engine(["silent", "ok", "silent", "silent"])
    assert out == "dit_step: no answer within 0.1 s, 3 attempts" and len(retries) == 2


def test_a_story_cancel_reaches_every_stage_at_once_and_reports_the_ones_that_failed():
    import threading

    from audiostory_ensemble.serving import control

    arrived = {"llm": threading.Event(), "dit_sampler": threading.Event(), "bridge": threading.Event()}
    sent = []

    class Response:               # a response is its own error, as far as the caller reads it
        def __init__(self, message=""):
            self.text = message

        def has_error(self):
            return bool(self.text)

        def error(self):
            return self

        def message(self):
            return self.text

    class Request:
        def __init__(self, model_name, inputs, requested_output_names):
            self.model, self.inputs = model_name, inputs

        def exec(self, decoupled):
            sent.append((self.model, self.inputs[0].name, self.inputs[0].value[0]))
            arrived[self.model].set()
            if self.model == "llm":       # the planner's abort is slow: the sampler must not wait for it
                assert arrived["dit_sampler"].wait(10), "the sampler's cancel waited for the planner's"
                return iter([Response()])
            if self.model == "bridge":
                raise RuntimeError("stub gone")
            return iter([Response("busy")])

    class Pb:
        InferenceRequest = Request

        class Tensor:
            def __init__(self, name, value):
                self.name, self.value = name, value

    errors = control.cancel_story_sync(Pb, "k" * 32, ("llm", "dit_sampler", "bridge"))
    assert sorted(m for m, _, _ in sent) == ["bridge", "dit_sampler", "llm"]
    assert {(name, key) for _, name, key in sent} == {(control.CANCEL_INPUT, b"k" * 32)}
    assert errors == ["dit_sampler: busy", "bridge: RuntimeError: stub gone"]
    # A target that never answers (a stage that died, not yet known dead) is reported, not waited for.
    never = threading.Event()

    class Silent(Request):
        def exec(self, decoupled):
            never.wait(60)
            return iter([])

    Pb.InferenceRequest = Silent
    import time
    t0 = time.monotonic()
    assert control.cancel_story_sync(Pb, "k" * 32, ("llm",), timeout_s=0.2) == [
        "llm: no answer to the cancel within 0.2 s"]
    assert time.monotonic() - t0 < 5
    never.set()


def test_blocking_calls_given_up_on_are_counted_until_they_return():
    import asyncio
    import threading

    from audiostory_ensemble.runtime.loop import DaemonCalls

    release = threading.Event()

    async def main():
        calls = DaemonCalls(limit=2, name="t")
        loop = asyncio.get_running_loop()
        assert await calls.run(loop, lambda: 7) == 7
        stuck = calls.run(loop, lambda: release.wait(30))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(stuck, 0.05)               # the caller gives up: the future is cancelled
        assert (calls.running, calls.stuck) == (1, 1)
        other = calls.run(loop, lambda: release.wait(30))
        with pytest.raises(RuntimeError, match="limit 2"):
            calls.run(loop, lambda: None)
        release.set()
        await other
        for _ in range(100):
            if not calls.running:
                break
            await asyncio.sleep(0.01)
        assert (calls.running, calls.stuck) == (0, 0)
        with pytest.raises(ZeroDivisionError):
            await calls.run(loop, lambda: 1 / 0)

    asyncio.run(main())


def test_tasks_by_key_track_and_cancel_what_is_in_flight():
    import asyncio

    from audiostory_ensemble.runtime.gates import TasksByKey

    async def main():
        reg = TasksByKey()
        started = asyncio.Event()

        async def work(key):
            with reg.track(key):
                started.set()
                await asyncio.sleep(30)

        a1, a2, b = (asyncio.ensure_future(work(k)) for k in ("a", "a", "b"))
        await started.wait()
        await asyncio.sleep(0)
        assert len(reg) == 2
        assert reg.cancel("a") == 2 and reg.cancel("nobody") == 0
        await asyncio.gather(a1, a2, return_exceptions=True)
        assert a1.cancelled() and a2.cancelled() and not b.done() and len(reg) == 1
        reg.cancel("b", asyncio.get_running_loop())      # the thread-safe path
        await asyncio.gather(b, return_exceptions=True)
        assert b.cancelled() and len(reg) == 0

    asyncio.run(main())


def test_the_story_loop_starts_a_clip_per_plan_entry_and_ends_when_every_stream_has():
    from audiostory_ensemble.pipeline import story

    loop = story.StoryLoop("llm", "dit_sampler", timeout_s=30.0, started_at=100.0)
    assert loop.response(story.PLAN, story.ENTRY) == story.Action("start_clip", tag="clip0")
    assert loop.response(story.PLAN, story.ENTRY).tag == "clip1"
    assert loop.response(story.PLAN, story.EMPTY) == story.WAIT          # the plan stream's final flag
    assert loop.response("clip0", story.CLIP).kind == "send"
    assert loop.response("clip0", story.EMPTY) == story.WAIT
    assert loop.stream_ended(story.PLAN) == story.WAIT                    # the plan's
    assert loop.stream_ended("clip0") == story.WAIT
    assert loop.idle(now=110.0, cancelled=False) == story.WAIT
    assert loop.response("clip1", story.CLIP).kind == "send"
    assert loop.stream_ended("clip1") == story.Action("stop", reason="done")     # nothing open
    assert loop.clips == 2


def test_the_story_loop_stops_for_a_cancel_a_timeout_or_a_stage_error_with_the_stage_named():
    from audiostory_ensemble.pipeline import story

    def fresh():
        loop = story.StoryLoop("llm", "dit_sampler", timeout_s=30.0, started_at=100.0)
        loop.response(story.PLAN, story.ENTRY)
        return loop

    assert fresh().idle(now=101.0, cancelled=True).reason == "cancelled"
    assert fresh().response("clip0", story.CLIP, cancelled=True).reason == "cancelled"   # never sent
    timeout = fresh().idle(now=130.5, cancelled=False)
    assert (timeout.reason, timeout.message) == ("timeout", "story not finished within story_timeout_s = 30 s; "
                                                            "cancelled")
    planner = fresh().response(story.PLAN, story.ERROR, error="malformed plan at clip 0")
    assert (planner.reason, planner.message) == ("error", "llm: malformed plan at clip 0")
    sampler = fresh().response("clip0", story.ERROR, error="bridge: shape mismatch")
    assert sampler.message == "dit_sampler: bridge: shape mismatch"
    named = fresh().response("clip0", story.ERROR, error="dit_sampler: bad _META")
    assert named.message == "dit_sampler: bad _META"                      # not named twice
    vllm = fresh().response(story.PLAN, story.ERROR, error="vllm refused the prompt")
    assert vllm.message == "llm: vllm refused the prompt"                 # "llm" inside a word is not the name


def test_a_response_the_caller_never_takes_is_given_up_counted_and_reported():
    """The front door sends from threads: a send that blocks (its caller died) is given up after the
    timeout, counted as stuck while its thread lives, and reported; a taken one returns True."""
    import asyncio
    import threading

    from audiostory_ensemble.serving.stage_clients import ThreadedSends

    release, sent, stuck_calls = threading.Event(), [], []

    class Sender:
        def __init__(self, blocks):
            self.blocks = blocks

        def send(self, response=None, flags=0):
            if self.blocks:
                release.wait(10)
            sent.append((response, flags))

    sends = ThreadedSends(FakeTriton, 4, 0.1, lambda: stuck_calls.append(1))

    async def main():
        return await sends.send(Sender(False), "clip"), await sends.send(Sender(True), "clip")
    assert asyncio.run(main()) == (True, False)
    assert sends.stuck == 1 and stuck_calls == [1] and sent == [("clip", 0)]
    release.set()
    for _ in range(100):
        if sends.stuck == 0:
            break
        threading.Event().wait(0.01)
    assert sends.stuck == 0                     # its thread returned: no longer stuck
    err = asyncio.run(sends.error(Sender(False), "bad input", FakeTriton.TritonError.INVALID_ARG))
    assert err and sent[-1][0].error.code == "INVALID_ARG" and sent[-1][1] == 1
