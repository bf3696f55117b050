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
    """The Qwen2-VL processor's resize rule (omni_train.data.features.smart_resize, which matches
    transformers exactly): sides rounded to the factor, area brought into [min_pixels, max_pixels]."""
    from omni_train.data.features import smart_resize as processor_smart_resize

    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    return processor_smart_resize(height, width, factor, min_pixels, max_pixels)


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
