"""Faults under load: processes of the running pipeline killed with SIGKILL while stories flow.

    python -m benchmarks.faults [--model tiny] [--per-fault] [--stories 200] [--concurrency 8]
                                [--faults 3] [--steps 8] [--seed 7]

It starts its own supervised tritonserver (the cpu repository of ``--model``, built under
``build/bench/``) and runs ``--concurrency`` clients, each sending stories one after another
(three in four through ``audiostory_stream``, one in four through ``audiostory_full``), a client
pausing 1 s after a refusal, as the refusal asks. Every story ends one of four ways:
``completed`` (every clip, none twice), ``refused`` (UNAVAILABLE before it started: a stage was
restarting), ``lost`` (it was in flight on the part that died: an error naming the stage, or the
connection closed by the front door's server restart), or ``hang`` (no end within
``--story-timeout``); anything else is an ``other`` error.

``--per-fault``: every kind of process is killed once, one after the other (the next once the last
has recovered and a few stories completed), and each fault is reported: seconds until the
supervisor saw it, until the stage was back, and the stories it cost. Otherwise ``--faults``
kinds drawn at random (seeded) are killed at random moments of a run of ``--stories`` stories.

At the end: one more story through each front door, the server's process tree (roles and count)
against the tree before the faults, vLLM's processes, the front door's stuck threads, and after
the server stops, shared memory left in /dev/shm. Writes ``build/bench/faults_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import threading
import time
from pathlib import Path

from audiostory_ensemble import interface as I
from audiostory_ensemble.model import layout
from audiostory_ensemble.runtime.processes import children, cmdline, descendants, start_time
from audiostory_ensemble.serving.supervisor import RestartPolicy
from audiostory_ensemble.serving.triton_server import TritonServer
from benchmarks.bench_dit_step import commit, machine
from benchmarks.loadgen import workload

# What can be killed: a stage's stub (by model), or a vLLM process of the llm stage.
KINDS = ("dit_sampler", "bridge", "vae_decoder", "dit_step", "llm", "EngineCore:generate", "EngineCore:pooling",
         "Worker", "audiostory_full", "audiostory_stream")


def find_victim(server, kind: str) -> int:
    if kind.startswith(("EngineCore", "Worker")):
        name, _, which = kind.partition(":")
        procs = sorted((p for p in descendants(server.process.pid)
                        if (cmdline(p) or [""])[0].startswith(f"VLLM::{name}")), key=start_time)
        return procs[1 if which == "pooling" else 0]        # the engines start generate first
    for pid in children(server.process.pid):
        if any(a.endswith(f"/{kind}/1/model.py") for a in cmdline(pid)):
            return pid
    raise RuntimeError(f"no process of {kind}")


def tree_roles(server) -> dict[str, int]:
    """The server's tree by role: each stage's stubs, vLLM's engine cores and workers, the rest."""
    roles: dict[str, int] = {}
    for pid in descendants(server.process.pid):
        argv = cmdline(pid)
        if not argv or start_time(pid) is None:
            continue
        if argv[0].startswith("VLLM::"):
            role = argv[0].split()[0]
        elif argv[0].endswith("triton_python_backend_stub"):
            role = Path(argv[1]).parent.parent.name
        else:
            role = "other"
        roles[role] = roles.get(role, 0) + 1
    return roles


def classify(error: str) -> str:
    """``refused``: the story did not start (a stage restarting, the server busy, not accepting
    connections while it restarts, or Triton refusing a request for a model it is reloading);
    ``lost``: it was in flight on the part that died."""
    low = error.lower()
    if ("it is restarting, retry" in error or "server busy" in error or "failed to connect" in low
            or "connection refused" in low or "has no available versions" in error):
        return "refused"
    if ("was lost with it" in error or "is not healthy" in error or "socket closed" in low
            or "stream removed" in low or "connection closed" in low or "unavailable" in low):
        return "lost"
    return "other"


