"""Every generated config.pbtxt, both profiles, parses as Triton's ModelConfig (the protobuf message
tritonserver reads it into; tritonclient ships its definition) and holds nothing Triton would
refuse: tensorrt_plan models take and give exactly the exported graphs' tensors (names, shapes with
the batch axis, types), fit the engines' batch profile and sit on KIND_GPU groups that follow the
placement settings; ensemble steps wire tensors that exist, with one type and shape end to end.

The gpu profile is generated here without a GPU: the engines manifest names plan files that this
test writes (dummy bytes, not TensorRT engines; the configs are what is checked). Building a real
plan needs a GPU host: see deploy/README.md.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export import build_engines as B
from export import make_repo as M

ONNX_TYPES = {onnx.TensorProto.FLOAT: mc.TYPE_FP32, onnx.TensorProto.INT64: mc.TYPE_INT64,
              onnx.TensorProto.INT32: mc.TYPE_INT32, onnx.TensorProto.BOOL: mc.TYPE_BOOL}
PLACEMENT = {"llm_gpus": [2, 3], "dit_gpus": [0, 1], "vae_gpus": [1], "dit_instances": 2,
             "engine_options": {"tensor_parallel_size": 2}}


def write_engines(folder: Path, max_batch: int = 16) -> Path:
    """An engines manifest as build_engines.py writes it, with dummy plan files beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {g: B.engine_name(g, "fp16", "10.13.3", (9, 0)) for g in B.GRAPHS}
    for name in names.values():
        (folder / name).write_bytes(b"not a TensorRT engine: the config test only copies it")
    manifest = folder / "engines.json"
    manifest.write_text(json.dumps({"precision": "fp16", "profile": {"min": 1, "opt": 8, "max": max_batch},
                                    "tensorrt": "10.13.3", "compute_capability": [9, 0], "engines": names}))
    return manifest


def parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def full_shape(t, max_batch: int) -> list[int]:
    """What the backend sees: the batch axis when batching, then the reshape if given, else dims."""
    dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
    return ([-1] if max_batch > 0 else []) + dims


def tensors(cfg: mc.ModelConfig, kind: str) -> dict:
    return {t.name: t for t in getattr(cfg, kind)}


