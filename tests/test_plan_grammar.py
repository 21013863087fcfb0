"""The plan grammar (model/grammar.py: plan_grammar) on the tiny tokenizer, with llguidance's own
matcher as vLLM's guidance backend builds it: every plan the model is trained to write is admitted
part by part, what the grammar excludes is refused, and the check fails under a planted grammar
fault. (On the engines, greedy with the grammar against the unconstrained reference:
tests/test_planner.py.)"""
import json
import random

import pytest

from audiostory_ensemble import tiny_story
from audiostory_ensemble.model import grammar as G


@pytest.fixture(scope="module")
def ll(converted):
    import llguidance
    import llguidance.hf

    vocab = json.loads((converted.llm_dir / "config.json").read_text())["vocab_size"]
    # As vLLM's guidance backend makes it: the fast tokenizer, the larger of the two vocabularies.
    tokenizer = llguidance.hf.from_tokenizer(converted.tokenizer, max(vocab, len(converted.tokenizer)))
    return llguidance, tokenizer, converted


def walk(ll, ids, grammar=G.plan_grammar) -> str:
    """Feed generated ids through the part grammars as the planner runs them (a matcher per part,
    the forced runs appended, not matched). "" when every part admits its tokens, else why not."""
    llguidance, tokenizer, converted = ll
    tok = converted.token_ids
    stops = {tok.t5_open, tok.aud_open, tok.im_end, tok.endoftext}
    done, i = [], 0
    while i < len(ids):
        part = G.plan_part(tok, done)
        matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar(tok, part)),
                                       log_level=0)
        if matcher.is_error():
            return f"{part}: the grammar does not compile: {matcher.get_error()}"
        start = i
        while i < len(ids):
            if not matcher.consume_token(ids[i]):
                return f"{part}: token {i} refused after {converted.tokenizer.decode(ids[start:i])!r}"
            i += 1
            if ids[i - 1] in stops:
                break
        done += ids[start:i]
        forced = {tok.t5_open: tok.forced_t5(), tok.aud_open: tok.forced_aud()}.get(done[-1], [])
        if ids[i:i + len(forced)] != forced:
            return f"{part}: the forced run after token {i - 1} is not there"
        done += forced
        i += len(forced)
    return ""


def encode(converted, text: str) -> list[int]:
    return converted.tokenizer.encode(text, add_special_tokens=False)


def story_text(converted, clips_text: list[str], reasoning="2 events. 12.0 = 6.0 + 6.0.", between="",
               end="<|im_end|>") -> str:
    return f"{reasoning}<|/think|>" + between + between.join(clips_text) + between + end


def clip(converted, caption: str, seconds: str, after: str = "") -> str:
    tok = converted.token_ids
    return (f"<|gen|>{caption}<timestamp>{seconds}</timestamp>{after}{G.t5_run_text(tok.n)}"
            f"{G.aud_run_text(tok.m)}<|/gen|>")


def test_every_plan_the_model_is_taught_is_admitted(ll):
    _, _, converted = ll
    tok = converted.token_ids
    rng = random.Random(3)
    for _ in range(40):
        caption, total, clips = tiny_story.make_story(rng)
        ids = encode(converted, tiny_story.assistant_text(total, clips, tok.n, tok.m))
        assert G.parse_plan(ids, tok, converted.tokenizer.decode).clips
        assert walk(ll, ids) == ""


@pytest.mark.parametrize("text", [
    "a plan cut by the token budget: {clip}<|gen|>rain<timestamp>4",        # ends mid-clip, as a cut does
    "numbers as the parser reads them: {clip}<|gen|>x<timestamp> 7 </timestamp>{runs}<|/gen|><|im_end|>",
    "points at either end, the other stop token: {clip}<|gen|>x<timestamp>.5</timestamp>{runs}<|/gen|>"
    "<|gen|>y<timestamp>12.</timestamp>{runs}<|/gen|><|endoftext|>",
    "text after the timestamp goes into the caption: {clip}<|gen|>door<timestamp>3.25</timestamp> slams{runs}"
    "<|/gen|><|im_end|>",
    "empty caption, long number: {clip}<|gen|><timestamp>0012.500</timestamp>{runs}<|/gen|><|im_end|>",
])
def test_what_the_parser_accepts_the_grammar_admits(ll, text):
    _, _, converted = ll
    tok = converted.token_ids
    reasoning, _, rest = text.partition(": ")
    runs = G.t5_run_text(tok.n) + G.aud_run_text(tok.m)
    body = rest.format(clip=clip(converted, "rain on a roof", "6.0"), runs=runs)
    ids = encode(converted, f"{reasoning}<|/think|>{body}")
    assert G.parse_plan(ids, tok, converted.tokenizer.decode).clips
    assert walk(ll, ids) == ""


def test_white_space_between_clips_is_admitted(ll):
    _, _, converted = ll
    text = story_text(converted, [clip(converted, "rain", "6.0"), clip(converted, "thunder", "6.0")], between="\n ")
    assert walk(ll, encode(converted, text)) == ""


