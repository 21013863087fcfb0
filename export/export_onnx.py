"""Export the guided DiT step and the VAE decoder to ONNX (torch dynamo exporter, opset 18).

    python export/export_onnx.py --model tiny [--out build/export/tiny] [--force]

Writes ``dit_step.onnx`` and ``vae_decoder.onnx`` (weights as external data beside each graph) and
``manifest.json`` (opset, exporter, versions, input fingerprint, I/O names and shapes). Skipped
when the converted checkpoint and the exporting code are unchanged.

Graphs (batch is the only dynamic axis; names are the served tensor names):
    dit_step:    x [B,645,64], cond [B,N,1024], duration [B], sigma [B], sigma_next [B],
                 guidance [B]  ->  x_next [B,645,64]
                 uncond tokens, RoPE tables, duration embedder and pooled head inside; CFG doubling
                 inside (one transformer call on 2B rows).
    vae_decoder: latent [B,645,64]  ->  wave [B,2,1320960]   (weight norm folded; the transpose
                 to channels-first is inside the graph)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from audiostory_ensemble import names
from audiostory_ensemble.model import config as model_config
from audiostory_ensemble.model import dit as model_dit
from audiostory_ensemble.model import layout
from audiostory_ensemble.model import vae as model_vae
from audiostory_ensemble.model.checkpoint import load_converted
from audiostory_ensemble.model.config import BRIDGE_DIM, LATENT_CHANNELS, LATENT_FRAMES
from audiostory_ensemble.serving.onnx_runner import ort_session

OPSET = 18
EXPORT_BATCH = 2          # never 1: the exporter specialises size-1 dimensions

DIT_INPUTS = names.DIT_STEP_INPUTS
DIT_OUTPUTS = (names.DIT_STEP_OUTPUT,)
VAE_INPUTS = (names.VAE_INPUT,)
VAE_OUTPUTS = (names.VAE_OUTPUT,)
DIT_FILE = f"{names.DIT_STEP}.onnx"
VAE_FILE = f"{names.VAE}.onnx"
MANIFEST = layout.MANIFEST


def dit_example(n: int, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, LATENT_FRAMES, LATENT_CHANNELS, generator=g)
    cond = torch.randn(batch, n, BRIDGE_DIM, generator=g) * 0.1
    duration = torch.rand(batch, generator=g) * 30
    sigma = torch.rand(batch, generator=g) * 0.9 + 0.1
    sigma_next = torch.rand(batch, generator=g) * 0.1
    guidance = torch.rand(batch, generator=g) * 6 + 1
    return dict(zip(DIT_INPUTS, (x, cond, duration, sigma, sigma_next, guidance)))


def vae_example(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {names.VAE_INPUT: torch.randn(batch, LATENT_FRAMES, LATENT_CHANNELS, generator=g)}


def _export(module: torch.nn.Module, example: dict, inputs, outputs, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic = {name: {0: batch} for name in inputs}
    program = torch.onnx.export(
        module, args=(), kwargs=example, dynamo=True, opset_version=OPSET,
        input_names=list(inputs), output_names=list(outputs), dynamic_shapes=dynamic,
    )
    program.save(str(path), external_data=True)
    _check_dynamic(path, inputs)


def _check_dynamic(path: Path, inputs) -> None:
    """Refuse a graph whose batch axis was silently fixed (a known exporter trap)."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    for inp in model.graph.input:
        if inp.name in inputs:
            d0 = inp.type.tensor_type.shape.dim[0]
            if not d0.dim_param:
                raise RuntimeError(f"{path.name}: input {inp.name} has a fixed batch ({d0.dim_value}); "
                                   "export broke the dynamic axis")


def graph_io(path: Path) -> dict:
    """The graph's inputs and outputs as exported, in order: ``{name: ["B", d1, ...]}``
    (the dynamic batch axis as ``"B"``)."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)

    def shapes(values) -> dict:
        return {v.name: [d.dim_value if not d.dim_param else "B" for d in v.type.tensor_type.shape.dim]
                for v in values}
    return {"file": path.name, "inputs": shapes(model.graph.input), "outputs": shapes(model.graph.output)}


def fingerprint(converted_root: Path) -> str:
    h = hashlib.sha256()
    manifest = converted_root / layout.MANIFEST
    h.update(manifest.read_bytes() if manifest.exists() else b"")
    for module in (model_dit, model_vae, model_config):     # the graphs' definitions
        h.update(Path(module.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    h.update(f"{torch.__version__}".encode())
    return h.hexdigest()


def export(model: str = "tiny", out: Path | None = None, force: bool = False, check: bool = True) -> Path:
    conv = load_converted(model)
    out = Path(out) if out else layout.export_dir(model)
    fp = fingerprint(conv.root)
    manifest_path = out / MANIFEST
    if not force and manifest_path.exists() and json.loads(manifest_path.read_text()).get("fingerprint") == fp \
            and (out / DIT_FILE).exists() and (out / VAE_FILE).exists():
        print(f"export: {out} is up to date")
        return out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.onnx*"):
        old.unlink()
    cfg = conv.config
    torch.set_grad_enabled(False)
    timings = {}

    step = conv.guided_step()
    t = time.perf_counter()
    _export(step, dit_example(cfg.num_t5_tokens, EXPORT_BATCH), DIT_INPUTS, DIT_OUTPUTS, out / DIT_FILE)
    timings["dit_step_export_s"] = round(time.perf_counter() - t, 2)

    vae = conv.vae(remove_weight_norm=True)
    t = time.perf_counter()
    _export(vae, vae_example(EXPORT_BATCH), VAE_INPUTS, VAE_OUTPUTS, out / VAE_FILE)
    timings["vae_decoder_export_s"] = round(time.perf_counter() - t, 2)

    checks = {}
    if check:
        checks["dit_step"] = parity(step, out / DIT_FILE, dit_example(cfg.num_t5_tokens, 3, seed=1))
        checks["vae_decoder"] = parity(vae, out / VAE_FILE, vae_example(1, seed=1))

    import diffusers
    import onnx
    import onnxruntime
    manifest = {
        "fingerprint": fp,
        "model": cfg.name,
        "opset": OPSET,
        "exporter": f"torch.onnx.export(dynamo=True) torch {torch.__version__}",
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "diffusers": diffusers.__version__},
        "graphs": {names.DIT_STEP: graph_io(out / DIT_FILE), names.VAE: graph_io(out / VAE_FILE)},
        "timings": timings,
        "parity_max_rel": checks,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"export: wrote {out} {timings} parity {checks}")
    return out


def parity(module: torch.nn.Module, path: Path, example: dict) -> float:
    """Max |onnx - torch| / max |torch| at a batch other than the export batch."""
    want = module(**example).numpy()
    got = ort_session(path).run(None, {k: v.numpy() for k, v in example.items()})[0]
    err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
    if not err <= 1e-4:
        raise RuntimeError(f"{path.name}: onnxruntime differs from torch (max rel {err:.2e} > 1e-4)")
    return err


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Export dit_step and vae_decoder to ONNX")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--out", default=None)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    args = ap.parse_args(argv)
    export(args.model, Path(args.out) if args.out else None, args.force, check=not args.no_check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
