"""The full-size model, end to end, on this machine: the random-weight release built, converted,
exported and served on the cpu profile, three stories asked for, time and memory of every step.

    python -m benchmarks.full_size [--out build/full-size] [--force] [--skip-serve]

Steps, each a child process measured on its own (wall time, peak resident memory from wait4):
``release`` (export/make_full_random_release.py), ``convert``, ``export`` (with its onnxruntime
parity check at full size) and ``repo`` (cpu profile, the settings below). Each is skipped by its own
cache when its inputs are unchanged, unless ``--force``. Then the server starts on that repository
and serves:

1. a script-mode story of 2 clips (non-integer times) at 2 steps through ``audiostory_stream``;
2. the same through ``audiostory_full`` (HTTP), which must give the same audio;
3. a story-mode request with the plan budget ``max_new_tokens`` below: the random LLM, held to the
   plan grammar, writes a plan within it or the story ends in a clear error; never a hang.

Every process of the server is sampled twice a second (peak RSS per process), Triton's statistics
give each model's time, and everything lands in ``<out>/report.json``, printed as tables.
Machine-independent settings only: nothing here needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from audiostory_ensemble.model import layout
from audiostory_ensemble.model.config import OUTPUT_SAMPLE_RATE

PY = sys.executable
EXPORT = layout.PROJECT_ROOT / "export"

# The cpu profile, and what the full size needs on a 24 GiB host: the LLM in bf16 (two float32 engines
# of 12.3 GB would not fit), a small batch and KV space (0.25 GiB: 4 plans of 2,048 tokens at 36 KiB a
# token), one audiostory_full instance, one clip per VAE
# call (a decoded clip's activations are 1.4 GB a layer at 128 channels), the DiT graph loaded once
# (in dit_step; the onnx engine would load a second copy into dit_sampler), a BLS timeout above a
# full-size clip's decode (≈ 30 s on 2 cores: the cpu profile's 30 s re-sent it), a short plan budget.
SETTINGS = {
    "engine_options": {"dtype": "bfloat16", "max_model_len": 2048, "kv_cache_gib": 0.25, "max_num_seqs": 4,
                       "max_new_tokens": 640},
    "full_instances": 1,
    "vae_max_batch": 1,
    "dit_engine": "triton",
    "bls_timeout_s": 600,
}
SCRIPT = [{"start": 0.0, "end": 4.75, "caption": "rain on a tin roof"},
          {"start": 4.75, "end": 9.3, "caption": "a dog barks twice in the distance"}]
STORY = ("a storm rolls over a harbour town at night, then the rain stops and gulls call", 12.5)
STEPS = 2
REQUEST_TIMEOUT_S = 1800.0


def measured(name: str, cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; its wall time and peak RSS (the child's own, from wait4)."""
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=layout.PROJECT_ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    out = {"step": name, "seconds": round(time.perf_counter() - t, 1),
           "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "rc": proc.returncode, "log": str(log),
           "up_to_date": "up to date" in log.read_text(errors="replace")}
    print(f"{name}: {out['seconds']} s, peak RSS {out['peak_rss_gib']} GiB"
          + (" (up to date)" if out["up_to_date"] else ""), flush=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed (rc {proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return out


def build(out: Path, force: bool) -> tuple[list[dict], dict]:
    """What ``make full-random convert export repo MODEL=full`` does (the repository under ``out``)."""
    from export.make_full_random_release import MARKER

    release, converted, onnx = layout.release_dir("full"), layout.converted_dir("full"), layout.export_dir("full")
    repo = out / "model_repository"
    settings = out / "settings.json"
    settings.write_text(json.dumps(SETTINGS, indent=2) + "\n")
    f = ["--force"] if force else []
    steps = []
    if release.exists() and not (release / MARKER).exists():
        print(f"release: using the release in {release} (not a random one made here)", flush=True)
    else:
        steps.append(measured("release", [PY, str(EXPORT / "make_full_random_release.py"), "--out", str(release)] + f,
                              out / "release.log"))
    steps += [
        measured("convert", [PY, str(EXPORT / "convert_checkpoint.py"), "--model", "full", "--release", str(release),
                             "--out", str(converted)] + f, out / "convert.log"),
        measured("export", [PY, str(EXPORT / "export_onnx.py"), "--model", str(converted), "--out", str(onnx)] + f,
                 out / "export.log"),
        measured("repo", [PY, str(EXPORT / "make_repo.py"), "--profile", "cpu", "--model", str(converted),
                          "--onnx-dir", str(onnx), "--out", str(repo), "--settings", str(settings)],
                 out / "repo.log"),
    ]
    manifest = json.loads((onnx / layout.MANIFEST).read_text())
    sizes = {p.name: p.stat().st_size for p in sorted(onnx.iterdir()) if p.is_file()}
    return steps, {"parity_max_rel": manifest.get("parity_max_rel"), "timings": manifest.get("timings"),
                   "files": sizes}


def anon_rss_gib(pid: int) -> float:
    """Resident anonymous memory (what the kernel cannot drop and page back in from a file, unlike
    the pages of mapped weight files, which RSS also counts)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 2**20
    return 0.0


class MemorySampler(threading.Thread):
    """Peak resident anonymous memory of every process under ``pid``, named by what it runs."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(name="memory-sampler", daemon=True)
        self.pid, self.interval = pid, interval
        self.peaks: dict[str, float] = {}
        self.total_peak = 0.0
        self.stop_event = threading.Event()

    @staticmethod
    def label(proc) -> str:
        args = proc.cmdline()
        text = " ".join(args)
        for part in args:
            if "/model_repository/" in part:         # a python stub: its model's folder
                return "stub " + part.split("/model_repository/")[1].split("/")[0]
        if "tritonserver" in text:
            return "tritonserver"
        return (proc.name() or (args[0] if args else "?"))[:40]

    def run(self) -> None:
        import psutil

        while not self.stop_event.wait(self.interval):
            try:
                root = psutil.Process(self.pid)
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                continue
            total = 0.0
            seen: dict[str, float] = {}
            for p in procs:
                try:
                    rss = anon_rss_gib(p.pid)
                    name = self.label(p)
                except (psutil.Error, OSError):
                    continue
                total += rss
                seen[name] = seen.get(name, 0.0) + rss     # same-named processes add up
            for name, rss in seen.items():
                self.peaks[name] = max(self.peaks.get(name, 0.0), rss)
            self.total_peak = max(self.total_peak, total)


def model_stats(http_url: str) -> dict[str, dict]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(http_url)
    try:
        stats = client.get_inference_statistics()["model_stats"]
    finally:
        client.close()
    out = {}
    for m in stats:
        inf = m["inference_stats"]
        out[m["name"]] = {"executions": int(m.get("execution_count", 0)),
                          "requests": int(inf["success"]["count"]) + int(inf["fail"]["count"]),
                          "compute_s": (int(inf["compute_input"]["ns"]) + int(inf["compute_infer"]["ns"])
                                        + int(inf["compute_output"]["ns"])) / 1e9}
    return out


def stats_delta(before: dict, after: dict) -> dict:
    out = {}
    for name, a in after.items():
        b = before.get(name, {"executions": 0, "requests": 0, "compute_s": 0.0})
        d = {k: round(a[k] - b[k], 3) for k in a}
        if d["executions"] or d["requests"]:
            out[name] = d
    return out


def expected_samples(clips) -> int:
    return round(max(c.start_s + c.duration_s for c in clips) * OUTPUT_SAMPLE_RATE)


def serve(out: Path) -> dict:
    from audiostory_ensemble.serving.triton_server import TritonServer
    from client.api import AudioStoryClient, AudioStoryError, generate_http

    t = time.perf_counter()
    # vLLM's VLLM_CPU_KVCACHE_SPACE (whole GiB; the test suite sets 1) would win over kv_cache_gib
    # and cost the 1.5 GiB this host does not have.
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    server = TritonServer(out / "model_repository", log_path=out / "tritonserver.log", env=env)
    server.start(timeout=REQUEST_TIMEOUT_S)
    startup_s = round(time.perf_counter() - t, 1)
    print(f"server ready in {startup_s} s", flush=True)
    sampler = MemorySampler(server.process.pid)
    sampler.start()
    time.sleep(2 * sampler.interval)
    idle = dict(sampler.peaks)
    results = {"startup_s": startup_s}
    http = server.http_url
    try:
        params = dict(segments=SCRIPT, num_steps=STEPS, seed=7)
        for door in ("stream", "full"):
            before, t, arrivals = model_stats(http), time.perf_counter(), []
            if door == "stream":
                story = AudioStoryClient(server.grpc_url).generate(
                    None, timeout=REQUEST_TIMEOUT_S, on_clip=lambda c: arrivals.append(time.perf_counter() - t),
                    **params)
            else:
                story = generate_http(None, http, timeout=REQUEST_TIMEOUT_S, **params)
            results[f"script_{door}"] = {
                "seconds": round(time.perf_counter() - t, 1), "clip_arrivals_s": [round(a, 1) for a in arrivals],
                "samples": int(story.audio.shape[1]), "expected_samples": expected_samples(story.clips),
                "finite": bool(np.isfinite(story.audio).all()), "peak": float(np.abs(story.audio).max()),
                "durations": [c.duration_s for c in story.clips], "stages": stats_delta(before, model_stats(http))}
            results[f"script_{door}_audio"] = story.audio
            print(f"script mode via {door}: {results[f'script_{door}']['seconds']} s", flush=True)
        a, b = results.pop("script_stream_audio"), results.pop("script_full_audio")
        results["doors_max_abs_diff"] = float(np.abs(a - b).max()) if a.shape == b.shape else None

        before, t, arrivals = model_stats(http), time.perf_counter(), []
        entry: dict = {}
        try:
            story = AudioStoryClient(server.grpc_url).generate(
                STORY[0], total_duration=STORY[1], num_steps=STEPS, timeout=REQUEST_TIMEOUT_S,
                on_clip=lambda c: arrivals.append(time.perf_counter() - t))
            entry = {"outcome": "story", "samples": int(story.audio.shape[1]),
                     "expected_samples": expected_samples(story.clips), "clips": len(story.clips),
                     "captions": [c.caption[:60] for c in story.clips],
                     "durations": [c.duration_s for c in story.clips],
                     "finite": bool(np.isfinite(story.audio).all())}
        except AudioStoryError as e:
            entry = {"outcome": "error", "status": e.status, "message": str(e)[:400]}
        entry.update(seconds=round(time.perf_counter() - t, 1), clip_arrivals_s=[round(x, 1) for x in arrivals],
                     stages=stats_delta(before, model_stats(http)))
        results["story"] = entry
        print(f"story mode: {entry['outcome']} in {entry['seconds']} s", flush=True)
    finally:
        sampler.stop_event.set()
        sampler.join()
        server.stop()
    results["memory_idle_gib"] = {k: round(v, 2) for k, v in sorted(idle.items())}
    results["memory_peak_gib"] = {k: round(v, 2) for k, v in sorted(sampler.peaks.items())}
    results["memory_peak_total_gib"] = round(sampler.total_peak, 2)
    return results


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))) / 2**20
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB, no GPU"


def main(argv: list[str] | None = None) -> int:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # stop the server on the way out
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=layout.BUILD / "full-size")
    ap.add_argument("--force", action="store_true", help="rebuild every step (else each step's cache decides)")
    ap.add_argument("--skip-serve", action="store_true", help="build and measure the steps only")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "settings": SETTINGS, "script": SCRIPT, "story": STORY, "num_steps": STEPS}
    report["steps"], report["export"] = build(args.out, args.force)
    if not args.skip_serve:
        report["serve"] = serve(args.out)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
