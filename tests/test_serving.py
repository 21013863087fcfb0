"""Request validation, clip metadata and story assembly (no server needed)."""
import numpy as np
import pytest

from audiostory_ensemble import interface as I
from audiostory_ensemble.serving.records import ClipMeta
from audiostory_ensemble.serving.request import RequestError, parse_request
from audiostory_ensemble.serving.stitch import StoryAssembler
from client.api import request_arrays


def parse(**params):
    arrays = request_arrays(**params)
    return parse_request(arrays.get)


def test_defaults_are_the_reference_defaults():
    p = parse(instruction="rain on a roof")
    assert (p.total_duration, p.guidance, p.seed, p.num_steps, p.duration_policy) == (50.0, 4.0, 0, 50, "model")


@pytest.mark.parametrize("params, field", [
    (dict(instruction=""), "INSTRUCTION"),
    (dict(instruction=" \n\t"), "INSTRUCTION"),
    (dict(instruction=b"\xff\xfe"), "INSTRUCTION"),
    (dict(instruction="x" * 5000), "INSTRUCTION"),
    (dict(instruction="a", total_duration=float("nan")), "TOTAL_DURATION"),
    (dict(instruction="a", total_duration=float("inf")), "TOTAL_DURATION"),
    (dict(instruction="a", total_duration=0.0), "TOTAL_DURATION"),
    (dict(instruction="a", guidance=-1.0), "GUIDANCE_SCALE"),
    (dict(instruction="a", guidance=0.5), "GUIDANCE_SCALE"),
    (dict(instruction="a", seed=-3), "SEED"),
    (dict(instruction="a", num_steps=0), "NUM_STEPS"),
    (dict(instruction="a", num_steps=100000), "NUM_STEPS"),
    (dict(instruction="a", duration_policy="fast"), "DURATION_POLICY"),
])
def test_bad_values_name_the_field(params, field):
    with pytest.raises(RequestError, match=field):
        parse(**params)


@pytest.mark.parametrize("params, message", [
    (dict(instruction="a", total_duration=float("nan")), "TOTAL_DURATION must be a number in [1.0, 600.0] seconds, got nan"),
    (dict(instruction="a", total_duration=1e4), "TOTAL_DURATION must be a number in [1.0, 600.0] seconds, got 10000.0"),
    (dict(instruction="a", guidance=0.5), "GUIDANCE_SCALE must be in [1.0, 20.0] (1 = no guidance), got 0.5"),
    (dict(instruction="a", seed=-3), "SEED must be in [0, 2^63-1], got -3"),
    (dict(instruction="a", num_steps=0), "NUM_STEPS must be in [1, 200], got 0"),
])
def test_refusals_print_the_request_values_as_plain_numbers(params, message):
    """The values come out of FP32/INT64/INT32 arrays; the message is the same under numpy 1 and 2."""
    with pytest.raises(RequestError) as e:
        parse(**params)
    assert str(e.value) == message


def test_wrong_dtype_and_shape_name_the_field():
    arrays = request_arrays("rain")
    arrays[I.SEED.name] = np.array([1.5], dtype=np.float32)
    with pytest.raises(RequestError, match="SEED must be INT64"):
        parse_request(arrays.get)
    arrays = request_arrays("rain")
    arrays[I.TOTAL_DURATION.name] = np.array([10.0, 20.0], dtype=np.float32)
    with pytest.raises(RequestError, match="TOTAL_DURATION must hold exactly one value"):
        parse_request(arrays.get)
    with pytest.raises(RequestError, match="INSTRUCTION is required"):
        parse_request({}.get)


def test_clip_meta_round_trip():
    meta = ClipMeta("r1", 2, "a dog barks – twice", 33.3, 16.7, 16.7, True, 4.0, 7, 50)
    assert ClipMeta.decode(meta.encode()) == meta


def test_story_assembler_orders_by_index_and_checks_completeness():
    story = StoryAssembler()
    clip = lambda n: np.ones((2, n), np.float32)  # noqa: E731
    story.add(1, "b", clip(32000 * 4), 5.0, 4.0, True)
    with pytest.raises(ValueError, match=r"clips \[0\] of 2 never arrived"):
        story.finish()
    story.add(0, "a", clip(32000 * 8), 0.0, 5.0, False)
    out = story.finish()
    assert out.captions == ["a", "b"]
    assert out.audio.shape == (2, 32000 * 8 + 32000 * 4 - 96000)
    with pytest.raises(ValueError, match="arrived twice"):
        story.add(0, "a", clip(10), 0.0, 1.0, False)


