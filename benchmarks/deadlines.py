"""Time to first sound and stalls under load: the step scheduler's policies, one run.

    python -m benchmarks.deadlines [--levels 1 8 32 64] [--loads 0.5 0.8 1.0 1.2] [--engine simulated|onnx]

For each configuration (``all``: every clip in flight stepped every iteration; ``deadline``:
playback deadlines; ``deadline+admit``: with admission control, open loop only) it writes a
repository (``make_repo``, the cpu profile plus the overrides below), starts a tritonserver on
loopback and streams stories through ``audiostory_stream``:

- **closed loop** at each level: ``level`` clients, each ``--stories`` stories back to back; each
  client's first story is left out of the statistics (a burst of simultaneous first clips is not
  the steady state);
- **open loop**: Poisson arrivals for ``--open-s`` seconds at each fraction of the capacity (the
  stories per second the ``all`` policy sustained at the highest closed-loop level, measured in
  this run), every story awaited.

A listener starts playing at the first clip; clip k is needed when playback reaches its start
(the plan's ``CLIP_START_S``). A clip received later is a *stall*: silence for the difference
(counted when over 10 ms), and playback moves back by as much. Reported per run: TTFC p50/p99,
stories with a stall, late clips, seconds of silence, clip-steps/s (clips delivered × steps over
the run's wall time), refusals. ``--engine simulated`` (default): the DiT step and the VAE sleep an
H100's measured times (``audiostory_ensemble.serving.simulated``); ``onnx``: the real tiny model on
this CPU. Writes ``build/bench/deadlines_<engine>.json`` and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from audiostory_ensemble import interface as I
from audiostory_ensemble.model import layout
from audiostory_ensemble.serving.control import STORY_KEY_INPUT
from benchmarks.loadgen import grpc_inputs, pct, workload

STALL_S = 0.010           # a clip later than this is a stall (receive jitter below it is not)
STORY_TIMEOUT_S = 300.0   # a story unfinished after this counts as an error (it never hangs the run)
OUT = layout.BUILD / "bench"

ENGINES = {   # repository overrides of the cpu profile, per engine
    "simulated": {"dit_engine": "simulated", "vae_engine": "simulated", "clips_in_flight_per_request": 2,
                  "max_clips_in_flight": 64, "stream_instances": 4, "limits": {"max_active_stories": 64}},
    "onnx": {"clips_in_flight_per_request": 2, "limits": {"max_active_stories": 64}},
}
CONFIGS = {"all": {"step_policy": "all"}, "deadline": {"step_policy": "deadline"},
           "deadline+admit": {"step_policy": "deadline", "admit_backlog_s": 2.0}}


def playback(clips: list[tuple[int, float, float]], first_at: float) -> tuple[int, float]:
    """``clips``: (index, start on the timeline, time received); playback starts at ``first_at``.
    Returns (late clips, seconds of silence)."""
    origin, late, silence = first_at, 0, 0.0
    for _index, start, got in sorted(clips)[1:]:
        gap = got - (origin + start)
        if gap > STALL_S:
            late += 1
            silence += gap
            origin += gap
    return late, silence


async def one_story(client, item: dict) -> dict:
    started = time.perf_counter()
    try:
        return await asyncio.wait_for(_story(client, item), STORY_TIMEOUT_S)
    except asyncio.TimeoutError:
        error = f"no final response within {STORY_TIMEOUT_S:g} s"
    except Exception as e:  # noqa: BLE001 - the connection failed (a server restart): the story's error
        error = f"{type(e).__name__}: {e}"
    return {"key": "", "started": started, "ended": time.perf_counter(), "clips": 0, "refused": False, "error": error}


async def _story(client, item: dict) -> dict:
    import tritonclient.grpc.aio as aio

    key = uuid.uuid4().hex          # the story key: the server's logs and traces name the story by it
    inputs = grpc_inputs(item)
    inputs.append(aio.InferInput(STORY_KEY_INPUT, [1], "BYTES"))
    inputs[-1].set_data_from_numpy(np.array([key.encode()], dtype=np.object_))

    async def requests():
        yield {"model_name": I.STREAM_MODEL, "inputs": inputs, "request_id": uuid.uuid4().hex,
               "enable_empty_final_response": True}

    start = time.perf_counter()
    clips, error = [], None
    async for result, err in client.stream_infer(requests()):
        if err is not None:
            error = str(err)
            break
        audio = result.as_numpy(I.CLIP_AUDIO.name)
        if audio is not None:
            clips.append((int(result.as_numpy(I.CLIP_INDEX.name)[0]), float(result.as_numpy(I.CLIP_START_S.name)[0]),
                          time.perf_counter()))
        final = result.get_response().parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            break
    out = {"key": key, "sent_wall": time.time() - (time.perf_counter() - start), "started": start,
           "ended": time.perf_counter(), "clips": len(clips), "error": error,
           "refused": bool(error and "over capacity" in error)}
    if error is None and sorted(c[0] for c in clips) != list(range(len(clips))):
        out["error"] = f"missing clips: got {sorted(c[0] for c in clips)}"
    if clips and out["error"] is None:
        first = min(clips)[2]
        out["ttfc_s"] = first - start
        out["clip_s"] = {i: got - start for i, _, got in clips}
        out["late"], out["silence_s"] = playback(clips, first)
    return out


def summary(results: list[dict], wall: float, steps: int) -> dict:
    ok = [r for r in results if r["error"] is None]
    ttfc = [r["ttfc_s"] for r in ok]
    return {"stories": len(results), "ok": len(ok), "refused": sum(r["refused"] for r in results),
            "errors": sum(1 for r in results if r["error"] and not r["refused"]),
            "error_samples": [r["error"] for r in results if r["error"] and not r["refused"]][:3],
            "ttfc_p50_s": pct(ttfc, 50), "ttfc_p99_s": pct(ttfc, 99),
            "stalled_stories": sum(1 for r in ok if r["late"]), "late_clips": sum(r["late"] for r in ok),
            "clips": sum(r["clips"] for r in ok), "silence_s": sum(r["silence_s"] for r in ok),
            "wall_s": wall, "clip_steps_per_s": sum(r["clips"] for r in results) * steps / wall,
            "stories_per_s": len(ok) / wall}


async def closed_loop(url: str, level: int, per_client: int, items: list[dict], steps: int) -> dict:
    import tritonclient.grpc.aio as aio

    results: list[tuple[int, dict]] = []

    async def client_(c: int):
        client = aio.InferenceServerClient(url)
        try:
            for k in range(per_client):
                results.append((k, await one_story(client, items[(c * per_client + k) % len(items)])))
        finally:
            await client.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client_(c) for c in range(level)))
    wall = time.perf_counter() - t0
    everything = summary([r for _, r in results], wall, steps)
    steady = summary([r for k, r in results if k > 0 or per_client == 1], wall, steps)
    steady["per_story"] = [dict(r, round=k) for k, r in results]
    steady["clip_steps_per_s"] = everything["clip_steps_per_s"]        # the engine's work over the whole run
    steady["stories_per_s"] = everything["stories_per_s"]
    rounds = [round(pct([r["ttfc_s"] for k, r in results if k == i and r["error"] is None], 50), 2)
              for i in range(per_client)]
    return {"mode": "closed", "level": level, **steady, "ttfc_p50_by_round_s": rounds,
            "first_stories": summary([r for k, r in results if k == 0], wall, steps)}


async def open_loop(url: str, rate: float, seconds: float, items: list[dict], steps: int, seed: int = 7) -> dict:
    import tritonclient.grpc.aio as aio

    rng = random.Random(seed)
    client = aio.InferenceServerClient(url)
    tasks, t0, at = [], time.perf_counter(), 0.0
    try:
        while True:
            at += rng.expovariate(rate)
            if at > seconds:
                break
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            tasks.append(asyncio.ensure_future(one_story(client, items[len(tasks) % len(items)])))
        results = await asyncio.gather(*tasks)
    finally:
        await client.close()
    return {"mode": "open", "rate_per_s": rate, **summary(list(results), time.perf_counter() - t0, steps)}


def make_repository(engine: str, config: str) -> Path:
    from export.make_repo import make_repo

    out = OUT / "deadlines" / config.replace("+", "_") / "model_repository"
    settings = out.parent / "settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({**ENGINES[engine], **CONFIGS[config]}))
    return make_repo("cpu", "tiny", out, settings)


def run_config(engine: str, config: str, args, capacity: list) -> list[dict]:
    from audiostory_ensemble.serving.triton_server import TritonServer

    repo = make_repository(engine, config)
    with TritonServer(repo, log_path=OUT / f"deadlines_{config.replace('+', '_')}.log").start(timeout=900) as server:
        # One event loop for the whole run: grpc's asyncio client is bound to the loop it first ran
        # on (seen: a fifth asyncio.run's streams stopped reading and the server's sends timed out).
        return asyncio.run(run_levels(server.grpc_url, config, args, capacity))


async def run_levels(url: str, config: str, args, capacity: list) -> list[dict]:
    items = workload(64, num_steps=args.steps)
    rows = []
    await closed_loop(url, 2, 1, items, args.steps)                      # warm-up
    if config != "deadline+admit":
        for level in args.levels:
            r = await closed_loop(url, level, args.stories, items, args.steps)
            brief = {k: v for k, v in r.items() if k not in ("first_stories", "per_story")}
            print(json.dumps({"config": config, **brief}), flush=True)
            rows.append({"config": config, **r})
            if config == "all" and level == max(args.levels):
                capacity.append(r["stories_per_s"])     # every story of the level, over its wall time
    loads = args.loads if config != "deadline+admit" else [x for x in args.loads if x >= 1.0]
    for load in loads if capacity else []:
        r = await open_loop(url, load * capacity[0], args.open_s, items, args.steps)
        r["load"] = load
        print(json.dumps({"config": config, **r}), flush=True)
        rows.append({"config": config, **r})
    return rows


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}; commit {report['commit']}; {report['date']}; engine {report['engine']}; "
             f"{report['steps']} steps; capacity {report['capacity_stories_per_s']:.3f} stories/s.", "",
             "| config | load | stories (refused) | TTFC p50 / p99 s | stalled stories | late clips | silence s "
             "| clip-steps/s | errors |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        load = f"c={r['level']}" if r["mode"] == "closed" else f"{r['load']:.0%} ({r['rate_per_s']:.2f}/s)"
        lines.append(f"| {r['config']} | {load} | {r['stories']} ({r['refused']}) | {r['ttfc_p50_s']:.2f} / "
                     f"{r['ttfc_p99_s']:.2f} | {r['stalled_stories']} | {r['late_clips']}/{r['clips']} | "
                     f"{r['silence_s']:.1f} | {r['clip_steps_per_s']:.0f} | {r['errors']} |")
    return "\n".join(lines)


def _terminate(*_):
    """SIGTERM unwinds like Ctrl-C, so the server this run started is stopped; a second one (a
    ``timeout`` signals the whole group) must not cut that stop short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(143)


