"""The converter on the tiny release: every key accounted for, the LoRA merged correctly."""
import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from audiostory_ensemble.model import layout
from export.convert_checkpoint import ConversionError, convert


def test_every_key_consumed_and_parts_written(tiny_release, converted):
    state = torch.load(tiny_release / layout.RELEASE_WEIGHTS, map_location="cpu", weights_only=True)
    manifest = json.loads((converted.root / layout.MANIFEST).read_text())
    assert manifest["keys_consumed"] == len(state)
    for name in (layout.BRIDGE_WEIGHTS, layout.DIT_WEIGHTS, layout.UNCOND_WEIGHTS, layout.VAE_WEIGHTS,
                 layout.MODEL_CONFIG, f"{layout.LLM_DIR}/config.json", f"{layout.LLM_DIR}/model.safetensors"):
        assert (converted.root / name).exists(), name
    hydra = yaml.safe_load((tiny_release / layout.RELEASE_CONFIG).read_text())
    cfg = converted.config
    assert cfg.num_t5_tokens == hydra["train_dataset"]["datapipes"][0]["num_t5_out_tokens"]
    assert cfg.num_aud_tokens == hydra["train_dataset"]["datapipes"][0]["num_aud_out_tokens"]
    assert converted.uncond_tokens().shape == (cfg.num_t5_tokens, 1024)


def test_merged_llm_equals_lora_forward(tiny_release, converted):
    from transformers import AutoModelForCausalLM

    state = torch.load(tiny_release / layout.RELEASE_WEIGHTS, map_location="cpu", weights_only=True)
    hydra = yaml.safe_load((tiny_release / layout.RELEASE_CONFIG).read_text())
    peft = hydra["llm_model"]["peft_config"]
    scale = peft["lora_alpha"] / peft["r"]
    model = AutoModelForCausalLM.from_pretrained(converted.llm_dir, dtype=torch.float32).eval()
    merged = model.state_dict()
    x = torch.randn(5, converted.config.llm.hidden_size, generator=torch.Generator().manual_seed(0))
    p = layout.LLM_PREFIX
    for layer in range(converted.config.llm.num_layers):
        for sub, proj in (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "gate_proj")):
            stem = f"{p}model.layers.{layer}.{sub}.{proj}."
            w = state[stem + "weight"]
            a, b = state[stem + "lora_A.default.weight"], state[stem + "lora_B.default.weight"]
            lora_forward = x @ w.T + scale * ((x @ a.T) @ b.T)
            merged_forward = x @ merged[f"model.layers.{layer}.{sub}.{proj}.weight"].T
            torch.testing.assert_close(merged_forward, lora_forward, rtol=1e-5, atol=1e-5)
        # The trained norm (modules_to_save) is used, not the original one.
        torch.testing.assert_close(merged[f"model.layers.{layer}.input_layernorm.weight"],
                                   state[f"{p}model.layers.{layer}.input_layernorm.modules_to_save.default.weight"])
    assert model.config.vocab_size == len(converted.tokenizer)
    assert model.config.tie_word_embeddings


def _copy_release(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".content-hash"))
    return dst


def test_unconsumed_key_is_an_error_naming_it(tiny_release, tmp_path):
    release = _copy_release(tiny_release, tmp_path / "release")
    state = torch.load(release / layout.RELEASE_WEIGHTS, map_location="cpu", weights_only=True)
    state["tangoflux.something_new.weight"] = torch.zeros(2)
    torch.save(state, release / layout.RELEASE_WEIGHTS)
    with pytest.raises(ConversionError, match="unconsumed keys.*tangoflux.something_new.weight"):
        convert(release, tmp_path / "out", "tiny")


def test_missing_key_is_an_error_naming_it(tiny_release, tmp_path):
    release = _copy_release(tiny_release, tmp_path / "release")
    state = torch.load(release / layout.RELEASE_WEIGHTS, map_location="cpu", weights_only=True)
    key = f"{layout.LLM_PREFIX}model.layers.1.mlp.up_proj.lora_B.default.weight"
    del state[key]
    torch.save(state, release / layout.RELEASE_WEIGHTS)
    with pytest.raises(ConversionError, match=f"missing key.*{key}"):
        convert(release, tmp_path / "out", "tiny")