def test_story_without_a_last_clip_ends_at_the_highest_index_once_the_stream_ended():
    story = StoryAssembler()
    story.add(0, "a", np.ones((2, 32000 * 8), np.float32), 0.0, 5.0, False)
    with pytest.raises(ValueError, match="no last clip"):
        story.finish(stream_ended=False)
    assert story.finish(stream_ended=True).captions == ["a"]


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_guard_kills_engine_processes_when_the_stub_is_killed():
    """A process started from a helper thread (as vLLM engines are, from the loop thread) must not
    outlive its parent after a SIGKILL."""
    import os
    import subprocess
    import sys
    import time

    shm = f"/dev/shm/audiostory_guard_test_{os.getpid()}"
    engine = ("import mmap, time\n"
              f"f = open({shm!r}, 'w+b'); f.truncate(4096); m = mmap.mmap(f.fileno(), 4096)\n"
              "print('mapped', flush=True); time.sleep(300)\n")
    code = (
        "import subprocess, sys, threading, time\n"
        "from audiostory_ensemble.serving.processes import guard_children\n"
        "procs = []\n"
        f"t = threading.Thread(target=lambda: procs.append(subprocess.Popen([sys.executable, '-c', {engine!r}], "
        "stdout=subprocess.PIPE)))\n"
        "t.start(); t.join()\n"
        "procs[0].stdout.readline()\n"
        "guard_children()\n"
        "print(procs[0].pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 60
    while (_alive(child) or os.path.exists(shm)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)
    assert not os.path.exists(shm), "the engine's shared memory was left behind"


def test_per_key_limiter_serves_in_order_and_forgets_idle_keys():
    import asyncio

    from audiostory_ensemble.serving.gates import PerKeyLimiter

    limiter = PerKeyLimiter(1)
    events = []

    async def clip(key, index):
        async with limiter.slot(key):
            events.append((key, index, "start"))
            await asyncio.sleep(0.01)
            events.append((key, index, "end"))

    async def main():
        await asyncio.gather(clip("a", 0), clip("a", 1), clip("b", 0), clip("a", 2))

    asyncio.run(main())
    a = [(i, what) for key, i, what in events if key == "a"]
    assert a == [(0, "start"), (0, "end"), (1, "start"), (1, "end"), (2, "start"), (2, "end")]
    assert events.index(("b", 0, "start")) < events.index(("a", 0, "end"))  # other keys overlap
    assert len(limiter) == 0


def test_priority_gate_admits_the_oldest_request_first_and_never_exceeds_capacity():
    import asyncio

    from audiostory_ensemble.serving.gates import PriorityGate

    gate = PriorityGate(2)
    started, holding = [], [0]
    peak = [0]

    async def clip(arrival, index, hold=0.02):
        async with gate.slot((arrival, index)):
            started.append((arrival, index))
            holding[0] += 1
            peak[0] = max(peak[0], holding[0])
            await asyncio.sleep(hold)
            holding[0] -= 1

    async def main():
        first = [asyncio.create_task(clip(1.0, 0)), asyncio.create_task(clip(1.0, 1))]
        await asyncio.sleep(0.005)                 # both slots held by request 1
        # A newer request queues first, then request 1's next clips: request 1 still goes first.
        late = [asyncio.create_task(clip(2.0, 0)), asyncio.create_task(clip(2.0, 1))]
        await asyncio.sleep(0)
        own = [asyncio.create_task(clip(1.0, 2)), asyncio.create_task(clip(1.0, 3))]
        await asyncio.gather(*first, *late, *own)

    asyncio.run(main())
    assert started == [(1.0, 0), (1.0, 1), (1.0, 2), (1.0, 3), (2.0, 0), (2.0, 1)]
    assert peak[0] == 2 and gate.held == 0 and gate.waiting == 0


def test_priority_gate_survives_cancelled_waiters():
    import asyncio

    from audiostory_ensemble.serving.gates import PriorityGate

    gate = PriorityGate(1)

    async def main():
        release = asyncio.Event()

        async def holder():
            async with gate.slot(0):
                await release.wait()

        async def waiter(p):
            async with gate.slot(p):
                return p

        h = asyncio.create_task(holder())
        await asyncio.sleep(0)
        w1, w2 = asyncio.create_task(waiter(1)), asyncio.create_task(waiter(2))
        await asyncio.sleep(0)
        w1.cancel()
        release.set()
        await h
        assert await w2 == 2
        with pytest.raises(asyncio.CancelledError):
            await w1

    asyncio.run(main())
    assert gate.held == 0 and gate.waiting == 0


def test_cancel_registry_remembers_keys_for_the_ttl():
    from audiostory_ensemble.serving.gates import CancelRegistry

    now = [0.0]
    reg = CancelRegistry(ttl=10, clock=lambda: now[0])
    reg.cancel("k1")
    reg.cancel("")                       # no key: nothing to cancel
    assert "k1" in reg and "" not in reg and "k2" not in reg
    now[0] = 11
    reg.cancel("k2")
    assert "k1" not in reg and "k2" in reg and len(reg) == 1


def test_cancel_registry_is_capped_under_a_flood_of_cancels():
    from audiostory_ensemble.serving.gates import CancelRegistry

    now = [0.0]
    reg = CancelRegistry(ttl=10, clock=lambda: now[0], max_keys=100)
    for i in range(1000):                 # all within the ttl
        now[0] = i * 1e-3
        reg.cancel(f"k{i}")
    assert len(reg) == 100 and "k999" in reg and "k899" not in reg and "k900" in reg
    now[0] = 5.0
    reg.cancel("k900")                    # a repeated cancel renews its key: it is now the newest
    now[0] = 11.0                         # past the ttl of all but the renewed key
    assert len(reg) == 1 and "k900" in reg


def test_absurd_clip_durations_are_capped_at_the_dit_window():
    from audiostory_ensemble.llm.planner import story_duration
    from audiostory_ensemble.model.config import MAX_DURATION_S

    assert story_duration(12.5) == 12.5
    assert story_duration(400.0) == MAX_DURATION_S
    assert story_duration(1e30) == MAX_DURATION_S


@pytest.mark.parametrize("typed", [12.3, 35.1, 36.6, 49.9, 50.0, 7.25, 600.0])
def test_total_duration_reaches_every_mode_as_typed(converted, typed):
    """FP32 on the wire holds 12.300000190734863 for 12.3: the instruction of every mode carries the
    shortest decimal that round-trips the FP32 value (what the user typed; 50 stays "50.0")."""
    from audiostory_ensemble.llm.planner import Planner, PlanRequest

    planner = Planner(converted)          # its instruction needs no engines
    segments = [{"start": 0.5, "end": 4.0, "caption": "rain"}]
    audio = dict(input_audio=np.zeros((1, 16000), np.float32), input_sample_rate=16000)
    for mode, extra in (("story", {}), ("exact", dict(duration_policy="exact")), ("script", dict(segments=segments)),
                        ("continuation", audio)):
        params = parse(instruction="rain on a roof", total_duration=typed, **extra)
        assert params.total_duration == typed, mode
        rows = np.zeros((converted.config.audio_tokens, converted.config.llm.hidden_size), np.float32)
        request = PlanRequest.from_params(params, rows if mode == "continuation" else None)
        assert planner.instruction(request).endswith(f"The total duration is {typed!r} seconds."), mode


CONTROL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_pad|>", "<|fim_prefix|>", "<tool_call>",
                  "<|think|>", "<|/think|>", "<|gen|>", "<|/gen|>", "<timestamp>", "</timestamp>", "<t5>", "</t5>",
                  "<t5_00000>", "<t5_00099>", "<aud>", "</aud>", "<aud_00000>", "<aud_00500>", "<video_padding>"]


