"""Audio continuation: the model's audio-understanding path, from a waveform to LLM prompt rows.

1. ``to_whisper_input``: the input ``[C, T]`` at any rate -> mono (channel mean) 16 kHz, soxr HQ.
2. ``AudioEncoder.features``: transformers' ``WhisperFeatureExtractor`` log-mel, *not* padded to
   30 s: the official inference copy of the Whisper encoder takes fewer than 3,000 frames and adds
   only the first ``ceil(frames / 2)`` rows of its positional table; ``encode`` does the same with
   transformers' encoder modules (conv1, conv2, positions, layers, final norm).
3. ``AudioEncoder.resample``: adaptive average pooling over time to ``audio_tokens`` rows, then
   Linear(d_model -> H) . GELU . Linear(H -> H) (the official ``Whisper_Resampler_llava``).

The rows replace the embeddings of the ``<aud_i>`` placeholders of the ``<aud>…</aud>`` block that
opens the user turn (:func:`grammar.audio_block`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soxr
import torch
from safetensors.torch import load_file

from ..model.config import AUDIO_INPUT_SAMPLE_RATE
from ..model.grammar import aud_run_text


def to_whisper_input(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """``[C, T]`` (or ``[T]``) at ``sample_rate`` -> float32 ``[T']`` mono at 16 kHz."""
    a = np.asarray(audio, dtype=np.float32)
    mono = a if a.ndim == 1 else a.mean(axis=0)
    if int(sample_rate) == AUDIO_INPUT_SAMPLE_RATE:
        return np.ascontiguousarray(mono, dtype=np.float32)
    out = soxr.resample(mono, int(sample_rate), AUDIO_INPUT_SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(out, dtype=np.float32)


class AudioResampler(torch.nn.Module):
    """Time pooling to ``token_num`` rows, then the projector into the LLM's width."""

    def __init__(self, token_num: int, in_dim: int, out_dim: int):
        super().__init__()
        self.token_num = token_num
        self.aud_projector = torch.nn.Sequential(
            torch.nn.Linear(in_dim, out_dim), torch.nn.GELU(), torch.nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, token_num, out_dim]
        pooled = torch.nn.functional.adaptive_avg_pool1d(x.transpose(1, 2), self.token_num).transpose(1, 2)
        return self.aud_projector(pooled)


class AudioEncoder:
    """The Whisper encoder and the resampler of a converted checkpoint (eager, float32)."""

    def __init__(self, encoder_dir: Path, resampler_weights: Path, token_num: int):
        from transformers import WhisperConfig, WhisperFeatureExtractor
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        encoder_dir = Path(encoder_dir)
        self.config = WhisperConfig.from_pretrained(encoder_dir)
        self.extractor = WhisperFeatureExtractor.from_pretrained(encoder_dir)
        self.encoder = WhisperEncoder(self.config).eval()
        missing, unexpected = self.encoder.load_state_dict(load_file(str(encoder_dir / "model.safetensors")),
                                                           strict=False)
        if missing or unexpected:
            raise ValueError(f"whisper encoder weights: missing {missing}, unexpected {unexpected}")
        state = load_file(str(resampler_weights))
        out_dim, in_dim = state["aud_projector.0.weight"].shape
        self.resampler = AudioResampler(token_num, in_dim, out_dim).eval()
        self.resampler.load_state_dict(state, strict=True)
        self.token_num = token_num

    @classmethod
    def of_converted(cls, converted) -> "AudioEncoder | None":
        """The encoder of a converted checkpoint (``model.checkpoint.Converted``), or None for a
        text-only one (the released text-to-audio weights carry no Whisper encoder)."""
        from ..model import layout
        if converted.config.audio_tokens <= 0:
            return None
        return cls(converted.root / layout.AUDIO_ENCODER_DIR, converted.root / layout.AUDIO_RESAMPLER_WEIGHTS,
                   converted.config.audio_tokens)

    @property
    def max_frames(self) -> int:
        return 2 * self.config.max_source_positions

    def features(self, wave16k: np.ndarray) -> torch.Tensor:
        """Log-mel ``[1, mels, frames]`` for the input's own length (no padding to 30 s)."""
        out = self.extractor(wave16k, sampling_rate=AUDIO_INPUT_SAMPLE_RATE, padding="longest",
                             return_tensors="pt")
        feats = out["input_features"]
        if feats.shape[-1] > self.max_frames:
            raise ValueError(f"{feats.shape[-1]} mel frames: the encoder takes at most {self.max_frames}")
        return feats.float()

    @torch.no_grad()
    def encode(self, feats: torch.Tensor) -> torch.Tensor:
        """``[1, mels, F]`` -> ``[1, ceil(F/2), d_model]``: positions sliced to the length."""
        enc = self.encoder
        x = torch.nn.functional.gelu(enc.conv1(feats))
        x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        h = x + enc.embed_positions.weight[: x.shape[1]]
        for layer in enc.layers:
            h = layer(h, None)
            if isinstance(h, tuple):
                h = h[0]
        return enc.layer_norm(h)

    @torch.no_grad()
    def __call__(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """The ``audio_tokens`` prompt rows ``[token_num, H]`` float32 for one input."""
        wave = to_whisper_input(audio, sample_rate)
        rows = self.resampler(self.encode(self.features(wave)))[0]
        return np.ascontiguousarray(rows.numpy(), dtype=np.float32)


# ---- the prompt side ------------------------------------------------------------------------

CONTINUATION_LEAD = "Understand the input audio, infer the subsequent events, and generate the continued audio"


def audio_block(token_num: int) -> str:
    """The placeholder block that opens the user turn: ``<aud><aud_00000>…</aud>``; the
    embeddings at the ``<aud_i>`` positions are replaced by the resampler's rows."""
    return aud_run_text(token_num)


def continuation_instruction(caption: str, total_duration: float) -> str:
    """The release README's phrasing: ``… the continued audio of {caption}. The total duration is
    {X} seconds.`` (without a caption: ``… the continued audio. …``). ``total_duration`` is the
    length of the continuation, not counting the input."""
    caption = (caption or "").strip().rstrip(".")
    body = f"{CONTINUATION_LEAD} of {caption}." if caption else f"{CONTINUATION_LEAD}."
    return f"{body} The total duration is {float(total_duration)} seconds."