class Clients:
    """``concurrency`` threads taking stories from a queue; every story's door, times and outcome."""

    def __init__(self, server, items, concurrency: int, timeout: float):
        self.server, self.timeout = server, timeout
        self.todo: queue.Queue = queue.Queue()
        for k, item in enumerate(items):
            self.todo.put((k, item))
        self.results: list[dict] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(concurrency)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def join(self):
        for t in self.threads:
            t.join()

    def _one(self, k: int, item: dict) -> dict:
        from client.api import AudioStoryClient, generate_http

        door = I.FULL_MODEL if k % 4 == 3 else I.STREAM_MODEL
        params = {"total_duration": item["total_duration"], "seed": item["seed"], "num_steps": item["num_steps"]}
        t0 = time.monotonic()
        out = {"k": k, "door": door, "start": t0}
        try:
            if door == I.STREAM_MODEL:
                story = AudioStoryClient(self.server.grpc_url).generate(item["instruction"], timeout=self.timeout,
                                                                         **params)
            else:
                story = generate_http(item["instruction"], url=self.server.http_url, timeout=self.timeout, **params)
            out.update(outcome="completed", clips=len(story.clips))
        except TimeoutError as e:
            out.update(outcome="hang", error=str(e))
        except Exception as e:  # noqa: BLE001 - every end is recorded
            message = str(e)
            out.update(outcome=classify(message), error=message[:300])
        out["end"] = time.monotonic()
        return out

    def _run(self):
        while True:
            try:
                k, item = self.todo.get_nowait()
            except queue.Empty:
                return
            result = self._one(k, item)
            with self.lock:
                self.results.append(result)
            if result["outcome"] != "completed":       # back off, as the error asks
                time.sleep(1.0)

    def completed_since(self, t: float) -> int:
        with self.lock:
            return sum(1 for r in self.results if r["outcome"] == "completed" and r["start"] >= t)

    def flowing(self, t: float, stories: int = 3, timeout: float = 600.0) -> None:
        """Wait until ``stories`` stories started after ``t`` completed (or the clients are done)."""
        deadline = time.monotonic() + timeout
        while self.completed_since(t) < stories and time.monotonic() < deadline:
            if not any(th.is_alive() for th in self.threads):
                raise RuntimeError("the clients ran out of stories before the server served again")
            time.sleep(0.2)


def inject(server, kind: str, clients: Clients, timeout: float = 600.0) -> dict:
    """Kill one process of ``kind``; wait until its stage is back; the fault's record."""
    before = len(server.supervisor.history)
    pid = find_victim(server, kind)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    deadline = killed + timeout
    while (len(server.supervisor.history) <= before or server.supervisor.busy) and time.monotonic() < deadline:
        if server.failure:
            break
        time.sleep(0.1)
    record = server.supervisor.history[before] if len(server.supervisor.history) > before else None
    return {"kind": kind, "pid": pid, "killed": killed, "stage": record.model if record else None,
            "reason": record.reason if record else None, "server_restart": bool(record and record.server),
            "detect_s": None if record is None else round(record.seen_at - killed, 3),
            "recover_s": None if record is None or record.recovered_s is None
            else round(record.seen_at - killed + record.recovered_s, 2),
            "failure": server.failure}


def attribute(faults: list[dict], results: list[dict]) -> None:
    """Each fault's cost: stories in flight at the kill that were lost, stories refused until the
    stage was back."""
    for f in faults:
        until = f["killed"] + (f["recover_s"] or 0)
        f["lost"] = sum(1 for r in results if r["outcome"] == "lost" and r["start"] <= f["killed"] <= r["end"])
        f["in_flight"] = sum(1 for r in results if r["start"] <= f["killed"] <= r["end"])
        f["refused"] = sum(1 for r in results if r["outcome"] == "refused" and f["killed"] <= r["end"] <= until + 1)


