"""Full-size DiT step and VAE decoder on one GPU, PyTorch only (no TensorRT/vLLM needed).

    python benchmarks/gpu_check.py --out DIR [--dtypes bf16 fp16] [--batches 1 2 4 8 16 32]

Random weights at the real sizes (6+18 Flux blocks, 8 x 128 heads; the default Oobleck VAE), the
same modules the package serves. Measures, per dtype and batch (rows = clips; CFG doubles them
inside the step):
- the guided Euler step, eager and replayed from a CUDA graph, median ms and rows/s;
- achieved TFLOP/s against the measured peak of a large dense matmul in the same dtype (MFU);
- the VAE decoder (weight norm removed) at batch 1 and 4.
Writes ``gpu_check.json`` under ``--out``. One call of a few minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from audiostory_ensemble.model.config import LATENT_CHANNELS, LATENT_FRAMES, get_config
from audiostory_ensemble.model.dit import AudioDiT, GuidedEulerStep
from audiostory_ensemble.model.vae import VAEDecoder

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


DEVICE = "cuda"


def cuda_time(fn, repeat: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":  # a CPU dry run of the script itself
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - t) / repeat * 1e3
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def matmul_peak(dtype, n: int = 0) -> float:
    n = n or (8192 if DEVICE == "cuda" else 512)
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    ms = cuda_time(lambda: a @ b, repeat=20)
    return 2 * n**3 / (ms / 1e3) / 1e12


def step_flops(step: GuidedEulerStep, rows: int, cfg) -> float:
    """Dense FLOPs of one guided step for ``rows`` clips (2 x rows through the transformer)."""
    tokens = LATENT_FRAMES + step.dit.num_text_tokens + 1
    params = sum(p.numel() for p in step.dit.transformer.parameters())
    inner = cfg.dit.num_attention_heads * cfg.dit.attention_head_dim
    blocks = cfg.dit.num_layers + cfg.dit.num_single_layers
    attention = 4 * tokens * tokens * inner * blocks          # QK^T and PV, 2 FLOPs per MAC
    return 2 * rows * (2 * params * tokens + attention)


def inputs(batch: int, n: int, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    kw = dict(device=DEVICE, generator=g)
    return {
        "x": torch.randn(batch, LATENT_FRAMES, LATENT_CHANNELS, **kw).to(dtype),
        "cond": (torch.randn(batch, n, 1024, **kw) * 0.1).to(dtype),
        "duration": torch.full((batch,), 13.0, device=DEVICE, dtype=dtype),
        "sigma": torch.full((batch,), 0.7, device=DEVICE, dtype=dtype),
        "sigma_next": torch.full((batch,), 0.68, device=DEVICE, dtype=dtype),
        "guidance": torch.full((batch,), 4.0, device=DEVICE, dtype=dtype),
    }


def graphed(fn, example):
    static = {k: v.clone() for k, v in example.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(**static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(**static)
    return graph, static, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--vae-batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--config", default="full", help="full (the point) or tiny (a CPU dry run)")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = get_config(args.config)
    torch.set_grad_enabled(False)
    torch.backends.cuda.matmul.allow_tf32 = True
    gpu = torch.cuda.get_device_properties(0).name if DEVICE == "cuda" else "none (CPU dry run)"
    report = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
              "date": time.strftime("%Y-%m-%d"), "config": f"{args.config} (random weights)", "step": [],
              "vae": [], "peak_tflops": {}}
    n = cfg.num_t5_tokens
    t0 = time.perf_counter()
    dit = AudioDiT(cfg)
    base_step = GuidedEulerStep(dit, torch.randn(n, 1024) * 0.1).eval()
    report["dit_params_m"] = round(sum(p.numel() for p in dit.transformer.parameters()) / 1e6, 1)
    for name in args.dtypes:
        dtype = DTYPES[name]
        peak = matmul_peak(dtype)
        report["peak_tflops"][name] = round(peak, 3)
        step = base_step.to(DEVICE, dtype)
        for b in args.batches:
            ex = inputs(b, n, dtype)
            eager_ms = cuda_time(lambda ex=ex: step(**ex))
            graph_ms = None
            if DEVICE == "cuda":
                try:
                    graph, static, _ = graphed(step, ex)
                    graph_ms = cuda_time(graph.replay)
                except Exception as e:  # noqa: BLE001 - report, keep going
                    report.setdefault("errors", []).append(f"cuda graph {name} b{b}: {e}")
            flops = step_flops(step, b, cfg)
            best = min(eager_ms, graph_ms) if graph_ms else eager_ms
            tflops = flops / (best / 1e3) / 1e12
            row = {"dtype": name, "batch": b, "eager_ms": round(eager_ms, 3),
                   "cuda_graph_ms": round(graph_ms, 3) if graph_ms else None,
                   "rows_per_s": round(b / (best / 1e3), 1), "tflops": round(tflops, 3),
                   "mfu_vs_measured_peak": round(tflops / peak, 3),
                   "clip_50_steps_ms": round(50 * best, 1)}
            report["step"].append(row)
            print(row, flush=True)
            del ex
            torch.cuda.empty_cache()
        step.to("cpu", torch.float32)
    vae = VAEDecoder(cfg)
    vae.remove_weight_norm()
    for name in args.dtypes[:1] + ["fp32"]:
        dtype = DTYPES[name]
        v = vae.to(DEVICE, dtype).eval()
        for b in args.vae_batches:
            lat = torch.randn(b, LATENT_FRAMES, LATENT_CHANNELS, device=DEVICE, dtype=dtype)
            ms = cuda_time(lambda: v(lat), repeat=5, warmup=2)
            row = {"dtype": name, "batch": b, "ms": round(ms, 2), "clips_per_s": round(b / (ms / 1e3), 2)}
            report["vae"].append(row)
            print(row, flush=True)
        vae.to("cpu", torch.float32)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("step", "vae")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
