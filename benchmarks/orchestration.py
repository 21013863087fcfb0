"""What our own loop costs around each DiT step: the pipeline with null-cost engines.

    python -m benchmarks.orchestration [--sizes tiny full] [--levels 1 8 32 64] [--steps 200]
                                       [--baseline REF] [--designs baseline current] [--no-real]

The DiT step and the VAE are replaced by ONNX graphs with the real tensors and no compute
(``x_next = 0.999 x``; the wave all zeros), so what is left is what this project adds: the front
door, the planner (the real tiny LLM on vLLM), the bridge, the sampler's loop, the BLS hops, the
decode hop, trim and resample, and the streaming back to the client. Two tensor sizes: ``tiny``
(N = 8 conditioning tokens per clip) and ``full`` (N = 64, the released model's; the tiny LLM is
asked for 64 semantic queries, so every per-clip and per-step tensor has the full model's shape).

Each *design* is one repository generated from one source tree, measured in the same run:
``current`` (this checkout) and ``baseline`` (``--baseline``: a commit whose tree is unpacked
under ``build/bench/orchestration/`` and imported by the server's stubs through a layered venv,
so nothing of the current package leaks into it). Per design and size:

- per-step overhead at concurrency 1: the same stories at ``--steps`` and at ``--steps / 10``;
  the difference in story time divided by the difference in clip-steps (clip-level costs cancel);
- clip-steps/s at each level (closed-loop streaming clients through ``audiostory_stream``):
  clips delivered × steps / wall time, and the DiT batch achieved (rows per engine call);
- with the real tiny graphs (unless ``--no-real``): time to first clip at concurrency 1 and
  audio-s/s at concurrency 8, 50 steps.

Writes ``build/bench/orchestration.json`` and ``.md``; the README of this folder has the results.

Why this module is over 300 lines: one benchmark from the graphs it serves to the table it writes,
so that one file says what each reported number measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from audiostory_ensemble import interface as I
from audiostory_ensemble import names
from audiostory_ensemble.model import layout
from audiostory_ensemble.model.config import AUDIO_CHANNELS, BRIDGE_DIM, LATENT_CHANNELS, LATENT_FRAMES, WAVE_SAMPLES
from benchmarks.bench_dit_step import commit, machine
from benchmarks.loadgen import one_story, pct, workload

OUT = layout.BUILD / "bench" / "orchestration"
BASELINE_REF = "b4c7491"      # the per-clip BLS loop (one dit_step request per clip-step)
SIZES = {"tiny": 8, "full": 64}   # N: conditioning tokens per clip
DIT_COUNTERS = ("audiostory_dit_step_rows_total", "audiostory_dit_step_batch_rows_count",
                "audiostory_dit_step_compute_seconds_total", "audiostory_dit_step_loop_seconds_total")


# ------------------------------------------------------------------------------------------------
# Null-cost engines and the checkpoints they are served with
# ------------------------------------------------------------------------------------------------

def null_graphs(n: int, out: Path) -> Path:
    """``dit_step.onnx`` and ``vae_decoder.onnx`` with the served names and shapes, no compute, and
    the export's ``manifest.json`` (the repository generator reads the graphs' tensors from it)."""
    import onnx
    from onnx import TensorProto, helper

    from export.export_onnx import MANIFEST, graph_io

    out.mkdir(parents=True, exist_ok=True)
    f32 = TensorProto.FLOAT
    x, cond, duration, sigma, sigma_next, guidance = names.DIT_STEP_INPUTS
    vec = lambda name: helper.make_tensor_value_info(name, f32, ["B"])
    dit = helper.make_graph(
        [helper.make_node("Mul", [x, "keep"], [names.DIT_STEP_OUTPUT])], "null_dit_step",
        [helper.make_tensor_value_info(x, f32, ["B", LATENT_FRAMES, LATENT_CHANNELS]),
         helper.make_tensor_value_info(cond, f32, ["B", n, BRIDGE_DIM]),
         vec(duration), vec(sigma), vec(sigma_next), vec(guidance)],
        [helper.make_tensor_value_info(names.DIT_STEP_OUTPUT, f32, ["B", LATENT_FRAMES, LATENT_CHANNELS])],
        [helper.make_tensor("keep", f32, [], [0.999])])
    vae = helper.make_graph(
        [helper.make_node("Shape", [names.VAE_INPUT], ["shape"], start=0, end=1),
         helper.make_node("Concat", ["shape", "tail"], ["wave_shape"], axis=0),
         helper.make_node("ConstantOfShape", ["wave_shape"], [names.VAE_OUTPUT],
                          value=helper.make_tensor("zero", f32, [1], [0.0]))],
        "null_vae_decoder",
        [helper.make_tensor_value_info(names.VAE_INPUT, f32, ["B", LATENT_FRAMES, LATENT_CHANNELS])],
        [helper.make_tensor_value_info(names.VAE_OUTPUT, f32, ["B", AUDIO_CHANNELS, WAVE_SAMPLES])],
        [helper.make_tensor("tail", TensorProto.INT64, [2], [AUDIO_CHANNELS, WAVE_SAMPLES])])
    graphs = {}
    for graph, name in ((dit, names.DIT_STEP), (vae, names.VAE)):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        onnx.checker.check_model(model)
        onnx.save(model, str(out / f"{name}.onnx"))
        graphs[name] = graph_io(out / f"{name}.onnx")
    (out / MANIFEST).write_text(json.dumps({"model": "null", "graphs": graphs}, indent=2) + "\n")
    return out


def shaped_checkpoint(n: int, out: Path) -> Path:
    """The converted tiny checkpoint asking for ``n`` semantic queries per clip (links, not copies)."""
    src = layout.converted_dir("tiny")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for item in src.iterdir():
        if item.name != layout.MODEL_CONFIG:
            (out / item.name).symlink_to(item.resolve())
    config = json.loads((src / layout.MODEL_CONFIG).read_text())
    config["num_t5_tokens"] = n
    (out / layout.MODEL_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


# ------------------------------------------------------------------------------------------------
# Designs: a source tree, the python its server's stubs import it with, a repository generator
# ------------------------------------------------------------------------------------------------

class Design:
    def __init__(self, name: str, root: Path, python: Path):
        self.name, self.root, self.python = name, root, python

    def repository(self, checkpoint: Path, onnx_dir: Path, out: Path, settings: dict) -> Path:
        settings_file = out.with_suffix(".settings.json")
        settings_file.parent.mkdir(parents=True, exist_ok=True)
        settings_file.write_text(json.dumps(settings))
        subprocess.run([str(self.python), str(self.root / "export" / "make_repo.py"), "--profile", "cpu",
                        "--model", str(checkpoint), "--out", str(out), "--onnx-dir", str(onnx_dir),
                        "--settings", str(settings_file)], check=True, cwd=self.root)
        return out

    def server(self, repository: Path, log: Path):
        from audiostory_ensemble.serving.triton_server import TritonServer

        server = TritonServer(repository, log_path=log)
        # The stubs import the package through the first python3 on PATH: this design's; and from
        # the server's working folder before that (sys.path[0]), so the server runs in this tree.
        server.env["PATH"] = str(self.python.parent) + os.pathsep + server.env["PATH"]
        server.cwd = self.root
        return server


def current_design() -> Design:
    return Design("current", layout.PROJECT_ROOT, Path(sys.executable))


def baseline_design(ref: str) -> Design:
    """``ref``'s tree unpacked beside the build, with a venv that layers it over the project venv's
    packages (the project's own editable install is not in that path: its finder is never loaded)."""
    sha = subprocess.check_output(["git", "rev-parse", "--short", ref], cwd=layout.PROJECT_ROOT, text=True).strip()
    root = OUT / f"tree-{sha}"
    if not (root / "audiostory_ensemble").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha], cwd=layout.PROJECT_ROOT, check=True,
                                 capture_output=True).stdout
        tar_path = OUT / f"tree-{sha}.tar"
        tar_path.write_bytes(archive)
        with tarfile.open(tar_path) as tar:
            tar.extractall(root, filter="data")
        tar_path.unlink()
    venv = OUT / f"venv-{sha}"
    python = venv / "bin" / "python"
    if not python.exists():
        base = Path(sys.base_prefix) / "bin" / "python3"
        subprocess.run([str(base), "-m", "venv", "--without-pip", str(venv)], check=True)
        site = subprocess.check_output([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                                       text=True).strip()
        main_site = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
        Path(site, "audiostory_baseline.pth").write_text(f"{root}\n{main_site}\n")
    return Design(f"baseline ({sha})", root, python)


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------

def dit_counters(server) -> tuple[float, ...]:
    """Rows, engine calls, engine seconds and loop seconds of the DiT step so far (the last two
    exist where the step scheduler reports them)."""
    from tests.serverutil import scrape

    m = scrape(server)
    return tuple(m.get(name + '{model="dit_step"}', 0.0) for name in DIT_COUNTERS)


def script_workload(count: int, seed: int, num_steps: int, segments: int = 8) -> list[dict]:
    """Script-mode requests of ``segments`` touching 3.75 s segments: the plan is one pooling
    pass, so the planner costs far less per clip than a generated story."""
    import random

    from audiostory_ensemble.tiny_story import EVENTS

    rng = random.Random(seed)
    items = []
    for _ in range(count):
        events = rng.sample(EVENTS, segments)
        script = [{"start": 3.75 * i, "end": 3.75 * (i + 1), "caption": e} for i, e in enumerate(events)]
        items.append({"instruction": None, "segments": script, "seed": rng.randrange(1000), "num_steps": num_steps})
    return items


async def closed_loop(url: str, level: int, items) -> tuple[list[dict], float]:
    import tritonclient.grpc.aio as aio

    queue, results = list(items), []

    async def worker():
        client = aio.InferenceServerClient(url)
        try:
            while queue:
                results.append(await one_story(client, queue.pop(0), I.STREAM_MODEL))
        finally:
            await client.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(level)))
    return results, time.perf_counter() - t0


