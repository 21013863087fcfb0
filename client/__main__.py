"""Command line: ``python -m client generate "a thunderstorm over a harbour" --duration 40 -o story.wav``.

Streams over gRPC (``audiostory_stream``), prints each clip as it lands, writes the stitched WAV
(and each clip with ``--clips-dir``, the plan with ``--plan``); ``--http`` asks ``audiostory_full``.
``--format flac|opus|mp3|wav`` has the server encode the story: the file is written as the ordered
story streams in (playable while it grows) and its header completed at the end.
``--script segments.json`` dubs a timeline; ``--continue input.wav`` continues an audio
(``--prepend-input`` puts the input before the continuation, crossfaded). Exits non-zero with the
server's message on error.

``python -m client dub VIDEO --subtitles FILE -o OUT`` dubs a video from its sound-description
subtitles (``--script FILE`` for a JSON script): see ``client/dub.py`` and ``client/subtitles.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from audiostory_ensemble.model.post import write_wav
from audiostory_ensemble.pipeline.encode import FORMATS

from .api import AudioStoryClient, AudioStoryError, generate_http, health_check


def _params(args) -> dict:
    params = {"total_duration": args.duration, "guidance": args.guidance, "seed": args.seed,
              "num_steps": args.steps, "duration_policy": args.duration_policy,
              "plan_temperature": args.plan_temperature, "plan_top_p": args.plan_top_p}
    if args.script:
        params["segments"] = Path(args.script).read_text()
    if args.continue_from:
        import soundfile as sf

        data, rate = sf.read(args.continue_from, dtype="float32", always_2d=True)   # [T, C]
        params["input_audio"], params["input_sample_rate"] = data.T, int(rate)
    return params


def prepend_input(story_audio, input_audio, input_rate: int):
    """The input, at 32 kHz stereo, then the continuation, joined by the 3 s crossfade."""
    import numpy as np

    from audiostory_ensemble.model.config import OUTPUT_SAMPLE_RATE
    from audiostory_ensemble.model.post import crossfade, resample

    a = resample(np.asarray(input_audio, dtype=np.float32), int(input_rate), OUTPUT_SAMPLE_RATE)
    a = np.repeat(a, 2, axis=0) if a.shape[0] == 1 else a[:2]
    return crossfade([a, story_audio], OUTPUT_SAMPLE_RATE)


def cmd_generate(args) -> int:
    t0 = time.perf_counter()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not (args.instruction or args.script or args.continue_from):
        print("error: give an instruction, --script or --continue", file=sys.stderr)
        return 2
    try:
        params = _params(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.format not in (None, "pcm"):
        return _generate_encoded(args, params, out, t0)
    if args.quality is not None:
        print("error: --quality applies to --format opus or mp3", file=sys.stderr)
        return 2
    try:
        if args.http:
            story = generate_http(args.instruction, url=args.http_url, timeout=args.timeout, **params)
            for c in story.clips:
                print(f"clip {c.index}: {c.start_s:7.2f}–{c.start_s + c.duration_s:7.2f} s  {c.caption}")
        else:
            on_clip = _on_clip(args, t0, lambda path, c: write_wav(path.with_suffix(".wav"), c.audio))
            story = AudioStoryClient(args.url).generate(args.instruction, on_clip=on_clip,
                                                        timeout=args.timeout, **params)
    except Exception as e:  # noqa: BLE001 - the server's refusal or a transport error, said once
        return _failed(e)
    audio = story.audio
    if args.prepend_input and args.continue_from:
        audio = prepend_input(audio, params["input_audio"], params["input_sample_rate"])
    write_wav(out, audio, story.sample_rate)
    if args.plan:
        Path(args.plan).write_text(json.dumps(story.plan, indent=2) + "\n")
    seconds = audio.shape[1] / story.sample_rate
    print(f"wrote {out}: {len(story.clips)} clips, {seconds:.2f} s of audio in {time.perf_counter() - t0:.1f} s")
    return 0


def _generate_encoded(args, params: dict, out: Path, t0: float) -> int:
    """The story in the server's encoding: streamed into ``out`` (or whole, with ``--http``)."""
    from audiostory_ensemble.pipeline.encode import CODECS

    if args.prepend_input:
        print("error: --prepend-input joins samples here; use it without --format (or --format pcm)", file=sys.stderr)
        return 2
    params = dict(params, audio_quality=args.quality)
    suffix = CODECS[args.format].suffix
    on_clip = _on_clip(args, t0, lambda path, c: path.with_suffix(suffix).write_bytes(c.encoded))
    try:
        if args.http:
            story = generate_http(args.instruction, url=args.http_url, timeout=args.timeout,
                                  audio_format=args.format, **params)
            out.write_bytes(story.encoded)
            clips, size, mime = story.clips, len(story.encoded), story.mime
        else:
            saved = AudioStoryClient(args.url).save(args.instruction, out, args.format, on_clip=on_clip,
                                                    clip_files=bool(args.clips_dir), timeout=args.timeout, **params)
            clips, size, mime = saved.clips, saved.size, saved.mime
            print(f"first bytes of the story after {saved.first_chunk_s:.1f} s", flush=True)
    except Exception as e:  # noqa: BLE001 - the server's refusal or a transport error, said once
        return _failed(e, STORY_ERRORS + (OSError,))
    if args.plan:
        end = max((c.start_s + c.duration_s for c in clips), default=0.0)
        plan = {"clips": [c.plan for c in clips], "duration": clips[0].plan.get("timeline") or end} if clips else {}
        Path(args.plan).write_text(json.dumps(plan, indent=2) + "\n")
    print(f"wrote {out}: {len(clips)} clips, {size} bytes of {mime} in {time.perf_counter() - t0:.1f} s")
    return 0


