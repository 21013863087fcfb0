"""Command line: ``python -m client generate "a thunderstorm over a harbour" --duration 40 -o story.wav``.

Streams over gRPC (the ``audiostory`` ensemble), prints each clip as it lands, writes the
crossfaded WAV (and each clip with ``--clips-dir``); ``--http`` asks ``audiostory_full`` instead.
Exits non-zero with the server's message on error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from audiostory_ensemble.post import write_wav

from .api import AudioStoryClient, AudioStoryError, generate_http, health_check


def _params(args) -> dict:
    return {"total_duration": args.duration, "guidance": args.guidance, "seed": args.seed,
            "num_steps": args.steps, "duration_policy": args.duration_policy}


def cmd_generate(args) -> int:
    t0 = time.perf_counter()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if args.http:
            story = generate_http(args.instruction, url=args.http_url, timeout=args.timeout, **_params(args))
            for c in story.clips:
                print(f"clip {c.index}: {c.start_s:7.2f}–{c.start_s + c.duration_s:7.2f} s  {c.caption}")
        else:
            clips_dir = Path(args.clips_dir) if args.clips_dir else None
            if clips_dir:
                clips_dir.mkdir(parents=True, exist_ok=True)

            def on_clip(c):
                elapsed = time.perf_counter() - t0
                print(f"[{elapsed:6.1f}s] clip {c.index}: {c.start_s:7.2f}–{c.start_s + c.duration_s:7.2f} s  "
                      f"{c.caption}{'  (last)' if c.is_last else ''}", flush=True)
                if clips_dir:
                    write_wav(clips_dir / f"clip_{c.index:02d}.wav", c.audio)

            story = AudioStoryClient(args.url).generate(args.instruction, on_clip=on_clip,
                                                        timeout=args.timeout, **_params(args))
    except (AudioStoryError, TimeoutError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - transport errors from tritonclient
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    write_wav(out, story.audio, story.sample_rate)
    seconds = story.audio.shape[1] / story.sample_rate
    print(f"wrote {out}: {len(story.clips)} clips, {seconds:.2f} s of audio in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_health(args) -> int:
    try:
        seconds = health_check(args.url, timeout=args.timeout)
    except Exception as e:  # noqa: BLE001 - any failure makes the probe fail, with the reason
        print(f"unhealthy: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"healthy: a story through {args.url} in {seconds:.2f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m client", description="AudioStory client")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a story and write it as WAV")
    g.add_argument("instruction", help="what the story is about")
    g.add_argument("-o", "--output", default="story.wav")
    g.add_argument("--duration", type=float, default=None, help="total duration in seconds (server default 50)")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (server default 4.0)")
    g.add_argument("--seed", type=int, default=None, help="seed (server default 0 = the reference)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (server default 50)")
    g.add_argument("--duration-policy", choices=["model", "exact"], default=None)
    g.add_argument("--url", default="127.0.0.1:8001", help="gRPC address")
    g.add_argument("--http", action="store_true", help="use audiostory_full over HTTP instead of streaming")
    g.add_argument("--http-url", default="127.0.0.1:8000")
    g.add_argument("--clips-dir", default=None, help="also write each clip here")
    g.add_argument("--timeout", type=float, default=600.0)
    g.set_defaults(func=cmd_generate)
    h = sub.add_parser("health", help="probe: one real small request through the pipeline (exit 0 = healthy)")
    h.add_argument("--url", default="127.0.0.1:8001", help="gRPC address")
    h.add_argument("--timeout", type=float, default=60.0)
    h.set_defaults(func=cmd_health)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
