"""The planner's token state machine on token sequences alone (no engine): forced runs, clips
released as their </aud> closes them, the budget, malformed and empty plans."""
import pytest

from audiostory_ensemble.llm.plan_tokens import PlanTokens
from audiostory_ensemble.model.grammar import NoClipError, PlanError, clip_text


@pytest.fixture(scope="module")
def tok(converted):
    return converted.token_ids, converted.tokenizer


def generate_in_parts(tokens: PlanTokens, full: list[int]):
    """Feed ``full`` as the generate engine would: each part ends at an engine stop (inclusive) or
    the budget; what the driver forces is not fed. Returns the clips and the tokens fed."""
    spans, fed, cursor = [], 0, 0
    while tokens.more and cursor < len(full):
        stops = [i for i in range(cursor, len(full)) if full[i] in tokens.engine_stops]
        end = min((stops[0] + 1) if stops else len(full), cursor + tokens.room)
        part = full[cursor:end]
        fed += len(part)
        span = tokens.take(part)
        if span is not None:
            spans.append(span)
        cursor = len(tokens.gen)
    return spans, fed


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_a_plan_is_taken_in_parts_with_the_runs_forced(tok):
    ids, tokenizer = tok
    text = ("2 events. 12.5 = 5.0 + 7.5.<|/think|>" + clip_text("a dog barks", "5.0", ids.n, ids.m)
            + clip_text("rain falls", "7.5", ids.n, ids.m) + "<|im_end|>")
    full = encode(tokenizer, text)
    tokens = PlanTokens(ids, tokenizer.decode, budget=4 * len(full))
    spans, fed = generate_in_parts(tokens, full)
    assert tokens.gen == full and tokens.finished and tokens.clips == 2
    assert fed == len(full) - 2 * (ids.n + 1 + ids.m + 1)      # the runs and their closers are forced
    assert [(s.index, s.caption, s.duration) for s in spans] == [(0, "a dog barks", 5.0), (1, "rain falls", 7.5)]
    assert spans[1].end_pos == len(full) - 3                    # its </aud>, before <|/gen|><|im_end|>
    tokens.end()
    assert tokens.dropped == []


def test_the_budget_cuts_a_clip_and_says_so(tok):
    ids, tokenizer = tok
    full = encode(tokenizer, "<|/think|>" + clip_text("a dog barks", "5.0", ids.n, ids.m)
                  + clip_text("rain falls", "7.5", ids.n, ids.m) + "<|im_end|>")
    tokens = PlanTokens(ids, tokenizer.decode, budget=len(full) - 5)     # inside the second <aud> run
    spans, _ = generate_in_parts(tokens, full)
    assert len(spans) == 1 and not tokens.finished and len(tokens.gen) == len(full) - 5
    tokens.end()
    assert tokens.dropped == ["clip 1: incomplete <aud> run (cut by the token limit)"]
    short = PlanTokens(ids, tokenizer.decode, budget=12)
    generate_in_parts(short, full)
    with pytest.raises(NoClipError, match="the LLM wrote no complete clip"):
        short.end()


def test_a_clip_that_closes_without_a_duration_is_malformed(tok):
    ids, tokenizer = tok
    full = encode(tokenizer, "<|/think|>" + clip_text("a dog barks", "soon", ids.n, ids.m) + "<|im_end|>")
    tokens = PlanTokens(ids, tokenizer.decode, budget=4 * len(full))
    with pytest.raises(PlanError, match="malformed plan at clip 0"):
        generate_in_parts(tokens, full)
    assert tokens.dropped == ["clip 0: malformed (see the generated text)"]
