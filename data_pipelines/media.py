"""Decode checks and probes for media bytes: soundfile (flac/wav), PyAV (mp3/mp4/webm), Pillow (images).

Every probe decodes the whole item (a file that only half-decodes is rejected) and returns a
`MediaInfo`. The member extension is taken from what the bytes really are, not from a file name.
"""

import io
import re
from dataclasses import dataclass

import numpy as np

from data_pipelines.schema import MEDIA_EXTS


class MediaError(ValueError):
    """The bytes are not a decodable item of the expected kind."""


@dataclass
class MediaInfo:
    kind: str
    ext: str
    seconds: float = 0.0
    width: int = 0
    height: int = 0
    frames: int = 0
    audio_seconds: float = 0.0  # a video's audio track; 0 when it has none
    has_audio: bool = False


def probe(kind, data):
    """Decode `data` fully as `kind` ("audio", "image" or "video"); raise MediaError if it does not."""
    if not data:
        raise MediaError(f"empty {kind} data")
    try:
        info = {"audio": probe_audio, "image": probe_image, "video": probe_video}[kind](data)
    except MediaError:
        raise
    except Exception as exc:  # decoders raise many types; all mean "not decodable"
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the data", str(exc))  # stable reports
        raise MediaError(f"undecodable {kind}: {type(exc).__name__}: {reason}") from exc
    if info.ext not in MEDIA_EXTS[kind]:
        raise MediaError(f"unsupported {kind} format {info.ext!r} (allowed: {', '.join(MEDIA_EXTS[kind])})")
    return info


def probe_audio(data):
    if data[:4] in (b"fLaC", b"RIFF"):
        import soundfile

        with soundfile.SoundFile(io.BytesIO(data)) as f:
            frames = 0
            for block in f.blocks(blocksize=65536):
                frames += len(block)
            ext = {"FLAC": "flac", "WAV": "wav"}.get(f.format, f.format.lower())
            if frames == 0:
                raise MediaError("audio has no samples")
            return MediaInfo("audio", ext, seconds=frames / f.samplerate)
    return _probe_audio_av(data)


def _probe_audio_av(data):
    import av

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.audio:
            raise MediaError("no audio stream")
        ext = "mp3" if "mp3" in container.format.name.split(",") else container.format.name
        samples, rate = 0, container.streams.audio[0].rate
        for frame in container.decode(audio=0):
            samples += frame.samples
    if samples == 0:
        raise MediaError("audio has no samples")
    return MediaInfo("audio", ext, seconds=samples / rate)


def probe_image(data):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(image.format, str(image.format).lower())
        return MediaInfo("image", ext, width=image.width, height=image.height)


def probe_video(data):
    import av

    with av.open(io.BytesIO(data)) as container:
        names = container.format.name.split(",")
        ext = "mp4" if "mp4" in names else "webm" if "webm" in names else names[0]
        if not container.streams.video:
            raise MediaError("no video stream")
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video=0))
        if frames == 0:
            raise MediaError("video has no frames")
        seconds = _stream_seconds(stream, container) or frames / float(stream.average_rate or 1)
        info = MediaInfo("video", ext, seconds=seconds, width=stream.width, height=stream.height, frames=frames)
    with av.open(io.BytesIO(data)) as container:
        if container.streams.audio:
            audio = container.streams.audio[0]
            samples = sum(frame.samples for frame in container.decode(audio=0))
            info.has_audio = samples > 0
            info.audio_seconds = _stream_seconds(audio, container) or samples / audio.rate
    return info


def _stream_seconds(stream, container):
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return 0.0


def load_npy(data, what):
    """Load .npy bytes without pickle; raise MediaError with `what` in the message if that fails."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise MediaError(f"{what}: not a readable .npy array ({type(exc).__name__}: {exc})") from exc


def check_codec(data):
    """Codec targets: a 2-D integer array [frames, codebooks] stored as int16/int32. Returns its shape."""
    array = load_npy(data, "codec")
    if array.ndim != 2 or array.shape[0] == 0 or array.dtype not in (np.int16, np.int32):
        raise MediaError(f"codec must be a non-empty int16/int32 [frames, codebooks] array, got "
                         f"{array.dtype} {list(array.shape)}")
    return array.shape


def check_speaker_embedding(data):
    """Speaker embedding: a non-empty float32 vector."""
    array = load_npy(data, "speaker embedding")
    if array.ndim != 1 or array.size == 0 or array.dtype != np.float32:
        raise MediaError(f"speaker embedding must be a float32 vector, got {array.dtype} {list(array.shape)}")
    return array.shape


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
