"""dit_step on onnxruntime vs torch eager: rows per second at several batch sizes.

    python benchmarks/bench_dit_step.py --model tiny [--batches 1 4 8 16] [--repeat 5]
    python benchmarks/bench_dit_step.py --model full --batches 1 --repeat 1 --export-size

Prints a markdown table and writes build/bench/dit_step_<model>.json. A row is one clip-step
(the graph runs 2 rows internally for CFG). The machine and settings are printed beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

import torch

from audiostory_ensemble.model import layout
from audiostory_ensemble.model.checkpoint import load_converted
from export.export_onnx import DIT_FILE, dit_example, ort_session


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} threads {torch.get_num_threads()}"


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--export-size", action="store_true", help="also report the ONNX graph size")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    conv = load_converted(args.model)
    step = conv.guided_step()
    onnx_path = layout.export_dir(args.model) / DIT_FILE
    session = ort_session(onnx_path, threads=torch.get_num_threads())
    rows = []
    for b in args.batches:
        ex = dit_example(conv.config.num_t5_tokens, b)
        feed = {k: v.numpy() for k, v in ex.items()}
        t_torch = timed(lambda: step(**ex), args.repeat)
        t_ort = timed(lambda: session.run(None, feed), args.repeat)
        rows.append({"batch": b, "torch_s": t_torch, "ort_s": t_ort,
                     "torch_rows_per_s": b / t_torch, "ort_rows_per_s": b / t_ort})
    result = {"model": args.model, "machine": machine(), "commit": commit(),
              "date": time.strftime("%Y-%m-%d"), "repeat": args.repeat, "rows": rows}
    if args.export_size:
        result["onnx_bytes"] = sum(p.stat().st_size for p in onnx_path.parent.glob(DIT_FILE + "*"))
    out = layout.BUILD / "bench" / f"dit_step_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"dit_step ({args.model}), {result['machine']}, commit {result['commit']}, median of {args.repeat}")
    print("| batch | torch eager s | onnxruntime s | torch rows/s | ORT rows/s | ORT / torch |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['torch_s']:.4f} | {r['ort_s']:.4f} | {r['torch_rows_per_s']:.1f} | "
              f"{r['ort_rows_per_s']:.1f} | {r['torch_s'] / r['ort_s']:.2f}× |")
    if "onnx_bytes" in result:
        print(f"ONNX graph + external data: {result['onnx_bytes'] / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
