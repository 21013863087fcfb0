"""Bounded soak: many short stories at a fixed concurrency through the front door; checks that no
clip is lost or duplicated, counts errors, and compares the server's memory before and after.

    python -m benchmarks.soak [--requests 1000] [--concurrency 16] [--steps 2] [--url HOST:PORT]

Without ``--url`` it starts its own tritonserver (the repository from ``make repo``) so it can
read the memory of the server's whole process tree (server, stubs, vLLM engines) and ``/dev/shm``.
Memory is taken after a warm-up of ``concurrency`` requests (first-use allocations) and again at
the end. Writes ``build/bench/soak_<model>.json`` and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from audiostory_ensemble import interface as I
from audiostory_ensemble import layout
from audiostory_ensemble.serving.processes import descendants
from benchmarks.bench_dit_step import commit, machine
from benchmarks.loadgen import one_story, pct, workload


def tree_rss_mib(pid: int) -> float:
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def shm_mib() -> float:
    return sum(f.stat().st_size for f in Path("/dev/shm").iterdir() if f.is_file()) / 2**20


def check(result: dict) -> list[str]:
    """What is wrong with one story's stream: lost, duplicated or unterminated clips."""
    problems = []
    if result["error"]:
        problems.append(result["error"])
    elif result["last"] != [result["clips"] - 1]:
        problems.append(f"last-clip flags {result['last']} for {result['clips']} clips")
    return problems


async def soak(url: str, items, concurrency: int, model: str) -> list[dict]:
    import tritonclient.grpc.aio as aio

    queue: asyncio.Queue = asyncio.Queue()
    for i, item in enumerate(items):
        queue.put_nowait((i, item))
    results: list[dict | None] = [None] * len(items)

    async def worker():
        client = aio.InferenceServerClient(url)
        try:
            while not queue.empty():
                i, item = queue.get_nowait()
                try:
                    results[i] = await one_story(client, item, model)
                except Exception as e:  # noqa: BLE001 - a transport failure is an error of the run
                    results[i] = {"error": f"{type(e).__name__}: {e}", "clips": 0, "last": [], "latency_s": 0.0}
        finally:
            await client.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--endpoint", default=I.STREAM_MODEL, help="model to call (default: the front door)")
    ap.add_argument("--url", default=None, help="gRPC address of a running server (default: start one)")
    ap.add_argument("--repository", default=str(layout.BUILD / "model_repository"))
    args = ap.parse_args(argv)
    # SIGTERM (timeout, CI) unwinds like Ctrl-C, so the server this run started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out_dir = layout.BUILD / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    items = workload(args.requests, num_steps=args.steps)
    server, url = None, args.url
    if url is None:
        from audiostory_ensemble.triton_server import TritonServer
        server = TritonServer(args.repository, log_path=out_dir / "soak_server.log").start(timeout=900)
        url = server.grpc_url
    report = {"model": args.model, "machine": machine(), "commit": commit(), "date": time.strftime("%Y-%m-%d"),
              "endpoint": args.endpoint, "requests": args.requests, "concurrency": args.concurrency,
              "num_steps": args.steps}
    try:
        asyncio.run(soak(url, workload(args.concurrency, seed=99, num_steps=args.steps), args.concurrency,
                         args.endpoint))                                  # warm-up
        before = (tree_rss_mib(server.process.pid), shm_mib()) if server else (None, None)
        t0 = time.perf_counter()
        timeline, done = [], threading.Event()

        def sample():   # the tree's memory every 30 s, to tell a plateau from a leak
            while not done.wait(30):
                if server.process is not None:
                    timeline.append((round(time.perf_counter() - t0), round(tree_rss_mib(server.process.pid))))

        sampler = threading.Thread(target=sample, daemon=True)
        if server:
            sampler.start()
        results = asyncio.run(soak(url, items, args.concurrency, args.endpoint))
        wall = time.perf_counter() - t0
        done.set()
        after = (tree_rss_mib(server.process.pid), shm_mib()) if server else (None, None)
    finally:
        if server is not None:
            server.stop()
    problems = [(i, p) for i, r in enumerate(results) for p in check(r)]
    lost_or_dup = [p for p in problems if "clip" in p[1]]   # missing/duplicate clips, last-clip flags
    ok = [r for r in results if not check(r)]
    report.update({
        "wall_s": round(wall, 1), "stories_per_s": round(len(ok) / wall, 2),
        "clips": sum(r["clips"] for r in ok), "errors": len(problems), "lost_or_duplicated": len(lost_or_dup),
        "error_examples": sorted({p for _, p in problems})[:10],
        "latency_p50_s": pct([r["latency_s"] for r in ok], 50), "latency_p99_s": pct([r["latency_s"] for r in ok], 99),
        "server_rss_mib": {"before": before[0], "after": after[0]},
        "dev_shm_mib": {"before": before[1], "after": after[1]},
        "server_rss_timeline_mib": timeline if server else None,
    })
    (out_dir / f"soak_{args.model}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if not problems else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
