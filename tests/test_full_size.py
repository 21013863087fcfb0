"""The full configuration builds and runs (random weights). Slow: `make test-all`, not CI."""
import pytest
import torch

from audiostory_ensemble.model.config import FULL
from audiostory_ensemble.model.dit import AudioDiT, GuidedEulerStep
from audiostory_ensemble.model.vae import VAEDecoder
from export.export_onnx import dit_example, vae_example


@pytest.mark.slow
def test_full_dit_step_and_vae_forward():
    torch.set_grad_enabled(False)
    step = GuidedEulerStep(AudioDiT(FULL), torch.zeros(FULL.num_t5_tokens, 1024)).eval()
    assert 510e6 < sum(p.numel() for p in step.dit.transformer.parameters()) < 520e6
    out = step(**dit_example(FULL.num_t5_tokens, 1))
    assert out.shape == (1, 645, 64) and torch.isfinite(out).all()
    vae = VAEDecoder(FULL).eval()
    vae.remove_weight_norm()
    wave = vae(**vae_example(1))
    assert wave.shape == (1, 2, 1320960) and torch.isfinite(wave).all()


def test_the_full_size_tokenizer_gives_the_released_ids(tmp_path):
    """The random full release's tokenizer has Qwen2.5's size, so the AudioStory tokens, added as
    the official loader adds them, take the ids the released model uses."""
    import json

    from export.make_full_random_release import QWEN_EMBED_ROWS, write_added_tokens, write_base_folder
    from export.tiny_llm import load_full_tokenizer

    base = tmp_path / "Qwen2.5-3B-Instruct"
    base_vocab = write_base_folder(base, seed=0)
    assert base_vocab == 151_665
    assert write_added_tokens(tmp_path / "tokenizer" / "added_tokens.json", base_vocab) == 152_277
    tok = load_full_tokenizer(base, tmp_path / "tokenizer" / "added_tokens.json")
    assert len(tok) == 152_277
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "</t5>", "<t5>", "<t5_00000>",
                                                      "<aud>", "<aud_00500>", "<|gen|>", "<|/think|>")}
    assert ids == {"<|endoftext|>": 151_643, "<|im_end|>": 151_645, "</t5>": 151_665, "<t5>": 151_669,
                   "<t5_00000>": 151_670, "<aud>": 151_770, "<aud_00500>": 152_272, "<|gen|>": 152_273,
                   "<|/think|>": 152_276}
    text = "<|im_start|>user\na dog barks twice, 12.5 s<|im_end|>"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    config = json.loads((base / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (QWEN_EMBED_ROWS, 2048, 36)


@pytest.mark.slow
def test_the_full_size_release_converts_exports_and_serves(tmp_path):
    """`make full-size` on the cached release (random weights unless a real one is in place): the
    exported graphs equal PyTorch at full size, and served on the cpu profile a script-mode story
    is the planned length through both doors, the same audio from each, and a story-mode request
    ends (a story of the planned length, or the planner's clear error) — never a hang. Needs 24 GiB,
    about 45 GB of disk and, on 2 cores, about 11 minutes the first time, 7 after (deploy/README.md)."""
    import json

    import numpy as np

    from benchmarks import full_size

    assert full_size.main(["--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert all(v <= 1e-4 for v in report["export"]["parity_max_rel"].values()), report["export"]
    serve = report["serve"]
    want = [round(s["end"] - s["start"], 6) for s in full_size.SCRIPT]
    for door in ("script_stream", "script_full"):
        r = serve[door]
        assert r["finite"] and r["peak"] > 0, r
        assert abs(r["samples"] - r["expected_samples"]) <= 1, r
        assert r["samples"] == round(full_size.SCRIPT[-1]["end"] * 32000), r
        assert np.allclose(r["durations"], want, atol=1e-4), r
    assert serve["doors_max_abs_diff"] is not None and serve["doors_max_abs_diff"] <= 1e-6
    story = serve["story"]
    if story["outcome"] == "story":
        assert story["finite"] and abs(story["samples"] - story["expected_samples"]) <= 1, story
    else:
        assert story["status"] == "UNKNOWN" and "plan" in story["message"].lower(), story