def run(args) -> dict:
    from export.make_repo import make_repo

    out_dir = layout.BUILD / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    repo = make_repo("cpu", args.model, out_dir / "faults_repository")
    shm_before = set(os.listdir("/dev/shm"))
    server = TritonServer(repo, log_path=out_dir / "faults_server.log",
                          restart_policy=RestartPolicy(max_restarts=len(KINDS) + args.faults))
    server.start(timeout=900)
    report = {"machine": machine(), "commit": commit(), "date": time.strftime("%Y-%m-%d"), "model": args.model,
              "mode": "per-fault" if args.per_fault else "random", "concurrency": args.concurrency,
              "steps": args.steps, "seed": args.seed}
    try:
        warm = Clients(server, workload(2, args.seed + 1, args.steps), 2, args.story_timeout).start()
        warm.join()
        roles_before = tree_roles(server)
        rng = random.Random(args.seed)
        faults = []
        if args.per_fault:
            items = workload(10_000, args.seed, args.steps)
            clients = Clients(server, items, args.concurrency, args.story_timeout).start()
            for kind in KINDS:
                clients.flowing(time.monotonic())          # stories flowing again
                time.sleep(rng.uniform(0.5, 2.0))
                faults.append(inject(server, kind, clients))
                print(f"faults: {faults[-1]['kind']}: detected {faults[-1]['detect_s']} s, back after "
                      f"{faults[-1]['recover_s']} s", flush=True)
                if server.failure:
                    break
            clients.flowing(time.monotonic())
            while not clients.todo.empty():                  # stop the clients: nothing more to take
                try:
                    clients.todo.get_nowait()
                except queue.Empty:
                    break
            clients.join()
        else:
            items = workload(args.stories, args.seed, args.steps)
            clients = Clients(server, items, args.concurrency, args.story_timeout).start()
            started = time.monotonic()
            # the faults at random moments of the run (as a share of the stories sent)
            marks = sorted(rng.uniform(0.1, 0.8) for _ in range(args.faults))
            kinds = [rng.choice(KINDS) for _ in range(args.faults)]
            for mark, kind in zip(marks, kinds):
                while len(clients.results) < mark * args.stories and any(t.is_alive() for t in clients.threads):
                    time.sleep(0.1)
                faults.append(inject(server, kind, clients))
                print(f"faults: {kind}: detected {faults[-1]['detect_s']} s, back after {faults[-1]['recover_s']} s",
                      flush=True)
            clients.join()
            report["wall_s"] = round(time.monotonic() - started, 1)
        results = clients.results
        attribute(faults, results)
        outcomes = {}
        for r in results:
            outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
        report["stories"] = len(results)
        report["outcomes"] = outcomes
        report["others"] = [r["error"] for r in results if r["outcome"] == "other"][:10]
        report["faults"] = [{k: v for k, v in f.items() if k not in ("killed", "pid")} for f in faults]
        # The server afterwards: a story through each door, the tree as before, no stuck threads.
        after = Clients(server, workload(4, args.seed + 2, args.steps), 1, args.story_timeout).start()
        after.join()
        report["after"] = {"stories": [r["outcome"] for r in after.results],
                           "tree_before": roles_before, "tree_after": tree_roles(server),
                           "failure": server.failure}
        from tests.serverutil import scrape  # the front door's stuck-thread gauges
        metrics = scrape(server)
        report["after"]["stuck"] = {k: v for k, v in metrics.items() if "stuck_" in k}
    finally:
        server.stop()
    from audiostory_ensemble.runtime.processes import unlink_unmapped_shm
    new = [f"/dev/shm/{n}" for n in sorted(set(os.listdir("/dev/shm")) - shm_before)]
    report["shm_left_after_stop"] = [Path(p).name for p in unlink_unmapped_shm([], new, timeout=5)]
    path = out_dir / f"faults_{args.model}{'_per_fault' if args.per_fault else ''}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--per-fault", action="store_true", help="kill every kind of process once, in turn")
    ap.add_argument("--stories", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--faults", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--story-timeout", type=float, default=300.0, help="a story not ended by then is a hang")
    report = run(ap.parse_args(argv))
    ok = report["outcomes"].get("hang", 0) == 0 and report["outcomes"].get("other", 0) == 0 and \
        all(o == "completed" for o in report["after"]["stories"]) and not report["shm_left_after_stop"]
    return 0 if ok else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())
