"""A small synthetic story world, and the transcripts the tiny AudioStory LLM is trained on.

A *story* is a scene followed by 2-4 sound events, each with a fixed clip caption; its total
duration (10-60 s in whole seconds) is split evenly, in tenths of a second, over the clips, so
that the clip durations (written with one decimal) sum exactly to the total. The reasoning
spells the arithmetic out (``3 events. 40.0 = 13.3 + 13.3 + 13.4.``) and each clip copies its
number, which is what lets a 0.6 M-parameter model get the sums right.

Used by ``export/make_tiny_checkpoint.py`` (training data, held-out checks) and by tests and
demos (:data:`SAMPLE_INSTRUCTIONS`: fixed requests that are never in the training set).
Everything here is pure Python and deterministic given the ``random.Random`` passed in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .model import grammar

# Each event is written into the story caption and, verbatim, as its clip caption.
EVENTS: tuple[str, ...] = (
    "heavy rain drums on a tin roof",
    "thunder rumbles in the distance",
    "a dog barks twice",
    "a cat meows softly",
    "birds chirp in the trees",
    "waves crash on a rocky shore",
    "a church bell rings",
    "a car engine starts and idles",
    "footsteps crunch on gravel",
    "a door creaks open slowly",
    "a baby laughs",
    "a crowd cheers loudly",
    "a train horn blows",
    "wind howls through a canyon",
    "a fire crackles in a fireplace",
    "a kettle whistles on the stove",
    "a clock ticks steadily",
    "a phone rings in an empty room",
    "children play in a schoolyard",
    "a helicopter flies overhead",
    "glass shatters on a tiled floor",
    "a horse gallops on dirt",
    "an owl hoots at night",
    "frogs croak by a pond",
    "a jet engine roars",
    "typing on a mechanical keyboard",
    "a siren wails down the street",
    "a stream trickles over stones",
    "leaves rustle in the breeze",
    "a hammer strikes a nail",
)

SCENES: tuple[str, ...] = (
    "a quiet evening in the countryside",
    "a stormy night at the farm",
    "a busy morning in the city",
    "a day at the seaside",
    "an afternoon in an old house",
    "a walk through the woods",
    "a winter night in a cabin",
    "a summer day in the park",
)

# How the events are joined into the story caption: before the 2nd.. and before the last one.
_JOIN_MIDDLE = ", then "
_JOIN_LAST = ", and finally "

MIN_TOTAL_S = 10.0
MAX_TOTAL_S = 60.0
TOTAL_STEP_S = 1.0
MIN_EVENTS = 2
MAX_EVENTS = 4


@dataclass(frozen=True)
class Clip:
    caption: str
    duration: float          # seconds, a multiple of 0.1


def story_caption(scene: str, events: tuple[str, ...] | list[str]) -> str:
    """``"{scene}: e1, then e2, and finally e3."`` (the caption the user would type)."""
    parts = [events[0]]
    for i, e in enumerate(events[1:], start=1):
        parts.append((_JOIN_LAST if i == len(events) - 1 else _JOIN_MIDDLE) + e)
    return f"{scene}: {''.join(parts)}."


def split_duration(total: float, k: int) -> list[float]:
    """Split ``total`` evenly in tenths of a second; the last clips take the remainder."""
    tenths = round(total * 10)
    base, rem = divmod(tenths, k)
    return [(base + (1 if i >= k - rem else 0)) / 10 for i in range(k)]


def fmt_seconds(d: float) -> str:
    return f"{d:.1f}"


def make_story(rng: random.Random) -> tuple[str, float, list[Clip]]:
    """One random story: ``(caption, total_duration, clips)``."""
    k = rng.randint(MIN_EVENTS, MAX_EVENTS)
    events = rng.sample(EVENTS, k)
    scene = rng.choice(SCENES)
    n_totals = round((MAX_TOTAL_S - MIN_TOTAL_S) / TOTAL_STEP_S) + 1
    total = MIN_TOTAL_S + TOTAL_STEP_S * rng.randrange(n_totals)
    return story_caption(scene, events), total, clips_for(events, total)


def clips_for(events: tuple[str, ...] | list[str], total: float) -> list[Clip]:
    return [Clip(e, d) for e, d in zip(events, split_duration(total, len(events)))]


def events_of(caption: str) -> tuple[str, ...]:
    """The events a story caption lists (inverse of :func:`story_caption`)."""
    body = caption.split(": ", 1)[1].rstrip(".")
    body = body.replace(_JOIN_LAST, _JOIN_MIDDLE)
    return tuple(body.split(_JOIN_MIDDLE))


def reasoning(total: float, clips: list[Clip]) -> str:
    """``"3 events. 38.0 = 12.6 + 12.7 + 12.7."``: each clip then copies its term."""
    terms = " + ".join(fmt_seconds(c.duration) for c in clips)
    return f"{len(clips)} events. {fmt_seconds(total)} = {terms}."


def assistant_text(total: float, clips: list[Clip], n: int, m: int) -> str:
    """Everything the model writes after the ``<|think|>`` prefill, ``<|im_end|>`` included."""
    clips_text = "".join(grammar.clip_text(c.caption, fmt_seconds(c.duration), n, m) for c in clips)
    return f"{reasoning(total, clips)}<|/think|>{clips_text}<|im_end|>"


def transcript(caption: str, total: float, clips: list[Clip], seed: int, n: int, m: int) -> tuple[str, str]:
    """``(prompt, completion)``: the prompt ends with ``<|think|>``; the completion is the target."""
    prompt = grammar.build_prompt(grammar.build_instruction(caption, total, seed))
    return prompt, assistant_text(total, clips, n, m)


# Fixed requests for tests and demos. Their event sequences are excluded from training
# (``export/make_tiny_checkpoint.py`` checks this), so they are genuinely held out.
SAMPLE_INSTRUCTIONS: tuple[tuple[str, float], ...] = (
    (story_caption("a stormy night at the farm",
                   ["heavy rain drums on a tin roof", "thunder rumbles in the distance", "a dog barks twice"]), 50.0),
    (story_caption("a day at the seaside", ["waves crash on a rocky shore", "children play in a schoolyard"]), 30.0),
    (story_caption("a winter night in a cabin",
                   ["a fire crackles in a fireplace", "a kettle whistles on the stove",
                    "a clock ticks steadily", "an owl hoots at night"]), 40.0),
    (story_caption("a busy morning in the city",
                   ["a car engine starts and idles", "a siren wails down the street", "a helicopter flies overhead"]), 25.0),
    (story_caption("a walk through the woods", ["leaves rustle in the breeze", "a stream trickles over stones"]), 18.0),
    (story_caption("an afternoon in an old house",
                   ["a door creaks open slowly", "footsteps crunch on gravel", "glass shatters on a tiled floor"]), 60.0),
)


def sample_clips(index: int) -> list[Clip]:
    """The plan the model was trained to write for ``SAMPLE_INSTRUCTIONS[index]``."""
    caption, total = SAMPLE_INSTRUCTIONS[index]
    return clips_for(events_of(caption), total)


def held_out_event_sequences() -> set[tuple[str, ...]]:
    return {events_of(c) for c, _ in SAMPLE_INSTRUCTIONS}
