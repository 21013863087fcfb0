"""`make demo`: serve the tiny model on a local Triton and generate one story with the client.

Expects the repository filled by `make repo` (the Makefile runs the steps before this one).
Writes build/demo/story.wav (and each clip under build/demo/clips/), then a dubbed timeline in
script mode (build/demo/dubbed.wav and its plan), then dubs a video from its sound-description
subtitles (a test-pattern film.mkv and film.srt made here -> build/demo/film.dubbed.mkv), then stops
the server.
"""
import argparse
import json
import subprocess
import sys
import time

from audiostory_ensemble.model import layout
from audiostory_ensemble.serving.triton_server import TritonServer, TritonServerError
from audiostory_ensemble.tiny_story import SAMPLE_INSTRUCTIONS
from client.__main__ import main as client_main

# A timeline as a video captioner would hand it over: two touching segments, a gap, one more.
DEMO_SCRIPT = [
    {"start": 0.5, "end": 6.0, "caption": "a door creaks open slowly"},
    {"start": 6.0, "end": 14.0, "caption": "footsteps crunch on gravel"},
    {"start": 16.0, "end": 20.0, "caption": "a dog barks twice"},
]

# Subtitles for the deaf and hard of hearing, as a film would ship them.
DEMO_SRT = """1
00:00:00,800 --> 00:00:04,000
[DOOR CREAKS OPEN]

2
00:00:03,500 --> 00:00:05,000
MARY: Is anyone home?

3
00:00:05,000 --> 00:00:09,500
(footsteps on gravel)

4
00:00:09,000 --> 00:00:11,400
(dog barking)
"""


def dub_demo(out, url: str) -> int:
    """A 12.4 s test-pattern video and its SDH subtitles -> the dubbed video (video stream copied)."""
    film = out / "film.mkv"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25:duration=12.4",
                    "-c:v", "libx264", "-preset", "ultrafast", str(film)], check=True)
    (out / "film.srt").write_text(DEMO_SRT, encoding="utf-8")
    print(f"dubbing {film} from {out / 'film.srt'}")
    return client_main(["dub", str(film), "--subtitles", str(out / "film.srt"), "--url", url,
                        "-o", str(out / "film.dubbed.mkv"), "--write-script", str(out / "film.script.json")])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    args = ap.parse_args()
    caption, total = SAMPLE_INSTRUCTIONS[0]
    out = layout.BUILD / "demo"
    out.mkdir(parents=True, exist_ok=True)
    print(f"starting tritonserver on {layout.BUILD / 'model_repository'} ...", flush=True)
    t = time.perf_counter()
    try:
        server = TritonServer(layout.BUILD / "model_repository", log_path=out / "tritonserver.log").start(timeout=600)
    except TritonServerError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"ready in {time.perf_counter() - t:.0f} s (gRPC {server.grpc_url}, {args.model} model); "
          f"asking for: {caption!r}, {total} s")
    try:
        rc = client_main(["generate", caption, "--duration", str(total), "--url", server.grpc_url,
                          "-o", str(out / "story.wav"), "--clips-dir", str(out / "clips")])
        if rc:
            return rc
        script = out / "segments.json"
        script.write_text(json.dumps(DEMO_SCRIPT, indent=2) + "\n")
        print(f"script mode: dubbing the timeline in {script}")
        rc = client_main(["generate", "--script", str(script), "--url", server.grpc_url,
                          "-o", str(out / "dubbed.wav"), "--plan", str(out / "dubbed.plan.json")])
        return rc or dub_demo(out, server.grpc_url)
    finally:
        server.stop()
        print(f"server stopped; log at {out / 'tritonserver.log'}")


if __name__ == "__main__":
    sys.exit(main())
