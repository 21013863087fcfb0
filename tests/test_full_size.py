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