@pytest.mark.parametrize("why, text", [
    ("a plan token in the reasoning", "2 events.</timestamp><t5>"),
    ("a clip before <|/think|>", "2 events.<|gen|>rain<timestamp>6.0</timestamp>"),
    ("a stop before any clip", "2 events.<|/think|><|im_end|>"),
    ("a plan token in a caption", "2 events.<|/think|><|gen|>rain<aud_00000>"),
    ("a chat token in a caption", "2 events.<|/think|><|gen|>rain<|im_start|>"),
    ("a <t5> before the timestamp", "2 events.<|/think|><|gen|>rain<t5>"),
    ("a duration of zero", "2 events.<|/think|><|gen|>rain<timestamp>0.0</timestamp>"),
    ("a duration in exponent form", "2 events.<|/think|><|gen|>rain<timestamp>1e1</timestamp>"),
    ("a signed duration", "2 events.<|/think|><|gen|>rain<timestamp>-3</timestamp>"),
    ("a duration that is no number", "2 events.<|/think|><|gen|>rain<timestamp>inf</timestamp>"),
])
def test_what_the_grammar_excludes_is_refused(ll, why, text):
    _, _, converted = ll
    assert walk(ll, encode(converted, text)) != "", why


def test_after_a_clip_only_its_close_then_a_clip_or_the_end(ll):
    _, _, converted = ll
    tok = converted.token_ids
    one = story_text(converted, [clip(converted, "rain", "6.0")], end="")
    assert walk(ll, encode(converted, one)) == ""
    for tail in ("thunder", "<|gen|>", "<aud>"):   # text between clips; a clip left open; a second run
        ids = encode(converted, one[:-len("<|/gen|>")] + tail)
        assert walk(ll, ids).startswith(G.PLAN_AFTER_AUD), tail
    after_t5 = encode(converted, "x<|/think|><|gen|>rain<timestamp>6</timestamp>") + [tok.t5_open, *tok.forced_t5()]
    assert walk(ll, after_t5 + encode(converted, "rain")).startswith(G.PLAN_AFTER_T5)


def test_every_text_run_is_bounded_so_that_a_part_always_ends(ll):
    """A model that wants a token the grammar forbids writes text instead; at a bound the clip's next
    token is all that is left, so a part cannot run on until the token budget (no clip at all)."""
    llguidance, tokenizer, converted = ll
    tok = converted.token_ids
    head = encode(converted, "2 events.") + [tok.think_close, tok.gen_open]
    for length, ok in ((G.MAX_CAPTION_CHARS, ""), (G.MAX_CAPTION_CHARS + 1, "refused")):
        caption = encode(converted, "a" * length)
        ids = head + caption + encode(converted, "<timestamp>6</timestamp><t5>") + tok.forced_t5()
        assert (walk(ll, ids) == "") == (ok == ""), length
    matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_lark(G.plan_grammar(tok, G.PLAN_START)),
                                   log_level=0)
    assert matcher.consume_tokens(head + encode(converted, "a" * G.MAX_CAPTION_CHARS))
    assert matcher.compute_ff_tokens()[:1] == [tok.timestamp_open]      # nothing else may follow
    long_reasoning = encode(converted, "x" * (G.MAX_REASONING_CHARS + 1)) + [tok.think_close]
    assert walk(ll, long_reasoning) != ""
    digits = head + encode(converted, "rain<timestamp>" + "9" * (2 * G.MAX_NUMBER_DIGITS + 2) + "</timestamp>")
    assert walk(ll, digits) != ""


def test_the_part_is_read_from_where_generation_resumes(ll):
    _, _, converted = ll
    tok = converted.token_ids
    assert G.plan_part(tok, []) == G.PLAN_START
    assert G.plan_part(tok, [tok.t5_open, *tok.forced_t5()]) == G.PLAN_AFTER_T5
    assert G.plan_part(tok, [tok.aud_open, *tok.forced_aud()]) == G.PLAN_AFTER_AUD
    with pytest.raises(ValueError):
        G.plan_part(tok, [tok.gen_open])
    with pytest.raises(ValueError):
        G.plan_grammar(tok, "middle")


@pytest.mark.parametrize("fault", ["forbids <|/think|>", "forbids the decimal point",
                                   "lets a plan token into a caption", "ends a clip without <t5>"])
def test_the_check_fails_under_a_planted_grammar_fault(ll, fault):
    """The admission and exclusion checks above, run on a grammar with a fault planted, fail."""
    _, _, converted = ll
    tok = converted.token_ids
    rng = random.Random(5)
    caption, total, clips = tiny_story.make_story(rng)
    taught = encode(converted, tiny_story.assistant_text(total, clips, tok.n, tok.m))
    smuggled = encode(converted, "2 events.<|/think|><|gen|>rain<aud_00000><timestamp>6</timestamp>")

    def planted(t, part):
        g = G.plan_grammar(t, part)
        if fault == "forbids <|/think|>":
            return g.replace(f"<[{t.think_close}]>", f"<[{t.think_open}]>")
        if fault == "forbids the decimal point":
            return g.replace(r"\.", ",")
        if fault == "lets a plan token into a caption":
            return g.replace(f"<[{t.gen_open}]> CAPTION?", f"<[{t.gen_open}]> (CAPTION | <[{t.aud_run[0]}]>)*")
        return g.replace(f" <[{t.t5_open}]>", "")

    if fault == "lets a plan token into a caption":
        assert walk(ll, smuggled) != ""                     # the check: refused by the real grammar
        assert walk(ll, smuggled, planted) == ""            # ... admitted under the fault
    else:
        assert walk(ll, taught) == ""
        assert walk(ll, taught, planted) != ""