def same_shape(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


def problems(repo: Path, export_dir: Path, engines_manifest: Path | None = None) -> list[str]:
    """What Triton (or the tensorrt backend) would refuse in a generated repository, as sentences."""
    engines = json.loads(engines_manifest.read_text()) if engines_manifest else None
    info = json.loads((repo / "repository.json").read_text())
    profile, settings = info["profile"], info["settings"]
    graphs = json.loads((export_dir / "manifest.json").read_text())["graphs"]
    out, configs = [], {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        name = path.parent.name
        try:
            configs[name] = cfg = parse(path)
        except text_format.ParseError as e:
            out.append(f"{name}: not a ModelConfig: {e}")
            continue
        if cfg.name != name:
            out.append(f"{name}: config names {cfg.name!r}")
        if bool(cfg.platform) == bool(cfg.backend):
            out.append(f"{name}: needs exactly one of platform / backend")
        if cfg.backend == "python" and not (path.parent / "1" / "model.py").is_file():
            out.append(f"{name}: python model without 1/model.py")
        for g in cfg.instance_group:
            if g.kind == mc.ModelInstanceGroup.KIND_GPU and profile != "gpu":
                out.append(f"{name}: KIND_GPU in the {profile} profile (CPU hosts have no GPU)")
            if g.gpus and g.kind != mc.ModelInstanceGroup.KIND_GPU:
                out.append(f"{name}: gpus {list(g.gpus)} on a {mc.ModelInstanceGroup.Kind.Name(g.kind)} group")
        if cfg.platform == "tensorrt_plan":
            out += plan_problems(name, cfg, path.parent, graphs[name], export_dir, settings, profile, engines)
    for name in M.PIPELINE:
        if name not in configs and not any(p.startswith(f"{name}:") for p in out):
            out.append(f"{name}: no config.pbtxt")
    if "audiostory" in configs:
        out += ensemble_problems(configs["audiostory"], configs)
    if profile == "gpu" and "llm" in configs:
        llm = configs["llm"]
        if [mc.ModelInstanceGroup.Kind.Name(g.kind) for g in llm.instance_group] != ["KIND_MODEL"]:
            out.append("llm: the gpu profile runs vLLM in a KIND_MODEL instance")
        if json.loads(llm.parameters["gpus"].string_value) != settings["llm_gpus"]:
            given = llm.parameters["gpus"].string_value
            out.append(f"llm: gpus parameter {given} is not llm_gpus {settings['llm_gpus']}")
    return out


def plan_problems(name, cfg, folder, graph, export_dir, settings, profile, engines) -> list[str]:
    out, short = [], "dit" if name == "dit_step" else "vae"
    if profile != "gpu":
        out.append(f"{name}: tensorrt_plan in the {profile} profile")
    plan = cfg.default_model_filename
    if not plan or not (folder / "1" / plan).is_file():
        out.append(f"{name}: no plan file 1/{plan}")
    model = onnx.load(str(export_dir / graph["file"]), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    # The graph itself, not the manifest (which the generator reads): a stale manifest must show here.
    in_graph = {kind: {v.name: ["B" if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]
                       for v in values} for kind, values in (("inputs", model.graph.input),
                                                             ("outputs", model.graph.output))}
    for kind in ("inputs", "outputs"):
        have, want = tensors(cfg, kind[:-1] if kind == "inputs" else "output"), in_graph[kind]
        if set(have) != set(want):
            out.append(f"{name}: {kind} {sorted(have)} are not the graph's {sorted(want)}")
            continue
        for tname, dims in want.items():
            shape = full_shape(have[tname], cfg.max_batch_size)
            expect = [-1 if d == "B" else d for d in dims]
            if shape != expect:
                out.append(f"{name}: {tname} is {shape} with the batch axis, the graph's is {expect}")
            if have[tname].data_type != ONNX_TYPES.get(types.get(tname)):
                out.append(f"{name}: {tname} is {mc.DataType.Name(have[tname].data_type)}, "
                           f"the graph's is {onnx.TensorProto.DataType.Name(types.get(tname, 0))}")
    if engines is not None:
        top = engines["profile"]["max"]
        if not 0 < cfg.max_batch_size <= top:
            out.append(f"{name}: max_batch_size {cfg.max_batch_size}, the engine's profile takes 1 to {top}")
    groups = list(cfg.instance_group)
    want_gpus = settings[f"{short}_gpus"]
    if len(groups) != 1 or groups[0].kind != mc.ModelInstanceGroup.KIND_GPU:
        out.append(f"{name}: needs one KIND_GPU instance group, has {[str(g).strip() for g in groups]}")
    else:
        g = groups[0]
        if list(g.gpus) != want_gpus:
            out.append(f"{name}: instance group gpus {list(g.gpus)}, the placement setting {short}_gpus is {want_gpus}")
        if g.count != settings[f"{short}_instances"]:
            out.append(f"{name}: {g.count} instances, {short}_instances is {settings[f'{short}_instances']}")
    return out


def ensemble_problems(ens: mc.ModelConfig, configs: dict) -> list[str]:
    """Each step's input comes from an ensemble input or an earlier step's output with the same type
    and shape; each mapped output exists on its model; every ensemble output is produced."""
    out = []
    known = {t.name: (t.data_type, full_shape(t, ens.max_batch_size)) for t in ens.input}
    for step in ens.ensemble_scheduling.step:
        model = configs.get(step.model_name)
        if model is None:
            out.append(f"audiostory: step {step.model_name} is not in the repository")
            continue
        ins, outs = tensors(model, "input"), tensors(model, "output")
        for key, value in step.input_map.items():
            if key not in ins:
                out.append(f"audiostory: {step.model_name} has no input {key}")
            elif value not in known:
                out.append(f"audiostory: {step.model_name}.{key} reads {value}, which nothing produces before it")
            else:
                dtype, shape = known[value]
                want = (ins[key].data_type, full_shape(ins[key], model.max_batch_size))
                if dtype != want[0] or not same_shape(shape, want[1]):
                    out.append(f"audiostory: {value} {mc.DataType.Name(dtype)} {shape} into {step.model_name}.{key} "
                               f"{mc.DataType.Name(want[0])} {want[1]}")
        for key, value in step.output_map.items():
            if key not in outs:
                out.append(f"audiostory: {step.model_name} has no output {key}")
            else:
                known[value] = (outs[key].data_type, full_shape(outs[key], model.max_batch_size))
    for t in ens.output:
        if t.name not in known:
            out.append(f"audiostory: output {t.name} is produced by no step")
        elif known[t.name][0] != t.data_type or not same_shape(known[t.name][1], full_shape(t, ens.max_batch_size)):
            out.append(f"audiostory: output {t.name} differs from what its step produces")
    return out


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Path:
    return write_engines(tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="module")
def placement(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("settings") / "placement.json"
    path.write_text(json.dumps(PLACEMENT))
    return path


def test_cpu_profile_configs_are_model_configs_triton_accepts(exported, tmp_path):
    repo = M.make_repo("cpu", "tiny", tmp_path / "repo")
    assert problems(repo, exported) == []
    configs = {p.parent.name: parse(p) for p in repo.glob("*/config.pbtxt")}
    assert set(configs) == set(M.PIPELINE)
    assert configs["dit_step"].backend == "python" and not configs["dit_step"].platform


def test_gpu_profile_is_generated_without_a_gpu_from_an_engines_manifest(exported, engines, tmp_path):
    """`make repo PROFILE=gpu ENGINES=...`: the command line the Makefile runs, default placement."""
    out = tmp_path / "repo"
    assert M.main(["--profile", "gpu", "--model", "tiny", "--out", str(out), "--engines", str(engines)]) == 0
    assert problems(out, exported, engines) == []
    names = json.loads(engines.read_text())["engines"]
    for graph in B.GRAPHS:
        cfg = parse(out / graph / "config.pbtxt")
        assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == names[graph]
        assert (out / graph / "1" / names[graph]).read_bytes() == (engines.parent / names[graph]).read_bytes()
        assert [list(g.gpus) for g in cfg.instance_group] == [[]]      # Triton's default: every GPU
    dit = tensors(parse(out / "dit_step" / "config.pbtxt"), "input")
    assert list(dit["sigma"].dims) == [1] and list(dit["sigma"].reshape.shape) == []   # [b, 1] -> the graph's [B]


def test_gpu_placement_settings_reach_the_generated_instance_groups(exported, engines, placement, tmp_path):
    repo = M.make_repo("gpu", "tiny", tmp_path / "repo", placement, engines_manifest=engines)
    assert problems(repo, exported, engines) == []
    dit, vae = (parse(repo / g / "config.pbtxt").instance_group for g in B.GRAPHS)
    assert [(g.count, list(g.gpus)) for g in dit] == [(2, [0, 1])] and [list(g.gpus) for g in vae] == [[1]]
    llm = parse(repo / "llm" / "config.pbtxt")
    assert json.loads(llm.parameters["engine_options"].string_value)["tensor_parallel_size"] == 2


def test_a_missing_engines_manifest_is_named(exported, tmp_path):
    with pytest.raises(SystemExit, match="engines manifest .*nothing.json not found"):
        M.make_repo("gpu", "tiny", tmp_path / "repo", engines_manifest=tmp_path / "nothing.json")


# Faults planted in a copy of the templates, each one a config Triton or the tensorrt backend refuses:
# (profile, model, template text, planted text, what the check must say).
FAULTS = {
    "placement dropped from the template": ("gpu", "dit_step", "${dit_instances}${dit_gpus}", "${dit_instances}",
                                            "placement setting dit_gpus"),
    "a batch larger than the plan's profile": ("gpu", "dit_step", "max_batch_size: ${dit_max_batch}",
                                               "max_batch_size: 32", "max_batch_size 32"),
    "a misspelt field": ("cpu", "bridge", "instance_group [", "instance_groups [", "not a ModelConfig"),
    "KIND_GPU on a CPU host": ("cpu", "bridge", "kind: KIND_CPU", "kind: KIND_GPU", "KIND_GPU in the cpu"),
    "an ensemble step reading an input its model lacks": ("cpu", "audiostory", 'input_map { key: "${t_sem}"',
                                                          'input_map { key: "_SEMX"', "bridge has no input _SEMX"),
}


def _rename(tensors: dict, old: str, new: str) -> None:
    tensors[new] = tensors.pop(old)


# The graphs' tensors are filled from the export's manifest: a manifest that disagrees with the
# graphs (stale, or edited) must show. (what is changed in the manifest's "graphs", what the check says)
MANIFEST_FAULTS = {
    "an input name the graph does not have": (lambda g: _rename(g["vae_decoder"]["inputs"], "latent", "latents"),
                                              "are not the graph's ['latent']"),
    "output dims off by one": (lambda g: g["vae_decoder"]["outputs"]["wave"].__setitem__(2, 1320961),
                               "wave is [-1, 2, 1320961]"),
    "output axes swapped": (lambda g: g["dit_step"]["outputs"].__setitem__("x_next", ["B", 64, 645]),
                            "x_next is [-1, 64, 645]"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_the_checks_catch_a_planted_fault(fault, exported, engines, placement, tmp_path, monkeypatch):
    profile, model, old, new, expect = FAULTS[fault]
    templates = tmp_path / "templates"
    shutil.copytree(M.TEMPLATES, templates)
    config = templates / model / "config.pbtxt"
    text = config.read_text()
    assert old in text, (model, old)
    config.write_text(text.replace(old, new, 1))
    monkeypatch.setattr(M, "TEMPLATES", templates)
    gpu = profile == "gpu"
    repo = M.make_repo(profile, "tiny", tmp_path / "repo", placement if gpu else None,
                       engines_manifest=engines if gpu else None)
    found = problems(repo, exported, engines if gpu else None)
    assert any(expect in p for p in found), found


@pytest.mark.parametrize("fault", sorted(MANIFEST_FAULTS))
def test_the_checks_catch_a_manifest_that_disagrees_with_the_graphs(fault, exported, engines, placement, tmp_path):
    plant, expect = MANIFEST_FAULTS[fault]
    export_copy = tmp_path / "export"
    export_copy.mkdir()
    for item in exported.iterdir():
        (export_copy / item.name).symlink_to(item.resolve())
    manifest = json.loads((exported / "manifest.json").read_text())
    plant(manifest["graphs"])
    (export_copy / "manifest.json").unlink()
    (export_copy / "manifest.json").write_text(json.dumps(manifest))
    repo = M.make_repo("gpu", "tiny", tmp_path / "repo", placement, onnx_dir=export_copy, engines_manifest=engines)
    found = problems(repo, exported, engines)
    assert any(expect in p for p in found), found


def test_the_checks_catch_a_data_type_the_graph_does_not_have(exported, engines, placement, tmp_path):
    repo = M.make_repo("gpu", "tiny", tmp_path / "repo", placement, engines_manifest=engines)
    config = repo / "dit_step" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "x" data_type: TYPE_FP32', 'name: "x" data_type: TYPE_FP16', 1))
    assert any("x is TYPE_FP16" in p for p in problems(repo, exported, engines))
