"""The LLM stage on vLLM: the story plan and the bridging queries, streamed clip by clip.

Two ``AsyncLLM`` engines on the converted Qwen2 folder:

- the **generate engine** writes the plan, greedily. The forced runs are not decoded token by
  token: ``<t5>`` and ``<aud>`` are stop tokens; when the model emits one, the fixed run
  (``<t5_00000>…</t5>`` or ``<aud_00000>…</aud>``) is appended and generation resumes on the longer
  prompt. With prefix caching a resume costs one short prefill.
- the **pooling engine** (``token_embed``, no activation) returns the last-layer hidden states of
  prompt + generated ids. It runs once per finished clip, as soon as the clip's ``</aud>`` is
  appended, while the generate engine goes on with the next clip.

A clip is yielded once its hidden states are ready *and* it is known whether it is the last one:
when the next clip is complete (its ``</aud>`` appended) or the generation ended. Waiting for the
next *complete* clip (not just its ``<|gen|>``) means a plan cut by the token limit still ends with
a clip marked last — the reference renders the last complete clip without the crossfade tail, and
every stream ends on a clip rather than an empty final response.

Against the reference (transformers ``generate`` with the official forcing processors):
- greedy, ``max_new_tokens`` counting forced tokens too, stops on ``<|im_end|>``/``<|endoftext|>``;
- repetition penalty: the checkpoint's ``generation_config.json`` value (Qwen2.5-Instruct ships
  1.05, and transformers applies it even under greedy decoding, so the reference does); vLLM
  applies it over prompt and output tokens, as transformers does over ``input_ids``;
- the official processors also set the run tokens' logits to 0.0 outside a run; vLLM leaves them
  as the model computed them. The two differ only if every other logit is negative, which a
  trained model does not produce where it writes text (the parity tests check token equality).

Why this module is over 300 lines: ``Planner`` is one class on purpose, since the three modes (story,
script, continuation) share the engines, the prompt, the abort bookkeeping and the clip release.
What the tokens mean is in ``plan_tokens.py`` and the engines' settings in ``engine_options.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import numpy as np

from ..model import post
from ..model.checkpoint import Converted, load_converted
from ..model.config import (
    DEFAULT_DURATION_POLICY,
    DEFAULT_PLAN_TEMPERATURE,
    DEFAULT_PLAN_TOP_P,
    DEFAULT_SEED,
    DEFAULT_TOTAL_DURATION_S,
    DURATION_POLICIES,
    MAX_DURATION_S,
    MAX_NEW_TOKENS,
)
from ..model.grammar import (
    ClipSpan,
    PlanError,
    TokenIds,
    build_instruction,
    build_prompt,
    parse_plan,
    plan_grammar,
    plan_part,
)
from ..pipeline import script as script_mod
from ..pipeline.script import ScriptClip
from ..runtime.processes import descendants, shm_mappings, unlink_unmapped_shm
from .audio_input import audio_block, continuation_instruction
from .engine_options import EngineOptions
from .plan_tokens import PlanTokens

MAX_SUMMARIES = 256     # plan summaries kept (the newest); older ones are dropped
# vLLM's structured-outputs backend for the plan grammar: llguidance reads Lark with tokens named by
# id and never lets text spell an added token (xgrammar and outlines do neither).
GRAMMAR_BACKEND = "guidance"

class PlannerError(RuntimeError):
    """The planner could not produce a plan (engine failure, or unusable model output)."""


@dataclass
class PlanRequest:
    instruction: str
    total_duration: float = DEFAULT_TOTAL_DURATION_S
    seed: int = DEFAULT_SEED
    duration_policy: str = DEFAULT_DURATION_POLICY
    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = DEFAULT_PLAN_TEMPERATURE    # 0: greedy, the official behaviour
    top_p: float = DEFAULT_PLAN_TOP_P
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    script: list[ScriptClip] | None = None      # script mode: the forced plan (no generation)
    audio_rows: np.ndarray | None = None        # continuation: the resampler's rows [audio_tokens, H]

    @classmethod
    def from_params(cls, params, audio_rows: np.ndarray | None = None, **kw) -> "PlanRequest":
        """From validated request params (``pipeline.request.RequestParams``): the instruction per mode."""
        script = script_mod.plan_clips(params.segments) if params.segments else None
        return cls(params.instruction, params.total_duration, params.seed, params.duration_policy,
                   temperature=params.plan_temperature, top_p=params.plan_top_p,
                   script=script, audio_rows=audio_rows, **kw)


@dataclass
class PlannedClip:
    index: int
    caption: str
    duration: float               # seconds after the duration policy
    llm_duration: float           # as written by the LLM
    start_s: float                # nominal start in the story (sum of earlier durations)
    is_last: bool
    sem: np.ndarray               # [N, H] float32 hidden states at the <t5_i> positions
    res: np.ndarray               # [M, H] float32 hidden states at the <aud_i> positions
    generated_tokens: int = 0     # tokens generated for the request when this clip was released
    script: ScriptClip | None = None   # script mode: the clip's place on the timeline


@dataclass
class PlanSummary:
    """What the planner knows after the last clip (also attached to errors for logs)."""
    prompt_ids: list[int]
    generated_ids: list[int]
    text: str
    dropped: list[str]
    finished: bool
    clips: int


class Planner:
    """``async for clip in planner.plan(request)``; many plans run concurrently on the same engines."""

    def __init__(self, converted: Converted, options: EngineOptions | None = None):
        self.converted = converted
        self.options = options or EngineOptions()
        self.tokenizer = converted.tokenizer
        self.tok: TokenIds = converted.token_ids
        gen_cfg_path = converted.llm_dir / "generation_config.json"
        gen_cfg = json.loads(gen_cfg_path.read_text()) if gen_cfg_path.exists() else {}
        self.repetition_penalty = float(gen_cfg.get("repetition_penalty", 1.0))
        self.generate_engine = None
        self.pooling_engine = None
        self.summaries: dict[str, PlanSummary] = {}
        self._engine_ids: dict[str, set[str]] = {}   # plan id -> its engine request ids in flight
        self._engine_pids: list[int] = []             # the embedded engines' processes
        self._grammars: dict[str, str] = {}           # plan grammar per part kind

    @classmethod
    def from_model(cls, model: str | Path = "tiny", options: EngineOptions | None = None) -> "Planner":
        return cls(load_converted(model), options)

    # -- engines ----------------------------------------------------------------------------------
    def _engine_args(self, pooling: bool):
        from vllm.engine.arg_utils import AsyncEngineArgs

        o = self.options
        kw = dict(
            model=str(self.converted.llm_dir), tokenizer=str(self.converted.llm_dir),
            dtype=o.dtype, max_model_len=o.max_model_len, tensor_parallel_size=o.tensor_parallel_size,
            enforce_eager=o.enforce_eager, seed=o.seed, max_num_seqs=o.max_num_seqs,
            gpu_memory_utilization=(o.pooling_gpu_memory_utilization if pooling else o.generate_gpu_memory_utilization),
            # vLLM's own loggers (log lines, its prometheus_client registry) stay off; the stat
            # loggers given to start() still turn the engine's statistics on.
            disable_log_stats=True, generation_config="vllm",
            enable_prompt_embeds=self.hears_audio,
        )
        from vllm.platforms import current_platform
        if current_platform.is_cpu():
            # A CPU host's KV space: kv_cache_gib, fractions too (vLLM's VLLM_CPU_KVCACHE_SPACE, whole
            # GiB only, still wins where it is set). A 2,048-token plan at full size needs 72 MiB.
            kw.update(kv_cache_memory_bytes=int(o.kv_cache_gib * 2**30))
        if pooling:
            from vllm.config import PoolerConfig
            kw.update(runner="pooling", convert="embed", enable_prefix_caching=False,
                      pooler_config=PoolerConfig(task="token_embed", tok_pooling_type="ALL", use_activation=False))
        else:
            kw.update(enable_prefix_caching=o.enable_prefix_caching)
            if o.plan_grammar:   # the backend is the engine's choice, not the request's
                kw.update(structured_outputs_config={"backend": GRAMMAR_BACKEND})
        kw.update(o.engine_args, **(o.pooling_engine_args if pooling else o.generate_engine_args))
        return AsyncEngineArgs(**kw)

    async def start(self, engine_metrics=None) -> "Planner":
        """Start the engines (or the remote tier's clients). ``engine_metrics``: a
        :class:`~audiostory_ensemble.llm.vllm_metrics.VllmMetrics` whose stat loggers the embedded
        engines report to (vLLM's engine statistics are off without it)."""
        o = self.options
        if o.remote:
            from .remote_llm import RemoteGenerateEngine, RemotePoolingEngine

            self.generate_engine = RemoteGenerateEngine(o.generate_url, o.remote_model, o.remote_timeout_s,
                                                        o.remote_retries)
            self.pooling_engine = RemotePoolingEngine(o.pooling_url, o.remote_model, o.remote_timeout_s,
                                                      o.remote_retries)
            return self
        from vllm.v1.engine.async_llm import AsyncLLM

        before = set(descendants(os.getpid()))
        loggers = (lambda engine: None if engine_metrics is None else [engine_metrics.stat_logger(engine)])
        self.generate_engine = AsyncLLM.from_engine_args(self._engine_args(pooling=False),
                                                         stat_loggers=loggers("generate"))
        self.pooling_engine = AsyncLLM.from_engine_args(self._engine_args(pooling=True),
                                                        stat_loggers=loggers("pooling"))
        self._engine_pids = [p for p in descendants(os.getpid()) if p not in before]
        return self

    def shutdown(self) -> None:
        """Stop the engines and remove the shared memory they leave (an engine core that vLLM's
        shutdown kills, or one that died, cannot unlink its message queues)."""
        engines = [e for e in (self.generate_engine, self.pooling_engine) if e is not None]
        self.generate_engine = self.pooling_engine = None
        pids, self._engine_pids = self._engine_pids, []
        shm = shm_mappings(pids)
        for e in engines:
            try:
                e.shutdown()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
        unlink_unmapped_shm(pids, shm)

    def dead_engine(self) -> str | None:
        """Which embedded engine vLLM has marked dead (its engine core, or a worker under it, died):
        "the generate engine" or "the pooling engine"; None while both live (or the tier is remote)."""
        for name, engine in (("generate", self.generate_engine), ("pooling", self.pooling_engine)):
            if engine is not None and getattr(engine, "errored", False) is True:
                return f"the {name} engine"
        return None

    @staticmethod
    def unreachable(error: BaseException) -> bool:
        """The error says a remote tier server could not be reached or failed (5xx): retry later."""
        cause = error.__cause__ if isinstance(error, PlannerError) else error
        return bool(getattr(cause, "unavailable", False))

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def hears_audio(self) -> bool:
        """The checkpoint has the audio-understanding path (Whisper encoder + resampler)."""
        return self.converted.config.audio_tokens > 0

    @property
    def continuation_refused(self) -> str:
        """Why this planner cannot continue audio ("" when it can)."""
        if not self.hears_audio:
            return ("INPUT_AUDIO: this checkpoint has no audio encoder (the released text-to-audio weights "
                    "carry none), so it cannot continue audio")
        if self.options.remote:
            return ("INPUT_AUDIO: audio continuation needs the embedded LLM engines; this server's LLM tier is "
                    "remote (token ids only)")
        return ""

    def instruction(self, request: PlanRequest) -> str:
        if request.script is not None:
            return build_instruction(script_mod.instruction_caption(request.instruction, request.script),
                                     request.total_duration, request.seed)
        if request.audio_rows is not None:
            return continuation_instruction(request.instruction, request.total_duration)
        return build_instruction(request.instruction, request.total_duration, request.seed)

    def prompt_ids(self, request: PlanRequest) -> list[int]:
        head = audio_block(self.converted.config.audio_tokens) if request.audio_rows is not None else ""
        text = build_prompt(head + self.instruction(request))
        return self.tokenizer.encode(text, add_special_tokens=False)

    def audio_positions(self, prompt: list[int]) -> int:
        """Where the audio rows go: the first ``<aud_i>`` of the prompt's placeholder block."""
        return prompt.index(self.tok.aud_run[0])

    @property
    def embedding_table(self):
        if getattr(self, "_embeddings", None) is None:
            from safetensors import safe_open
            with safe_open(str(self.converted.llm_dir / "model.safetensors"), "pt") as f:
                self._embeddings = f.get_tensor("model.embed_tokens.weight").float()
        return self._embeddings

    def prompt_embeds(self, ids: list[int], request: PlanRequest):
        """The LLM input for ``ids`` with the audio rows spliced in (continuation)."""
        import torch

        emb = self.embedding_table[torch.tensor(ids, dtype=torch.long)].clone()
        pos = self.audio_positions(ids)
        rows = torch.from_numpy(np.asarray(request.audio_rows, dtype=np.float32))
        emb[pos:pos + rows.shape[0]] = rows
        return emb

    def _llm_input(self, ids: list[int], request: PlanRequest) -> dict:
        if request.audio_rows is None:
            return {"prompt_token_ids": ids}
        return {"prompt_embeds": self.prompt_embeds(ids, request)}

    async def _hidden_states(self, ids: list[int], request_id: str, request: PlanRequest) -> np.ndarray:
        from vllm import PoolingParams

        final = None
        async for out in self.pooling_engine.encode(self._llm_input(ids, request),
                                                    PoolingParams(task="token_embed", use_activation=False),
                                                    request_id):
            final = out
        data = final.outputs.data
        return np.asarray(data.float().numpy() if hasattr(data, "numpy") else data, dtype=np.float32)

    async def abort(self, request_id: str) -> None:
        """Stop every engine request of a plan (its generate parts and pooling passes)."""
        ids = sorted(self._engine_ids.pop(request_id, ()))
        for engine in (self.generate_engine, self.pooling_engine):
            if engine is not None and ids:
                try:
                    await engine.abort(ids)
                except Exception:  # noqa: BLE001 - aborting a finished request is fine
                    pass

    # -- the plan ---------------------------------------------------------------------------------
    async def plan(self, request: PlanRequest) -> AsyncIterator[PlannedClip]:
        if self.generate_engine is None:
            raise PlannerError("planner not started")
        if request.duration_policy not in DURATION_POLICIES:
            raise ValueError(f"duration_policy must be one of {DURATION_POLICIES}, got {request.duration_policy!r}")
        if request.audio_rows is not None and self.continuation_refused:
            raise ValueError(self.continuation_refused)
        if request.script is not None:
            async for clip in self._plan_script(request):
                yield clip
            return
        if request.duration_policy == "exact":
            clips = [c async for c in self._plan_stream(request)]
            for c in scale_to_total(clips, request.total_duration):
                yield c
            return
        async for clip in self._plan_stream(request):
            yield clip

    async def _plan_stream(self, request: PlanRequest) -> AsyncIterator[PlannedClip]:
        """The generated plan: engine calls in parts (``PlanTokens`` says what the tokens mean), a
        pooling pass per complete clip, and each clip released once the next one is complete (or the
        plan ends), so that ``is_last`` is known."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        prompt = self.prompt_ids(request)
        budget = min(int(request.max_new_tokens), self.options.max_new_tokens)   # the deployment's ceiling
        tokens = PlanTokens(self.tok, self.tokenizer.decode, budget)
        pending: list[tuple[ClipSpan, asyncio.Task]] = []   # complete clips awaiting "is another next?"
        start_s = 0.0
        rid = request.request_id
        try:
            for part in itertools.count():
                if not tokens.more:
                    break
                params = SamplingParams(
                    temperature=request.temperature, top_p=request.top_p,
                    seed=part_seed(request.seed, part) if request.temperature > 0 else None,
                    max_tokens=tokens.room, repetition_penalty=self.repetition_penalty,
                    stop_token_ids=tokens.engine_stops, skip_special_tokens=False, detokenize=False,
                    output_kind=RequestOutputKind.DELTA, structured_outputs=self._grammar(tokens.gen),
                )
                sub_id = f"{rid}-g{part}"
                self._engine_ids.setdefault(rid, set()).add(sub_id)
                new: list[int] = []
                async for out in self.generate_engine.generate(self._llm_input(prompt + tokens.gen, request), params,
                                                               sub_id):
                    new.extend(out.outputs[0].token_ids)
                if not new:
                    raise PlannerError("the generate engine returned no output")
                span = tokens.take(new)
                if span is None:
                    continue
                # A complete clip follows the pending one: that one is not the last.
                for prev, task in pending:
                    yield await self._clip(prev, task, prompt, False, start_s, len(tokens.gen))
                    start_s += post.heard_seconds(story_duration(prev.duration), fades_out=True)
                pool_id = f"{rid}-p{span.index}"
                self._engine_ids.setdefault(rid, set()).add(pool_id)
                pending = [(span, asyncio.ensure_future(self._hidden_states(prompt + tokens.gen, pool_id, request)))]
            tokens.end()
            for i, (span, task) in enumerate(pending):
                yield await self._clip(span, task, prompt, i == len(pending) - 1, start_s, len(tokens.gen))
                start_s += post.heard_seconds(story_duration(span.duration), fades_out=True)
            pending = []
        except (PlanError, PlannerError):
            raise
        except asyncio.CancelledError:
            raise
        except Exception as e:  # engine died, etc.: an error, never a hang
            raise PlannerError(f"LLM engine failure: {type(e).__name__}: {e}") from e
        finally:
            for _, task in pending:
                task.cancel()
            if not tokens.finished or pending:   # stopped early (cancelled, failed, consumer gone)
                await self.abort(rid)
            self._engine_ids.pop(rid, None)
            self._remember(rid, PlanSummary(prompt, tokens.gen, self.tokenizer.decode(tokens.gen), tokens.dropped,
                                            tokens.finished, tokens.clips))

    def _grammar(self, generated: list[int]):
        """The structured-outputs constraint of the next generate part (None when the plan grammar
        is off): the grammar of where the part starts, built once per part kind."""
        if not self.options.plan_grammar:
            return None
        from vllm.sampling_params import StructuredOutputsParams

        part = plan_part(self.tok, generated)
        if part not in self._grammars:
            self._grammars[part] = plan_grammar(self.tok, part)
        return StructuredOutputsParams(grammar=self._grammars[part])

    async def _plan_script(self, request: PlanRequest) -> AsyncIterator[PlannedClip]:
        """Script mode: the plan is forced; one pooling pass gives every clip's hidden states."""
        clips = request.script
        prompt = self.prompt_ids(request)
        forced = self.tokenizer.encode(script_mod.forced_text(clips, self.tok.n, self.tok.m), add_special_tokens=False)
        rid = request.request_id
        pool_id = f"{rid}-p0"
        self._engine_ids.setdefault(rid, set()).add(pool_id)
        done = False
        try:
            plan = parse_plan(forced, self.tok, self.tokenizer.decode)
            if len(plan.clips) != len(clips):
                raise PlannerError(f"the forced script parsed into {len(plan.clips)} clips, expected {len(clips)}")
            task = asyncio.ensure_future(self._hidden_states(prompt + forced, pool_id, request))
            for span, sc in zip(plan.clips, clips):
                out = await self._clip(span, task, prompt, sc.index == len(clips) - 1, sc.start_s, 0)
                out.caption, out.duration, out.script = sc.caption, sc.duration_s, sc
                yield out
            done = True
        except (PlanError, PlannerError, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001 - any engine failure becomes a PlannerError naming it
            raise PlannerError(f"LLM engine failure: {type(e).__name__}: {e}") from e
        finally:
            if not done:
                await self.abort(rid)
            self._engine_ids.pop(rid, None)
            self._remember(rid, PlanSummary(prompt, forced, self.tokenizer.decode(forced), [], True, len(clips)))

    def _remember(self, request_id: str, summary: PlanSummary) -> None:
        """Keep the last :data:`MAX_SUMMARIES` plans' summaries (for metrics and tests), in every mode."""
        self.summaries.pop(request_id, None)
        self.summaries[request_id] = summary
        while len(self.summaries) > MAX_SUMMARIES:
            self.summaries.pop(next(iter(self.summaries)))

    def tracked(self) -> dict[str, int]:
        """Sizes of the per-request structures (reported as ``audiostory_tracked_entries``)."""
        return {"plan_summaries": len(self.summaries), "engine_requests": len(self._engine_ids)}

    async def _clip(self, span: ClipSpan, task: asyncio.Task, prompt: list[int], is_last: bool,
                    start_s: float, generated: int) -> PlannedClip:
        hidden = await task
        p = len(prompt)
        n, m = self.tok.n, self.tok.m
        sem = hidden[p + span.t5_pos: p + span.t5_pos + n]
        res = hidden[p + span.aud_pos: p + span.aud_pos + m]
        if sem.shape[0] != n or res.shape[0] != m:
            raise PlannerError(f"pooling engine returned {hidden.shape[0]} positions, clip {span.index} needs more")
        return PlannedClip(span.index, span.caption, story_duration(span.duration), span.duration, start_s, is_last,
                           np.ascontiguousarray(sem), np.ascontiguousarray(res), generated)


def part_seed(seed: int, part: int) -> int:
    """The sampling seed of a plan's generate part ``part``: drawn from (``SEED``, part), so that a
    take depends on the request alone (vLLM seeds a request's own generator, whatever else is in the
    batch) and the parts of one plan do not repeat one another's draws."""
    return int(np.random.SeedSequence([int(seed), int(part)]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def story_duration(llm_duration: float) -> float:
    """A clip's length as rendered: as the LLM wrote it, capped at the DiT's window (its length in
    the joined story is ``post.heard_seconds`` of this).

    The repair for an absurd duration (say 400 s): the DiT renders at most its window whatever it is
    asked (the duration feature is clamped at 30 s and the trim keeps the whole wave), so the
    reference's audio for such a clip is the window. Capping at 30 s (the duration feature's own
    clamp, not the 29.95 s window) leaves that audio unchanged; the reported start and duration
    take the window into account (``heard_seconds``). Non-positive or non-finite durations never get
    here: the parser rejects the clip.
    """
    return min(float(llm_duration), MAX_DURATION_S)


def scale_to_total(clips: list[PlannedClip], total: float) -> list[PlannedClip]:
    """The ``exact`` policy: durations scaled so that they sum to ``total``; starts recomputed."""
    s = sum(c.llm_duration for c in clips)
    if not clips or s <= 0:
        return clips
    factor = float(total) / s
    start = 0.0
    out = []
    for c in clips:
        d = story_duration(c.llm_duration * factor)
        out.append(PlannedClip(c.index, c.caption, d, c.llm_duration, start, c.is_last, c.sem, c.res,
                               c.generated_tokens))
        start += post.heard_seconds(d, fades_out=not c.is_last)
    return out