def test_audio_encoder_is_converted_and_a_release_without_one_is_text_only(tiny_release, converted, tmp_path):
    assert converted.config.audio_tokens == 8
    assert (converted.root / layout.AUDIO_ENCODER_DIR / "model.safetensors").is_file()
    assert (converted.root / layout.AUDIO_RESAMPLER_WEIGHTS).is_file()
    # The official text-to-audio release has no audio path: it converts, as text only.
    release = _copy_release(tiny_release, tmp_path / "release")
    state = torch.load(release / layout.RELEASE_WEIGHTS, map_location="cpu", weights_only=True)
    resampler = {k: v for k, v in state.items() if k.startswith(layout.AUDIO_RESAMPLER_PREFIX)}
    torch.save({k: v for k, v in state.items() if k not in resampler}, release / layout.RELEASE_WEIGHTS)
    hydra = yaml.safe_load((release / layout.RELEASE_CONFIG).read_text())
    spec = hydra["agent_model"].pop("whisper_resampler_llava")
    encoder = hydra.pop("whisper_encoder")
    (release / layout.RELEASE_CONFIG).write_text(yaml.safe_dump(hydra, sort_keys=False))
    out = convert(release, tmp_path / "text_only", "tiny")
    assert json.loads((out / layout.MODEL_CONFIG).read_text())["audio_tokens"] == 0
    assert not (out / layout.AUDIO_ENCODER_DIR).exists()
    # Half an audio path (the config names it, the weights are missing) is an error, not text only.
    hydra["agent_model"]["whisper_resampler_llava"] = spec
    hydra["whisper_encoder"] = encoder
    (release / layout.RELEASE_CONFIG).write_text(yaml.safe_dump(hydra, sort_keys=False))
    with pytest.raises(ConversionError, match="incomplete audio encoder"):
        convert(release, tmp_path / "half", "tiny")


def test_conversion_is_skipped_when_unchanged(tiny_release, converted, capsys):
    convert(tiny_release, converted.root, "tiny")
    assert "up to date" in capsys.readouterr().out
    weights = load_file(str(converted.root / layout.DIT_WEIGHTS))
    assert any(k.startswith("duration_embedder.") for k in weights)


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["agent_model"].update(brand_new_option=1), "unknown key agent_model.brand_new_option"),
    (lambda h: h.update(optimizer={"lr": 1e-4}), r"unknown section\(s\) \['optimizer'\]"),
    (lambda h: h["llm_model"]["peft_config"].update(use_dora=True), "unknown key llm_model.peft_config.use_dora"),
    (lambda h: h["llm_model"]["peft_config"].update(bias="all"), "bias must be 'none'"),
    (lambda h: h["llm_model"]["peft_config"].update(target_modules=["q_proj", "v_proj"]), "target_modules"),
    (lambda h: h["agent_model"].update(model_dims=2048), "model_dims 2048"),
    (lambda h: h["llm_model"]["model"].update(pretrained_model_name_or_path="elsewhere"), "not the tokenizer's base"),
])
def test_config_yaml_keys_are_used_checked_or_knowingly_ignored(tiny_release, tmp_path, edit, message):
    """An unknown config.yaml key or section, or a checked value the conversion cannot honour, is an
    error naming it; the training pipeline's keys (train_dataset) are ignored."""
    release = _copy_release(tiny_release, tmp_path / "release")
    hydra = yaml.safe_load((release / layout.RELEASE_CONFIG).read_text())
    hydra["train_dataset"]["datapipes"][0]["batch_size"] = 8        # training-only: ignored
    (release / layout.RELEASE_CONFIG).write_text(yaml.safe_dump(hydra, sort_keys=False))
    from export.convert_checkpoint import release_config_keys
    release_config_keys(hydra)
    edit(hydra)
    (release / layout.RELEASE_CONFIG).write_text(yaml.safe_dump(hydra, sort_keys=False))
    with pytest.raises(ConversionError, match=message):
        convert(release, tmp_path / "out", "tiny")
