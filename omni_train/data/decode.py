"""Decode one WebDataset sample of the omni-train shard format (docs/data_format.md).

``decode_sample(raw)`` takes what webdataset yields for one sample, with nothing decoded
(``{"__key__": ..., "json": bytes, "audio0.flac": bytes, ...}``), and returns the parsed JSON with the
media decoded under ``"media"``:

- audio (``flac wav mp3``): ``np.float32 [n]``, mono (channel mean), resampled to 16 kHz;
- image (``jpg png webp``): ``np.uint8 [H, W, 3]`` RGB;
- video (``mp4 webm``): ``DecodedVideo`` (frames ``uint8 [T, H, W, 3]`` sampled at ``video_fps``,
  their timestamps, the effective sampling rate and, when a part sets ``use_audio_in_video``, the audio
  track as 16 kHz mono float32, ``None`` for a silent video);
- ``.npy``: ``np.load(allow_pickle=False)``.

Only JSON, ``.npy`` and media bytes are decoded; never pickle, never eval. Any failure raises
``SampleError(key, member, reason)``.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Dict, Iterator, List, Optional, Set

import numpy as np

from omni_train.data.errors import SampleError

AUDIO_EXTS = ("flac", "wav", "mp3")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm")
TARGET_SAMPLING_RATE = 16000


@dataclass
class DecodedVideo:
    frames: np.ndarray            # uint8 [T, H, W, 3]
    timestamps: np.ndarray        # float64 [T], seconds
    fps: float                    # effective sampling rate of `frames` (frames per second of video)
    audio: Optional[np.ndarray] = None  # float32 [n] at 16 kHz, only when use_audio_in_video asked for it


# ----------------------------------------------------------------------------------------------- resampling
def _kaiser_sinc_table(up: int, down: int, zero_crossings: int, rolloff: float, beta: float):
    """Polyphase table [up, taps]: weights of input samples base+j (j = -K..K) for each output phase."""
    cutoff = rolloff * min(1.0, up / down)  # lowpass cutoff relative to the input Nyquist
    half_width = zero_crossings / cutoff    # in input samples
    k = int(math.ceil(half_width))
    offsets = np.arange(-k, k + 1, dtype=np.float64)
    u = (np.arange(up, dtype=np.float64)[:, None] / up) - offsets[None, :]  # distance output - input
    window = np.where(np.abs(u) < half_width,
                      np.i0(beta * np.sqrt(np.clip(1.0 - (u / half_width) ** 2, 0.0, None))) / np.i0(beta), 0.0)
    table = cutoff * np.sinc(cutoff * u) * window
    table /= table.sum(axis=1, keepdims=True)  # unit DC gain in every phase
    return table, k


def resample_audio(x: np.ndarray, orig_sr: int, target_sr: int = TARGET_SAMPLING_RATE, *,
                   zero_crossings: int = 24, rolloff: float = 0.94, beta: float = 8.6,
                   chunk: int = 1 << 15) -> np.ndarray:
    """Band-limited rational resampling of a 1-D signal (Kaiser-windowed sinc, polyphase, numpy only).

    Output sample n sits at input position n * orig_sr / target_sr; ``ceil(len * target / orig)`` samples.
    """
    x = np.asarray(x, dtype=np.float32)
    if orig_sr == target_sr:
        return x
    g = math.gcd(int(orig_sr), int(target_sr))
    up, down = int(target_sr) // g, int(orig_sr) // g
    table, k = _kaiser_sinc_table(up, down, zero_crossings, rolloff, beta)
    table = table.astype(np.float32)
    n_out = -(-len(x) * up // down)
    padded = np.concatenate([np.zeros(k, np.float32), x, np.zeros(k + 1, np.float32)])
    taps = np.arange(2 * k + 1)
    out = np.empty(n_out, dtype=np.float32)
    for start in range(0, n_out, chunk):
        n = np.arange(start, min(start + chunk, n_out), dtype=np.int64)
        base, phase = np.divmod(n * down, up)
        window = padded[base[:, None] + taps[None, :]]  # input samples base-k .. base+k
        out[start:start + len(n)] = np.einsum("nj,nj->n", window, table[phase])
    return out


# ----------------------------------------------------------------------------------------------- audio
def _to_mono(samples: np.ndarray) -> np.ndarray:
    samples = np.asarray(samples, dtype=np.float32)
    return samples.mean(axis=1) if samples.ndim == 2 else samples


def _audio_with_av(data: bytes, stream_index: Optional[int] = None):
    """Decode an audio stream with PyAV: (float32 [n, channels], sampling rate), or None if no audio stream."""
    import av

    with av.open(io.BytesIO(data)) as container:
        streams = container.streams.audio
        if not streams:
            return None
        stream = streams[stream_index or 0]
        resampler = av.AudioResampler(format="fltp")  # planar float, layout and rate unchanged
        chunks: List[np.ndarray] = []
        rate = None
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                rate = out.sample_rate
                chunks.append(out.to_ndarray())  # [channels, n]
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    if not chunks or rate is None:
        return np.zeros((0, 1), np.float32), stream.rate or TARGET_SAMPLING_RATE
    return np.concatenate(chunks, axis=1).T.astype(np.float32), int(rate)


def decode_audio(data: bytes, target_sr: int = TARGET_SAMPLING_RATE) -> np.ndarray:
    """Audio bytes -> mono float32 at ``target_sr``. soundfile first; PyAV for what libsndfile can't read."""
    import soundfile as sf

    try:
        samples, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception:  # e.g. mp3 on an old libsndfile: fall back to ffmpeg through PyAV
        decoded = _audio_with_av(data)
        if decoded is None:
            raise ValueError("no audio stream")
        samples, sr = decoded
    if samples.shape[0] == 0:
        raise ValueError("empty audio")
    return resample_audio(_to_mono(samples), sr, target_sr)


