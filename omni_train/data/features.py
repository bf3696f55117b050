"""Model inputs of one media item, computed as transformers' Qwen3-Omni processor computes them.

Audio: the 128-bin log-mel of ``WhisperFeatureExtractor`` (torch path: ``torch.stft`` with a periodic
Hann window of 400, hop 160, centre/reflect padding, last frame dropped, power 2, Slaney mel filters
from ``transformers.audio_utils.mel_filter_bank`` (reused, not reimplemented), ``log10`` floored at
1e-10, clipped to max - 8, then ``(x + 4) / 4``). One item at a time, unpadded: equal to the extractor
called with that single item and the processor's ``padding=True, truncation=False`` (a batched call
zero-pads shorter items before the STFT, which changes their last frame or two). Placeholder count:
the AuT length formula (``_get_feat_extract_output_lengths``, ``n_window`` 50).

Image: ``Qwen2VLImageProcessorPil`` (the PIL backend, what AutoImageProcessor picks without
torchvision): ``smart_resize`` to multiples of patch*merge, Pillow bicubic on uint8, rescale 1/255 in
float64 then float32, normalise, patchify with the image repeated over the temporal patch.

Video: ``Qwen2VLVideoProcessor`` (needs torchvision, absent here): same ``smart_resize`` with the
processor's video bounds (128*32*32 .. 768*32*32 pixels), bicubic antialiased resize on the uint8
frames (torch's native uint8 kernel, which torchvision uses on CPU), fused rescale+normalise
``(x - 255*mean) / (255*std)`` in float32, pad the frame count to a multiple of the temporal patch by
repeating the last frame, patchify.

Placeholders per image/video: ``prod(grid_thw) // merge**2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------- configs
def _from_mapping(cls, cfg: Mapping[str, Any], renames: Mapping[str, str] = {}):
    names = {f.name for f in fields(cls)}
    kwargs = {renames.get(k, k): v for k, v in cfg.items() if renames.get(k, k) in names}
    for k, v in kwargs.items():
        if isinstance(v, list):
            kwargs[k] = tuple(v)
    return cls(**kwargs)


@dataclass(frozen=True)
class AudioFeatureConfig:
    """WhisperFeatureExtractor settings of Qwen3-Omni (``preprocessor_config.json``)."""

    feature_size: int = 128
    sampling_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    dither: float = 0.0
    n_window: int = 50  # the audio encoder's window (processor/audio_config), for the token count

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "AudioFeatureConfig":
        return _from_mapping(cls, cfg)


@dataclass(frozen=True)
class VisionFeatureConfig:
    """Qwen2-VL image/video processor settings with Qwen3-Omni's patching (16-pixel patches, 2x2 merge,
    2 frames per temporal patch). Defaults for mean/std and image pixel bounds are the transformers
    class defaults; load a checkpoint's ``preprocessor_config.json`` with ``from_dict`` for its values."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    video_min_pixels: int = 128 * 32 * 32  # Qwen3OmniMoeProcessor.videos_kwargs
    video_max_pixels: int = 768 * 32 * 32
    rescale_factor: float = 1 / 255
    image_mean: Tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: Tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "VisionFeatureConfig":
        cfg = dict(cfg)
        size = cfg.pop("size", None) or {}
        cfg.setdefault("min_pixels", size.get("shortest_edge", cls.min_pixels))
        cfg.setdefault("max_pixels", size.get("longest_edge", cls.max_pixels))
        return _from_mapping(cls, cfg)


# ----------------------------------------------------------------------------------------------- audio
@lru_cache(maxsize=8)
def _mel_filters(n_fft: int, n_mels: int, sampling_rate: int) -> torch.Tensor:
    from transformers.audio_utils import mel_filter_bank

    filters = mel_filter_bank(num_frequency_bins=1 + n_fft // 2, num_mel_filters=n_mels, min_frequency=0.0,
                              max_frequency=8000.0, sampling_rate=sampling_rate, norm="slaney",
                              mel_scale="slaney")
    return torch.from_numpy(filters).to(torch.float32)  # [n_freq, n_mels]


def num_audio_frames(num_samples: int, cfg: AudioFeatureConfig = AudioFeatureConfig()) -> int:
    return int(num_samples) // cfg.hop_length


