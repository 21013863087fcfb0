"""The tiny AudioStory's audio half: bridge, DiT, duration embedder, T5 encoder, VAE and the audio
encoder, with the official key names — seeded, then given gains so that the audio *hears* what
it is given.

Left at their seeded initialisation these modules barely listen: giving a clip another clip's
conditioning moved its audio by ~1e-5, a hundred times below the audio parity tolerance (1e-3), so
a served story could pass its parity test with the wrong bridging queries, duration or schedule.
What stops them listening, and what is set instead (``GAINS``; every value is the initialiser's
draw times a gain, or a bias chosen from data, never a trained weight):

- the bridging queries of different clips differ by ~15 % of their size and the projectors shrink
  everything: the projectors' first layers get a gain and a bias that centres the tiny LLM's
  hidden states (their mean over training transcripts), the second layers' and the fusion's
  biases are zero — conditioning tokens are then mostly what differs between clips;
- the pooled conditioning is drowned by the timestep embedding, and the timestep by the pooled
  conditioning once it is loud: both projections get gains;
- the text stream reaches the latent only through attention, which the 654 image tokens dilute:
  a shared bias direction on the first block's image queries and text keys makes image tokens
  attend to the conditioning and duration tokens, and that block's attention gate is opened;
- one second changes the duration features little: the Fourier frequencies are scaled;
- the velocity and the VAE's output are scaled up (the VAE's biases are zero, so the silence
  latent decodes to silence), and T5("") is scaled to the size of the conditioning tokens.

``tests/test_tiny_checkpoint.py`` measures the result on the converted checkpoint: conditioning,
duration and sigma each move a clip's latent by >= 1e-2 of its size and its audio by >= 0.1.
"""

from __future__ import annotations

import json
from pathlib import Path

from audiostory_ensemble.model import layout
from audiostory_ensemble.model.config import TINY

GAINS = {
    "bridge": 8.0,                  # projectors' first layers
    "pooled": 20.0,                 # fc (pooled conditioning)
    "timestep": 30.0,               # timestep embedder's output layer
    "duration_frequencies": 15.0,   # the duration embedder's Fourier frequencies
    "text_attention": 30.0,         # bias along one direction on image queries and text keys (block 0)
    "image_gate": 5.0,              # added to block 0's attention gate on the image stream
    "velocity": 3.0,                # proj_out
    "vae": 8.0,                     # the VAE decoder's last convolution
    "t5_output": 0.1,               # T5's final norm (the unconditional tokens' size)
}
T5_DIR = "flan-t5-tiny"             # the text encoder folder (text_encoder_name)

# The audio-understanding path (continuation): a tiny Whisper encoder and the resampler. The
# official text-to-audio release has neither; this layout (a transformers Whisper folder beside
# the LLM, resampler keys in pytorch_model.bin) is ours and documented in layout.py.
TINY_WHISPER = dict(d_model=64, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=128,
                    decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=128,
                    num_mel_bins=80, max_source_positions=1500, vocab_size=64,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)


def hidden_state_means(model, tok, seed: int, stories: int = 64):
    """Mean last-layer hidden state at the ``<t5_i>`` and at the ``<aud_i>`` positions over
    teacher-forced training-style transcripts (what the bridge's projectors see)."""
    import random

    import torch

    from audiostory_ensemble import tiny_story
    from audiostory_ensemble.model import grammar

    n, m = TINY.num_t5_tokens, TINY.num_aud_tokens
    ids_of = grammar.TokenIds.from_tokenizer(tok, n, m)
    rng = random.Random(f"bridge-{seed}")
    sem, res = [], []
    with torch.no_grad():
        for _ in range(stories):
            caption, total, clips = tiny_story.make_story(rng)
            prompt, completion = tiny_story.transcript(caption, total, clips, rng.randrange(1000), n, m)
            p = tok.encode(prompt, add_special_tokens=False)
            c = tok.encode(completion, add_special_tokens=False)
            hidden = model(input_ids=torch.tensor([p + c]), output_hidden_states=True).hidden_states[-1][0, len(p):]
            for span in grammar.parse_plan(c, ids_of, tok.decode).clips:
                sem.append(hidden[span.t5_pos:span.t5_pos + n])
                res.append(hidden[span.aud_pos:span.aud_pos + m])
    return torch.cat(sem).mean(0), torch.cat(res).mean(0)


def t5_config(t=TINY.t5):
    from transformers import T5Config

    return T5Config(vocab_size=t.vocab_size, d_model=t.d_model, d_kv=t.d_kv, d_ff=t.d_ff, num_layers=t.num_layers,
                    num_heads=t.num_heads, feed_forward_proj=t.feed_forward_proj, pad_token_id=t.pad_token_id,
                    eos_token_id=t.eos_token_id, decoder_start_token_id=t.pad_token_id, dropout_rate=0.0,
                    is_encoder_decoder=False, use_cache=False)


