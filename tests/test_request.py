"""Request validation: every field's defaults, ranges, types and shapes, the control tokens a
caller's text may not hold, and durations as users type them (no server needed)."""
import numpy as np
import pytest

from audiostory_ensemble import interface as I
from audiostory_ensemble.pipeline.request import RequestError, parse_request
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
    (dict(instruction="a", plan_temperature=-0.5), "PLAN_TEMPERATURE"),
    (dict(instruction="a", plan_temperature=2.01), "PLAN_TEMPERATURE"),
    (dict(instruction="a", plan_temperature=float("inf")), "PLAN_TEMPERATURE"),
    (dict(instruction="a", plan_top_p=0.0), "PLAN_TOP_P"),
    (dict(instruction="a", plan_top_p=-1.0), "PLAN_TOP_P"),
    (dict(instruction="a", plan_top_p=float("nan")), "PLAN_TOP_P"),
    (dict(instruction=None, segments='[{"start": 0, "end": 3, "caption": "rain"}]', plan_temperature=0.5),
     "PLAN_TEMPERATURE"),
    (dict(instruction=None, segments='[{"start": 0, "end": 3, "caption": "rain"}]', plan_top_p=0.9), "PLAN_TOP_P"),
])
def test_bad_values_name_the_field(params, field):
    with pytest.raises(RequestError, match=field):
        parse(**params)


@pytest.mark.parametrize("params, message", [
    (dict(instruction="a", total_duration=float("nan")),
     "TOTAL_DURATION must be a number in [1.0, 600.0] seconds, got nan"),
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


def test_plan_sampling_is_greedy_unless_asked_and_passes_through_as_typed():
    p = parse(instruction="a")
    assert (p.plan_temperature, p.plan_top_p) == (0.0, 1.0)
    p = parse(instruction="a", plan_temperature=0.7, plan_top_p=0.9)
    assert (p.plan_temperature, p.plan_top_p) == (0.7, 0.9)      # FP32 on the wire, the typed decimal here
    p = parse(instruction="a", plan_temperature=2.0, plan_top_p=1.0)
    assert (p.plan_temperature, p.plan_top_p) == (2.0, 1.0)


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


@pytest.mark.parametrize("durations", [[29.0, 12.0], [12.0, 30.0], [400.0, 28.5, 30.0], [26.9, 27.1, 5.0]])
def test_reported_starts_and_durations_are_where_the_joined_audio_puts_each_clip(durations):
    """A clip longer than the DiT window holds (29.95 s; 26.95 s plus the crossfade for a clip that
    fades out) renders the window: the joined story places the next clip earlier than the written
    duration says, and the reported start and duration follow the audio, not the text."""
    from audiostory_ensemble.llm.planner import PlannedClip, scale_to_total, story_duration
    from audiostory_ensemble.model import post
    from audiostory_ensemble.model.config import OUTPUT_SAMPLE_RATE, VAE_SAMPLE_RATE, WAVE_SAMPLES
    from audiostory_ensemble.pipeline.records import ClipMeta
    from audiostory_ensemble.pipeline.request import RequestParams

    sr = OUTPUT_SAMPLE_RATE
    rendered = post.clip_durations([story_duration(d) for d in durations])
    # What each clip's audio is: the window's wave trimmed to the rendered length, at 32 kHz; each
    # clip marks its own first sample so its place in the joined story can be read back.
    audios = []
    for k, r in enumerate(rendered):
        n = min(int(r * VAE_SAMPLE_RATE), WAVE_SAMPLES)
        a = np.zeros((2, post._resampled_length(n, VAE_SAMPLE_RATE, sr)), np.float32)
        audios.append(a)
    lengths = [a.shape[1] for a in audios]
    xf = round(post.CROSSFADE_S * sr)
    true_starts = [sum(lengths[:k]) - k * xf for k in range(len(lengths))]
    story_len = sum(lengths) - (len(lengths) - 1) * xf
    assert post.crossfade(audios, sr).shape[1] == story_len

    clips = [PlannedClip(k, f"c{k}", story_duration(d), d, 0.0, k == len(durations) - 1, None, None, 0)
             for k, d in enumerate(durations)]
    clips = scale_to_total(clips, sum(durations))     # the starts as the planner computes them
    params = RequestParams("x", sum(durations), 4.0, 0, 2, "model")
    metas = [ClipMeta.of_planned(c, params, "r", 0.0, "k") for c in clips]
    for k, m in enumerate(metas):
        assert abs(m.start_s * sr - true_starts[k]) <= 1, (k, m.start_s, true_starts[k] / sr)
    last = metas[-1]
    assert abs((last.start_s + last.duration_s) * sr - story_len) <= 1
    for m, r in zip(metas, rendered):
        assert m.render_s == r          # what the DiT is asked is unchanged (the reference's)
