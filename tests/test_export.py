"""ONNX graphs on onnxruntime against the torch modules; the TensorRT builder's configuration."""
import json

import numpy as np
import pytest
import torch

from audiostory_ensemble.model.sampler import flow_sigmas, initial_noise, sample_latent
from export import build_engines as B
from export.export_onnx import DIT_FILE, MANIFEST, VAE_FILE, dit_example, ort_session, vae_example


def rel_err(got, want):
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


@pytest.fixture(scope="module")
def step(converted):
    return converted.guided_step()


@pytest.fixture(scope="module")
def dit_session(exported):
    return ort_session(exported / DIT_FILE)


@pytest.mark.parametrize("batch", [1, 3])
def test_dit_step_onnx_matches_torch(step, dit_session, converted, batch):
    ex = dit_example(converted.config.num_t5_tokens, batch, seed=10 + batch)
    with torch.no_grad():
        want = step(**ex).numpy()
    got = dit_session.run(None, {k: v.numpy() for k, v in ex.items()})[0]
    assert got.shape == want.shape == (batch, 645, 64)
    assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("batch", [1, 3])
def test_vae_decoder_onnx_matches_torch(converted, exported, batch):
    vae = converted.vae(remove_weight_norm=True)
    ex = vae_example(batch, seed=20 + batch)
    with torch.no_grad():
        want = vae(**ex).numpy()
    got = ort_session(exported / VAE_FILE).run(None, {k: v.numpy() for k, v in ex.items()})[0]
    assert got.shape == (batch, 2, 1320960)
    assert rel_err(got, want) <= 1e-4


def test_rows_are_independent_of_their_neighbours(converted, dit_session):
    ex4 = dit_example(converted.config.num_t5_tokens, 4, seed=5)
    ex4["guidance"] = torch.tensor([4.0, 1.0, 7.5, 2.0])
    ex4["sigma"] = torch.tensor([0.9, 0.1, 0.5, 0.02])
    full = dit_session.run(None, {k: v.numpy() for k, v in ex4.items()})[0]
    for row in (0, 2):
        solo = dit_session.run(None, {k: v[row:row + 1].numpy() for k, v in ex4.items()})[0]
        assert rel_err(solo[0], full[row]) <= 1e-5


def test_fifty_steps_through_onnx_match_the_torch_sampler(converted, step, dit_session):
    cfg = converted.config
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(1, cfg.num_t5_tokens, 1024, generator=g) * 0.1
    with torch.no_grad():
        want = sample_latent(step, cond, 12.0, 4.0, 50).numpy()
    x = initial_noise(0).numpy()
    sig = flow_sigmas(50).numpy()
    one = lambda v: np.array([v], np.float32)
    for i in range(50):
        x = dit_session.run(None, {"x": x, "cond": cond.numpy(), "duration": one(12.0), "sigma": one(sig[i]),
                                   "sigma_next": one(sig[i + 1]), "guidance": one(4.0)})[0]
    assert rel_err(x, want) <= 1e-4


def test_manifest_records_the_export(exported):
    m = json.loads((exported / MANIFEST).read_text())
    assert m["opset"] == 18 and "dynamo=True" in m["exporter"]
    assert m["graphs"]["dit_step"]["inputs"]["x"] == ["B", 645, 64]
    assert set(m["graphs"]["dit_step"]["inputs"]) == {"x", "cond", "duration", "sigma", "sigma_next", "guidance"}
    assert m["parity_max_rel"]["dit_step"] <= 1e-4


# ---- TensorRT builder configuration (the build itself needs a GPU host) ------------------------

def test_engine_name_carries_trt_version_and_compute_capability():
    s = B.build_settings("dit_step", "fp16", B.Profile(1, 8, 16), "10.13.0", (9, 0))
    assert s.engine_name == "dit_step.fp16.trt10.13.0.sm90.plan"
    assert s.flags == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    assert B.build_settings("vae_decoder", "fp32", B.Profile(1, 1, 4), "10.13.0", (8, 9)).flags == []


def test_profile_shapes_and_validation():
    p = B.Profile(1, 4, 16)
    assert p.shapes((-1, 645, 64)) == ((1, 645, 64), (4, 645, 64), (16, 645, 64))
    assert p.shapes((-1,)) == ((1,), (4,), (16,))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        B.Profile(4, 2, 8)
    with pytest.raises(ValueError, match="only the batch axis"):
        p.shapes((-1, -1, 64))


def test_precision_rules():
    with pytest.raises(ValueError, match="bf16 needs compute capability"):
        B.build_settings("dit_step", "bf16", B.Profile(1, 1, 1), "10.13.0", (7, 5))
    with pytest.raises(ValueError, match="precision must be one of"):
        B.build_settings("dit_step", "int8", B.Profile(1, 1, 1), "10.13.0", (9, 0))
    assert B.keep_fp32("NORMALIZATION") and B.keep_fp32("REDUCE")
    assert B.keep_fp32("UNARY", "SQRT") and B.keep_fp32("UNARY", "SIN") and B.keep_fp32("ELEMENTWISE", "POW")
    assert not B.keep_fp32("MATRIX_MULTIPLY") and not B.keep_fp32("ELEMENTWISE", "SUM")


def test_build_without_tensorrt_says_so_in_one_sentence(capsys):
    try:
        import tensorrt  # noqa: F401 - only whether it imports
        pytest.skip("TensorRT is installed here: this checks the CPU-host message")
    except ImportError:
        pass
    assert B.main(["--model", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("build_engines: TensorRT is not installed") and err.count("\n") == 0
