"""Token estimates per modality, following docs/data_format.md (no model files needed).

These are estimates for dataset statistics and shard planning. The exact counts the reference
processor gives are computed by `omni_train/data/features.py`.
"""

import math

AUDIO_TOKENS_PER_SECOND = 12.5  # one token per 80 ms: 10 ms mel frames, 8x downsampling in the AuT encoder
PATCH_FACTOR = 32  # 16-pixel patches, 2x2 merge
IMAGE_MIN_PIXELS = 4 * 32 * 32  # at least 4 tokens
IMAGE_MAX_PIXELS = 1280 * 32 * 32  # at most 1280 tokens
VIDEO_MAX_PIXELS = 768 * 32 * 32  # per frame pair
VIDEO_SAMPLE_FPS = 2.0  # frames the processor samples per second of video
TEXT_CHARS_PER_TOKEN = 4.0  # rough BPE average for English-like text


def smart_resize(height, width, factor=PATCH_FACTOR, min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS):
    """Resize target (h, w): both multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    The same rule as the Qwen2-VL image processor's resize: round to the factor, then scale down or up
    when the area leaves the allowed range.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_frames_sampled(seconds, frames, fps=VIDEO_SAMPLE_FPS):
    """Frames the processor keeps: `fps` per second, at most the video's own, rounded up to a pair."""
    n = max(2, round(seconds * fps))
    if frames:
        n = min(n, max(2, frames))
    return n + (n % 2)


def estimate_tokens(kind, seconds=None, height=None, width=None, frames=None, text=None):
    """Estimated Thinker placeholder tokens for one item.

    kind: "audio" (needs seconds), "image" (height, width), "video" (height, width, and frames fed to
    the processor, or seconds to sample them at VIDEO_SAMPLE_FPS), "text" (text: the string).
    """
    if kind == "audio":
        return int(math.ceil(seconds * AUDIO_TOKENS_PER_SECOND - 1e-9)) if seconds > 0 else 0
    if kind == "image":
        h, w = smart_resize(height, width)
        return (h // PATCH_FACTOR) * (w // PATCH_FACTOR)
    if kind == "video":
        if frames is None:
            frames = video_frames_sampled(seconds, None)
        h, w = smart_resize(height, width, max_pixels=VIDEO_MAX_PIXELS)
        return int(math.ceil(frames / 2)) * (h // PATCH_FACTOR) * (w // PATCH_FACTOR)
    if kind == "text":
        return int(math.ceil(len(text) / TEXT_CHARS_PER_TOKEN)) if text else 0
    raise ValueError(f"unknown modality {kind!r}")
