"""Bounded soak: many short requests at a fixed concurrency, in every mode and through both front
doors; checks that no clip is lost or duplicated, counts errors, and follows the memory of every
process of the server's tree.

    python -m benchmarks.soak [--requests 1000] [--rounds 2] [--concurrency 16] [--steps 2]
                              [--modes story,script,continuation] [--doors stream,full]

Request k is of mode ``modes[k % len(modes)]`` and goes through door ``doors[(k // len(modes)) %
len(doors)]``, so every mode goes through every door: ``stream`` is ``audiostory_stream`` (gRPC
streaming, one response per clip), ``full`` is ``audiostory_full`` (the whole story in one
response). Stories are the seeded workload of ``loadgen``; scripts are two or three segments;
continuations continue one second of a tone.

It starts its own tritonserver (the repository from ``make repo``) so that it can read the memory
of the whole tree: the resident set of the server, of each python stub (by model), of the vLLM
engine processes and of the rest (proportional set, its anonymous and shared-memory parts, and
the resident set), and ``/dev/shm``. Memory is taken after a warm-up (first-use allocations), after
request 100 of the first round, and at the end of every round; the report gives the growth over
the first round from request 100 and over each later round. The tree's total is the sum of the
proportional sets: the resident sets count every shared page once per process that maps it. Writes
``build/bench/soak_<model>.json`` and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np

from audiostory_ensemble import interface as I
from audiostory_ensemble.model import layout
from audiostory_ensemble.runtime.processes import descendants
from benchmarks.bench_dit_step import commit, machine
from benchmarks.loadgen import grpc_inputs, one_story, pct, workload

MODES = ("story", "script", "continuation")
DOORS = {"stream": I.STREAM_MODEL, "full": I.FULL_MODEL}
SCRIPT_CAPTIONS = ("a door creaks open", "footsteps on gravel", "a dog barks twice", "rain on a tin roof",
                   "a church bell rings")


# ------------------------------------------------------------------------------------------------
# Memory of the server's tree, by process
# ------------------------------------------------------------------------------------------------

MEASURES = {"pss": "Pss", "anon": "Pss_Anon", "shmem": "Pss_Shmem", "rss": "Rss"}


def _memory_kib(pid: int) -> dict[str, int]:
    """A process's memory (``/proc/PID/smaps_rollup``): its proportional set (``pss``: a shared page
    counts a 1/n share in each of the n processes mapping it, so the sum over processes is what
    the tree uses), of that the anonymous part (``anon``: heaps, Python's included) and the shared
    memory part (``shmem``: the python backend's pool, vLLM's buffers), and the resident set
    (``rss``: as ``ps`` shows it, shared pages counted in full in every process)."""
    out = dict.fromkeys(MEASURES, 0)
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]   # after the address line
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
    except OSError:
        return out
    for key, name in MEASURES.items():
        if name in fields:
            out[key] = int(fields[name].split()[0])
    return out


def _role(pid: int, server_pid: int) -> str:
    """Which part of the server a process is: the server, a model's stub, a vLLM engine, other."""
    if pid == server_pid:
        return "tritonserver"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    if "triton_python_backend_stub" in cmd:
        m = re.search(r"/([^/\s]+)/1/model\.py", cmd)
        return f"stub:{m.group(1)}" if m else "stub"
    if cmd.startswith("VLLM::") or "vllm" in cmd.lower():
        return "vllm:" + cmd.split()[0].removeprefix("VLLM::")
    return "other"


def tree_memory_mib(server_pid: int) -> dict[str, dict[str, float]]:
    """MiB by measure (see :func:`_memory_kib`), then by role, with each measure's total."""
    out: dict[str, dict[str, float]] = {key: {} for key in MEASURES}
    for pid in [server_pid, *descendants(server_pid)]:
        role = _role(pid, server_pid)
        for key, kib in _memory_kib(pid).items():
            out[key][role] = out[key].get(role, 0.0) + kib / 1024
    for key, by_role in out.items():
        out[key] = {k: round(v, 1) for k, v in sorted(by_role.items())}
        out[key]["total"] = round(sum(by_role.values()), 1)
    return out


def shm_mib() -> dict[str, float]:
    """``/dev/shm``: the segments' sizes and the memory they hold (pages written)."""
    files = [f.stat() for f in Path("/dev/shm").iterdir() if f.is_file()]
    return {"size": round(sum(st.st_size for st in files) / 2**20, 1),
            "used": round(sum(st.st_blocks * 512 for st in files) / 2**20, 1)}


def growth(a: dict, b: dict) -> dict[str, dict[str, float]]:
    """Relative growth from ``a`` to ``b``, by measure and role (roles in both)."""
    return {key: {k: round((b[key][k] - a[key][k]) / a[key][k], 4) for k in a[key] if k in b[key] and a[key][k] > 0}
            for key in a}


# ------------------------------------------------------------------------------------------------
# The requests
# ------------------------------------------------------------------------------------------------

def requests(count: int, modes, doors, steps: int, seed: int = 1234) -> list[dict]:
    stories = workload(count, seed=seed, num_steps=steps)
    t = np.arange(16000) / 16000
    tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
    out = []
    for k in range(count):
        mode, door = modes[k % len(modes)], doors[(k // len(modes)) % len(doors)]
        item = {"mode": mode, "door": door, "seed": stories[k]["seed"], "num_steps": steps}
        if mode == "story":
            item.update(instruction=stories[k]["instruction"], total_duration=stories[k]["total_duration"])
        elif mode == "script":
            n = 2 + k % 2
            start = 0.5 + (k % 5) * 0.25
            segs = []
            for j in range(n):
                end = start + 3.0 + (k + j) % 4
                segs.append({"start": round(start, 2), "end": round(end, 2),
                             "caption": SCRIPT_CAPTIONS[(k + j) % len(SCRIPT_CAPTIONS)]})
                start = end if j % 2 == 0 else end + 0.5
            item.update(instruction=None, segments=segs)
        else:
            item.update(instruction="footsteps fade away", total_duration=6.0 + k % 5,
                        input_audio=tone, input_sample_rate=16000)
        out.append(item)
    return out


async def one_full(client, item: dict) -> dict:
    """One whole story from ``audiostory_full``: the plan's clip indices must be 0..K-1 and the
    captions as many."""
    import tritonclient.grpc.aio as aio

    inputs = grpc_inputs(item)
    start = time.perf_counter()
    outputs = [aio.InferRequestedOutput(t.name) for t in I.FULL_OUTPUTS]
    result = await client.infer(I.FULL_MODEL, inputs, outputs=outputs)
    captions = result.as_numpy(I.CAPTIONS.name)
    plan = json.loads(result.as_numpy(I.PLAN.name)[0])
    indices = [c["index"] for c in plan["clips"]]
    error = None
    if indices != list(range(len(indices))) or len(captions) != len(indices):
        error = f"clip indices {indices} for {len(captions)} captions"
    elif result.as_numpy(I.AUDIO.name).shape[-1] == 0:
        error = "empty story audio"
    return {"latency_s": time.perf_counter() - start, "clips": len(indices),
            "last": [len(indices) - 1] if indices else [], "error": error}


def check(result: dict) -> list[str]:
    """What is wrong with one request: an error, or lost, duplicated or unterminated clips."""
    if result["error"]:
        return [result["error"]]
    if result["last"] != [result["clips"] - 1]:
        return [f"last-clip flags {result['last']} for {result['clips']} clips"]
    return []


async def soak(url: str, items: list[dict], concurrency: int, on_done=None) -> list[dict]:
    import tritonclient.grpc.aio as aio

    queue: asyncio.Queue = asyncio.Queue()
    for i, item in enumerate(items):
        queue.put_nowait((i, item))
    results: list[dict | None] = [None] * len(items)
    done = 0

    async def worker():
        nonlocal done
        client = aio.InferenceServerClient(url)
        try:
            while not queue.empty():
                i, item = queue.get_nowait()
                try:
                    if item["door"] == "full":
                        results[i] = await one_full(client, item)
                    else:
                        results[i] = await one_story(client, item, DOORS["stream"])
                except Exception as e:  # noqa: BLE001 - a transport failure is an error of the run
                    results[i] = {"error": f"{type(e).__name__}: {e}", "clips": 0, "last": [], "latency_s": 0.0}
                done += 1
                if on_done is not None:
                    on_done(done)
        finally:
            await client.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def summary(items: list[dict], results: list[dict], wall: float) -> dict:
    problems = [(i, p) for i, r in enumerate(results) for p in check(r)]
    lost_or_dup = [p for p in problems if "clip" in p[1]]
    ok = [r for r in results if not check(r)]
    by = {}
    for item, r in zip(items, results):
        key = f"{item['mode']}/{item['door']}"
        by.setdefault(key, {"requests": 0, "clips": 0, "errors": 0})
        by[key]["requests"] += 1
        by[key]["clips"] += r["clips"]
        by[key]["errors"] += bool(check(r))
    return {"wall_s": round(wall, 1), "requests_per_s": round(len(ok) / wall, 3),
            "clips": sum(r["clips"] for r in ok), "errors": len(problems), "lost_or_duplicated": len(lost_or_dup),
            "error_examples": sorted({p for _, p in problems})[:10], "by_mode_and_door": by,
            "latency_p50_s": pct([r["latency_s"] for r in ok], 50),
            "latency_p99_s": pct([r["latency_s"] for r in ok], 99)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--requests", type=int, default=1000, help="requests per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--doors", default=",".join(DOORS))
    ap.add_argument("--mark", type=int, default=100, help="memory is also taken after this many requests")
    ap.add_argument("--repository", default=str(layout.BUILD / "model_repository"))
    args = ap.parse_args(argv)
    modes, doors = args.modes.split(","), args.doors.split(",")
    if set(modes) - set(MODES) or set(doors) - set(DOORS):
        ap.error(f"--modes from {MODES}, --doors from {tuple(DOORS)}")
    # SIGTERM (timeout, CI) unwinds like Ctrl-C, so the server this run started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out_dir = layout.BUILD / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    from audiostory_ensemble.serving.triton_server import TritonServer
    server = TritonServer(args.repository, log_path=out_dir / "soak_server.log").start(timeout=900)
    pid = server.process.pid
    report = {"model": args.model, "machine": machine(), "commit": commit(), "date": time.strftime("%Y-%m-%d"),
              "requests_per_round": args.requests, "rounds": args.rounds, "concurrency": args.concurrency,
              "num_steps": args.steps, "modes": modes, "doors": doors, "rounds_report": []}
    memory = {}
    try:
        warm = requests(max(args.concurrency, len(modes) * len(doors)), modes, doors, args.steps, seed=99)
        asyncio.run(soak(server.grpc_url, warm, args.concurrency))
        memory["after warm-up"] = tree_memory_mib(pid)
        shm_before = shm_mib()
        for rnd in range(args.rounds):
            items = requests(args.requests, modes, doors, args.steps, seed=1234 + rnd)

            def mark(done, rnd=rnd):
                if rnd == 0 and done == args.mark:
                    memory[f"round 1, after {args.mark}"] = tree_memory_mib(pid)
            t0 = time.perf_counter()
            results = asyncio.run(soak(server.grpc_url, items, args.concurrency, mark))
            report["rounds_report"].append(summary(items, results, time.perf_counter() - t0))
            memory[f"round {rnd + 1}, end"] = tree_memory_mib(pid)
            print(f"round {rnd + 1}: {json.dumps(report['rounds_report'][-1])}", flush=True)
        shm_after = shm_mib()
    finally:
        server.stop()
    report["memory_mib"] = memory
    report["dev_shm_mib"] = {"before": shm_before, "after": shm_after}
    first = memory.get(f"round 1, after {args.mark}")
    if first is not None:
        report["growth_round_1_from_mark"] = growth(first, memory["round 1, end"])
    for rnd in range(1, args.rounds):
        report[f"growth_round_{rnd + 1}"] = growth(memory[f"round {rnd}, end"], memory[f"round {rnd + 1}, end"])
    (out_dir / f"soak_{args.model}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if all(r["errors"] == 0 for r in report["rounds_report"]) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