def run_level(server, level: int, items) -> dict:
    before = dit_counters(server)
    results, wall = asyncio.run(closed_loop(server.grpc_url, level, items))
    rows, calls, engine_s, loop_s = (a - b for a, b in zip(dit_counters(server), before))
    ok = [r for r in results if r["error"] is None]
    steps = items[0]["num_steps"]
    clips = sum(r["clips"] for r in ok)
    return {"concurrency": level, "stories": len(results), "errors": len(results) - len(ok),
            "error_samples": [r["error"] for r in results if r["error"]][:3], "clips": clips, "wall_s": wall,
            "clip_steps_per_s": clips * steps / wall, "audio_s_per_s": sum(r["audio_s"] for r in ok) / wall,
            "ttfc_p50_s": pct([r["ttfc_s"] for r in ok], 50), "latency_p50_s": pct([r["latency_s"] for r in ok], 50),
            "dit_rows": rows, "dit_batch": rows / calls if calls else None,
            # in the scheduler (where it reports them): the loop's own cost around the engine calls
            "loop_ms_per_iteration": (loop_s - engine_s) / calls * 1e3 if loop_s and calls else None,
            "loop_busy_fraction": loop_s / wall if loop_s else None}


def per_step_overhead(server, stories: int, steps: int) -> dict:
    """Concurrency 1, each story at ``steps`` then at ``steps // 10``: its extra time over its extra
    clip-steps (clip- and story-level costs cancel). The median over the stories, and the spread."""
    lo = max(2, steps // 10)
    slopes, errors = [], []
    for item in workload(stories, seed=99, num_steps=steps):
        (hi,), _ = asyncio.run(closed_loop(server.grpc_url, 1, [item]))
        (low,), _ = asyncio.run(closed_loop(server.grpc_url, 1, [dict(item, num_steps=lo)]))
        if hi["error"] or low["error"] or hi["clips"] != low["clips"]:
            errors.append(hi["error"] or low["error"] or "the plans differ between the runs")
            continue
        slopes.append((hi["latency_s"] - low["latency_s"]) / (hi["clips"] * (steps - lo)) * 1e3)
    if not slopes:
        return {"error": errors[:3]}
    return {"stories": len(slopes), "steps": [lo, steps], "ms_per_step": statistics.median(slopes),
            "ms_per_step_p25_p75": [pct(slopes, 25), pct(slopes, 75)], "errors": errors[:3]}


def null_engine_ms(onnx_dir: Path, rows: int = 1, repeat: int = 200) -> float:
    """The null step itself, bare onnxruntime (what the per-step figure includes of the engine)."""
    import numpy as np

    from audiostory_ensemble.serving.onnx_runner import ort_session

    session = ort_session(onnx_dir / "dit_step.onnx", threads=2)
    n = {i.name: i.shape for i in session.get_inputs()}["cond"][1]
    x, cond, *per_row = names.DIT_STEP_INPUTS
    feed = {x: np.zeros((rows, LATENT_FRAMES, LATENT_CHANNELS), np.float32),
            cond: np.zeros((rows, n, BRIDGE_DIM), np.float32), **{k: np.zeros(rows, np.float32) for k in per_row}}
    session.run(None, feed)
    t = time.perf_counter()
    for _ in range(repeat):
        session.run(None, feed)
    return (time.perf_counter() - t) / repeat * 1e3


def measure(design: Design, label: str, checkpoint: Path, onnx_dir: Path, args, null: bool) -> dict:
    out = OUT / "repos" / f"{design.name.split()[0]}-{label}"
    repo = design.repository(checkpoint, onnx_dir, out, {})
    server = design.server(repo, out.with_suffix(".log")).start(timeout=900)
    result = {"design": design.name, "size": label, "engines": "null" if null else "tiny (real)"}
    try:
        warm = workload(2, seed=5, num_steps=4)
        asyncio.run(closed_loop(server.grpc_url, 1, warm))
        if null:
            print(f"  {design.name} {label}: per-step overhead at concurrency 1", flush=True)
            result["per_step"] = per_step_overhead(server, args.overhead_stories, args.steps)
            result["levels"] = []
            for level in args.levels:
                print(f"  {design.name} {label}: concurrency {level}", flush=True)
                items = workload(max(args.min_stories, 2 * level), seed=1000 + level, num_steps=args.steps)
                result["levels"].append(run_level(server, level, items))
            result["script_levels"] = []
            for level in args.script_levels:
                print(f"  {design.name} {label}: script mode, concurrency {level}", flush=True)
                items = script_workload(max(args.min_stories, level), seed=2000 + level, num_steps=args.steps)
                result["script_levels"].append(run_level(server, level, items))
        else:
            print(f"  {design.name} {label}: time to first clip at 1, audio-s/s at 8", flush=True)
            result["c1"] = run_level(server, 1, workload(args.real_stories, seed=7, num_steps=50))
            result["c8"] = run_level(server, 8, workload(3 * args.real_stories, seed=8, num_steps=50))
    finally:
        server.stop()
    return result


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    levels = report["levels"]
    lines = [f"Machine: {report['machine']}; commit {report['commit']}; {report['date']}; "
             f"{report['steps']} steps per clip; `cpu` profile defaults; streaming through `audiostory_stream`.",
             "Null step alone (bare onnxruntime, 1 row): " + ", ".join(
                 f"{size} {ms:.3f} ms" for size, ms in report["null_engine_ms"].items()) + ".", "",
             "| design | size | per-step overhead c=1, median (p25–p75) | "
             + " | ".join(f"clip-steps/s c={lv}" for lv in levels)
             + f" | DiT batch c={levels[-1]} | loop ms/iteration c={levels[-1]} | errors |",
             "|---|---|---|" + "---|" * len(levels) + "---|---|---|"]
    for r in report["null"]:
        ps = r["per_step"]
        per = (f"{ps['ms_per_step']:.3f} ms ({ps['ms_per_step_p25_p75'][0]:.3f}–{ps['ms_per_step_p25_p75'][1]:.3f})"
               if "ms_per_step" in ps else f"error: {ps['error']}")
        last = r["levels"][-1]
        loop = f"{last['loop_ms_per_iteration']:.3f}" if last.get("loop_ms_per_iteration") else "—"
        lines.append(f"| {r['design']} | {r['size']} | {per} | "
                     + " | ".join(f"{lv['clip_steps_per_s']:.0f}" for lv in r["levels"])
                     + f" | {last['dit_batch'] or 0:.1f} | {loop} | {sum(lv['errors'] for lv in r['levels'])} |")
    scripted = [r for r in report["null"] if r.get("script_levels")]
    if scripted:
        lines += ["", "Script mode (8 touching segments per request: one pooling pass plans 8 clips):", "",
                  "| design | size | concurrency | clip-steps/s | DiT batch | loop ms/iteration | loop busy | errors |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in scripted:
            for lv in r["script_levels"]:
                loop = f"{lv['loop_ms_per_iteration']:.3f}" if lv.get("loop_ms_per_iteration") else "—"
                busy = f"{lv['loop_busy_fraction']:.0%}" if lv.get("loop_busy_fraction") else "—"
                lines.append(f"| {r['design']} | {r['size']} | {lv['concurrency']} | {lv['clip_steps_per_s']:.0f} | "
                             f"{lv['dit_batch'] or 0:.1f} | {loop} | {busy} | {lv['errors']} |")
    if report.get("real"):
        lines += ["", f"Real tiny model (50 steps), {report['real_rounds']} rounds alternating the designs:", "",
                  "| design | TTFC p50 c=1 s | story p50 c=1 s | audio-s/s c=8 | DiT batch c=8 | errors |",
                  "|---|---|---|---|---|---|"]
        for name in dict.fromkeys(r["design"] for r in report["real"]):
            runs = [r for r in report["real"] if r["design"] == name]
            each = ", ".join(f"{r['c8']['audio_s_per_s']:.2f}" for r in runs)
            lines.append(f"| {name} | {statistics.median(r['c1']['ttfc_p50_s'] for r in runs):.2f} | "
                         f"{statistics.median(r['c1']['latency_p50_s'] for r in runs):.2f} | "
                         f"{statistics.mean(r['c8']['audio_s_per_s'] for r in runs):.2f} "
                         f"({each}) | "
                         f"{statistics.mean(r['c8']['dit_batch'] or 0 for r in runs):.2f} | "
                         f"{sum(r['c1']['errors'] + r['c8']['errors'] for r in runs)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--min-stories", type=int, default=8, help="stories per level (at least 2 x the level)")
    ap.add_argument("--overhead-stories", type=int, default=8)
    ap.add_argument("--script-levels", type=int, nargs="*", default=[64])
    ap.add_argument("--real-stories", type=int, default=8, help="stories at concurrency 1 (3x at 8), per round")
    ap.add_argument("--real-rounds", type=int, default=2, help="rounds of the real comparison (designs alternate)")
    ap.add_argument("--baseline", default=BASELINE_REF, help="git ref of the design to compare with")
    ap.add_argument("--designs", nargs="+", default=["baseline", "current"], choices=["baseline", "current"])
    ap.add_argument("--no-real", action="store_true", help="skip the real tiny model comparison")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    OUT.mkdir(parents=True, exist_ok=True)
    designs = [baseline_design(args.baseline) if d == "baseline" else current_design() for d in args.designs]
    report = {"machine": machine(), "commit": commit(), "date": time.strftime("%Y-%m-%d"), "steps": args.steps,
              "levels": args.levels, "null_engine_ms": {}, "null": [], "real": [], "real_rounds": args.real_rounds}
    for size in args.sizes:
        n = SIZES[size]
        onnx_dir = null_graphs(n, OUT / f"null-{size}")
        report["null_engine_ms"][size] = null_engine_ms(onnx_dir)
        checkpoint = shaped_checkpoint(n, OUT / f"checkpoint-{size}")
        for design in designs:
            report["null"].append(measure(design, size, checkpoint, onnx_dir, args, null=True))
    if not args.no_real:
        for _ in range(args.real_rounds):
            for design in designs:
                report["real"].append(measure(design, "tiny", layout.converted_dir("tiny"),
                                              layout.export_dir("tiny"), args, null=False))
    (layout.BUILD / "bench" / "orchestration.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (layout.BUILD / "bench" / "orchestration.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