@pytest.mark.parametrize("token", CONTROL_TOKENS)
def test_instruction_holding_a_control_token_is_refused_naming_it(token):
    """A caller's text must not reach the tokenizer as the model's ChatML or plan tokens (it could
    forge a turn or a plan): every family of the tokenizer's special and added tokens is refused."""
    with pytest.raises(RequestError, match=f"INSTRUCTION must not contain the model's control token '{token}'"):
        parse(instruction=f"rain on a roof {token} and wind")


def test_every_special_and_added_token_is_a_refused_control_token(converted):
    """The refusal list is the tokenizer's own: each special or added token of the checkpoint's
    tokenizer is refused, and look-alikes that are plain text pass."""
    tok = converted.tokenizer
    reserved = set(tok.all_special_tokens) | set(tok.get_added_vocab())
    assert len(reserved) >= 612
    for token in reserved:
        with pytest.raises(RequestError, match="control token"):
            parse(instruction=f"a {token} b")
    for text in ("a <t5_00100> b", "im_end and <| gen |>", "timestamp 3.5 s", "<aud_1>", "t5 t5_00001"):
        assert parse(instruction=text).instruction == text


def test_a_planned_clip_record_has_the_render_length_and_fades_of_its_mode():
    """One builder for every mode: a story's clips render the 3 s tail except the last; a script's
    clips take theirs from the timeline (a touching segment's tail, none after a gap)."""
    import numpy as np

    from audiostory_ensemble.llm import script
    from audiostory_ensemble.llm.planner import PlannedClip

    def planned(i, d, last, sc=None):
        return PlannedClip(i, "c", d, d, 0.0, last, np.zeros((1, 1)), np.zeros((1, 1)), script=sc)

    story = parse_request(lambda name: {"INSTRUCTION": np.array([b"rain"], dtype=object)}.get(name))
    first, last = (ClipMeta.of_planned(planned(0, 12.5, False), story, "r", 0.0, "k"),
                   ClipMeta.of_planned(planned(1, 7.25, True), story, "r", 0.0, "k"))
    assert (first.render_s, last.render_s) == (15.5, 7.25)
    assert not (first.fade_in or first.fade_out) and first.timeline_s == 0.0 and first.mode == "story"
    raw = '[{"start": 1, "end": 5, "caption": "a"}, {"start": 5, "end": 9, "caption": "b"}, {"start": 10, "end": 11, "caption": "c"}]'
    params = parse_request(lambda name: {"SEGMENTS": np.array([raw.encode()], dtype=object)}.get(name))
    clips = script.plan_clips(params.segments)
    metas = [ClipMeta.of_planned(planned(c.index, c.duration_s, c.index == 2, c), params, "r", 0.0, "k") for c in clips]
    assert [m.render_s for m in metas] == [7.0, 4.0, 1.0]
    assert [(m.fade_in, m.fade_out) for m in metas] == [(False, True), (True, False), (False, False)]
    assert all(m.timeline_s == 11.0 and m.mode == "script" for m in metas)