# ----------------------------------------------------------------------------------------------- video
def num_sampled_frames(total: int, video_fps: float, fps: float, min_frames: int = 4,
                       max_frames: int = 768, factor: int = 2) -> int:
    """How many frames to take, the way qwen-omni-utils does: duration * fps, clamped to
    [min_frames, min(max_frames, total)] and floored to a multiple of ``factor`` (the temporal patch)."""
    if total < factor:
        return total
    lo = -(-min_frames // factor) * factor
    hi = (min(max_frames, total) // factor) * factor
    n = min(max(total / video_fps * fps, lo), hi, total)
    return max(factor, int(n // factor) * factor)


def _iter_frames(data: bytes) -> Iterator[Any]:
    import av

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield stream
        for frame in container.decode(stream):
            yield frame


def _video_info(data: bytes):
    """(declared frame count or 0, average frame rate)."""
    frames = _iter_frames(data)
    stream = next(frames)
    rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
    count = int(stream.frames or 0)
    frames.close()
    return count, rate


def _collect_frames(data: bytes, wanted: Set[int]):
    frames = _iter_frames(data)
    stream = next(frames)
    tb = float(stream.time_base or Fraction(1, 1))
    images, stamps, index = [], [], -1
    for index, frame in enumerate(frames):
        if index in wanted:
            images.append(frame.to_ndarray(format="rgb24"))
            stamps.append(float(frame.pts) * tb if frame.pts is not None else float("nan"))
    return images, stamps, index + 1


def decode_video(data: bytes, fps: float = 2.0, min_frames: int = 4, max_frames: int = 768,
                 with_audio: bool = False, target_sr: int = TARGET_SAMPLING_RATE) -> DecodedVideo:
    """Video bytes -> frames sampled uniformly at ``fps`` (index = linspace(0, total-1, n).round())."""
    total, rate = _video_info(data)
    if total <= 0:  # container does not declare its frame count (webm): count by decoding
        total = _collect_frames(data, set())[2]
    for _ in range(2):
        n = num_sampled_frames(total, rate, fps, min_frames, max_frames)
        if n <= 0:
            raise ValueError("video has no frames")
        idx = np.round(np.linspace(0, total - 1, n)).astype(np.int64)
        images, stamps, decoded = _collect_frames(data, set(idx.tolist()))
        if decoded >= total:
            break
        total = decoded  # the declared count was too high: sample again from the true count
    # linspace can repeat an index for very short clips; repeat the frame as well
    by_index = dict(zip(sorted(set(idx.tolist())), zip(images, stamps)))
    frames = np.stack([by_index[i][0] for i in idx.tolist()]).astype(np.uint8)
    timestamps = np.array([by_index[i][1] for i in idx.tolist()], dtype=np.float64)
    if np.isnan(timestamps).any():
        timestamps = idx / rate
    audio = None
    if with_audio:
        decoded_audio = _audio_with_av(data)
        if decoded_audio is not None and decoded_audio[0].shape[0] > 0:
            audio = resample_audio(_to_mono(decoded_audio[0]), decoded_audio[1], target_sr)
    return DecodedVideo(frames=frames, timestamps=timestamps, fps=n / max(total, 1e-6) * rate, audio=audio)


# ----------------------------------------------------------------------------------------------- sample
def decode_image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _referenced_members(sample: Dict[str, Any]) -> Dict[str, bool]:
    """Member names that the JSON refers to -> whether a video part asks for its audio track."""
    refs: Dict[str, bool] = {}
    for message in sample.get("messages", []):
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            kind = part.get("type")
            if kind in ("audio", "image", "video") and isinstance(part.get(kind), str):
                name = part[kind]
                refs[name] = refs.get(name, False) or (kind == "video" and bool(part.get("use_audio_in_video")))
            if isinstance(part.get("codec"), str):
                refs.setdefault(part["codec"], False)
    speaker = sample.get("speaker")
    if isinstance(speaker, dict) and isinstance(speaker.get("embedding"), str):
        refs.setdefault(speaker["embedding"], False)
    for entry in sample.get("teacher") or []:  # stored top-k log-probabilities of a teacher response
        logprobs = entry.get("logprobs") if isinstance(entry, dict) else None
        for name in logprobs.values() if isinstance(logprobs, dict) else []:
            if isinstance(name, str):
                refs.setdefault(name, False)
    return refs


def _parse_json(key: str, raw: Dict[str, Any]) -> Dict[str, Any]:
    if "json" not in raw:
        raise SampleError(key, "json", "missing")
    try:
        data = raw["json"]
        sample = json.loads(data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data)
    except Exception as e:
        raise SampleError(key, "json", f"invalid JSON: {e}") from None
    if not isinstance(sample, dict) or not isinstance(sample.get("messages"), list):
        raise SampleError(key, "json", "not an object with a 'messages' list")
    return sample


def decode_member(name: str, data: bytes, *, use_audio_in_video: bool = False, video_fps: float = 2.0,
                  video_min_frames: int = 4, video_max_frames: int = 768) -> Any:
    ext = name.rsplit(".", 1)[-1].lower()
    if ext in AUDIO_EXTS:
        return decode_audio(data)
    if ext in IMAGE_EXTS:
        return decode_image(data)
    if ext in VIDEO_EXTS:
        return decode_video(data, video_fps, video_min_frames, video_max_frames, with_audio=use_audio_in_video)
    if ext == "npy":
        return decode_npy(data)
    raise ValueError(f"unsupported member extension {ext!r}")


def decode_sample(raw: Dict[str, Any], *, video_fps: float = 2.0, video_min_frames: int = 4,
                  video_max_frames: int = 768) -> Dict[str, Any]:
    """One raw WebDataset sample -> its JSON plus ``"media": {member name: decoded}`` (see module doc).

    Also sets ``"__key__"`` and ``"__url__"``. Every member the JSON names must be present.
    """
    key = str(raw.get("__key__", "?"))
    sample = _parse_json(key, raw)
    refs = _referenced_members(sample)
    members = {k: v for k, v in raw.items() if not k.startswith("__") and k != "json"}
    missing = sorted(set(refs) - set(members))
    if missing:
        raise SampleError(key, missing[0], "named in the JSON but missing from the sample")
    media: Dict[str, Any] = {}
    for name, data in members.items():
        try:
            media[name] = decode_member(name, data, use_audio_in_video=refs.get(name, False),
                                        video_fps=video_fps, video_min_frames=video_min_frames,
                                        video_max_frames=video_max_frames)
        except SampleError:
            raise
        except Exception as e:
            raise SampleError(key, name, f"{type(e).__name__}: {e}") from None
    sample["media"] = media
    sample["__key__"] = key
    sample["__url__"] = raw.get("__url__")
    return sample
