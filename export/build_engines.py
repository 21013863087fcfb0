"""Build TensorRT engines (``.plan``) from the exported ONNX graphs, on a GPU host.

    python export/build_engines.py --model full --precision fp16 [--min 1 --opt 8 --max 16]

- Precision ``fp16`` or ``bf16`` (or ``fp32``); the precision-sensitive layers (normalisations,
  their reductions, square roots and powers, and the VAE's Snake sin/exp) are pinned to fp32 with
  precision constraints obeyed.
- One optimisation profile over the batch axis (min/opt/max from the command line or the
  repository configuration); every input shares the batch axis.
- A timing cache file kept next to the engines, reused across builds.
- Engine names carry what an engine is valid for: the TensorRT version and the GPU's compute
  capability, e.g. ``dit_step.fp16.trt10.13.0.sm90.plan``. A stale engine is visible by its name.

Without TensorRT or without a GPU it stops with one clear sentence (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PRECISIONS = ("fp16", "bf16", "fp32")
GRAPHS = ("dit_step", "vae_decoder")

# Layer kinds kept in fp32 under reduced precision (TensorRT LayerType / operation names).
FP32_LAYER_TYPES = ("NORMALIZATION", "REDUCE")
FP32_UNARY_OPS = ("SQRT", "RECIP", "EXP", "SIN", "COS")
FP32_ELEMENTWISE_OPS = ("POW",)


class BuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class Profile:
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"batch profile must satisfy 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    def shapes(self, input_shape: tuple) -> tuple[tuple, tuple, tuple]:
        """(min, opt, max) shapes for an input whose first axis is the batch (-1)."""
        rest = tuple(input_shape[1:])
        if any(d < 0 for d in rest):
            raise ValueError(f"only the batch axis may be dynamic, got {input_shape}")
        return (self.min, *rest), (self.opt, *rest), (self.max, *rest)


@dataclass
class BuildSettings:
    graph: str
    precision: str
    profile: Profile
    trt_version: str
    compute_capability: tuple[int, int]
    workspace_gib: float = 8.0
    flags: list[str] = field(default_factory=list)

    @property
    def engine_name(self) -> str:
        return engine_name(self.graph, self.precision, self.trt_version, self.compute_capability)


def engine_name(graph: str, precision: str, trt_version: str, cc: tuple[int, int]) -> str:
    return f"{graph}.{precision}.trt{trt_version}.sm{cc[0]}{cc[1]}.plan"


def build_settings(graph: str, precision: str, profile: Profile, trt_version: str,
                   compute_capability: tuple[int, int], workspace_gib: float = 8.0) -> BuildSettings:
    """Validate the options and derive the builder flags (pure: unit-tested without TensorRT)."""
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and compute_capability < (8, 0):
        major, minor = compute_capability
        raise ValueError(f"bf16 needs compute capability >= 8.0; this GPU is {major}.{minor}")
    flags = []
    if precision == "fp16":
        flags += ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    elif precision == "bf16":
        flags += ["BF16", "OBEY_PRECISION_CONSTRAINTS"]
    return BuildSettings(graph, precision, profile, trt_version, compute_capability, workspace_gib, flags)


def keep_fp32(layer_type: str, op: str | None = None) -> bool:
    """Whether a layer (TensorRT type name, and unary/elementwise op name) stays in fp32."""
    if layer_type in FP32_LAYER_TYPES:
        return True
    if layer_type == "UNARY" and op in FP32_UNARY_OPS:
        return True
    if layer_type == "ELEMENTWISE" and op in FP32_ELEMENTWISE_OPS:
        return True
    return False


def _require_trt_and_gpu():
    try:
        import tensorrt as trt
    except ImportError:
        raise BuildError("TensorRT is not installed: engines are built on a GPU host "
                         "(pip install -r requirements-gpu.txt); CPU hosts serve the ONNX graphs on "
                         "onnxruntime.") from None
    try:
        import torch
        if not torch.cuda.is_available():
            raise BuildError("no CUDA GPU is visible: TensorRT engines must be built on the GPU they will run on.")
        cc = torch.cuda.get_device_capability(0)
    except ImportError:
        raise BuildError("torch is needed to query the GPU's compute capability.") from None
    return trt, cc


def build(onnx_path: Path, out_dir: Path, settings: BuildSettings, trt) -> Path:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gib * (1 << 30)))
    for flag in settings.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if settings.precision != "fp32":
        pinned = 0
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            ltype = layer.type.name
            op = None
            if ltype in ("UNARY", "ELEMENTWISE"):
                # get_layer returns the base interface; the subclass exposes the operation.
                layer.__class__ = trt.IUnaryLayer if ltype == "UNARY" else trt.IElementWiseLayer
                op = layer.op.name
            if keep_fp32(ltype, op):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
                pinned += 1
        print(f"{settings.graph}: {pinned} layers pinned to fp32")
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        profile.set_shape(inp.name, *settings.profile.shapes(tuple(inp.shape)))
    config.add_optimization_profile(profile)
    cache_path = out_dir / "timing.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    t = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT failed to build {settings.engine_name}")
    cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    path = out_dir / settings.engine_name
    path.write_bytes(memoryview(serialized))
    print(f"built {path.name} in {time.perf_counter() - t:.0f} s")
    return path


def main(argv: list[str] | None = None) -> int:
    from audiostory_ensemble.model import layout

    ap = argparse.ArgumentParser(description="Build TensorRT engines from the exported ONNX graphs")
    ap.add_argument("--model", default="full")
    ap.add_argument("--onnx-dir", default=None, help="default: build/export/MODEL")
    ap.add_argument("--out", default=None, help="default: build/engines/MODEL")
    ap.add_argument("--precision", default="fp16", choices=PRECISIONS)
    ap.add_argument("--min", type=int, default=1)
    ap.add_argument("--opt", type=int, default=8)
    ap.add_argument("--max", type=int, default=16)
    ap.add_argument("--workspace-gib", type=float, default=8.0)
    ap.add_argument("--graphs", nargs="+", default=list(GRAPHS), choices=GRAPHS)
    ap.add_argument("--force", action="store_true", help="rebuild even if a cached plan matches")
    args = ap.parse_args(argv)
    try:
        profile = Profile(args.min, args.opt, args.max)
        trt, cc = _require_trt_and_gpu()
        onnx_dir = Path(args.onnx_dir) if args.onnx_dir else layout.export_dir(args.model)
        out = Path(args.out) if args.out else layout.BUILD / "engines" / args.model
        out.mkdir(parents=True, exist_ok=True)
        manifest = onnx_dir / "manifest.json"
        export_id = json.loads(manifest.read_text()).get("fingerprint", "") if manifest.exists() else ""
        built = {}
        for graph in args.graphs:
            src = onnx_dir / f"{graph}.onnx"
            if not src.exists():
                raise BuildError(f"{src} not found: run `make export MODEL={args.model}` first")
            settings = build_settings(graph, args.precision, profile, trt.__version__, cc, args.workspace_gib)
            # The plan's name carries TensorRT version, GPU, precision and profile; a sidecar holds
            # the export's fingerprint (checkpoint, exporter code and versions: the graph *and* its
            # external weights). Both the same: the cached plan is this build (container restarts).
            plan, stamp = out / settings.engine_name, out / (settings.engine_name + ".export-fingerprint")
            if not args.force and export_id and plan.exists() and stamp.exists() \
                    and stamp.read_text().strip() == export_id:
                print(f"{plan.name}: cached (same export, TensorRT, GPU)")
                built[graph] = plan.name
                continue
            built[graph] = build(src, out, settings, trt).name
            if export_id:
                stamp.write_text(export_id + "\n")
            else:   # no manifest to vouch for this plan: never reuse it
                stamp.unlink(missing_ok=True)
        (out / "engines.json").write_text(json.dumps(
            {"precision": args.precision, "profile": vars(profile), "tensorrt": trt.__version__,
             "compute_capability": list(cc), "engines": built}, indent=2) + "\n")
    except (BuildError, ValueError) as e:
        print(f"build_engines: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
