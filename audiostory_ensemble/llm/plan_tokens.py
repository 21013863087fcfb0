"""The planner's token state machine, without an engine.

The generate engine is called in parts: it stops at ``<t5>`` and ``<aud>`` (the model only chooses to
open a query run; the run itself is forced), at ``<|im_end|>``/``<|endoftext|>``, or at the token
budget. :class:`PlanTokens` takes each part's tokens, appends the forced run after ``<t5>``/``<aud>``
(within the budget), and hands back each clip as its ``</aud>`` closes it. The planner does the
engine calls, the pooling passes and the clip release around it; this module only decides what the
tokens mean, so it is tested on token sequences alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..model.grammar import ClipSpan, NoClipError, PlanError, TokenIds, parse_clip_at


@dataclass
class PlanTokens:
    tok: TokenIds
    decode: Callable[[Sequence[int]], str]
    budget: int
    gen: list[int] = field(default_factory=list)     # everything after the prompt: generated + forced
    finished: bool = False                           # a stop token ended the plan
    clips: int = 0                                   # complete clips so far
    dropped: list[str] = field(default_factory=list)  # what was not a usable clip, and why

    @property
    def engine_stops(self) -> list[int]:
        """Where the generate engine hands back: the run openers and the end of the turn."""
        return [self.tok.t5_open, self.tok.aud_open, self.tok.im_end, self.tok.endoftext]

    @property
    def room(self) -> int:
        return self.budget - len(self.gen)

    @property
    def more(self) -> bool:
        """Another generate call is due."""
        return not self.finished and self.room > 0

    def take(self, new: Sequence[int]) -> ClipSpan | None:
        """One generate call's tokens. Returns the clip its forced ``</aud>`` completes, if any;
        raises :class:`PlanError` for a clip that closes but does not parse."""
        self.gen.extend(new)
        last = self.gen[-1]
        if last in self.tok.stop_ids:
            self.finished = True
        elif last == self.tok.t5_open:
            self.gen.extend(self.tok.forced_t5()[: self.room])
        elif last == self.tok.aud_open:
            self.gen.extend(self.tok.forced_aud()[: self.room])
            if self.gen[-1] == self.tok.aud_close:
                span = self._closing_clip()
                if span is None:
                    self.dropped.append(f"clip {self.clips}: malformed (see the generated text)")
                    raise PlanError(f"malformed plan at clip {self.clips}", text=self.decode(self.gen))
                self.clips += 1
                return span
        return None

    def end(self) -> None:
        """The generation is over (a stop token or the budget): a clip the budget cut is noted in
        ``dropped``; a plan without a complete clip is a :class:`NoClipError`."""
        if not self.finished:
            span, why = self._last_clip()
            if span is None and why:
                self.dropped.append(f"{why} (cut by the token limit)")
        if self.clips == 0:
            why = f" ({'; '.join(self.dropped)})" if self.dropped else ""
            raise NoClipError("the LLM wrote no complete clip" + why, text=self.decode(self.gen))

    def _last_clip(self) -> tuple[ClipSpan | None, str]:
        g = max((i for i, t in enumerate(self.gen) if t == self.tok.gen_open), default=-1)
        if g == -1:
            return None, ""
        return parse_clip_at(self.gen, g, self.tok, self.decode, self.clips)

    def _closing_clip(self) -> ClipSpan | None:
        """The clip whose ``</aud>`` was just appended (its ``<|gen|>`` is the last one)."""
        span, _ = self._last_clip()
        return span if span is not None and span.end_pos == len(self.gen) - 1 else None
