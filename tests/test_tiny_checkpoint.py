"""The synthetic TINY release (export/make_tiny_checkpoint.py): official layout, keys, tokenizer, and a
tiny LLM that writes well-formed plans.

Why this module is over 300 lines: it checks one artifact against one format (the official
release's files, keys, configuration and tokenizer) through the loaded state it shares below.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from audiostory_ensemble import tiny_story
from audiostory_ensemble.model import grammar, layout
from audiostory_ensemble.model.config import TINY

ROOT = Path(__file__).resolve().parent.parent


from conftest import run_tiny_maker as _run_maker


@pytest.fixture(scope="session")
def release_state(tiny_release) -> dict:
    return torch.load(tiny_release / layout.RELEASE_WEIGHTS, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def release_yaml(tiny_release) -> dict:
    return yaml.safe_load((tiny_release / layout.RELEASE_CONFIG).read_text())


@pytest.fixture(scope="session")
def full_tokenizer(tiny_release, release_yaml):
    """Built the way the official ``init_tokenizer`` does: base tokenizer, then ``add_tokens``."""
    from transformers import AutoTokenizer

    cfg = release_yaml["tokenizer"]
    tok = AutoTokenizer.from_pretrained(str(tiny_release / cfg["pretrained_model_path"]))
    added = json.loads((tiny_release / cfg["add_tokens_path"]).read_text())
    tok.add_tokens(list(added.keys()))
    return tok


def test_second_run_is_up_to_date(tiny_release):
    proc = _run_maker()
    assert proc.returncode == 0 and "up to date" in proc.stdout


def test_release_files_follow_the_official_layout(tiny_release, release_yaml):
    base = tiny_release / release_yaml["tokenizer"]["pretrained_model_path"]
    for rel in (layout.RELEASE_CONFIG, layout.RELEASE_WEIGHTS, layout.RELEASE_ADDED_TOKENS,
                layout.RELEASE_DIT_CONFIG, layout.RELEASE_VAE_WEIGHTS, layout.RELEASE_VAE_CONFIG, "MADE_BY.txt"):
        assert (tiny_release / rel).is_file(), rel
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "model.safetensors"):
        assert (base / name).is_file(), name
    assert "synthetic" in (tiny_release / "MADE_BY.txt").read_text().lower()
    t5 = tiny_release / json.loads((tiny_release / layout.RELEASE_DIT_CONFIG).read_text())["text_encoder_name"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (t5 / name).is_file(), name


def test_hf_folders_load_the_way_the_official_loader_reads_them(tiny_release, release_state):
    """``from_pretrained`` of the base LLM folder and of the T5 folder (what the official code calls
    before the checkpoint overwrites the weights): every weight present, metadata transformers 4.44
    needs, the base weights the LoRA-free part of the checkpoint's; tokenizer.json in the form
    tokenizers 0.19 reads (merges as "a b" strings)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, T5EncoderModel

    base = tiny_release / "Qwen2.5-tiny"
    t5_dir = tiny_release / json.loads((tiny_release / layout.RELEASE_DIT_CONFIG).read_text())["text_encoder_name"]
    for folder in (base, t5_dir, tiny_release / layout.RELEASE_WHISPER_DIR):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert f.metadata() == {"format": "pt"}, folder
    model, info = AutoModelForCausalLM.from_pretrained(str(base), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    p = layout.LLM_PREFIX
    vocab = model.config.vocab_size
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        src = p + name.replace("layernorm.weight", "layernorm.original_module.weight").replace(
            "model.norm.weight", "model.norm.original_module.weight")
        want = release_state[src][:vocab] if name == "model.embed_tokens.weight" else release_state[src]
        assert torch.equal(tensor, want), name
    merges = json.loads((base / "tokenizer.json").read_text())["model"]["merges"]
    assert merges and all(isinstance(m, str) and m.count(" ") == 1 for m in merges)
    t5, info = T5EncoderModel.from_pretrained(str(t5_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    for name, tensor in t5.state_dict().items():
        assert torch.equal(tensor, release_state[layout.T5_PREFIX + name]), name
    ids = AutoTokenizer.from_pretrained(str(t5_dir))([""], max_length=TINY.num_t5_tokens, padding="max_length",
                                                     truncation=True)
    assert ids["input_ids"] == [[1] + [0] * (TINY.num_t5_tokens - 1)]
    assert ids["attention_mask"] == [[1] + [0] * (TINY.num_t5_tokens - 1)]


def test_config_yaml_carries_every_key_the_official_loader_reads(release_yaml):
    """Each key of config.yaml is one the converter uses, checks or knowingly ignores (the table
    in layout.py); the sections the official inference code reads are all there."""
    from export.convert_checkpoint import release_config_keys

    walked = release_config_keys(release_yaml)
    assert set(walked) <= set(layout.RELEASE_CONFIG_KEYS)
    for required in ("tokenizer._target_", "tokenizer.pretrained_model_path", "tokenizer.add_tokens_path",
                     "llm_model._target_", "llm_model.model._target_", "llm_model.model.pretrained_model_name_or_path",
                     "llm_model.peft_config._target_", "llm_model.vocab_size", "agent_model._target_",
                     "agent_model.input_resampler", "agent_model.output_resampler",
                     "agent_model.whisper_resampler_llava", "seedx_dit_model_cfg._target_",
                     "train_dataset.datapipes[0].num_t5_out_tokens", "train_dataset.datapipes[0].num_aud_out_tokens"):
        assert required in walked, required
    assert release_yaml["agent_model"]["input_resampler"] is None
    assert release_yaml["seedx_dit_model_cfg"]["_target_"].endswith("AudioStory_unified")


def test_config_yaml_fields(release_yaml, tiny_release):
    assert release_yaml["tokenizer"]["pretrained_model_path"] == "Qwen2.5-tiny"
    assert release_yaml["tokenizer"]["add_tokens_path"] == layout.RELEASE_ADDED_TOKENS
    llm = release_yaml["llm_model"]
    assert llm["model"]["_target_"] == "transformers.AutoModelForCausalLM.from_pretrained"
    assert llm["model"]["pretrained_model_name_or_path"] == "Qwen2.5-tiny"
    peft = llm["peft_config"]
    assert peft["_target_"] == "peft.LoraConfig"
    assert (peft["r"], peft["lora_alpha"], peft["lora_dropout"]) == (TINY.llm.lora_r, TINY.llm.lora_alpha, 0.05)
    assert sorted(peft["target_modules"]) == sorted(layout.LORA_TARGETS)
    assert peft["modules_to_save"] == list(layout.SAVED_NORMS)
    assert peft["task_type"] == "CAUSAL_LM"
    agent = release_yaml["agent_model"]
    assert agent["t5_feature_scale"] == 10.0 and agent["model_dims"] == TINY.llm.hidden_size
    pipe = release_yaml["train_dataset"]["datapipes"][0]
    assert (pipe["num_t5_out_tokens"], pipe["num_aud_out_tokens"]) == (TINY.num_t5_tokens, TINY.num_aud_tokens)
    base_cfg = json.loads((tiny_release / "Qwen2.5-tiny" / "config.json").read_text())
    assert llm["vocab_size"] == base_cfg["vocab_size"] + len(grammar.added_tokens())


def test_added_tokens_order_and_ids(tiny_release):
    added = json.loads((tiny_release / layout.RELEASE_ADDED_TOKENS).read_text())
    base_cfg = json.loads((tiny_release / "Qwen2.5-tiny" / "config.json").read_text())
    assert list(added) == grammar.added_tokens()
    assert list(added.values()) == list(range(base_cfg["vocab_size"], base_cfg["vocab_size"] + 612))


def test_tokenizer_loads_and_sizes_agree(tiny_release, release_yaml, full_tokenizer):
    from transformers import AutoTokenizer

    base_dir = tiny_release / "Qwen2.5-tiny"
    base = AutoTokenizer.from_pretrained(str(base_dir))
    base_cfg = json.loads((base_dir / "config.json").read_text())
    assert len(base) == base_cfg["vocab_size"]
    bpe = base_cfg["vocab_size"] - len(grammar.QWEN_SPECIAL_TOKENS)
    assert base.convert_tokens_to_ids(grammar.QWEN_SPECIAL_TOKENS) == list(range(bpe, base_cfg["vocab_size"]))
    assert base.eos_token == "<|im_end|>" and base.pad_token == "<|endoftext|>"
    tcfg = json.loads((base_dir / "tokenizer_config.json").read_text())
    assert tcfg["clean_up_tokenization_spaces"] is False and tcfg["tokenizer_class"].startswith("Qwen2Tokenizer")
    assert len(full_tokenizer) == release_yaml["llm_model"]["vocab_size"]
    added = json.loads((tiny_release / layout.RELEASE_ADDED_TOKENS).read_text())
    assert full_tokenizer.convert_tokens_to_ids(list(added)) == list(added.values())
    # The ids the pipeline needs resolve, and a prompt round-trips through encode/decode.
    grammar.TokenIds.from_tokenizer(full_tokenizer, TINY.num_t5_tokens, TINY.num_aud_tokens)
    prompt = grammar.build_prompt(grammar.build_instruction(*tiny_story.SAMPLE_INSTRUCTIONS[0], seed=0))
    assert full_tokenizer.decode(full_tokenizer(prompt, add_special_tokens=False)["input_ids"]) == prompt


def test_base_llm_config_and_generation_config(tiny_release):
    base_dir = tiny_release / "Qwen2.5-tiny"
    cfg = json.loads((base_dir / "config.json").read_text())
    llm = TINY.llm
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"]) == (llm.hidden_size, llm.num_layers, llm.num_heads, llm.num_kv_heads,
                                          llm.intermediate_size)
    assert cfg["rope_theta"] == llm.rope_theta and cfg["rms_norm_eps"] == llm.rms_norm_eps
    gen = json.loads((base_dir / "generation_config.json").read_text())
    bpe = cfg["vocab_size"] - len(grammar.QWEN_SPECIAL_TOKENS)
    im_end, eot = bpe + 2, bpe
    assert gen["eos_token_id"] == [im_end, eot] and gen["pad_token_id"] == eot
    assert gen["repetition_penalty"] == 1.05 and gen["do_sample"] is True
    assert (gen["temperature"], gen["top_p"], gen["top_k"]) == (0.7, 0.8, 20)


def _llm_keys(vocab: int) -> dict[str, tuple[int, ...]]:
    llm = TINY.llm
    h, f, r = llm.hidden_size, llm.intermediate_size, llm.lora_r
    kv = llm.num_kv_heads * h // llm.num_heads
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
              "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    p = layout.LLM_PREFIX
    keys = {p + "model.embed_tokens.weight": (vocab, h), p + "lm_head.weight": (vocab, h),
            p + "model.norm.original_module.weight": (h,), p + "model.norm.modules_to_save.default.weight": (h,)}
    for i in range(llm.num_layers):
        for proj, (o, n) in shapes.items():
            block = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            stem = f"{p}model.layers.{i}.{block}.{proj}"
            keys[stem + ".weight"] = (o, n)
            keys[stem + ".lora_A.default.weight"] = (r, n)
            keys[stem + ".lora_B.default.weight"] = (o, r)
            if proj in ("q_proj", "k_proj", "v_proj"):
                keys[stem + ".bias"] = (o,)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            for copy in ("original_module", "modules_to_save.default"):
                keys[f"{p}model.layers.{i}.{norm}.{copy}.weight"] = (h,)
    return keys


def test_llm_keys_are_the_official_peft_names(release_state, release_yaml):
    expected = _llm_keys(release_yaml["llm_model"]["vocab_size"])
    got = {k: tuple(v.shape) for k, v in release_state.items() if k.startswith(layout.LLM_PREFIX)}
    assert got == expected
    p = layout.LLM_PREFIX
    assert torch.equal(release_state[p + "lm_head.weight"], release_state[p + "model.embed_tokens.weight"])
    for k in expected:
        if ".original_module." in k:
            # the trained copy differs from the original, so a converter reading the wrong one is caught
            trained = release_state[k.replace("original_module", "modules_to_save.default")]
            assert not torch.equal(release_state[k], trained)
        if ".lora_B." in k:
            assert release_state[k].abs().max() > 0
    assert all(v.dtype == torch.float32 for v in release_state.values())


def test_bridge_dit_t5_keys_and_shapes(release_state):
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    prefixes = (layout.PROJECTOR_PREFIX, layout.AUDIO_PROJECTOR_PREFIX, layout.FUSION_PREFIX, layout.DIT_PREFIX,
                layout.FC_PREFIX, layout.DURATION_PREFIX, layout.T5_PREFIX, layout.LLM_PREFIX,
                layout.AUDIO_RESAMPLER_PREFIX)
    assert all(any(k.startswith(p) for p in prefixes) for k in release_state)
    h = TINY.llm.hidden_size
    r = layout.AUDIO_RESAMPLER_PREFIX + "aud_projector."
    assert {k for k in release_state if k.startswith(layout.AUDIO_RESAMPLER_PREFIX)} == {
        r + "0.weight", r + "0.bias", r + "2.weight", r + "2.bias"}
    assert tuple(release_state[r + "2.weight"].shape) == (h, h)
    for p in (layout.PROJECTOR_PREFIX, layout.AUDIO_PROJECTOR_PREFIX):
        assert tuple(release_state[p + "0.weight"].shape) == (1024, h)
        assert tuple(release_state[p + "2.weight"].shape) == (1024, 1024)
        assert tuple(release_state[p + "0.bias"].shape) == tuple(release_state[p + "2.bias"].shape) == (1024,)
    f = layout.FUSION_PREFIX
    assert tuple(release_state[f + "in_proj_weight"].shape) == (3072, 1024)
    assert {k[len(f):] for k in release_state if k.startswith(f)} == {
        "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}
    assert tuple(release_state[layout.FC_PREFIX + "0.weight"].shape) == (1024, 1024)
    d = layout.DURATION_PREFIX + "time_positional_embedding."
    assert tuple(release_state[d + "0.weights"].shape) == (128,)
    assert tuple(release_state[d + "1.weight"].shape) == (1024, 257)

    def sub(prefix):
        return {k[len(prefix):]: v for k, v in release_state.items() if k.startswith(prefix)}

    FluxTransformer2DModel(**TINY.dit.diffusers_kwargs()).load_state_dict(sub(layout.DIT_PREFIX), strict=True)
    t = TINY.t5
    t5 = T5EncoderModel(T5Config(vocab_size=t.vocab_size, d_model=t.d_model, d_kv=t.d_kv, d_ff=t.d_ff,
                                 num_layers=t.num_layers, num_heads=t.num_heads,
                                 feed_forward_proj=t.feed_forward_proj))
    t5.load_state_dict(sub(layout.T5_PREFIX), strict=True)


def test_the_audio_hears_its_conditioning(reference, reference_result, sample_instructions):
    """The tiny DiT and VAE respond to what they are given (export/tiny_audio.py): another clip's
    conditioning, one second more duration, or the timestep input shifted by one step each move a
    clip's latent by >= 1e-2 of its size (100x the export tolerance) and its audio by >= 0.1
    (100x the audio parity tolerance); skipping one Euler step of 50 moves the audio by >= 1e-2."""
    import numpy as np

    from audiostory_ensemble.model import post
    from audiostory_ensemble.model.sampler import flow_sigmas, initial_noise

    caption, total = sample_instructions[0]
    clips = reference_result(caption, total).clips
    step = reference.converted.guided_step()

    def render(cond, duration, shift=False, skip=None):
        x, s = initial_noise(0), flow_sigmas(50)
        with torch.no_grad():
            for i in range(50):
                if i == skip:
                    continue
                sigma = s[i + 1:i + 2].clamp(min=1e-3) if shift else s[i:i + 1]
                x = step(x, cond[None], torch.tensor([duration]), sigma, sigma + s[i + 1:i + 2] - s[i:i + 1],
                         torch.tensor([4.0]))
        audio = post.clip_audio(reference.decode(x), duration)
        return x, audio

    base, base_audio = render(clips[0].cond, clips[0].render_duration)
    assert np.abs(base_audio - clips[0].audio).max() <= 1e-3      # the same loop as the reference's
    scale = float(base.abs().max())
    faults = {"conditioning": render(clips[1].cond, clips[0].render_duration),
              "duration": render(clips[0].cond, clips[0].render_duration + 1.0),
              "sigma": render(clips[0].cond, clips[0].render_duration, shift=True),
              "skipped step": render(clips[0].cond, clips[0].render_duration, skip=25)}
    n = base_audio.shape[1]
    for name, (latent, audio) in faults.items():
        moved = float((latent - base).abs().max()) / scale
        heard = float(np.abs(audio[:, :n] - base_audio).max())
        floor = 1e-2 if name == "skipped step" else 0.1
        assert heard >= floor and (name == "skipped step" or moved >= 1e-2), (name, moved, heard)


def test_flux_detokenizer_folder(tiny_release):
    from diffusers import AutoencoderOobleck
    from safetensors.torch import load_file

    cfg = json.loads((tiny_release / layout.RELEASE_DIT_CONFIG).read_text())
    d = TINY.dit
    assert {k: cfg[k] for k in ("num_layers", "num_single_layers", "in_channels", "attention_head_dim",
                                "num_attention_heads", "joint_attention_dim", "audio_seq_len", "max_duration")} == {
        "num_layers": d.num_layers, "num_single_layers": d.num_single_layers, "in_channels": d.in_channels,
        "attention_head_dim": d.attention_head_dim, "num_attention_heads": d.num_attention_heads,
        "joint_attention_dim": d.joint_attention_dim, "audio_seq_len": d.audio_seq_len,
        "max_duration": d.max_duration}
    assert (tiny_release / cfg["text_encoder_name"] / "config.json").is_file()
    vae_kwargs = json.loads((tiny_release / layout.RELEASE_VAE_CONFIG).read_text())
    assert vae_kwargs == TINY.vae.diffusers_kwargs()
    sd = load_file(str(tiny_release / layout.RELEASE_VAE_WEIGHTS))
    assert any(k.endswith("weight_g") for k in sd) and any(k.endswith("weight_v") for k in sd)
    AutoencoderOobleck(**vae_kwargs).load_state_dict(sd, strict=True)


def _merged_llm(tiny_release, release_state, vocab_size):
    """The LLM as a converter must rebuild it: base + (alpha/r) B@A, trained norms, resized vocab."""
    from transformers import AutoConfig, AutoModelForCausalLM

    p = layout.LLM_PREFIX
    scale = TINY.llm.lora_alpha / TINY.llm.lora_r
    sd = {}
    for k, v in release_state.items():
        if not k.startswith(p) or ".lora_" in k or ".original_module." in k:
            continue
        name = k[len(p):].replace(".modules_to_save.default.", ".")
        stem = k[: -len(".weight")]
        if k.endswith(".weight") and stem + ".lora_A.default.weight" in release_state:
            lora_a = release_state[stem + ".lora_A.default.weight"]
            lora_b = release_state[stem + ".lora_B.default.weight"]
            v = v + scale * lora_b @ lora_a
        sd[name] = v
    config = AutoConfig.from_pretrained(str(tiny_release / "Qwen2.5-tiny"))
    config.vocab_size = vocab_size
    model = AutoModelForCausalLM.from_config(config).float().eval()
    model.load_state_dict(sd, strict=True)
    return model


def test_greedy_decode_of_a_sample_instruction_parses(tiny_release, release_state, release_yaml, full_tokenizer):
    """transformers ``generate`` (greedy, the base generation config's repetition penalty), stopping
    at ``<t5>`` / ``<aud>`` to append the forced runs, as a vLLM-style server does."""
    torch.set_num_threads(2)
    tok = full_tokenizer
    model = _merged_llm(tiny_release, release_state, release_yaml["llm_model"]["vocab_size"])
    ids = grammar.TokenIds.from_tokenizer(tok, TINY.num_t5_tokens, TINY.num_aud_tokens)
    caption, total = tiny_story.SAMPLE_INSTRUCTIONS[0]
    prompt = grammar.build_prompt(grammar.build_instruction(caption, total, seed=0))
    seq = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    prompt_len = seq.shape[1]
    stops = [ids.t5_open, ids.aud_open, *ids.stop_ids]
    for _ in range(40):
        out = model.generate(seq, attention_mask=torch.ones_like(seq), do_sample=False, max_new_tokens=120,
                             eos_token_id=stops, pad_token_id=ids.endoftext, repetition_penalty=1.05)
        seq = out
        last = int(seq[0, -1])
        if last == ids.t5_open:
            seq = torch.cat([seq, torch.tensor([ids.forced_t5()])], dim=1)
        elif last == ids.aud_open:
            seq = torch.cat([seq, torch.tensor([ids.forced_aud()])], dim=1)
        else:
            break
    gen = seq[0, prompt_len:].tolist()
    plan = grammar.parse_plan(gen, ids, lambda x: tok.decode(list(x), skip_special_tokens=False))
    assert plan.finished and not plan.dropped
    assert len(plan.clips) >= 2
    assert round(plan.total_duration * 10) == round(total * 10)
    assert [c.caption for c in plan.clips] == list(tiny_story.events_of(caption))


def test_sample_instructions_are_held_out_and_well_formed():
    assert len(tiny_story.SAMPLE_INSTRUCTIONS) >= 5
    for i, (caption, total) in enumerate(tiny_story.SAMPLE_INSTRUCTIONS):
        clips = tiny_story.sample_clips(i)
        assert len(clips) >= 2
        assert round(sum(c.duration for c in clips) * 10) == round(total * 10)
    assert len(tiny_story.held_out_event_sequences()) == len(tiny_story.SAMPLE_INSTRUCTIONS)
