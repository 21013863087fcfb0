"""A web playground over a running AudioStory Triton server.

    python -m web [--triton-url 127.0.0.1:8001] [--host 127.0.0.1] [--port 7860]

Everything goes through the gRPC client (`client.api`), streaming from `audiostory_stream`: the
plan fills in clip by clip (caption, start, duration), each clip is playable as soon as it lands,
and at the end the whole story is playable and downloadable, with a waveform picture marking
the clip boundaries. Errors show the server's own message.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from audiostory_ensemble.config import (DEFAULT_GUIDANCE, DEFAULT_NUM_STEPS, DEFAULT_SEED,
                                        DEFAULT_TOTAL_DURATION_S, OUTPUT_SAMPLE_RATE)
from audiostory_ensemble.post import write_wav
from audiostory_ensemble.stitch import StoryAssembler
from client.api import AudioStoryClient, AudioStoryError

MAX_CLIPS = 16          # clip players on the page (stories longer than this show the first 16)
PLAN_HEADERS = ["clip", "caption", "start (s)", "duration (s)"]


def plan_rows(clips) -> list[list]:
    return [[c.index, c.caption, round(c.start_s, 2), round(c.duration_s, 2)]
            for c in sorted(clips, key=lambda c: c.index)]


def waveform_png(audio: np.ndarray, starts: list[float], captions: list[str], path: Path,
                 sr: int = OUTPUT_SAMPLE_RATE) -> Path:
    """The story's waveform (mono mix, min/max envelope) with the clip boundaries marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mono = audio.mean(axis=0) if audio.ndim == 2 else audio
    seconds = len(mono) / sr
    bins = max(1, min(2000, len(mono)))
    chunks = np.array_split(mono, bins)
    t = np.linspace(0, seconds, bins)
    fig, ax = plt.subplots(figsize=(10, 2.6), dpi=100)
    ax.fill_between(t, [c.min() if len(c) else 0 for c in chunks], [c.max() if len(c) else 0 for c in chunks],
                    color="#4a6fa5", linewidth=0)
    for i, (s, cap) in enumerate(zip(starts, captions)):
        ax.axvline(s, color="#c0392b", linewidth=1)
        ax.text(s, 0.97, f" {i}: {cap[:28]}", transform=ax.get_xaxis_transform(), fontsize=7, va="top")
    ax.set_xlim(0, max(seconds, 1e-3))
    ax.set_xlabel("seconds")
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def audio_from_upload(data: np.ndarray) -> np.ndarray:
    """gradio's numpy audio ([T] or [T, C], integer PCM or float) -> float32 [C, T] in [-1, 1]."""
    a = np.asarray(data)
    scale = float(np.iinfo(a.dtype).max) + 1.0 if a.dtype.kind in "iu" else 1.0
    a = a.astype(np.float32) / scale
    return np.ascontiguousarray(a[None] if a.ndim == 1 else a.T)