def num_audio_tokens(num_frames: int, n_window: int = 50) -> int:
    """Tokens the AuT encoder gives for ``num_frames`` mel frames: three stride-2 convolutions inside
    windows of ``2 * n_window`` frames (13 tokens per full window), as ``_get_feat_extract_output_lengths``."""
    chunk = n_window * 2
    rest = num_frames % chunk
    after_cnn = (rest - 1) // 2 + 1
    return int(((after_cnn - 1) // 2 + 1 - 1) // 2 + 1 + (num_frames // chunk) * 13)


def audio_log_mel(waveform: np.ndarray | torch.Tensor,
                  cfg: AudioFeatureConfig = AudioFeatureConfig()) -> torch.Tensor:
    """Mono 16 kHz waveform [n] -> log-mel features float32 [feature_size, n // hop_length]."""
    x = torch.as_tensor(np.asarray(waveform, dtype=np.float32) if not torch.is_tensor(waveform) else waveform,
                        dtype=torch.float32).reshape(1, -1)
    if x.shape[1] <= cfg.n_fft // 2:
        raise ValueError(f"audio of {x.shape[1]} samples is shorter than n_fft/2+1 = {cfg.n_fft // 2 + 1}")
    if cfg.dither != 0.0:
        x = x + cfg.dither * torch.randn_like(x)
    window = torch.hann_window(cfg.n_fft)
    stft = torch.stft(x, cfg.n_fft, cfg.hop_length, window=window, return_complex=True)
    power = (stft[..., :-1].abs() ** 2).contiguous()
    mel = _mel_filters(cfg.n_fft, cfg.feature_size, cfg.sampling_rate).T @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0)[0]


def audio_features(waveform: np.ndarray, cfg: AudioFeatureConfig = AudioFeatureConfig()) -> Dict[str, Any]:
    """``input_features`` [128, T], ``num_frames`` T (all valid: the feature attention mask is all ones)
    and ``num_tokens`` (audio placeholders in the text)."""
    feats = audio_log_mel(waveform, cfg)
    return {"input_features": feats, "num_frames": int(feats.shape[1]),
            "num_tokens": num_audio_tokens(int(feats.shape[1]), cfg.n_window)}


# ----------------------------------------------------------------------------------------------- vision
def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> Tuple[int, int]:
    """Size with both sides multiples of ``factor``, area within [min_pixels, max_pixels], aspect kept
    as closely as possible (transformers' ``smart_resize``)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _patchify(video: torch.Tensor, cfg: VisionFeatureConfig) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """[T, C, H, W] float -> ([grid_t*grid_h*grid_w, C*tp*p*p], (grid_t, grid_h, grid_w)).

    Row order: t, then merge blocks (h//m, w//m), then (mh, mw) inside a block; vector order: C, tp, ph, pw.
    """
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if pad := -video.shape[0] % tp:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)], dim=0)
    t, c, h, w = video.shape
    gt, gh, gw = t // tp, h // p, w // p
    patches = video.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(gt * gh * gw, c * tp * p * p).contiguous(), (gt, gh, gw)


def image_patches(image: np.ndarray, cfg: VisionFeatureConfig = VisionFeatureConfig()) -> Dict[str, Any]:
    """RGB uint8 [H, W, 3] -> ``pixel_values`` float32 [N, 3*tp*p*p], ``grid_thw`` (1, gh, gw), ``num_tokens``."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    factor = cfg.patch_size * cfg.merge_size
    h, w = smart_resize(image.shape[0], image.shape[1], factor, cfg.min_pixels, cfg.max_pixels)
    resized = np.asarray(Image.fromarray(image).resize((w, h), resample=Image.BICUBIC))
    x = (resized.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    chw = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
    # one image fills every frame of its temporal patch
    pixel_values, grid = _patchify(chw[None].expand(cfg.temporal_patch_size, -1, -1, -1), cfg)
    return {"pixel_values": pixel_values, "grid_thw": grid, "num_tokens": vision_num_tokens(grid, cfg.merge_size)}


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [T, C, H, W] -> uint8 [T, C, height, width], bicubic with antialiasing (torchvision's CPU path
    for uint8 tensors: torch's native uint8 kernel; float path with clamp+round where that is missing)."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    try:
        return F.interpolate(frames, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    except RuntimeError:
        out = F.interpolate(frames.float(), size=(height, width), mode="bicubic", align_corners=False,
                            antialias=True)
        return out.clamp_(0, 255).round_().to(torch.uint8)


def video_patches(frames: np.ndarray, cfg: VisionFeatureConfig = VisionFeatureConfig(),
                  fps: Optional[float] = None) -> Dict[str, Any]:
    """RGB uint8 frames [T, H, W, 3] -> ``pixel_values_videos`` float32 [N, 3*tp*p*p], ``grid_thw``,
    ``num_tokens`` and, given the frames' sampling ``fps``, ``second_per_grid`` = tp / fps."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"expected RGB uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    factor = cfg.patch_size * cfg.merge_size
    h, w = smart_resize(frames.shape[1], frames.shape[2], factor, cfg.video_min_pixels, cfg.video_max_pixels)
    video = resize_frames(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous(), h, w)
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32) * (1.0 / cfg.rescale_factor)
    std = torch.tensor(cfg.image_std, dtype=torch.float32) * (1.0 / cfg.rescale_factor)
    video = (video.to(torch.float32) - mean[:, None, None]) / std[:, None, None]
    pixel_values, grid = _patchify(video, cfg)
    out = {"pixel_values_videos": pixel_values, "grid_thw": grid,
           "num_tokens": vision_num_tokens(grid, cfg.merge_size)}
    if fps is not None:
        out["second_per_grid"] = cfg.temporal_patch_size / fps
    return out


def vision_num_tokens(grid_thw: Sequence[int], merge_size: int = 2) -> int:
    return int(np.prod(grid_thw)) // merge_size ** 2


def audio_in_video_layout(video_grid_thw: Sequence[int], second_per_grid: float, num_audio: int,
                          merge_size: int = 2, position_id_per_seconds: float = 13.0) -> np.ndarray:
    """Order of placeholders for a video with its audio track: a bool array, True for a video token and
    False for an audio token. Each temporal grid (its tokens at time t * second_per_grid) comes before the
    audio tokens (one per position id, ``position_id_per_seconds`` per second) from that time on, as
    ``Qwen3OmniMoeProcessor.replace_video_with_audio_token``."""
    gt, gh, gw = (int(v) for v in video_grid_thw)
    per_frame = (gh // merge_size) * (gw // merge_size)
    video_pos = np.repeat(np.arange(gt), per_frame) * second_per_grid * position_id_per_seconds
    audio_pos = np.arange(num_audio)
    # a video token goes first when its position is <= the next audio token's (stable merge)
    order = np.concatenate([video_pos, audio_pos]).astype(np.float64)
    is_video = np.concatenate([np.ones(len(video_pos), bool), np.zeros(num_audio, bool)])
    rank = np.lexsort((~is_video, order))  # ties: video first
    return is_video[rank]
