"""The served DiT loop on a GPU: the step scheduler over a PyTorch engine, next to the bare step.

    python benchmarks/gpu_loop.py --out DIR [--config full] [--dtype bf16] [--clips 1 2 4 8 16 32]
                                  [--steps 50] [--no-cuda-graphs]

Random weights at the real sizes (``--config tiny`` is the CPU dry run the tests make). For each
number of concurrent clips ``c``: ``c`` clips of ``--steps`` steps are handed to one
``StepScheduler`` over a ``TorchStepEngine`` (the rows live on the GPU; replayed CUDA graphs at
padded batch sizes unless ``--no-cuda-graphs``) and the loop runs them to the end. Reported: the
loop's clip-steps/s and per-clip latency, and the bare batched step at the same batch (the engine
alone, no scheduler), so ``loop / bare`` is what the scheduling costs. One device call, PyTorch
only. Writes ``gpu_loop.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from audiostory_ensemble.model.config import LATENT_CHANNELS, LATENT_FRAMES, get_config
from audiostory_ensemble.model.dit import AudioDiT, GuidedEulerStep
from audiostory_ensemble.model.sampler import flow_sigmas
from audiostory_ensemble.serving.scheduler import Job, StepScheduler
from audiostory_ensemble.serving.step_engines import TorchStepEngine

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_step_ms(engine: TorchStepEngine, rows: int, repeat: int) -> float:
    """The engine's step alone at ``rows`` (what the loop would cost with free scheduling)."""
    sigma = torch.full((rows,), 0.7).numpy()
    sigma_next = torch.full((rows,), 0.68).numpy()
    engine.step(rows, sigma, sigma_next)   # warm-up (and graph capture)
    sync(engine.device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        engine.step(rows, sigma, sigma_next)
        sync(engine.device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def loop_run(scheduler: StepScheduler, clips: int, steps: int, n: int) -> dict:
    """``clips`` clips submitted at once, run to the end: wall time and per-clip latency."""
    g = torch.Generator().manual_seed(clips)
    done = threading.Event()
    finished: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    t0 = 0.0

    def on_done(latent, error):        # called on the scheduler's thread: record, never raise
        with lock:
            if error is not None:
                errors.append(error)
            finished.append(time.perf_counter() - t0)
            if len(finished) == clips:
                done.set()

    sigmas = flow_sigmas(steps).numpy()
    jobs = [Job(torch.randn(LATENT_FRAMES, LATENT_CHANNELS, generator=g).numpy(),
                (torch.randn(n, 1024, generator=g) * 0.1).numpy(), 5.0 + i, 4.0, sigmas, on_done)
            for i in range(clips)]
    t0 = time.perf_counter()
    scheduler.submit(*jobs)
    if not done.wait(600):
        raise RuntimeError("the loop did not finish in 600 s")
    if errors:
        raise RuntimeError(f"{len(errors)} clip(s) failed: {errors[0]}")
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "clip_latency_ms": statistics.mean(finished) * 1e3}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="full", help="full (the point) or tiny (a CPU dry run)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--clips", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=10, help="timed bare steps per batch size")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    torch.set_grad_enabled(False)
    cfg = get_config(args.config)
    n = cfg.num_t5_tokens
    step = GuidedEulerStep(AudioDiT(cfg), torch.randn(n, 1024) * 0.1).eval().to(device, dtype)
    capacity = max(args.clips)
    engine = TorchStepEngine(step, capacity, n, device=device, dtype=dtype, cuda_graphs=not args.no_cuda_graphs)
    batches = []
    scheduler = StepScheduler(engine, on_batch=lambda rows, *_: batches.append(rows))
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "config": f"{args.config} (random weights)",
              "dtype": str(dtype).replace("torch.", ""), "steps": args.steps,
              "cuda_graphs": engine.cuda_graphs, "rows": []}
    try:
        for clips in args.clips:
            bare = bare_step_ms(engine, clips, args.repeat)
            batches.clear()
            run = loop_run(scheduler, clips, args.steps, n)
            row = {"clips": clips, "bare_step_ms": round(bare, 3),
                   "bare_clip_steps_per_s": round(clips / (bare / 1e3), 1),
                   "loop_clip_steps_per_s": round(clips * args.steps / run["wall_s"], 1),
                   "loop_vs_bare": round(clips * args.steps / run["wall_s"] / (clips / (bare / 1e3)), 3),
                   "clip_latency_ms": round(run["clip_latency_ms"], 1),
                   "mean_batch": round(sum(batches) / max(1, len(batches)), 2)}
            report["rows"].append(row)
            print(row, flush=True)
    finally:
        scheduler.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_loop.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