def audio_release_tensors(seed: int, sem_mean, res_mean, cfg=TINY, gains: bool = True) -> dict:
    """Bridge, DiT, fc, duration embedder and T5 encoder with official keys (``GAINS`` applied
    unless ``gains`` is false: the seeded initialisation as it is, e.g. at full size, where the
    LLM's hidden-state means would cost a 3B forward pass; ``sem_mean``/``res_mean`` are then unused)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    out = {}

    def add(prefix: str, module) -> None:
        for k, v in module.state_dict().items():
            out[prefix + k] = v.detach().clone().contiguous().float()

    h, d = cfg.llm.hidden_size, 1024
    with torch.no_grad():
        for i, (prefix, mean) in enumerate(((layout.PROJECTOR_PREFIX, sem_mean),
                                            (layout.AUDIO_PROJECTOR_PREFIX, res_mean))):
            torch.manual_seed(seed + 11 + i)
            proj = torch.nn.Sequential(torch.nn.Linear(h, d), torch.nn.GELU(), torch.nn.Linear(d, d))
            if gains:
                proj[0].weight.mul_(GAINS["bridge"])
                proj[0].bias.copy_(-proj[0].weight @ mean.float())
                proj[2].bias.zero_()
            add(prefix, proj)
        torch.manual_seed(seed + 13)
        fusion = torch.nn.MultiheadAttention(d, cfg.bridge_heads)
        fusion.in_proj_bias.zero_()
        fusion.out_proj.bias.zero_()
        add(layout.FUSION_PREFIX, fusion)

        torch.manual_seed(seed + 14)
        dit = FluxTransformer2DModel(**cfg.dit.diffusers_kwargs())
        if gains:
            _dit_gains(dit, seed)
        add(layout.DIT_PREFIX, dit)
        del dit

        torch.manual_seed(seed + 15)
        fc = torch.nn.Sequential(torch.nn.Linear(d, cfg.dit.joint_attention_dim), torch.nn.ReLU())
        if gains:
            fc[0].weight.mul_(GAINS["pooled"])
            fc[0].bias.mul_(GAINS["pooled"])
        add(layout.FC_PREFIX, fc)
        torch.manual_seed(seed + 16)
        out[layout.DURATION_PREFIX + "time_positional_embedding.0.weights"] = \
            torch.randn(128) * (GAINS["duration_frequencies"] if gains else 1.0)
        lin = torch.nn.Linear(257, d)
        out[layout.DURATION_PREFIX + "time_positional_embedding.1.weight"] = lin.weight.detach().clone()
        out[layout.DURATION_PREFIX + "time_positional_embedding.1.bias"] = lin.bias.detach().clone()

        torch.manual_seed(seed + 17)
        t5 = T5EncoderModel(t5_config(cfg.t5))
        if gains:
            t5.encoder.final_layer_norm.weight.mul_(GAINS["t5_output"])
        add(layout.T5_PREFIX, t5)
    return out


def _dit_gains(dit, seed: int) -> None:
    """The DiT's part of ``GAINS`` (in place)."""
    import torch

    te = dit.time_text_embed.timestep_embedder.linear_2
    te.weight.mul_(GAINS["timestep"])
    te.bias.mul_(GAINS["timestep"])
    block = dit.transformer_blocks[0]
    direction = torch.randn(block.attn.to_q.bias.shape[0], generator=torch.Generator().manual_seed(seed + 18))
    direction /= direction.norm()
    block.attn.to_q.bias.add_(GAINS["text_attention"] * direction)
    block.attn.add_k_proj.bias.add_(GAINS["text_attention"] * direction)
    inner = dit.config.num_attention_heads * dit.config.attention_head_dim
    block.norm1.linear.bias[2 * inner:3 * inner].add_(GAINS["image_gate"])   # (shift, scale, GATE, ...) msa
    dit.proj_out.weight.mul_(GAINS["velocity"])
    dit.proj_out.bias.mul_(GAINS["velocity"])


def write_t5_folder(folder: Path, release: dict, t5=TINY.t5) -> None:
    """``text_encoder_name``'s folder: what ``T5EncoderModel``/``T5TokenizerFast.from_pretrained``
    need (config, weights — the same tensors as ``tangoflux.text_encoder.*`` in the checkpoint —
    and a tokenizer with ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 that ends every text with ``</s>``)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    folder.mkdir(parents=True)
    cfg = t5_config(t5)
    cfg.architectures = ["T5EncoderModel"]
    cfg.save_pretrained(folder)
    prefix = layout.T5_PREFIX
    save_file({k[len(prefix):]: v.contiguous() for k, v in release.items() if k.startswith(prefix)},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(ch, -3.0) for ch in "abcdefghijklmnopqrstuvwxyz"]
    pieces += [("\u2581" + w, -1.0) for w in ("a", "the", "of", "and", "in", "on", "rain", "dog", "bell", "wind")]
    if len(pieces) > t5.vocab_size:
        raise RuntimeError("the T5 tokenizer has more pieces than the tiny T5 vocabulary")
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 512}, indent=2) + "\n")


def vae_state(seed: int, vae_cfg=TINY.vae, gains: bool = True) -> dict:
    """The Oobleck VAE (weight-normed keys): decoder biases zero, the last convolution's gain up
    (with ``gains``; else the seeded initialisation as it is)."""
    import torch
    from diffusers import AutoencoderOobleck

    torch.manual_seed(seed + 21)
    vae = AutoencoderOobleck(**vae_cfg.diffusers_kwargs())
    state = {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}
    if not gains:
        return state
    for key in state:
        if key.startswith("decoder.") and key.endswith(".bias"):
            state[key].zero_()
    state["decoder.conv2.weight_g"].mul_(GAINS["vae"])
    return state


def write_whisper_encoder(folder: Path, seed: int) -> dict:
    """A seeded random tiny Whisper encoder folder; returns the resampler's release tensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    folder.mkdir(parents=True)
    cfg = WhisperConfig(**TINY_WHISPER)
    cfg.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=cfg.num_mel_bins).save_pretrained(folder)
    torch.manual_seed(seed + 31)
    enc = WhisperEncoder(cfg)
    save_file({k: v.detach().clone().contiguous().float() for k, v in enc.state_dict().items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    torch.manual_seed(seed + 32)
    d, h = cfg.d_model, TINY.llm.hidden_size
    proj = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.GELU(), torch.nn.Linear(h, h))
    return {layout.AUDIO_RESAMPLER_PREFIX + "aud_projector." + k: v.detach().clone().contiguous().float()
            for k, v in proj.state_dict().items()}
