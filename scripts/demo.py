"""`make demo`: serve the tiny model on a local Triton and generate one story with the client.

Expects the repository filled by `make repo` (the Makefile runs the steps before this one).
Writes build/demo/story.wav (and each clip under build/demo/clips/), then stops the server.
"""
import argparse
import sys
import time

from audiostory_ensemble import layout
from audiostory_ensemble.tiny_story import SAMPLE_INSTRUCTIONS
from audiostory_ensemble.triton_server import TritonServer, TritonServerError
from client.__main__ import main as client_main


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
        return client_main(["generate", caption, "--duration", str(total), "--url", server.grpc_url,
                            "-o", str(out / "story.wav"), "--clips-dir", str(out / "clips")])
    finally:
        server.stop()
        print(f"server stopped; log at {out / 'tritonserver.log'}")


if __name__ == "__main__":
    sys.exit(main())