STORY_ERRORS = (AudioStoryError, TimeoutError, ConnectionError)


def _failed(e: Exception, said=STORY_ERRORS) -> int:
    """A story that did not come: the message of an error in ``said`` as it is, any other (a
    transport error from tritonclient) with its type; exit status 1."""
    print(f"error: {e}" if isinstance(e, said) else f"error: {type(e).__name__}: {e}", file=sys.stderr)
    return 1


def _on_clip(args, t0: float, write):
    """Each clip as it lands: printed, and with ``--clips-dir`` written as ``write(path, clip)``
    (``path`` without its suffix)."""
    clips_dir = Path(args.clips_dir) if args.clips_dir else None
    if clips_dir:
        clips_dir.mkdir(parents=True, exist_ok=True)
    printer = _print_clip(t0)

    def on_clip(c):
        printer(c)
        if clips_dir:
            write(clips_dir / f"clip_{c.index:02d}", c)
    return on_clip


def _print_clip(t0: float):
    def on_clip(c):
        print(f"[{time.perf_counter() - t0:6.1f}s] clip {c.index}: {c.start_s:7.2f}–{c.start_s + c.duration_s:7.2f} s  "
              f"{c.caption}{'  (last)' if c.is_last else ''}", flush=True)
    return on_clip


def cmd_dub(args) -> int:
    from audiostory_ensemble.pipeline.script import ScriptError, parse_segments

    from .dub import DubError, dub, probe
    from .subtitles import CueRules, SubtitleError, script_from_file

    t0 = time.perf_counter()
    try:
        info = probe(args.video)
        if args.subtitles:
            rules = CueRules(dialogue=args.dialogue, music=args.music, overlap=args.overlap,
                             min_duration_s=args.min_cue, short=args.short)
            script = script_from_file(args.subtitles, info.duration_s, rules)
            for d in script.dropped:
                print(f"dropped cue at line {d.line}: {d.reason}: {d.text!r}", file=sys.stderr)
            segments = script.segments
        else:
            raw = Path(args.script).read_text()
            parse_segments(raw, info.duration_s)   # the server's validator; nothing past the video's end
            segments = json.loads(raw)
    except (DubError, SubtitleError, ScriptError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.video}: {info.duration_s:.3f} s; {len(segments)} segment(s)", flush=True)
    if args.write_script:
        Path(args.write_script).write_text(json.dumps(segments, indent=2) + "\n")
    if args.dry_run:
        print(json.dumps(segments, indent=2))
        return 0
    params = {"guidance": args.guidance, "seed": args.seed, "num_steps": args.steps}
    try:
        story, out = dub(args.video, segments, args.output, url=args.url, instruction=args.instruction,
                         mix_db=args.mix, keep_audio=args.keep_audio, audio_codec=args.audio_codec,
                         on_clip=_print_clip(t0), timeout=args.timeout, **params)
    except Exception as e:  # noqa: BLE001 - the server's refusal or a transport error, said once
        return _failed(e, STORY_ERRORS + (DubError,))
    if args.plan:
        Path(args.plan).write_text(json.dumps(story.plan, indent=2) + "\n")
    print(f"wrote {out}: {len(story.clips)} clips, {story.audio.shape[1] / story.sample_rate:.3f} s of audio "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_health(args) -> int:
    try:
        seconds = health_check(args.url, timeout=args.timeout, story=args.story)
    except Exception as e:  # noqa: BLE001 - any failure makes the probe fail, with the reason
        print(f"unhealthy: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"healthy: {'a story through ' if args.story else 'live and ready: '}{args.url} in {seconds:.2f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m client", description="AudioStory client")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a story and write it as WAV")
    g.add_argument("instruction", nargs="?", default=None,
                   help="what the story is about (optional with --script or --continue)")
    g.add_argument("--script", default=None, help='JSON file: [{"start": s, "end": s, "caption": "..."}, ...]')
    g.add_argument("--continue", dest="continue_from", default=None, help="audio file to continue (at most 30 s)")
    g.add_argument("--prepend-input", action="store_true", help="with --continue: input + continuation in one WAV")
    g.add_argument("--plan", default=None, help="also write the plan (JSON) here")
    g.add_argument("-o", "--output", default="story.wav")
    g.add_argument("--format", choices=list(FORMATS), default=None,
                   help="have the server encode the story (default: pcm samples, written here as float WAV)")
    g.add_argument("--quality", type=float, default=None, help="opus and mp3: the encoder's quality in [0, 1]")
    g.add_argument("--duration", type=float, default=None, help="total duration in seconds (server default 50)")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (server default 4.0)")
    g.add_argument("--seed", type=int, default=None, help="seed (server default 0 = the reference)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (server default 50)")
    g.add_argument("--duration-policy", choices=["model", "exact"], default=None)
    g.add_argument("--plan-temperature", type=float, default=None,
                   help="sample the plan (server default 0 = greedy, the official plan); a take per --seed")
    g.add_argument("--plan-top-p", type=float, default=None, help="nucleus sampling of the plan, in (0, 1]")
    g.add_argument("--url", default="127.0.0.1:8001", help="gRPC address")
    g.add_argument("--http", action="store_true", help="use audiostory_full over HTTP instead of streaming")
    g.add_argument("--http-url", default="127.0.0.1:8000")
    g.add_argument("--clips-dir", default=None, help="also write each clip here")
    g.add_argument("--timeout", type=float, default=600.0)
    g.set_defaults(func=cmd_generate)
    d = sub.add_parser("dub", help="dub a video: its sound-description subtitles (or a script) in, the video "
                       "with the generated soundtrack out")
    d.add_argument("video", help="the video file (its video stream is copied, not re-encoded)")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--subtitles", default=None, help="SRT or WebVTT file with sound descriptions ([door creaks])")
    src.add_argument("--script", default=None, help='JSON file: [{"start": s, "end": s, "caption": "..."}, ...]')
    d.add_argument("-o", "--output", required=True, help="the dubbed video (.mkv, .mp4, .webm, ...)")
    d.add_argument("--instruction", default=None, help="what the film is about (default: the captions)")
    d.add_argument("--mix", type=float, default=None, metavar="DB",
                   help="keep the original audio under the generated one at this gain in dB (e.g. -12)")
    d.add_argument("--keep-audio", action="store_true",
                   help="keep the original audio track(s) and add the generated one after them")
    d.add_argument("--audio-codec", default=None,
                   help="FFmpeg encoder of the generated track (default by container: mkv flac, mp4 aac, webm opus)")
    d.add_argument("--dialogue", action="store_true", help='keep dialogue lines as captions (someone says "...")')
    d.add_argument("--music", action="store_true", help="keep music-note (lyrics) lines as captions")
    d.add_argument("--overlap", choices=["merge", "clip"], default="merge",
                   help="overlapping cues with different captions: one segment (merge) or the earlier cut (clip)")
    d.add_argument("--min-cue", type=float, default=1.0, help="shorter cues are widened or dropped (seconds)")
    d.add_argument("--short", choices=["widen", "drop"], default="widen")
    d.add_argument("--write-script", default=None, help="also write the derived script (JSON) here")
    d.add_argument("--dry-run", action="store_true", help="print the derived script and stop (no server call)")
    d.add_argument("--plan", default=None, help="also write the plan (JSON) here")
    d.add_argument("--guidance", type=float, default=None)
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--url", default="127.0.0.1:8001", help="gRPC address")
    d.add_argument("--timeout", type=float, default=600.0)
    d.set_defaults(func=cmd_dub)
    h = sub.add_parser("health", help="probe: the server is live and ready (exit 0 = healthy)")
    h.add_argument("--url", default="127.0.0.1:8001", help="gRPC address")
    h.add_argument("--timeout", type=float, default=60.0)
    h.add_argument("--story", action="store_true",
                   help="send one real small story through the pipeline instead (for a server without its supervisor)")
    h.set_defaults(func=cmd_health)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
