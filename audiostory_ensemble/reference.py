"""The reference pipeline: plain eager PyTorch, following the official inference flow step by step.

It is the oracle every served result is compared with, and the baseline the benchmarks beat, so
it stays faithful rather than fast:

- transformers ``generate`` (greedy, the checkpoint's generation config, so Qwen's repetition
  penalty 1.05 applies) with the two logits processors of the official code that force the
  ``<t5_i>``/``<aud_i>`` runs token by token once the model opens them;
- bridging queries from ``generate``'s own last-layer hidden states (no second forward);
- the bridge; the DiT per clip with diffusers' ``FlowMatchEulerDiscreteScheduler`` and an unmodified
  ``FluxTransformer2DModel`` (RoPE from position ids, as the reference); CFG on [uncond; cond];
- the weight-normed Oobleck VAE; trim; resample 44.1 → 32 kHz (soxr HQ, librosa's default);
  the 3 s linear crossfade.

One generalisation: the reference always draws the initial noise from seed 0 (and uses the seed
only for the lead phrase); here ``seed`` drives both, so ``seed=0`` is the reference exactly.

    python -m audiostory_ensemble.reference --instruction "rain on a tin roof ..." --duration 30 --out story.wav
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .model import post
from .model.checkpoint import load_converted
from .model.config import (
    DEFAULT_GUIDANCE,
    DEFAULT_NUM_STEPS,
    DEFAULT_SEED,
    DEFAULT_TOTAL_DURATION_S,
    MAX_NEW_TOKENS,
    OUTPUT_SAMPLE_RATE,
)
from .model.grammar import Plan, build_instruction, build_prompt, parse_plan
from .model.sampler import initial_noise
from .pipeline import script as script_mod


class ForcedRunProcessor:
    """The official forcing rule, as a transformers logits processor.

    ``run`` = [opener, q_0 … q_{n-1}, closer]. When the last input token is the opener or a query
    token, the next token of the run gets ``max + 10``; otherwise the run's tokens (all but the
    opener) get the score 0.0 (literally 0, as the official code does, not -inf).
    """

    def __init__(self, run: list[int]):
        self.run = list(run)
        self.next_of = {a: b for a, b in zip(self.run[:-1], self.run[1:])}
        self.rest = torch.tensor(self.run[1:], dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i in range(input_ids.shape[0]):
            last = int(input_ids[i, -1])
            if last in self.next_of:
                scores[i, self.next_of[last]] = scores[i].max() + 10
            else:
                scores[i, self.rest] = 0.0
        return scores


@dataclass
class ReferenceClip:
    index: int
    caption: str
    duration: float               # as written by the LLM
    render_duration: float        # + crossfade for every clip but the last
    sem: torch.Tensor             # [N, H]
    res: torch.Tensor             # [M, H]
    cond: torch.Tensor            # [N, 1024]
    latent: torch.Tensor          # [645, 64]
    audio: np.ndarray             # [2, T] at 32 kHz, trimmed to render_duration


@dataclass
class ReferenceResult:
    instruction: str
    prompt_ids: list[int]
    generated_ids: list[int]
    text: str
    plan: Plan
    clips: list[ReferenceClip]
    audio: np.ndarray             # [2, T] at 32 kHz, crossfaded
    sample_rate: int = OUTPUT_SAMPLE_RATE
    timings: dict = field(default_factory=dict)


class ReferencePipeline:
    def __init__(self, model: str = "tiny"):
        from diffusers import FluxTransformer2DModel
        from transformers import AutoModelForCausalLM

        self.converted = load_converted(model)
        cfg = self.config = self.converted.config
        self.tokenizer = self.converted.tokenizer
        self.tok = self.converted.token_ids
        self.llm = AutoModelForCausalLM.from_pretrained(self.converted.llm_dir, dtype=torch.float32).eval()
        self.bridge = self.converted.bridge()
        dit = self.converted.dit()
        # An unmodified diffusers transformer with the same weights: RoPE from position ids.
        self.transformer = FluxTransformer2DModel(**cfg.dit.diffusers_kwargs()).eval()
        self.transformer.load_state_dict(
            {k[len("transformer."):]: v for k, v in dit.state_dict().items() if k.startswith("transformer.")})
        self.fc, self.duration_embedder = dit.fc, dit.duration_embedder
        self.uncond = self.converted.uncond_tokens()
        self.vae = self.converted.vae(remove_weight_norm=False).vae  # weight-normed, as loaded

    # -- LLM ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int = MAX_NEW_TOKENS):
        """Greedy generation with forced runs. Returns (generated ids, hidden [G-1, H])."""
        from transformers import LogitsProcessorList

        tok = self.tok
        processors = LogitsProcessorList([
            ForcedRunProcessor([tok.t5_open, *tok.forced_t5()]),
            ForcedRunProcessor([tok.aud_open, *tok.forced_aud()]),
        ])
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)
        out = self.llm.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
            logits_processor=processors, output_hidden_states=True, return_dict_in_generate=True,
        )
        length = input_ids.shape[1]
        generated = out.sequences[0, length:].tolist()
        hidden = torch.cat([step[-1] for step in out.hidden_states], dim=1)[0, length:, :]
        return generated, hidden

    @torch.no_grad()
    def hidden_states(self, ids: list[int], inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """One transformers forward: last-layer hidden states ``[len(ids), H]``; with
        ``inputs_embeds`` (continuation: audio rows spliced in) those are the input instead."""
        if inputs_embeds is None:
            out = self.llm(input_ids=torch.tensor([ids], dtype=torch.long), output_hidden_states=True)
        else:
            out = self.llm(inputs_embeds=inputs_embeds[None].float(), output_hidden_states=True)
        return out.hidden_states[-1][0]

    # -- DiT --------------------------------------------------------------------------------------
    @torch.no_grad()
    def render(self, cond: torch.Tensor, duration: float, guidance: float, num_steps: int, seed: int):
        """One clip's latent ``[1, 645, 64]``: TangoFlux ``inference_flow`` with full tokens."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device="cpu")
        latents = initial_noise(seed)
        dur = self.duration_embedder(torch.tensor([float(duration)]))           # [1, 1, 1024]
        cfg_on = guidance > 1
        enc = torch.cat([self.uncond[None], cond[None]]) if cfg_on else cond[None]
        pooled = self.fc(torch.nanmean(enc, dim=1))
        enc = torch.cat([enc, dur.repeat(enc.shape[0], 1, 1)], dim=1)
        n = cond.shape[0]
        txt_ids = torch.zeros(n + 1, 3)
        img_ids = torch.arange(latents.shape[1], dtype=torch.float32)[:, None].repeat(1, 3)
        for t in scheduler.timesteps:
            inp = torch.cat([latents] * 2) if cfg_on else latents
            pred = self.transformer(
                hidden_states=inp, timestep=(t / 1000).reshape(1), guidance=None,
                pooled_projections=pooled, encoder_hidden_states=enc,
                txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
            if cfg_on:
                u, c = pred.chunk(2)
                pred = u + guidance * (c - u)
            latents = scheduler.step(pred, t, latents).prev_sample
        return latents

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> np.ndarray:
        """``[1, 645, 64]`` -> ``[2, 1320960]`` at 44.1 kHz."""
        return self.vae.decode(latent.transpose(2, 1)).sample[0].float().numpy()

    def clip_audio(self, cond: torch.Tensor, render_s: float, guidance: float, num_steps: int, seed: int):
        """One clip: its latent, and its audio rendered for ``render_s`` — trimmed, at 32 kHz."""
        latent = self.render(cond, render_s, guidance, num_steps, seed)
        audio = post.clip_audio(self.decode(latent), render_s)
        return latent, audio

    # -- the whole story --------------------------------------------------------------------------
    def __call__(self, instruction: str, total_duration: float = DEFAULT_TOTAL_DURATION_S,
                 guidance: float = DEFAULT_GUIDANCE, seed: int = DEFAULT_SEED,
                 num_steps: int = DEFAULT_NUM_STEPS, max_new_tokens: int = MAX_NEW_TOKENS) -> ReferenceResult:
        timings = {}
        t0 = time.perf_counter()
        full_instruction = build_instruction(instruction, total_duration, seed)
        prompt_ids = self.tokenizer.encode(build_prompt(full_instruction), add_special_tokens=False)
        generated, hidden = self.generate(prompt_ids, max_new_tokens)
        text = self.tokenizer.decode(generated)
        plan = parse_plan(generated, self.tok, self.tokenizer.decode)
        timings["llm_s"] = time.perf_counter() - t0

        n, m = self.tok.n, self.tok.m
        sem = torch.stack([hidden[c.t5_pos:c.t5_pos + n] for c in plan.clips])
        res = torch.stack([hidden[c.aud_pos:c.aud_pos + m] for c in plan.clips])
        with torch.no_grad():
            cond = self.bridge(sem, res)

        render_durations = post.clip_durations([c.duration for c in plan.clips])
        clips = []
        t1 = time.perf_counter()
        for k, (span, dur) in enumerate(zip(plan.clips, render_durations)):
            latent, audio = self.clip_audio(cond[k], dur, guidance, num_steps, seed)
            clips.append(ReferenceClip(k, span.caption, span.duration, dur, sem[k], res[k], cond[k],
                                       latent[0], audio))
        timings["audio_s"] = time.perf_counter() - t1
        story = post.crossfade([c.audio for c in clips], OUTPUT_SAMPLE_RATE)
        timings["total_s"] = time.perf_counter() - t0
        return ReferenceResult(full_instruction, prompt_ids, generated, text, plan, clips, story,
                               timings=timings)


    def script(self, segments: list[script_mod.Segment], instruction: str = "", total_duration: float | None = None,
               guidance: float = DEFAULT_GUIDANCE, seed: int = DEFAULT_SEED,
               num_steps: int = DEFAULT_NUM_STEPS) -> ReferenceResult:
        """Script mode in plain PyTorch: the forced plan through one transformers forward, each clip
        rendered at its own length, placed on the timeline (``script.py`` has the rules)."""
        clips_plan = script_mod.plan_clips(segments)
        story_s = script_mod.story_length(segments, total_duration)
        full_instruction = build_instruction(script_mod.instruction_caption(instruction, clips_plan), story_s, seed)
        prompt_ids = self.tokenizer.encode(build_prompt(full_instruction), add_special_tokens=False)
        forced = self.tokenizer.encode(script_mod.forced_text(clips_plan, self.tok.n, self.tok.m),
                                       add_special_tokens=False)
        hidden = self.hidden_states(prompt_ids + forced)[len(prompt_ids):]
        plan = parse_plan(forced, self.tok, self.tokenizer.decode)
        n, m = self.tok.n, self.tok.m
        clips = []
        for span, sc in zip(plan.clips, clips_plan):
            sem, res = hidden[span.t5_pos:span.t5_pos + n], hidden[span.aud_pos:span.aud_pos + m]
            cond = self.bridge(sem[None], res[None])[0]
            latent, audio = self.clip_audio(cond, sc.render_s, guidance, num_steps, seed)
            clips.append(ReferenceClip(sc.index, sc.caption, sc.duration_s, sc.render_s, sem, res, cond,
                                       latent[0], audio))
        story = post.place_on_timeline([c.audio for c in clips], [c.start_s for c in clips_plan],
                                       [c.duration_s for c in clips_plan], [c.fade_in for c in clips_plan],
                                       [c.fade_out for c in clips_plan], story_s)
        return ReferenceResult(full_instruction, prompt_ids, forced, self.tokenizer.decode(forced), plan, clips, story)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="AudioStory reference pipeline (eager PyTorch, the parity oracle)")
    ap.add_argument("--instruction", required=True, help="what the story is about")
    ap.add_argument("--duration", type=float, default=DEFAULT_TOTAL_DURATION_S, help="total duration in seconds")
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--steps", type=int, default=DEFAULT_NUM_STEPS)
    ap.add_argument("--model", default="tiny", help="tiny, full, or a converted folder")
    ap.add_argument("--out", required=True, help="output WAV (32 kHz stereo float)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    result = ReferencePipeline(args.model)(args.instruction, args.duration, args.guidance, args.seed, args.steps)
    for c in result.clips:
        print(f"clip {c.index}: {c.duration:6.2f} s  {c.caption}")
    for d in result.plan.dropped:
        print(f"dropped: {d}", file=sys.stderr)
    post.write_wav(args.out, result.audio, result.sample_rate)
    print(f"wrote {args.out}: {result.audio.shape[1] / result.sample_rate:.2f} s "
          f"({', '.join(f'{k} {v:.1f}s' for k, v in result.timings.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
