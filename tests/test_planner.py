"""The vLLM planner (real engines, tiny checkpoint) against the reference's transformers generate."""
import asyncio

import numpy as np
import pytest

from audiostory_ensemble.grammar import NoClipError, build_instruction, build_prompt, parse_plan
from audiostory_ensemble.planner import PlannedClip, PlanRequest, Planner, scale_to_total
from audiostory_ensemble.serving import LoopThread


@pytest.fixture(scope="module")
def planner(converted):
    loop = LoopThread("test-planner")
    p = Planner(converted)
    loop.run(p.start(), timeout=600)
    yield p, loop
    p.shutdown()
    loop.stop()


def run_plan(planner, request):
    p, loop = planner

    async def collect():
        return [c async for c in p.plan(request)]

    return loop.run(collect(), timeout=300)


def reference_plan(reference, caption, total, seed=0, max_new_tokens=1600):
    prompt = reference.tokenizer.encode(build_prompt(build_instruction(caption, total, seed)), add_special_tokens=False)
    gen, hidden = reference.generate(prompt, max_new_tokens)
    return gen, hidden


def test_tokens_and_hidden_states_equal_the_reference(planner, reference, sample_instructions):
    p, _ = planner
    for k, (caption, total) in enumerate(sample_instructions[:4]):
        clips = run_plan(planner, PlanRequest(caption, total, request_id=f"parity-{k}"))
        ref_ids, hidden = reference_plan(reference, caption, total)
        assert p.summaries[f"parity-{k}"].generated_ids == ref_ids
        plan = parse_plan(ref_ids, reference.tok, reference.tokenizer.decode)
        assert [c.caption for c in clips] == [c.caption for c in plan.clips]
        assert [c.duration for c in clips] == [c.duration for c in plan.clips]
        assert [c.is_last for c in clips] == [False] * (len(clips) - 1) + [True]
        n, m = reference.tok.n, reference.tok.m
        for clip, span in zip(clips, plan.clips):
            np.testing.assert_allclose(clip.sem, hidden[span.t5_pos:span.t5_pos + n].numpy(), rtol=0, atol=1e-4)
            np.testing.assert_allclose(clip.res, hidden[span.aud_pos:span.aud_pos + m].numpy(), rtol=0, atol=1e-4)
        starts = np.cumsum([0.0] + [c.duration for c in clips[:-1]])
        np.testing.assert_allclose([c.start_s for c in clips], starts)


def test_concurrent_plans_equal_solo_plans(planner, sample_instructions):
    p, loop = planner
    requests = [PlanRequest(c, t, seed=s, request_id=f"solo-{i}")
                for i, ((c, t), s) in enumerate(zip(sample_instructions[:4], (0, 1, 2, 3)))]
    solo = [run_plan(planner, r) for r in requests]

    async def together():
        async def one(r):
            return [c async for c in p.plan(PlanRequest(r.instruction, r.total_duration, seed=r.seed))]
        return await asyncio.gather(*(one(r) for r in requests))

    for alone, joint in zip(solo, loop.run(together(), timeout=300)):
        assert [(c.caption, c.duration, c.is_last) for c in alone] == [(c.caption, c.duration, c.is_last) for c in joint]
        for a, b in zip(alone, joint):
            np.testing.assert_allclose(a.sem, b.sem, atol=1e-4)
            np.testing.assert_allclose(a.res, b.res, atol=1e-4)


def test_first_clip_is_released_before_the_last_clip_is_generated(planner, sample_instructions):
    p, _ = planner
    caption, total = sample_instructions[2]
    clips = run_plan(planner, PlanRequest(caption, total, request_id="order"))
    gen = p.summaries["order"].generated_ids
    plan = parse_plan(gen, p.tok, p.tokenizer.decode)
    assert len(clips) >= 2
    # Clip 0 was released as soon as clip 1 was complete, before the plan was finished.
    assert clips[0].generated_tokens == plan.clips[1].end_pos + 1 < len(gen)
    assert [c.generated_tokens for c in clips] == sorted(c.generated_tokens for c in clips)


def test_exact_duration_policy_sums_to_the_request(planner, sample_instructions):
    caption, total = sample_instructions[3]
    model = run_plan(planner, PlanRequest(caption, total, duration_policy="model"))
    exact = run_plan(planner, PlanRequest(caption, total, duration_policy="exact"))
    assert abs(sum(c.duration for c in exact) - total) < 1e-6
    expected = scale_to_total(model, total)
    np.testing.assert_allclose([c.duration for c in exact], [c.duration for c in expected])
    np.testing.assert_allclose([c.start_s for c in exact], [c.start_s for c in expected])


def test_scale_to_total_scales_and_recomputes_starts():
    z = np.zeros((1, 1), np.float32)
    clips = [PlannedClip(i, f"c{i}", d, d, 0.0, i == 2, z, z) for i, d in enumerate([10.0, 20.0, 10.0])]
    out = scale_to_total(clips, 60.0)
    assert [c.duration for c in out] == [15.0, 30.0, 15.0]
    assert [c.start_s for c in out] == [0.0, 15.0, 45.0]
    assert [c.llm_duration for c in out] == [10.0, 20.0, 10.0]


def test_token_limit_cut_drops_the_incomplete_clip(planner, reference, sample_instructions):
    p, _ = planner
    caption, total = sample_instructions[0]
    full_ids, _ = reference_plan(reference, caption, total)
    plan = parse_plan(full_ids, reference.tok, reference.tokenizer.decode)
    cut = plan.clips[1].t5_pos + 2            # in the middle of clip 1's <t5> run
    clips = run_plan(planner, PlanRequest(caption, total, max_new_tokens=cut, request_id="cut"))
    assert [c.caption for c in clips] == [plan.clips[0].caption]
    # Clip 1 was cut: clip 0 is the story's last clip (as the reference renders it), and the drop
    # is reported.
    assert clips[0].is_last
    summary = p.summaries["cut"]
    assert len(summary.generated_ids) == cut and summary.dropped and "token limit" in summary.dropped[0]


def test_no_complete_clip_is_a_typed_error(planner, reference, sample_instructions):
    caption, total = sample_instructions[0]
    full_ids, _ = reference_plan(reference, caption, total)
    plan = parse_plan(full_ids, reference.tok, reference.tokenizer.decode)
    with pytest.raises(NoClipError) as e:
        run_plan(planner, PlanRequest(caption, total, max_new_tokens=plan.clips[0].aud_pos))
    assert e.value.text  # the generated text travels with the error, for the log


def test_a_dead_engine_is_an_error_not_a_hang(planner, sample_instructions):
    """Runs last in this module: it kills the engines' processes."""
    import os
    import signal

    from audiostory_ensemble.planner import PlannerError
    from audiostory_ensemble.serving import _descendants

    killed = 0
    for pid in _descendants(os.getpid()):
        try:
            title = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ")
        except OSError:
            continue
        if b"EngineCore" in title:
            os.kill(pid, signal.SIGKILL)
            killed += 1
    assert killed >= 1
    caption, total = sample_instructions[0]
    with pytest.raises(PlannerError, match="engine"):
        run_plan(planner, PlanRequest(caption, total))