def main(argv=None) -> int:
    from benchmarks.bench_dit_step import commit, machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="simulated", choices=sorted(ENGINES))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--stories", type=int, default=3, help="stories per client in the closed loop")
    ap.add_argument("--loads", type=float, nargs="*", default=[0.5, 0.8, 1.0, 1.2],
                    help="open-loop loads, fractions of the capacity (none: closed loop only)")
    ap.add_argument("--open-s", type=float, default=60.0, help="seconds of arrivals per open-loop load")
    ap.add_argument("--capacity", type=float, default=None, help="stories/s (default: measured, config all)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--admit-backlog-s", type=float, default=CONFIGS["deadline+admit"]["admit_backlog_s"],
                    help="the admission threshold of config deadline+admit")
    ap.add_argument("--tag", default="", help="suffix of the report's file names")
    args = ap.parse_args(argv)
    CONFIGS["deadline+admit"]["admit_backlog_s"] = args.admit_backlog_s
    signal.signal(signal.SIGTERM, _terminate)
    OUT.mkdir(parents=True, exist_ok=True)
    capacity = [args.capacity] if args.capacity else []
    rows = []
    for config in args.configs:
        rows += run_config(args.engine, config, args, capacity)
    report = {"engine": args.engine, "admit_backlog_s": args.admit_backlog_s, "machine": machine(), "commit": commit(),
              "date": time.strftime("%Y-%m-%d"),
              "steps": args.steps, "capacity_stories_per_s": capacity[0] if capacity else float("nan"), "rows": rows}
    name = f"deadlines_{args.engine}{args.tag}"
    (OUT / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (OUT / f"{name}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
