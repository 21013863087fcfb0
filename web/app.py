"""A web playground over a running AudioStory Triton server.

    python -m web [--triton-url 127.0.0.1:8001] [--host 127.0.0.1] [--port 7860]

Everything goes through the gRPC client (`client.api`), streaming from `audiostory_stream`: the
plan fills in clip by clip (caption, start, duration), each clip is playable as soon as it lands,
the story itself plays while it arrives (the server's ordered story stream, `STORY_STREAM`: each
part once no later clip can change it), and at the end the whole story is playable and
downloadable, with a waveform picture marking the clip boundaries. The "Dubbing" tab takes a video
and its sound-description subtitles (or a script), shows the cues and what became of each, fills
the plan as clips land and plays the dubbed video (``client.dub``, ``client.subtitles``: the same
rules as ``python -m client dub``). Errors show the server's own message.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from audiostory_ensemble.model.config import (
    DEFAULT_GUIDANCE,
    DEFAULT_NUM_STEPS,
    DEFAULT_PLAN_TEMPERATURE,
    DEFAULT_PLAN_TOP_P,
    DEFAULT_SEED,
    DEFAULT_TOTAL_DURATION_S,
    OUTPUT_SAMPLE_RATE,
)
from audiostory_ensemble.model.post import write_wav
from audiostory_ensemble.pipeline.stitch import Clip, StoryAssembler
from client.api import AudioStoryClient, AudioStoryError

MAX_CLIPS = 16          # clip players on the page (stories longer than this show the first 16)
PLAN_HEADERS = ["clip", "caption", "start (s)", "duration (s)"]
CUE_HEADERS = ["line", "start (s)", "end (s)", "cue", "becomes"]
DUB_AUDIO = ["generated only", "mix over the original", "keep the original as track 1"]


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


def wav_chunk(audio: np.ndarray, sr: int = OUTPUT_SAMPLE_RATE) -> bytes:
    """A piece of the ordered story as a 16-bit WAV, the chunk form gradio's streaming player takes
    (it plays the pieces as one stream)."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.ascontiguousarray(np.clip(audio, -1.0, 1.0).T), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def audio_from_upload(data: np.ndarray) -> np.ndarray:
    """gradio's numpy audio ([T] or [T, C], integer PCM or float) -> float32 [C, T] in [-1, 1]."""
    a = np.asarray(data)
    scale = float(np.iinfo(a.dtype).max) + 1.0 if a.dtype.kind in "iu" else 1.0
    a = a.astype(np.float32) / scale
    return np.ascontiguousarray(a[None] if a.ndim == 1 else a.T)


def cue_rows(cues, script) -> list[list]:
    """One row per cue: where it is, its text, and the segment it went into or why it was dropped."""
    where = {line: i for i, lines in enumerate(script.lines) for line in lines}
    why = {d.line: d.reason for d in script.dropped}
    rows = []
    for c in cues:
        if c.line in where:
            seg = script.segments[where[c.line]]
            becomes = f"segment {where[c.line]}: {seg['caption']} ({seg['start']:g}–{seg['end']:g} s)"
        else:
            becomes = f"dropped: {why.get(c.line, '')}"
        rows.append([c.line, round(c.start, 3), round(c.end, 3), c.text.replace("\n", " / "), becomes])
    return rows


def dub_output_path(workdir: Path, video: str) -> Path:
    """Same container as the upload where we know its audio codec (webm plays in every browser)."""
    from client.dub import CODECS

    suffix = Path(video).suffix.lower()
    return workdir / f"dubbed-{time.strftime('%Y%m%d-%H%M%S')}{suffix if suffix in CODECS else '.mkv'}"


