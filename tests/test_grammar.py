"""Tokens, prompt and the plan parser (no model needed: a toy vocabulary stands in for ids)."""
import random

import numpy as np
import pytest

from audiostory_ensemble.llm.audio_input import continuation_instruction
from audiostory_ensemble.model import grammar as G


def toy_vocab(n=3, m=2):
    words = ["<|im_end|>", "<|endoftext|>", "<t5>", "</t5>", "<aud>", "</aud>", "<|gen|>", "<|/gen|>",
             "<|think|>", "<|/think|>", "<timestamp>", "</timestamp>"]
    words += [f"<t5_{i:05d}>" for i in range(n)] + [f"<aud_{i:05d}>" for i in range(m)]
    words += ["rain", " on", " a", " roof", "thunder", " rolls", "12.5", "7.5", "3 events.", "x"]
    ids = {w: i for i, w in enumerate(words)}

    class Tok:
        unk_token_id = None

        def convert_tokens_to_ids(self, toks):
            return [ids.get(t) for t in toks]

    tok = G.TokenIds.from_tokenizer(Tok(), n, m)
    decode = lambda seq: "".join(words[i] for i in seq)
    return ids, tok, decode


def clip(ids, tok, caption_words, seconds):
    return ([ids["<|gen|>"]] + [ids[w] for w in caption_words] + [ids["<timestamp>"], ids[seconds],
            ids["</timestamp>"], tok.t5_open, *tok.forced_t5(), tok.aud_open, *tok.forced_aud(), tok.gen_close])


def test_added_tokens_official_order_and_count():
    toks = G.added_tokens()
    assert len(toks) == 612 and len(set(toks)) == 612
    assert toks[:5] == ["</t5>", "<video_padding>", "<timestamp>", "</timestamp>", "<t5>"]
    assert toks[5] == "<t5_00000>" and toks[104] == "<t5_00099>"
    assert toks[105:107] == ["<aud>", "</aud>"] and toks[107] == "<aud_00000>" and toks[607] == "<aud_00500>"
    assert toks[-4:] == ["<|gen|>", "<|/gen|>", "<|think|>", "<|/think|>"]
    # With Qwen2.5's 151665 base tokens these land on the release's vocabulary of 152277.
    assert 151665 + len(toks) == 152277


def test_prompt_matches_reference_format():
    instruction = G.build_instruction("rain on a roof", 50, seed=0)
    assert instruction == ("Produce an in-depth, multi-layered audio that portrays rain on a roof "
                           "The total duration is 50.0 seconds.")
    prompt = G.build_prompt(instruction)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n<|think|>")


@pytest.mark.parametrize("total, text", [
    (50, "50.0"), (12.3, "12.3"), (7.25, "7.25"), (600.0, "600.0"), (0.1, "0.1"),
    (np.float64(12.3), "12.3"), (np.float32(12.5), "12.5"), (np.int64(50), "50.0"), (np.int32(8), "8.0"),
])
def test_the_duration_sentence_prints_a_float_the_same_under_numpy_1_and_2(total, text):
    """A Python float's repr, as the official code writes it; numpy scalars print as their value
    (numpy 2's repr would say ``np.float64(12.3)``). Also run under numpy 2: tests/test_numpy2.py."""
    sentence = f"The total duration is {text} seconds."
    assert G.build_instruction("rain on a roof", total, seed=0).endswith(" roof " + sentence)
    assert continuation_instruction("rain", total) == f"{G_CONTINUATION} of rain. {sentence}"


G_CONTINUATION = "Understand the input audio, infer the subsequent events, and generate the continued audio"


def test_lead_choice_uses_private_rng_and_matches_global_seeding():
    state = random.getstate()
    for seed in (0, 1, 7, 123456789):
        random.seed(seed)
        expected = random.choice(G.LEAD_PHRASES)
        assert G.choose_lead(seed) == expected
    random.setstate(state)
    before = random.random()
    random.setstate(state)
    G.choose_lead(5)
    assert random.random() == before


def test_parse_well_formed_plan():
    ids, tok, decode = toy_vocab()
    seq = [ids["3 events."], tok.think_close] + clip(ids, tok, ["rain", " on", " a", " roof"], "12.5") \
        + clip(ids, tok, ["thunder", " rolls"], "7.5") + [tok.im_end]
    plan = G.parse_plan(seq, tok, decode)
    assert plan.finished and not plan.dropped
    assert [c.caption for c in plan.clips] == ["rain on a roof", "thunder rolls"]
    assert [c.duration for c in plan.clips] == [12.5, 7.5]
    assert plan.reasoning == "3 events."
    for c in plan.clips:
        assert [seq[c.t5_pos + i] for i in range(tok.n)] == list(tok.t5_run)
        assert [seq[c.aud_pos + i] for i in range(tok.m)] == list(tok.aud_run)
        assert seq[c.end_pos] == tok.aud_close


@pytest.mark.parametrize("cut", [3, 8, 12, 13])
def test_truncated_last_clip_is_dropped_and_reported(cut):
    ids, tok, decode = toy_vocab()
    first = clip(ids, tok, ["rain"], "12.5")
    second = clip(ids, tok, ["thunder"], "7.5")
    seq = [tok.think_close] + first + second[:cut]
    plan = G.parse_plan(seq, tok, decode)
    assert [c.caption for c in plan.clips] == ["rain"]
    assert len(plan.dropped) == 1 and "clip 1" in plan.dropped[0] and "token limit" in plan.dropped[0]
    assert not plan.finished


def test_no_complete_clip_is_a_typed_error_with_the_text():
    ids, tok, decode = toy_vocab()
    seq = [ids["x"], tok.think_close] + clip(ids, tok, ["rain"], "12.5")[:5]
    with pytest.raises(G.NoClipError) as e:
        G.parse_plan(seq, tok, decode)
    assert "no complete clip" in str(e.value) and "rain" in e.value.text
    with pytest.raises(G.NoClipError):
        G.parse_plan([ids["x"], tok.im_end], tok, decode)


def test_malformed_middle_clip_is_an_error_not_a_silent_skip():
    ids, tok, decode = toy_vocab()
    bad = clip(ids, tok, ["rain"], "12.5")
    bad = [t for t in bad if t not in (ids["<timestamp>"], ids["</timestamp>"], ids["12.5"])]
    seq = [tok.think_close] + bad + clip(ids, tok, ["thunder"], "7.5") + [tok.im_end]
    with pytest.raises(G.PlanError, match="clip 0: missing or unreadable <timestamp>"):
        G.parse_plan(seq, tok, decode)


def test_broken_forced_run_is_reported():
    ids, tok, decode = toy_vocab()
    c = clip(ids, tok, ["rain"], "12.5")
    c[c.index(tok.t5_run[1])] = ids["x"]
    with pytest.raises(G.NoClipError, match="incomplete <t5> run"):
        G.parse_plan([tok.think_close] + c + [tok.im_end], tok, decode)


def test_split_timestamp_rules():
    assert G.split_timestamp("rain<timestamp> 4.5 </timestamp> falls") == ("rain falls", 4.5)
    assert G.split_timestamp("rain falls") == ("rain falls", None)
    assert G.split_timestamp("a<timestamp>x</timestamp>") == ("a", None)
