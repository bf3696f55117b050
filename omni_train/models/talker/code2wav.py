"""Code2Wav: transformers' ``Qwen3OmniMoeCode2Wav``, carried unchanged (frozen by default) to turn codec
frames into 24 kHz waveforms (evaluation, DPO candidates, listening samples). Not reimplemented: its HF
weights load by name under ``model.`` (``weights.hf_to_code2wav``).

Lengths: ``forward`` maps codes [B, G, T] to [B, 1, n(T)] with n(T) slightly under T * total_upsample:
the two x2 upsamplers are exact, but each decoder block's causal transposed convolution (kernel 2r,
stride r) trims r samples on both sides, so a block maps L samples to (L - 1) * r. At release sizes
(upsample rates 8, 5, 4, 3) n(T) = 1920 T - 555. ``num_samples`` gives n(T) for any config.
"""

from __future__ import annotations

import copy
import wave
from typing import Any, Dict, Union

import torch
from torch import nn
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeCode2WavConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeCode2Wav


class Code2Wav(nn.Module):
    """codes [B, G, T] (G = num_quantizers, each in [0, codebook_size)) -> waveform [B, 1, n(T)] in [-1, 1]."""

    def __init__(self, model: Qwen3OmniMoeCode2Wav, frozen: bool = True):
        super().__init__()
        self.model = model
        self.frozen = frozen
        if frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True):
        """A frozen Code2Wav stays in eval mode whatever the loop sets."""
        return super().train(mode and not self.frozen)

    @property
    def samples_per_frame(self) -> int:
        return int(self.model.total_upsample)

    def num_samples(self, num_frames: int) -> int:
        cfg = self.model.config
        length = num_frames
        for ratio in cfg.upsampling_ratios:
            length *= ratio
        for rate in cfg.upsample_rates:
            length = (length - 1) * rate
        return length

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                return self.model(codes)
        return self.model(codes)

    def decode(self, codes: torch.Tensor, chunk_size: int = 300, left_context_size: int = 25) -> torch.Tensor:
        """Long sequences in chunks with left context, as transformers' ``generate`` decodes."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.model.chunked_decode(codes, chunk_size=chunk_size, left_context_size=left_context_size)


def build_code2wav(hf_config: Union[Qwen3OmniMoeCode2WavConfig, Dict[str, Any]], *, device="cpu",
                   dtype: torch.dtype = torch.float32, frozen: bool = True) -> Code2Wav:
    """Code2Wav sized by the HF ``code2wav_config`` (its weights: ``load_state_dict(hf_to_code2wav(...))``)."""
    config = copy.deepcopy(hf_config) if isinstance(hf_config, Qwen3OmniMoeCode2WavConfig) \
        else Qwen3OmniMoeCode2WavConfig(**hf_config)
    with torch.device(device):
        model = Qwen3OmniMoeCode2Wav(config)
    return Code2Wav(model.to(dtype), frozen=frozen)


SAMPLE_RATE = 24000  # Code2Wav's output: 1,920 samples per 12.5 Hz codec frame


def write_wav(path, waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> None:
    """[n] floats in [-1, 1] -> a mono 16-bit PCM WAV file."""
    pcm = (waveform.detach().float().flatten().clamp(-1, 1).cpu() * 32767).round().to(torch.int16)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.numpy().tobytes())