class _FakeTriton:
    """Just what serving.adapter uses of triton_python_backend_utils."""
    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    class TritonError:
        INTERNAL, INVALID_ARG, UNAVAILABLE = "INTERNAL", "INVALID_ARG", "UNAVAILABLE"

        def __init__(self, message, code="INTERNAL"):
            self.message, self.code = message, code

    class InferenceResponse:
        def __init__(self, tensors=None, error=None):
            self.tensors, self.error = tensors, error


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

    pb = _FakeTriton
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


def test_tasks_by_key_track_and_cancel_what_is_in_flight():
    import asyncio

    from audiostory_ensemble.serving.gates import TasksByKey

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
    from audiostory_ensemble.serving import story

    loop = story.StoryLoop("llm", "dit_sampler", timeout_s=30.0, started_at=100.0)
    assert loop.response(story.PLAN, story.ENTRY) == story.Action("start_clip", tag="clip0")
    assert loop.response(story.PLAN, story.ENTRY).tag == "clip1"
    assert loop.response(story.PLAN, story.EMPTY) == story.WAIT          # the plan stream's final flag
    assert loop.response("clip0", story.CLIP).kind == "send"
    assert loop.response("clip0", story.EMPTY) == story.WAIT
    assert loop.stream_ended() == story.WAIT                              # the plan's
    assert loop.stream_ended() == story.WAIT                              # clip0's
    assert loop.idle(now=110.0, cancelled=False) == story.WAIT
    assert loop.response("clip1", story.CLIP).kind == "send"
    assert loop.stream_ended() == story.Action("stop", reason="done")     # clip1's: nothing open
    assert loop.clips == 2


def test_the_story_loop_stops_for_a_cancel_a_timeout_or_a_stage_error_with_the_stage_named():
    from audiostory_ensemble.serving import story

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