def build(triton_url: str):
    import gradio as gr

    workdir = Path(tempfile.mkdtemp(prefix="audiostory-web-"))

    def dub(video, subtitles, script_text, dialogue, music, overlap, audio_mode, mix_db, guidance, seed, steps):
        from audiostory_ensemble.pipeline.script import ScriptError, parse_segments
        from client.dub import DubError, probe, render
        from client.subtitles import CueRules, SubtitleError, read_cues, script_from_cues

        try:
            if not video:
                raise gr.Error("upload a video")
            info = probe(video)
            if subtitles:
                cues = read_cues(subtitles)
                script = script_from_cues(cues, info.duration_s,
                                          CueRules(dialogue=bool(dialogue), music=bool(music), overlap=overlap))
                segments, rows = script.segments, cue_rows(cues, script)
            elif script_text and script_text.strip():
                parse_segments(script_text, info.duration_s)
                segments = json.loads(script_text)
                rows = [["", s["start"], s["end"], "(script)", f"segment {i}: {s['caption']}"]
                        for i, s in enumerate(segments)]
            else:
                raise gr.Error("upload a subtitle file (SRT or WebVTT) or type a script")
        except (DubError, SubtitleError, ScriptError, OSError, ValueError) as e:
            raise gr.Error(str(e)) from None
        mix = float(mix_db) if audio_mode == DUB_AUDIO[1] else None
        keep = audio_mode == DUB_AUDIO[2]
        if (mix is not None or keep) and info.audio_streams == 0:
            raise gr.Error("this video has no audio track to mix or keep")
        status = f"{info.duration_s:.2f} s of video, {len(segments)} segment(s); rendering…"
        yield [status, gr.update(value=rows), gr.update(value=[]), None]
        story = StoryAssembler()
        t0 = time.perf_counter()
        try:
            for clip in AudioStoryClient(triton_url).stream(None, segments=segments, total_duration=info.duration_s,
                                                            guidance=float(guidance), seed=int(seed),
                                                            num_steps=int(steps)):
                story.add_clip(clip)
                status = f"{len(story.clips)} of {len(segments)}+ clip(s) after {time.perf_counter() - t0:.1f} s"
                yield [status, gr.update(value=rows), gr.update(value=plan_rows(story.clips.values())), None]
            result = story.finish()
            out = render(video, result.audio, dub_output_path(workdir, video), info=info, mix_db=mix,
                         keep_audio=keep)
        except (AudioStoryError, DubError, TimeoutError, ValueError) as e:
            raise gr.Error(str(e)) from None
        except Exception as e:  # noqa: BLE001 - transport errors: show them, do not crash the page
            raise gr.Error(f"{type(e).__name__}: {e}") from None
        status = (f"done: {len(result.clips)} clips, {result.audio.shape[1] / result.sample_rate:.2f} s of audio "
                  f"in {time.perf_counter() - t0:.1f} s")
        yield [status, gr.update(value=rows), gr.update(value=plan_rows(result.clips)), str(out)]

    def generate(instruction, total_duration, guidance, seed, steps, segments, input_audio, plan_temperature,
                 plan_top_p):
        empty_clips = [gr.update(value=None, visible=False, label=f"clip {i}") for i in range(MAX_CLIPS)]
        status = "planning…"
        yield [status, gr.update(value=[]), None, None, None, None, *empty_clips]
        story = StoryAssembler()
        t0 = time.perf_counter()
        client = AudioStoryClient(triton_url)
        params = dict(guidance=float(guidance), seed=int(seed), num_steps=int(steps))
        if segments and segments.strip():     # script mode: the timeline sets the length (nothing is sampled)
            params["segments"] = segments
        else:
            params["total_duration"] = float(total_duration)
            if float(plan_temperature) != DEFAULT_PLAN_TEMPERATURE:     # a sampled plan: a take per seed
                params["plan_temperature"], params["plan_top_p"] = float(plan_temperature), float(plan_top_p)
        if input_audio is not None:           # continuation: (rate, [T] or [T, C]) from the upload
            rate, data = input_audio
            params["input_audio"], params["input_sample_rate"] = audio_from_upload(data), int(rate)
        try:
            for item in client.events(instruction or None, story_stream=True, **params):
                if not isinstance(item, Clip):      # the story's next final part: to the live player
                    yield [status, gr.update(), wav_chunk(item.audio), None, None, None, *empty_clips]
                    continue
                clip = item
                story.add_clip(clip)
                if clip.index < MAX_CLIPS:
                    empty_clips[clip.index] = gr.update(
                        value=(OUTPUT_SAMPLE_RATE, np.ascontiguousarray(clip.audio.T)), visible=True,
                        label=f"clip {clip.index}: {clip.caption}")
                status = f"{len(story.clips)} clip(s) after {time.perf_counter() - t0:.1f} s"
                yield [status, gr.update(value=plan_rows(story.clips.values())), None, None, None, None, *empty_clips]
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
        yield [status, gr.update(value=plan_rows(result.clips)), None, str(wav), str(png), str(wav), *empty_clips]

    with gr.Blocks(title="AudioStory playground") as page:
        gr.Markdown(f"## AudioStory playground\nServer: `{triton_url}` (gRPC, `audiostory_stream`)")
        with gr.Tabs():
            with gr.Tab("Story", id="story-tab"):
                with gr.Row():
                    instruction = gr.Textbox(label="Instruction", lines=2, elem_id="instruction",
                                             placeholder="a thunderstorm rolls in over a harbour")
                with gr.Row():
                    total = gr.Number(label="Total duration (s)", value=DEFAULT_TOTAL_DURATION_S, elem_id="total")
                    guidance = gr.Number(label="Guidance", value=DEFAULT_GUIDANCE, elem_id="guidance")
                    seed = gr.Number(label="Seed", value=DEFAULT_SEED, precision=0, elem_id="seed")
                    steps = gr.Number(label="Steps", value=DEFAULT_NUM_STEPS, precision=0, elem_id="steps")
                    plan_temperature = gr.Number(label="Plan temperature (0 = greedy)", value=DEFAULT_PLAN_TEMPERATURE,
                                                 elem_id="plan-temperature")
                    plan_top_p = gr.Number(label="Plan top-p", value=DEFAULT_PLAN_TOP_P, elem_id="plan-top-p")
                with gr.Row():
                    segments = gr.Textbox(label="Script (optional): SEGMENTS as JSON — dubs this timeline; the "
                                          "instruction may stay empty", lines=3, elem_id="segments",
                                          placeholder='[{"start": 0.5, "end": 6.0, "caption": "a door creaks open"}]')
                    input_audio = gr.Audio(label="Continue this audio (optional, at most 30 s)", type="numpy",
                                           sources=["upload"], elem_id="input-audio")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown(elem_id="status")
                plan = gr.Dataframe(headers=PLAN_HEADERS, label="Plan", elem_id="plan", interactive=False)
                live = gr.Audio(label="Story, playing as it arrives", streaming=True, autoplay=True, elem_id="live",
                                interactive=False)
                story_audio = gr.Audio(label="Story", type="filepath", elem_id="story", interactive=False)
                picture = gr.Image(label="Waveform and clip boundaries", type="filepath", elem_id="waveform",
                                   interactive=False)
                download = gr.File(label="Download WAV", elem_id="download", interactive=False)
                clip_players = [gr.Audio(label=f"clip {i}", visible=False, interactive=False, elem_id=f"clip-{i}")
                                for i in range(MAX_CLIPS)]
                run.click(generate, [instruction, total, guidance, seed, steps, segments, input_audio,
                                     plan_temperature, plan_top_p],
                          [status, plan, live, story_audio, picture, download, *clip_players])
            with gr.Tab("Dubbing", id="dubbing"):
                gr.Markdown("A video and its sound-description subtitles (`[door creaks]`, `(dog barking)`) "
                            "or a script in, the video with a generated soundtrack out; the video stream is "
                            "copied. The story is exactly as long as the video.")
                with gr.Row():
                    dub_video = gr.File(label="Video", file_types=["video"], elem_id="dub-video")
                    dub_subs = gr.File(label="Subtitles (SRT or WebVTT)", file_types=[".srt", ".vtt"],
                                       elem_id="dub-subtitles")
                dub_script = gr.Textbox(label="…or a script: SEGMENTS as JSON", lines=2, elem_id="dub-script")
                with gr.Row():
                    dub_dialogue = gr.Checkbox(label="keep dialogue lines", elem_id="dub-dialogue")
                    dub_music = gr.Checkbox(label="keep music (lyrics) lines", elem_id="dub-music")
                    dub_overlap = gr.Radio(["merge", "clip"], value="merge", label="overlapping cues",
                                           elem_id="dub-overlap")
                with gr.Row():
                    dub_audio = gr.Radio(DUB_AUDIO, value=DUB_AUDIO[0], label="audio", elem_id="dub-audio")
                    dub_mix = gr.Number(label="original's gain when mixed (dB)", value=-12.0, elem_id="dub-mix")
                    dub_guidance = gr.Number(label="Guidance", value=DEFAULT_GUIDANCE, elem_id="dub-guidance")
                    dub_seed = gr.Number(label="Seed", value=DEFAULT_SEED, precision=0, elem_id="dub-seed")
                    dub_steps = gr.Number(label="Steps", value=DEFAULT_NUM_STEPS, precision=0, elem_id="dub-steps")
                dub_run = gr.Button("Dub", variant="primary", elem_id="dub")
                dub_status = gr.Markdown(elem_id="dub-status")
                dub_cues = gr.Dataframe(headers=CUE_HEADERS, label="Cues", elem_id="dub-cues", interactive=False)
                dub_plan = gr.Dataframe(headers=PLAN_HEADERS, label="Plan", elem_id="dub-plan", interactive=False)
                dubbed = gr.Video(label="Dubbed video", elem_id="dubbed", interactive=False)
                dub_run.click(dub, [dub_video, dub_subs, dub_script, dub_dialogue, dub_music, dub_overlap, dub_audio,
                                    dub_mix, dub_guidance, dub_seed, dub_steps],
                              [dub_status, dub_cues, dub_plan, dubbed])
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