def build(triton_url: str):
    import gradio as gr

    workdir = Path(tempfile.mkdtemp(prefix="audiostory-web-"))

    def generate(instruction, total_duration, guidance, seed, steps, segments, input_audio):
        empty_clips = [gr.update(value=None, visible=False, label=f"clip {i}") for i in range(MAX_CLIPS)]
        status = "planning…"
        yield [status, gr.update(value=[]), None, None, None, *empty_clips]
        story = StoryAssembler()
        t0 = time.perf_counter()
        client = AudioStoryClient(triton_url)
        params = dict(guidance=float(guidance), seed=int(seed), num_steps=int(steps))
        if segments and segments.strip():     # script mode: the timeline sets the length
            params["segments"] = segments
        else:
            params["total_duration"] = float(total_duration)
        if input_audio is not None:           # continuation: (rate, [T] or [T, C]) from the upload
            rate, data = input_audio
            params["input_audio"], params["input_sample_rate"] = audio_from_upload(data), int(rate)
        try:
            for clip in client.stream(instruction or None, **params):
                story.add_clip(clip)
                if clip.index < MAX_CLIPS:
                    empty_clips[clip.index] = gr.update(
                        value=(OUTPUT_SAMPLE_RATE, np.ascontiguousarray(clip.audio.T)), visible=True,
                        label=f"clip {clip.index}: {clip.caption}")
                status = f"{len(story.clips)} clip(s) after {time.perf_counter() - t0:.1f} s"
                yield [status, gr.update(value=plan_rows(story.clips.values())), None, None, None, *empty_clips]
            result = story.finish()
        except (AudioStoryError, TimeoutError, ValueError) as e:
            raise gr.Error(str(e)) from None
        except Exception as e:  # noqa: BLE001 - transport errors: show them, do not crash the page
            raise gr.Error(f"{type(e).__name__}: {e}") from None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        wav = workdir / f"story-{stamp}.wav"
        write_wav(wav, result.audio, result.sample_rate)
        png = waveform_png(result.audio, result.starts, result.captions, workdir / f"story-{stamp}.png")
        seconds = result.audio.shape[1] / result.sample_rate
        status = (f"done: {len(result.clips)} clips, {seconds:.2f} s of audio in "
                  f"{time.perf_counter() - t0:.1f} s")
        yield [status, gr.update(value=plan_rows(result.clips)), str(wav), str(png), str(wav), *empty_clips]

    with gr.Blocks(title="AudioStory playground") as page:
        gr.Markdown(f"## AudioStory playground\nServer: `{triton_url}` (gRPC, `audiostory_stream`)")
        with gr.Row():
            instruction = gr.Textbox(label="Instruction", lines=2, elem_id="instruction",
                                     placeholder="a thunderstorm rolls in over a harbour")
        with gr.Row():
            total = gr.Number(label="Total duration (s)", value=DEFAULT_TOTAL_DURATION_S, elem_id="total")
            guidance = gr.Number(label="Guidance", value=DEFAULT_GUIDANCE, elem_id="guidance")
            seed = gr.Number(label="Seed", value=DEFAULT_SEED, precision=0, elem_id="seed")
            steps = gr.Number(label="Steps", value=DEFAULT_NUM_STEPS, precision=0, elem_id="steps")
        with gr.Row():
            segments = gr.Textbox(label="Script (optional): SEGMENTS as JSON — dubs this timeline; the "
                                  "instruction may stay empty", lines=3, elem_id="segments",
                                  placeholder='[{"start": 0.5, "end": 6.0, "caption": "a door creaks open"}]')
            input_audio = gr.Audio(label="Continue this audio (optional, at most 30 s)", type="numpy",
                                   sources=["upload"], elem_id="input-audio")
        run = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown(elem_id="status")
        plan = gr.Dataframe(headers=PLAN_HEADERS, label="Plan", elem_id="plan", interactive=False)
        story_audio = gr.Audio(label="Story", type="filepath", elem_id="story", interactive=False)
        picture = gr.Image(label="Waveform and clip boundaries", type="filepath", elem_id="waveform",
                           interactive=False)
        download = gr.File(label="Download WAV", elem_id="download", interactive=False)
        clip_players = [gr.Audio(label=f"clip {i}", visible=False, interactive=False, elem_id=f"clip-{i}")
                        for i in range(MAX_CLIPS)]
        run.click(generate, [instruction, total, guidance, seed, steps, segments, input_audio],
                  [status, plan, story_audio, picture, download, *clip_players])
    return page


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="AudioStory web playground (a client of a running server)")
    ap.add_argument("--triton-url", default=os.environ.get("AUDIOSTORY_TRITON_URL", "127.0.0.1:8001"),
                    help="gRPC address of the Triton server (env AUDIOSTORY_TRITON_URL)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    ap.add_argument("--port", type=int, default=7860)
    args = ap.parse_args(argv)
    build(args.triton_url).queue(default_concurrency_limit=8).launch(
        server_name=args.host, server_port=args.port, share=False, show_error=True)
    return 0
