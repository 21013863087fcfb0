"""Fill the model-repository templates into a deployable Triton repository.

    python export/make_repo.py --profile cpu --model tiny [--out build/model_repository] [--settings S.json]
    python export/make_repo.py --profile gpu --model full [--engines build/engines/full/engines.json]

One source of truth: tensor names/shapes come from ``audiostory_ensemble.interface`` and the
converted checkpoint's ``model_config.json``; batch sizes, instance counts, engine options and
limits come from the profile defaults below, overridden by ``--settings`` (a JSON object with the
same keys). Every ``${field}`` of every template must be filled, or the tool stops and names it.

Profiles:
  cpu  dit_step / vae_decoder as python models running the ONNX graphs on onnxruntime
  gpu  dit_step / vae_decoder as tensorrt_plan models over the engines from build_engines.py;
       llm on GPU; the same python models elsewhere
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import string
import sys
from pathlib import Path

from audiostory_ensemble import interface as I
from audiostory_ensemble import names
from audiostory_ensemble.llm.engine_options import EngineOptions
from audiostory_ensemble.model import layout
from audiostory_ensemble.model.checkpoint import load_converted
from audiostory_ensemble.pipeline.request import Limits
from audiostory_ensemble.serving import control

TEMPLATES = layout.PROJECT_ROOT / "model_repository"
PIPELINE = (names.LLM, names.BRIDGE, names.SAMPLER, names.DIT_STEP, names.VAE, I.ENSEMBLE, I.STREAM_MODEL,
            I.FULL_MODEL)      # the template folders, by the names their models are served under
ONNX_MODEL_PY = TEMPLATES / "onnx_graph.py"   # the cpu form of dit_step and vae_decoder: one ONNX graph

# What both profiles set alike; each profile below says only where it differs. Placement: the GPUs
# vLLM sees (several for tensor_parallel_size > 1), and the GPUs the DiT-step / VAE instances go on
# ([] = Triton's default: `count` instances on every GPU).
_SHARED = {
    "dit_min_batch": 1, "dit_max_batch": 16, "dit_queue_delay_us": 0, "dit_instances": 1,
    "vae_max_batch": 4, "vae_instances": 1, "bridge_instances": 1, "stream_instances": 1,
    "max_clips_in_flight": 64, "limits": {}, "llm_gpus": [], "dit_gpus": [], "vae_gpus": [],
    "vae_engine": "graph", "step_policy": "deadline", "deadline_lead_s": 0.3, "deadline_margin_s": 0.5,
    "admit_backlog_s": 0,
}
PROFILES = {
    "cpu": {
        **_SHARED,
        "dit_engine": "onnx", "dit_threads": 2, "vae_queue_delay_us": 2000, "vae_threads": 2, "step_policy": "all",
        "full_instances": 4, "clips_in_flight_per_request": 1, "bls_timeout_s": 30,
        "full_max_queue": 16, "full_queue_timeout_s": 120,
        "engine_options": {"dtype": "float32", "max_model_len": 2048, "kv_cache_gib": 1, "enforce_eager": True},
    },
    "gpu": {
        **_SHARED,
        "dit_engine": "triton", "dit_threads": 0, "vae_queue_delay_us": 1000, "vae_threads": 0,
        "full_instances": 8, "clips_in_flight_per_request": 2, "bls_timeout_s": 10, "stream_instances": 4,
        "full_max_queue": 64, "full_queue_timeout_s": 60,
        "engine_options": {"dtype": "bfloat16", "max_model_len": 4096, "generate_gpu_memory_utilization": 0.35,
                           "pooling_gpu_memory_utilization": 0.15, "enforce_eager": False},
        "engines": {"dit_step": None, "vae_decoder": None},   # plan file names, from engines.json
    },
}


def _json_literal(obj) -> str:
    """A protobuf text string literal holding compact JSON."""
    return json.dumps(json.dumps(obj, separators=(",", ":")))


def _gpu_list(settings: dict, key: str) -> list[int]:
    value = settings.get(key) or []
    if not isinstance(value, list) or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in value):
        raise SystemExit(f"make_repo: {key} must be a list of GPU indices (integers >= 0), got {value!r}")
    return value


def _gpus_clause(settings: dict, key: str, gpu: bool) -> str:
    """`` gpus: [ 0, 1 ]`` for an instance group, or nothing (Triton's default placement)."""
    gpus = _gpu_list(settings, key)
    if gpus and not gpu:
        raise SystemExit(f"make_repo: {key} needs the gpu profile (the cpu profile runs on KIND_CPU)")
    return f" gpus: [ {', '.join(str(g) for g in gpus)} ]" if gpus else ""


def _tensor_lines(tensors, optional=None) -> str:
    return ",\n".join(t.pbtxt(optional) for t in tensors)


def _maps(kind: str, names) -> str:
    return "\n".join(f'      {kind} {{ key: "{n}" value: "{n}" }}' for n in names)


def control_input_line(name: str = control.CANCEL_INPUT) -> str:
    return f'  {{ name: "{name}" data_type: TYPE_STRING dims: [ 1 ] optional: true }}'


def graph_fields(onnx_dir: Path, tensorrt: bool) -> dict:
    """``dit_step``'s and ``vae_decoder``'s inputs and outputs, as the export recorded them from the
    graphs in its ``manifest.json``. A per-row scalar (shape ``[B]``) is declared ``[1]`` (Triton
    has no rank-0 rows); the TensorRT form reshapes it back to ``[ ]``."""
    path = onnx_dir / layout.MANIFEST
    if not path.is_file():
        raise SystemExit(f"make_repo: {path} not found: run `make export` first (the graphs' tensors are read from it)")
    graphs = json.loads(path.read_text())["graphs"]

    def lines(tensors: dict) -> str:
        out = []
        for name, shape in tensors.items():
            dims = ", ".join(str(d) for d in shape[1:]) or "1"
            reshape = " reshape: { shape: [ ] }" if tensorrt and not shape[1:] else ""
            out.append(f'  {{ name: "{name}" data_type: TYPE_FP32 dims: [ {dims} ]{reshape} }}')
        return ",\n".join(out)

    return {f"{short}_{side}": lines(graphs[stage][side])
            for stage, short in ((names.DIT_STEP, "dit"), (names.VAE, "vae")) for side in ("inputs", "outputs")}


DIT_ENGINES = {
    "onnx": "The step runs in this model: onnxruntime on the exported graph (no hop per step).",
    "triton": "The step runs in dit_step: each iteration's rows in BLS requests of step_max_batch rows.",
    "simulated": "The step is simulated: it sleeps an H100's measured time for its batch (benchmarks only).",
}
# vae_decoder: the profile's form of the exported graph, or the simulated H100 (benchmarks only).
VAE_ENGINES = ("graph", "simulated")
STEP_POLICIES = ("all", "deadline")


def dit_engine_fields(settings: dict, onnx_dir: Path) -> dict:
    """Where ``dit_sampler``'s scheduler runs the step (``dit_engine``)."""
    engine = settings["dit_engine"]
    if engine not in DIT_ENGINES:
        raise SystemExit(f"make_repo: dit_engine must be one of {sorted(DIT_ENGINES)}, got {engine!r}")
    onnx = onnx_dir / "dit_step.onnx"
    if engine == "onnx" and not onnx.exists():
        raise SystemExit(f"make_repo: {onnx} not found: run `make export` first (dit_engine onnx runs it)")
    min_batch = settings["dit_min_batch"]
    if not (isinstance(min_batch, int) and 1 <= min_batch <= settings["max_clips_in_flight"]):
        raise SystemExit(f"make_repo: dit_min_batch must be an integer in [1, max_clips_in_flight], got {min_batch!r}")
    if settings["step_policy"] not in STEP_POLICIES:
        raise SystemExit(f"make_repo: step_policy must be one of {', '.join(STEP_POLICIES)}, "
                         f"got {settings['step_policy']!r}")
    if settings["vae_engine"] not in VAE_ENGINES:
        raise SystemExit(f"make_repo: vae_engine must be one of {', '.join(VAE_ENGINES)}, "
                         f"got {settings['vae_engine']!r}")
    seconds = {}
    for key in ("deadline_lead_s", "deadline_margin_s", "admit_backlog_s"):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 600:
            raise SystemExit(f"make_repo: {key} must be a number of seconds in [0, 600], got {value!r}")
        seconds[key] = value
    return {"dit_engine": engine, "dit_engine_form": DIT_ENGINES[engine], "dit_min_batch": min_batch,
            "dit_onnx_path": str(onnx) if engine == "onnx" else "", "dit_threads": settings["dit_threads"],
            "step_policy": settings["step_policy"], **seconds}


def fields(profile: str, settings: dict, checkpoint: Path) -> dict:
    cfg = load_converted(checkpoint).config
    limits = Limits(**settings.get("limits", {}))
    try:   # refused here rather than when the llm model starts: unknown vLLM arguments, too few GPUs
        EngineOptions.from_dict(settings["engine_options"]).check_gpus(_gpu_list(settings, "llm_gpus"))
    except ValueError as e:
        raise SystemExit(f"make_repo: {e}") from None
    gpu = profile == "gpu"
    f = {
        "n": cfg.num_t5_tokens, "m": cfg.num_aud_tokens, "llm_hidden": cfg.llm.hidden_size,
        "checkpoint": str(checkpoint),
        "request_inputs": _tensor_lines(I.REQUEST_INPUTS),
        "stream_inputs": _tensor_lines(I.REQUEST_INPUTS + I.STREAM_INPUTS) + ",\n"
                         + control_input_line(control.STORY_KEY_INPUT),
        "stream_outputs": _tensor_lines(I.STREAM_OUTPUTS),
        "llm_inputs": _tensor_lines(I.REQUEST_INPUTS, optional=True) + ",\n" + control_input_line(),
        "clip_outputs": _tensor_lines(I.CLIP_OUTPUTS),
        "full_outputs": _tensor_lines(I.FULL_OUTPUTS),
        "llm_input_map": _maps("input_map", [t.name for t in I.REQUEST_INPUTS]),
        "clip_output_map": _maps("output_map", [t.name for t in I.CLIP_OUTPUTS]),
        "engine_options": _json_literal(settings["engine_options"]),
        "limits": _json_literal(vars(limits)),
        "llm_kind": "KIND_MODEL" if gpu else "KIND_CPU",
        "engine_kind": "KIND_GPU" if gpu else "KIND_CPU",
        "llm_gpus": json.dumps(_gpu_list(settings, "llm_gpus")),   # a JSON list inside a pbtxt string
        "dit_gpus": _gpus_clause(settings, "dit_gpus", gpu),
        "vae_gpus": _gpus_clause(settings, "vae_gpus", gpu),
    }
    for key in ("dit_max_batch", "dit_queue_delay_us", "dit_instances", "vae_max_batch", "vae_queue_delay_us",
                "vae_instances", "bridge_instances", "full_instances", "clips_in_flight_per_request",
                "max_clips_in_flight", "stream_instances", "bls_timeout_s", "full_max_queue"):
        f[key] = settings[key]
    f["full_queue_timeout_us"] = int(float(settings["full_queue_timeout_s"]) * 1e6)
    return f


def per_model_fields(name: str, profile: str, settings: dict, onnx_dir: Path) -> dict:
    if name not in ("dit_step", "vae_decoder"):
        return {}
    short = "dit" if name == "dit_step" else "vae"
    onnx = onnx_dir / f"{name}.onnx"
    if name == "vae_decoder" and settings["vae_engine"] == "simulated":
        return {"form": "Simulated H100: sleeps the measured decode time, answers silence (benchmarks only).",
                "backend": 'backend: "python"',
                "engine_parameters": (f'parameters {{ key: "onnx_path" value: {{ string_value: "{onnx}" }} }}\n'
                                      'parameters { key: "simulate" value: { string_value: "h100" } }')}
    if profile == "gpu":
        plan = (settings.get("engines") or {}).get(name)
        if not plan:
            raise SystemExit(f"make_repo: no TensorRT engine for {name}: run `make engines` "
                             f"(or set engines.{name} in --settings)")
        return {"form": "GPU form: TensorRT engine.", "backend": 'platform: "tensorrt_plan"',
                "engine_parameters": f'default_model_filename: "{plan}"', "plan_file": plan}
    if not onnx.exists():
        raise SystemExit(f"make_repo: {onnx} not found: run `make export` first")
    threads = settings[f"{short}_threads"]
    return {"form": "CPU form: python model on onnxruntime.", "backend": 'backend: "python"',
            "engine_parameters": (f'parameters {{ key: "onnx_path" value: {{ string_value: "{onnx}" }} }}\n'
                                  f'parameters {{ key: "threads" value: {{ string_value: "{threads}" }} }}')}


def render(template: str, values: dict, where: str) -> str:
    missing = sorted(set(re.findall(r"\$\{(\w+)\}", template)) - set(values))
    if missing:
        raise SystemExit(f"make_repo: {where}: no value for {', '.join(missing)}")
    return string.Template(template).substitute({k: str(v) for k, v in values.items()})


def make_repo(profile: str, model: str, out: Path, settings_path: Path | None = None,
              onnx_dir: Path | None = None, engines_manifest: Path | None = None) -> Path:
    if profile not in PROFILES:
        raise SystemExit(f"make_repo: profile must be one of {sorted(PROFILES)}, got {profile!r}")
    settings = json.loads(json.dumps(PROFILES[profile]))
    if settings_path:
        overrides = json.loads(Path(settings_path).read_text())
        unknown = set(overrides) - set(settings)
        if unknown:
            raise SystemExit(f"make_repo: unknown setting(s) {sorted(unknown)}; known: {sorted(settings)}")
        for key, value in overrides.items():   # dict settings (engine_options, limits) merge key by key
            if isinstance(value, dict) and isinstance(settings.get(key), dict):
                settings[key] = {**settings[key], **value}
            else:
                settings[key] = value
    checkpoint = layout.converted_dir(model) if not Path(model).exists() else Path(model).resolve()
    onnx_dir = Path(onnx_dir).resolve() if onnx_dir else layout.export_dir(model)
    # The engines manifest (build_engines.py writes it beside the plans); generating needs no GPU.
    default_manifest = layout.BUILD / "engines" / model / "engines.json"
    manifest = Path(engines_manifest).resolve() if engines_manifest else default_manifest
    if engines_manifest and not manifest.is_file():
        raise SystemExit(f"make_repo: engines manifest {manifest} not found")
    engines_dir = manifest.parent
    if profile == "gpu" and not settings.get("engines", {}).get("dit_step"):
        if manifest.exists():
            settings["engines"] = json.loads(manifest.read_text())["engines"]
    common = {**fields(profile, settings, checkpoint), **dit_engine_fields(settings, onnx_dir),
              **graph_fields(onnx_dir, tensorrt=profile == "gpu"), **names.template_fields()}
    if out.exists():
        shutil.rmtree(out)
    for name in PIPELINE:
        src = TEMPLATES / name
        dst = out / name
        (dst / "1").mkdir(parents=True)
        values = {**common, **per_model_fields(name, profile, settings, onnx_dir)}
        (dst / "config.pbtxt").write_text(render((src / "config.pbtxt").read_text(), values, f"{name}/config.pbtxt"))
        if name in ("dit_step", "vae_decoder"):
            if profile == "gpu" and "plan_file" in values:
                shutil.copy(engines_dir / values["plan_file"], dst / "1" / values["plan_file"])
            else:
                shutil.copy(ONNX_MODEL_PY, dst / "1" / "model.py")
        elif (src / "1" / "model.py").exists():
            shutil.copy(src / "1" / "model.py", dst / "1" / "model.py")
    (out / "repository.json").write_text(json.dumps({"profile": profile, "model": model, "settings": settings},
                                                    indent=2) + "\n")
    print(f"make_repo: wrote {out} ({profile}, {model})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fill the model-repository templates")
    ap.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    ap.add_argument("--model", default="tiny", help="tiny, full, or a converted checkpoint folder")
    ap.add_argument("--out", default=str(layout.BUILD / "model_repository"))
    ap.add_argument("--settings", default=None, help="JSON overrides of the profile's settings")
    ap.add_argument("--onnx-dir", default=None, help="exported graphs (default: build/export/MODEL)")
    ap.add_argument("--engines", default=None,
                    help="gpu: engines manifest, plans beside it (default: build/engines/MODEL/engines.json)")
    args = ap.parse_args(argv)
    make_repo(args.profile, args.model, Path(args.out), Path(args.settings) if args.settings else None,
              Path(args.onnx_dir) if args.onnx_dir else None, Path(args.engines) if args.engines else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
