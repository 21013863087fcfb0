"""Load generator: served stack vs the reference pipeline, same instructions, same machine, one run.

    python benchmarks/loadgen.py --model tiny --levels 1 2 4 8 [--requests-per-level 8] [--url HOST:PORT]

Without ``--url`` it starts its own tritonserver on loopback (the repository from ``make repo``).
Steps:
1. the **baseline**: the reference pipeline (eager, sequential) on the fixed instruction set,
   before any server runs, so it has the machine to itself;
2. a **concurrency sweep** with tritonclient's asyncio gRPC streaming client: ``level`` closed-loop
   workers, ``requests-per-level`` stories in all, instructions/durations/seeds fixed and seeded;
3. per level: time to first clip (p50/p90/p99), full-story latency, real-time factor, audio-seconds
   per wall-second, requests/s, errors; Triton's per-model statistics over the level (average batch
   of ``dit_step``/``vae_decoder``, queue vs compute time per request).
Writes ``build/bench/loadgen_<model>.json``, a markdown summary, and (``--plot``) a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from audiostory_ensemble import interface as I
from audiostory_ensemble.model import layout
from audiostory_ensemble.tiny_story import SAMPLE_INSTRUCTIONS
from client.api import request_arrays

STAT_MODELS = ("llm", "bridge", "dit_sampler", "dit_step", "vae_decoder")


def workload(count: int, seed: int = 1234, num_steps: int = 50):
    """A fixed, seeded list of (instruction, total duration, seed) requests."""
    rng = random.Random(seed)
    items = []
    for i in range(count):
        caption, total = SAMPLE_INSTRUCTIONS[i % len(SAMPLE_INSTRUCTIONS)]
        items.append({"instruction": caption, "total_duration": total, "seed": rng.randrange(1000),
                      "num_steps": num_steps})
    return items


def pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


# -------------------------------------------------------------------------------------------------
# Baseline
# -------------------------------------------------------------------------------------------------

def run_baseline(model: str, items) -> dict:
    import torch

    from audiostory_ensemble.reference import ReferencePipeline

    torch.set_grad_enabled(False)
    pipe = ReferencePipeline(model)
    latencies, audio_s = [], 0.0
    t0 = time.perf_counter()
    for it in items:
        t = time.perf_counter()
        r = pipe(it["instruction"], it["total_duration"], seed=it["seed"], num_steps=it["num_steps"])
        latencies.append(time.perf_counter() - t)
        audio_s += r.audio.shape[1] / r.sample_rate
    wall = time.perf_counter() - t0
    return {"requests": len(items), "wall_s": wall, "audio_s": audio_s, "audio_s_per_s": audio_s / wall,
            "latency_p50_s": pct(latencies, 50), "rtf": wall / audio_s,
            # The reference produces nothing before the whole story: its first clip is its last.
            "ttfc_p50_s": pct(latencies, 50)}


# -------------------------------------------------------------------------------------------------
# Served
# -------------------------------------------------------------------------------------------------

def grpc_inputs(item: dict) -> list:
    """A workload item's request tensors as tritonclient's gRPC inputs."""
    import tritonclient.grpc.aio as aio

    inputs = []
    for name, arr in request_arrays(item["instruction"], total_duration=item.get("total_duration"), seed=item["seed"],
                                    num_steps=item["num_steps"], segments=item.get("segments"),
                                    input_audio=item.get("input_audio"),
                                    input_sample_rate=item.get("input_sample_rate")).items():
        t = next(t for t in I.REQUEST_INPUTS if t.name == name)
        inp = aio.InferInput(name, list(arr.shape), t.dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


async def one_story(client, item, model: str = I.ENSEMBLE) -> dict:
    inputs = grpc_inputs(item)
    rid = uuid.uuid4().hex

    async def requests():
        yield {"model_name": model, "inputs": inputs, "request_id": rid, "enable_empty_final_response": True}

    start = time.perf_counter()
    first, clips, audio, error, last = None, set(), 0.0, None, []
    async for result, err in client.stream_infer(requests()):
        if err is not None:
            error = str(err)
            break
        audio_arr = result.as_numpy(I.CLIP_AUDIO.name)
        if audio_arr is not None:
            if first is None:
                first = time.perf_counter() - start
            index = int(result.as_numpy(I.CLIP_INDEX.name)[0])
            if index in clips:
                error = f"duplicate clip {index}"
            clips.add(index)
            if bool(result.as_numpy(I.IS_LAST.name)[0]):
                last.append(index)
            audio += float(result.as_numpy(I.CLIP_DURATION_S.name)[0])
        final = result.get_response().parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            break
    if error is None and clips != set(range(len(clips))):
        error = f"missing clips: got {sorted(clips)}"
    return {"latency_s": time.perf_counter() - start, "ttfc_s": first, "audio_s": audio, "clips": len(clips),
            "last": last, "error": error}


def model_stats(url: str) -> dict:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    out = {}
    for name in STAT_MODELS:
        s = client.get_inference_statistics(name).model_stats[0]
        out[name] = {"inferences": s.inference_count, "executions": s.execution_count,
                     "requests": s.inference_stats.success.count,
                     "queue_ns": s.inference_stats.queue.ns, "compute_ns": s.inference_stats.compute_infer.ns}
    return out


def stats_delta(before: dict, after: dict) -> dict:
    out = {}
    for name in STAT_MODELS:
        b, a = before[name], after[name]
        inf, ex, req = (a["inferences"] - b["inferences"], a["executions"] - b["executions"],
                        a["requests"] - b["requests"])
        out[name] = {"avg_batch": inf / ex if ex else None,
                     "queue_ms_per_request": (a["queue_ns"] - b["queue_ns"]) / req / 1e6 if req else None,
                     "compute_ms_per_request": (a["compute_ns"] - b["compute_ns"]) / req / 1e6 if req else None}
    return out


async def sweep_level(url: str, level: int, items) -> dict:
    import tritonclient.grpc.aio as aio

    queue = list(items)
    results = []

    async def worker():
        client = aio.InferenceServerClient(url)
        try:
            while queue:
                results.append(await one_story(client, queue.pop(0)))
        finally:
            await client.close()

    before = model_stats(url)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(level)))
    wall = time.perf_counter() - t0
    delta = stats_delta(before, model_stats(url))
    ok = [r for r in results if r["error"] is None]
    audio = sum(r["audio_s"] for r in ok)
    return {
        "concurrency": level, "requests": len(results), "errors": len(results) - len(ok),
        "error_samples": [r["error"] for r in results if r["error"]][:3],
        "wall_s": wall, "requests_per_s": len(ok) / wall, "audio_s": audio, "audio_s_per_s": audio / wall,
        "ttfc_p50_s": pct([r["ttfc_s"] for r in ok], 50), "ttfc_p90_s": pct([r["ttfc_s"] for r in ok], 90),
        "ttfc_p99_s": pct([r["ttfc_s"] for r in ok], 99),
        "latency_p50_s": pct([r["latency_s"] for r in ok], 50), "latency_p90_s": pct([r["latency_s"] for r in ok], 90),
        "rtf_p50": statistics.median([r["latency_s"] / r["audio_s"] for r in ok]) if ok else None,
        "models": delta,
        "per_request": results,
    }


def markdown(report: dict) -> str:
    b = report["baseline"]
    lines = [f"Machine: {report['machine']}; commit {report['commit']}; {report['date']}; model {report['model']}, "
             f"{report['num_steps']} steps, {report['requests_per_level']} stories per level.", "",
             f"Reference (eager, sequential): {b['audio_s_per_s']:.2f} audio-s/s, story latency p50 "
             f"{b['latency_p50_s']:.2f} s (its first audio arrives with the whole story).", "",
             "| concurrency | audio-s/s | × reference | req/s | TTFC p50 / p90 / p99 s | story p50 / p90 s | "
             "TTFC / story | dit_step batch | vae batch | dit_step queue / compute ms | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["levels"]:
        d, v = r["models"]["dit_step"], r["models"]["vae_decoder"]
        lines.append(
            f"| {r['concurrency']} | {r['audio_s_per_s']:.2f} | {r['audio_s_per_s'] / b['audio_s_per_s']:.2f}× | "
            f"{r['requests_per_s']:.3f} | {r['ttfc_p50_s']:.2f} / {r['ttfc_p90_s']:.2f} / {r['ttfc_p99_s']:.2f} | "
            f"{r['latency_p50_s']:.2f} / {r['latency_p90_s']:.2f} | {r['ttfc_p50_s'] / r['latency_p50_s']:.0%} | "
            f"{d['avg_batch'] or 0:.2f} | {v['avg_batch'] or 0:.2f} | "
            f"{d['queue_ms_per_request'] or 0:.1f} / {d['compute_ms_per_request'] or 0:.1f} | {r['errors']} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [r["concurrency"] for r in report["levels"]]
    b = report["baseline"]
    panels = (  # title, y label, the served series (key, style, label), the reference's line
        ("throughput", "audio seconds per wall second",
         [("audio_s_per_s", "o-", "served")], ("audio_s_per_s", "reference (sequential)")),
        ("time to first clip", "seconds",
         [("ttfc_p50_s", "o-", "served TTFC p50"), ("ttfc_p90_s", "o:", "served TTFC p90")],
         ("ttfc_p50_s", "reference (whole story)")),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(10, 4))
    for ax, (title, ylabel, series, (ref_key, ref_label)) in zip(axes, panels):
        for key, style, label in series:
            ax.plot(levels, [r[key] for r in report["levels"]], style, label=label)
        ax.axhline(b[ref_key], color="gray", linestyle="--", label=ref_label)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.legend()
        ax.set_title(title)
    fig.suptitle(f"AudioStory {report['model']} — {report['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    from benchmarks.bench_dit_step import commit, machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--requests-per-level", type=int, default=8)
    ap.add_argument("--baseline-requests", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--url", default=None, help="gRPC address of a running server (default: start one)")
    ap.add_argument("--repository", default=str(layout.BUILD / "model_repository"))
    ap.add_argument("--plot", action="store_true")
    args = ap.parse_args(argv)
    # SIGTERM (timeout, CI) unwinds like Ctrl-C, so the server this run started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out_dir = layout.BUILD / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    items = workload(args.requests_per_level, num_steps=args.steps)
    report = {"model": args.model, "machine": machine(), "commit": commit(), "date": time.strftime("%Y-%m-%d"),
              "num_steps": args.steps, "requests_per_level": args.requests_per_level, "levels": []}
    print("baseline: reference pipeline, sequential ...", flush=True)
    report["baseline"] = run_baseline(args.model, items[:args.baseline_requests])
    server = None
    url = args.url
    if url is None:
        from audiostory_ensemble.serving.triton_server import TritonServer
        server = TritonServer(args.repository, log_path=out_dir / "loadgen_server.log").start(timeout=900)
        url = server.grpc_url
    try:
        for level in args.levels:
            print(f"concurrency {level} ...", flush=True)
            report["levels"].append(asyncio.run(sweep_level(url, level, items)))
    finally:
        if server is not None:
            server.stop()
    (out_dir / f"loadgen_{args.model}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out_dir / f"loadgen_{args.model}.md").write_text(table + "\n")
    print(table)
    if args.plot:
        plot(report, out_dir / f"loadgen_{args.model}.png")
        print(f"plot: {out_dir / f'loadgen_{args.model}.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
