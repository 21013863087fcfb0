"""Encoded audio against PCM: bytes per story, encode time per clip, time to the first clip and to
the first playable part of the story, one run.

    python -m benchmarks.formats [--url HOST:GRPC_PORT] [--stories 3] [--duration 50] [--steps 50]

Without ``--url`` it writes the cpu repository for the tiny model and starts a tritonserver on
loopback. Every configuration streams the same stories (one after another, so the times are the
pipeline's, not a queue's) through ``audiostory_stream``: ``pcm`` as clients get it by default
(clips only; the baseline), then ``STORY_STREAM`` in pcm, wav, flac, opus and mp3. Per story:
time to the first clip, to the first story chunk (what a player can start on), to the end; bytes
on the wire (clip audio or files, plus the story stream) and the story's file. Encode times are
measured here on the baseline's clips (``pipeline.encode.encode``, the code the server runs), per
clip and per second of audio. Writes ``build/bench/formats.json`` and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from audiostory_ensemble.pipeline.encode import CODECS, encode, patched
from audiostory_ensemble.pipeline.stitch import Clip
from client.api import AudioStoryClient

ROOT = Path(__file__).resolve().parent.parent
INSTRUCTIONS = ["a thunderstorm rolls in over a harbour", "a busy kitchen: pans clatter, a kettle whistles",
                "footsteps cross a gravel yard, a gate creaks, a dog barks"]
# (format, the story stream, the clips' audio): the baseline; the story alone, as a player takes it;
# both, as the web page takes them.
CONFIGS = [("pcm", False, True), ("pcm", True, False), ("wav", True, False), ("flac", True, False),
           ("opus", True, False), ("mp3", True, False), ("opus", True, True)]


def one_story(client: AudioStoryClient, instruction: str, fmt: str, story: bool, clip_audio: bool,
              params: dict) -> tuple[dict, list]:
    t0 = time.monotonic()
    first_clip = first_chunk = None
    wire = file_bytes = samples = 0
    clips, data, head = [], [], b""
    for item in client.events(instruction, audio_format=fmt, story_stream=story, clip_audio=clip_audio, **params):
        now = time.monotonic() - t0
        if isinstance(item, Clip):
            first_clip = now if first_clip is None else first_clip
            wire += item.audio.nbytes + len(item.encoded)
            clips.append(item)
            continue
        if first_chunk is None and (item.audio.shape[1] or item.data):
            first_chunk = now
        wire += item.audio.nbytes + len(item.data) + len(item.header)
        samples += item.audio.shape[1]
        data.append(item.data)
        head = item.header or head
    total = time.monotonic() - t0
    file_bytes = len(patched(b"".join(data), head)) if fmt != "pcm" else samples * 2 * 4
    return ({"ttfc_s": first_clip, "first_chunk_s": first_chunk, "total_s": total, "wire_bytes": wire,
             "file_bytes": file_bytes if story else None, "clips": len(clips),
             "audio_s": sum(c.duration_s for c in clips)}, clips)


def encode_times(clips: list[Clip], repeats: int = 2) -> dict:
    out = {}
    seconds = sum(c.audio.shape[1] for c in clips) / 32000
    for fmt in ("wav", "flac", "opus", "mp3"):
        best = None
        for _ in range(repeats):
            t = time.perf_counter()
            for c in clips:
                encode(c.audio, fmt)
            dt = time.perf_counter() - t
            best = dt if best is None else min(best, dt)
        out[fmt] = {"ms_per_clip": 1e3 * best / len(clips), "ms_per_audio_s": 1e3 * best / seconds}
    return out


def median(values):
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def run(url: str, args) -> dict:
    client = AudioStoryClient(url)
    params = dict(total_duration=args.duration, num_steps=args.steps)
    one_story(client, INSTRUCTIONS[0], "pcm", False, True, params)          # warm-up
    results, baseline_clips = {}, []
    for fmt, story, clip_audio in CONFIGS:
        name = f"{fmt} " + ("clips" if not story else "story" if not clip_audio else "clips + story")
        rows = []
        for i in range(args.stories):
            row, clips = one_story(client, INSTRUCTIONS[i % len(INSTRUCTIONS)], fmt, story, clip_audio, params)
            rows.append(row)
            if not story:
                baseline_clips += clips
        results[name] = {k: median([r[k] for r in rows]) for k in rows[0]}
        print(name, json.dumps(results[name]), flush=True)
    return {"configs": results, "encode": encode_times(baseline_clips)}


def table(report: dict) -> str:
    base = report["configs"]["pcm clips"]
    lines = ["| format | story file (MB) | wire (MB) | wire vs pcm | TTFC p50 (s) | first story chunk (s) | "
             "story done (s) | encode ms/clip | encode ms per audio s |", "|---|---|---|---|---|---|---|---|---|"]
    def num(v, digits):
        return "" if v is None else f"{v:.{digits}f}"

    for name, r in report["configs"].items():
        fmt = name.split()[0]
        enc = report["encode"].get(fmt)
        mb = None if r["file_bytes"] is None else r["file_bytes"] / 1e6
        lines.append(f"| {name} | {num(mb, 2)} | {r['wire_bytes'] / 1e6:.2f} | "
                     f"{r['wire_bytes'] / base['wire_bytes']:.3f} | {r['ttfc_s']:.2f} | {num(r['first_chunk_s'], 2)} | "
                     f"{r['total_s']:.2f} | {num(enc and enc['ms_per_clip'], 0)} | "
                     f"{num(enc and enc['ms_per_audio_s'], 1)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a running server's gRPC address (default: start one)")
    ap.add_argument("--stories", type=int, default=3)
    ap.add_argument("--duration", type=float, default=50.0)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args(argv)
    out = ROOT / "build" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "stories": args.stories,
            "duration_s": args.duration, "steps": args.steps, "codecs": {k: c.mime for k, c in CODECS.items()}}
    if args.url:
        report = run(args.url, args)
    else:
        from audiostory_ensemble.serving.triton_server import TritonServer
        from export.make_repo import make_repo

        repo = make_repo("cpu", "tiny", out / "formats_repo")
        with TritonServer(repo, log_path=out / "formats_server.log").start(timeout=600) as server:
            report = run(server.grpc_url, args)
    report.update(meta)
    (out / "formats.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
