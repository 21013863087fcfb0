"""Eager modules vs. their references (TINY config, CPU, small)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderOobleck, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from audiostory_ensemble.model.bridge import Bridge
from audiostory_ensemble.model.config import BRIDGE_DIM, LATENT_CHANNELS, LATENT_FRAMES, ROPE_AXES, TINY, VAE_HOP
from audiostory_ensemble.model.dit import AudioDiT, GuidedEulerStep
from audiostory_ensemble.model.sampler import flow_sigmas, initial_noise, sample_latent
from audiostory_ensemble.model.vae import VAEDecoder

N = TINY.num_t5_tokens


def _randomize(module: torch.nn.Module, scale: float = 0.05) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


@pytest.fixture(scope="module")
def dit() -> AudioDiT:
    torch.manual_seed(1234)
    m = AudioDiT(TINY).eval()
    _randomize(m)
    return m


@pytest.fixture(scope="module")
def step(dit) -> GuidedEulerStep:
    g = torch.Generator().manual_seed(7)
    return GuidedEulerStep(dit, torch.randn(N, BRIDGE_DIM, generator=g)).eval()


def _inputs(b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, LATENT_FRAMES, LATENT_CHANNELS, generator=g)
    cond = torch.randn(b, N, BRIDGE_DIM, generator=g) * 0.5
    duration = torch.rand(b, generator=g) * 40.0 - 5.0        # exercises both clamps
    sigma = torch.rand(b, generator=g) * 0.9 + 0.1
    sigma_next = sigma - 0.05
    guidance = torch.rand(b, generator=g) * 5.0 + 1.5
    return x, cond, duration, sigma, sigma_next, guidance


# ---------------------------------------------------------------------------------------- DiT
def test_duration_token_formula(dit):
    d = torch.tensor([-3.0, 0.0, 7.5, 30.0, 45.0])
    emb = dit.duration_embedder
    w = emb.time_positional_embedding[0].weights
    lin = emb.time_positional_embedding[1]
    t = (d.clamp(0.0, 30.0) / 30.0)[:, None]
    f = 2 * math.pi * t * w[None]
    feats = torch.cat([t, torch.sin(f), torch.cos(f)], dim=-1)
    expected = (feats @ lin.weight.T + lin.bias)[:, None, :]
    with torch.no_grad():
        got = emb(d)
    assert got.shape == (5, 1, BRIDGE_DIM)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    keys = set(emb.state_dict())
    assert keys == {"time_positional_embedding.0.weights", "time_positional_embedding.1.weight",
                    "time_positional_embedding.1.bias"}
    assert emb.time_positional_embedding[0].weights.shape == (128,)


def test_rope_constants_and_state_dict(dit):
    ids = torch.cat([torch.zeros(N + 1, 3), torch.arange(LATENT_FRAMES)[:, None].repeat(1, 3)], dim=0)
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=list(ROPE_AXES))(ids)
    c, s = dit.transformer.pos_embed(None)
    assert c.dtype == torch.float32 and c.shape == (N + 1 + LATENT_FRAMES, sum(ROPE_AXES))
    assert torch.equal(c, cos.float()) and torch.equal(s, sin.float())
    assert dit.txt_ids.shape == (N + 1, 3) and dit.img_ids.shape == (LATENT_FRAMES, 3)
    sd = dit.state_dict()
    assert not any(k.endswith(("txt_ids", "img_ids", ".cos", ".sin")) for k in sd)
    assert all(k.startswith(("transformer.", "fc.0.", "duration_embedder.")) for k in sd)


def test_velocity_matches_unmodified_diffusers(dit):
    ref = FluxTransformer2DModel(**TINY.dit.diffusers_kwargs()).eval()
    ref.load_state_dict(dit.transformer.state_dict(), strict=True)
    x, cond, duration, sigma, _, _ = _inputs(2, seed=1)
    with torch.no_grad():
        tokens, pooled = dit.condition(cond, duration)
        got = dit.velocity(x, tokens, pooled, sigma)
        # the reference's own ids: zeros for text (incl. duration token), (i, i, i) for frame i
        txt_ids = torch.zeros(N + 1, 3)
        img_ids = torch.arange(LATENT_FRAMES)[:, None].repeat(1, 3)
        want = ref(hidden_states=x, encoder_hidden_states=tokens, pooled_projections=pooled,
                   timestep=sigma, img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]
    assert got.shape == (2, LATENT_FRAMES, LATENT_CHANNELS)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # condition(): pooled before the duration token, duration token last
    torch.testing.assert_close(pooled, dit.fc(cond.mean(1)))
    torch.testing.assert_close(tokens[:, -1:], dit.duration_embedder(duration))
    torch.testing.assert_close(tokens[:, :N], cond)


def test_guided_step_matches_manual_cfg_euler(step, dit):
    x, cond, duration, sigma, sigma_next, guidance = _inputs(2, seed=2)
    with torch.no_grad():
        got = step(x, cond, duration, sigma, sigma_next, guidance)
        tokens_c, pooled_c = dit.condition(cond, duration)
        unc = step.uncond_tokens[None].expand(2, -1, -1)
        tokens_u, pooled_u = dit.condition(unc, duration)
        v_u = dit.velocity(x, tokens_u, pooled_u, sigma)
        v_c = dit.velocity(x, tokens_c, pooled_c, sigma)
        g = guidance[:, None, None]
        want = x + (sigma_next - sigma)[:, None, None] * (v_u + g * (v_c - v_u))
        # guidance <= 1: the reference runs without CFG (pure conditional velocity)
        got1 = step(x, cond, duration, sigma, sigma_next, torch.tensor([1.0, 0.5]))
        want1 = x + (sigma_next - sigma)[:, None, None] * v_c
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got1, want1, rtol=1e-5, atol=1e-5)
    assert "uncond_tokens" in step.state_dict()


def test_rows_are_independent(step):
    x, cond, duration, sigma, sigma_next, guidance = _inputs(4, seed=3)
    with torch.no_grad():
        full = step(x, cond, duration, sigma, sigma_next, guidance)
        one = step(x[2:3], cond[2:3], duration[2:3], sigma[2:3], sigma_next[2:3], guidance[2:3])
    torch.testing.assert_close(one[0], full[2], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ sampler
@pytest.mark.parametrize("n", [1, 31, 50])
def test_flow_sigmas_match_diffusers(n):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n))
    s = flow_sigmas(n)
    assert s.dtype == torch.float32 and s.shape == (n + 1,)
    assert torch.equal(s, sched.sigmas.to(torch.float32))


def test_initial_noise_matches_global_seed_and_keeps_global_rng():
    torch.manual_seed(0)
    want = torch.randn(1, LATENT_FRAMES, LATENT_CHANNELS)
    torch.manual_seed(99)
    state = torch.get_rng_state()
    got = initial_noise(0)
    assert torch.equal(torch.get_rng_state(), state)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    initial_noise(2**63 - 1)
    for bad in (-1, 2**63):
        with pytest.raises(ValueError):
            initial_noise(bad)


def test_sample_latent_drives_the_step(step):
    _, cond, _, _, _, _ = _inputs(2, seed=4)
    with torch.no_grad():
        got = sample_latent(step, cond, 12.0, 4.0, num_steps=2)
        s = flow_sigmas(2)
        x = initial_noise(0).expand(2, -1, -1)
        d, g = torch.full((2,), 12.0), torch.full((2,), 4.0)
        for i in range(2):
            x = step(x, cond, d, s[i].expand(2), s[i + 1].expand(2), g)
    assert torch.equal(got, x)


# ---------------------------------------------------------------------------------------- VAE
@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_vae_remove_weight_norm_keeps_output():
    torch.manual_seed(5)
    dec = VAEDecoder(TINY).eval()
    _randomize(dec, 0.02)
    official = {k: v.clone() for k, v in dec.vae.state_dict().items()}
    assert any(k.endswith("weight_g") for k in official) and any(k.startswith("encoder.") for k in official)
    z = torch.randn(1, LATENT_CHANNELS, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = dec.vae.decode(z).sample
        n = dec.remove_weight_norm()
        after = dec.vae.decode(z).sample
    assert n > 0
    assert not any("weight_g" in k or "weight_v" in k for k in dec.vae.state_dict())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    # official weights still load after removal (folded), and forward takes [B, frames, 64]
    fresh = VAEDecoder(TINY).eval()
    fresh.remove_weight_norm()
    fresh.load_official_state_dict(official)
    with torch.no_grad():
        wave = fresh(z.transpose(1, 2))
    assert wave.shape == (1, 2, 8 * VAE_HOP)
    torch.testing.assert_close(wave, before, rtol=1e-5, atol=1e-6)
    # and strictly before removal
    ref = AutoencoderOobleck(**TINY.vae.diffusers_kwargs())
    ref.load_state_dict(official, strict=True)
    plain = VAEDecoder(TINY)
    plain.load_official_state_dict(official)


# ------------------------------------------------------------------------------------- bridge
def test_bridge_formula():
    torch.manual_seed(6)
    h = TINY.llm.hidden_size
    br = Bridge(h, TINY.bridge_heads, TINY.t5_feature_scale).eval()
    sem = torch.randn(3, TINY.num_t5_tokens, h)
    res = torch.randn(3, TINY.num_aud_tokens, h)
    with torch.no_grad():
        out = br(sem, res)
        t5 = br.projector[2](torch.nn.functional.gelu(br.projector[0](sem)))
        aud = br.audio_projector[2](torch.nn.functional.gelu(br.audio_projector[0](res)))
        # manual multi-head attention, query = t5, key = value = aud
        w_q, w_k, w_v = br.fusion.in_proj_weight.chunk(3)
        b_q, b_k, b_v = br.fusion.in_proj_bias.chunk(3)
        heads, dh = TINY.bridge_heads, BRIDGE_DIM // TINY.bridge_heads

        def split(t):
            return t.view(t.shape[0], t.shape[1], heads, dh).transpose(1, 2)

        q, k, v = split(t5 @ w_q.T + b_q), split(aud @ w_k.T + b_k), split(aud @ w_v.T + b_v)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1) @ v
        a = a.transpose(1, 2).reshape(3, TINY.num_t5_tokens, BRIDGE_DIM)
        attn = br.fusion.out_proj(a)
        want = (t5 + attn) / TINY.t5_feature_scale
    assert out.shape == (3, TINY.num_t5_tokens, BRIDGE_DIM)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    keys = set(br.state_dict())
    assert {"projector.0.weight", "projector.2.bias", "audio_projector.0.weight",
            "fusion.in_proj_weight", "fusion.in_proj_bias", "fusion.out_proj.weight"} <= keys
    assert br.feature_scale == 10.0 and isinstance(br.feature_scale, float)
