"""decode_sample on media written here with soundfile, Pillow and PyAV (no files from elsewhere)."""

import io
import json

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from omni_train.data.decode import (DecodedVideo, decode_audio, decode_image, decode_sample, decode_video,
                                    num_sampled_frames, resample_audio)
from omni_train.data.errors import SampleError


def sine(freq, sr, seconds, amp=0.5):
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)).astype(np.float32)


def audio_bytes(x, sr, fmt):
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt)
    return buf.getvalue()


def image_bytes(arr, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def video_bytes(num_frames=30, rate=10, size=(48, 64), audio_sr=None, container="mp4", codec="mpeg4"):
    """Frame i is a flat grey of level 8*i; optional 440 Hz stereo audio track of the same length."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        vs = out.add_stream(codec, rate=rate)
        vs.height, vs.width = size
        vs.pix_fmt = "yuv420p"
        if container == "mp4":
            vs.options = {"qscale": "1"}  # near-lossless, levels survive
        aus = out.add_stream("aac" if container == "mp4" else "libopus", rate=audio_sr) if audio_sr else None
        for i in range(num_frames):
            arr = np.full((*size, 3), 8 * i, np.uint8)
            for pkt in vs.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(pkt)
        for pkt in vs.encode():
            out.mux(pkt)
        if aus is not None:
            tone = sine(440, audio_sr, num_frames / rate)
            frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
            frame.sample_rate = audio_sr
            for pkt in aus.encode(frame):
                out.mux(pkt)
            for pkt in aus.encode():
                out.mux(pkt)
    return buf.getvalue()


def dominant_freq(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()]


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_resampler_is_accurate_and_band_limited(sr):
    y = resample_audio(sine(1000, sr, 1.0), sr)
    assert len(y) == 16000
    ref = sine(1000, 16000, 1.0)
    assert np.abs(y - ref)[300:-300].max() < 1e-4  # interior; edges see the zero padding
    if sr > 16000:  # a 9 kHz tone is above the new Nyquist: must be filtered out (< -80 dB)
        alias = resample_audio(sine(9000, sr, 1.0), sr)
        assert np.abs(alias[300:-300]).max() < 0.5e-4


@pytest.mark.parametrize("fmt,sr,stereo", [("WAV", 44100, True), ("FLAC", 16000, False), ("FLAC", 48000, True),
                                           ("MP3", 24000, False)])
def test_decode_audio_formats(fmt, sr, stereo):
    x = sine(440, sr, 1.0)
    data = np.stack([x, x], axis=1) if stereo else x
    out = decode_audio(audio_bytes(data, sr, fmt))
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - 16000) <= (1200 if fmt == "MP3" else 0)  # mp3 adds encoder delay/padding
    assert abs(dominant_freq(out, 16000) - 440) < 2
    if fmt != "MP3":
        assert np.abs(out[300:-300] - sine(440, 16000, 1.0)[300:-300]).max() < 1e-3


def test_decode_images():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(image_bytes(rgb, "PNG")), rgb)
    np.testing.assert_array_equal(decode_image(image_bytes(rgb, "WEBP", lossless=True)), rgb)
    jpg = decode_image(image_bytes(rgb, "JPEG", quality=95))
    assert jpg.shape == (20, 30, 3) and jpg.dtype == np.uint8
    gray = decode_image(image_bytes(rgb[..., 0], "PNG"))
    assert gray.shape == (20, 30, 3) and (gray[..., 0] == rgb[..., 0]).all()
    rgba = decode_image(image_bytes(np.dstack([rgb, np.full((20, 30), 255, np.uint8)]), "PNG"))
    np.testing.assert_array_equal(rgba, rgb)


def test_num_sampled_frames_follows_qwen_rules():
    assert num_sampled_frames(30, 10.0, 2.0) == 6       # 3 s at 2 fps
    assert num_sampled_frames(5, 10.0, 2.0) == 4        # at least min_frames (4), even
    assert num_sampled_frames(3, 10.0, 2.0) == 2        # at most the frames there are, even
    assert num_sampled_frames(100000, 30.0, 2.0) == 768  # at most max_frames


def test_decode_video_samples_frames_and_audio():
    data = video_bytes(num_frames=30, rate=10, audio_sr=44100)
    video = decode_video(data, fps=2.0, with_audio=True)
    idx = np.round(np.linspace(0, 29, 6)).astype(int)  # [0, 6, 12, 17, 23, 29]
    assert isinstance(video, DecodedVideo) and video.frames.shape == (6, 48, 64, 3)
    assert video.frames.dtype == np.uint8
    levels = video.frames.reshape(6, -1).mean(axis=1)
    np.testing.assert_allclose(levels, 8 * idx, atol=6)  # yuv420 round trip
    np.testing.assert_allclose(video.timestamps, idx / 10, atol=1e-6)
    assert video.fps == pytest.approx(2.0)
    assert video.audio is not None and video.audio.dtype == np.float32
    assert abs(len(video.audio) - 48000) < 2000  # 3 s at 16 kHz (aac priming/padding)
    assert abs(dominant_freq(video.audio, 16000) - 440) < 2
    assert decode_video(data, fps=2.0).audio is None  # not asked for


def test_decode_webm_without_declared_frame_count():
    data = video_bytes(num_frames=20, rate=10, container="webm", codec="libvpx")
    video = decode_video(data, fps=2.0)
    assert video.frames.shape[0] == 4  # 2 s at 2 fps
    np.testing.assert_allclose(video.frames.reshape(4, -1).mean(axis=1),
                               8 * np.round(np.linspace(0, 19, 4)), atol=6)


def raw_sample(**members):
    msg = {"messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "audio", "audio": "audio0.flac"},
                                     {"type": "image", "image": "image0.png"},
                                     {"type": "video", "video": "video0.mp4", "use_audio_in_video": True},
                                     {"type": "text", "text": "What do you hear and see?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A dog."},
                                          {"type": "audio", "audio": "audio1.wav", "codec": "codec0.npy"}]}],
        "speaker": {"id": "spk_1", "embedding": "spk.npy"}, "meta": {"line": 3}}
    raw = {"__key__": "s00000001", "__url__": "shard-000000.tar", "json": json.dumps(msg).encode(),
           "audio0.flac": audio_bytes(sine(300, 22050, 0.5), 22050, "FLAC"),
           "image0.png": image_bytes(np.zeros((8, 8, 3), np.uint8), "PNG"),
           "video0.mp4": video_bytes(num_frames=10, rate=10, audio_sr=16000),
           "audio1.wav": audio_bytes(sine(300, 16000, 0.5), 16000, "WAV"),
           "codec0.npy": _npy(np.arange(12, dtype=np.int16).reshape(4, 3)),
           "spk.npy": _npy(np.ones(8, np.float32))}
    raw.update(members)
    return raw


def _npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=arr.dtype == object)
    return buf.getvalue()


def test_decode_sample_end_to_end():
    out = decode_sample(raw_sample())
    assert out["__key__"] == "s00000001" and out["__url__"] == "shard-000000.tar"
    assert out["meta"] == {"line": 3} and len(out["messages"]) == 3
    media = out["media"]
    assert media["audio0.flac"].shape == (8000,) and media["audio1.wav"].shape == (8000,)
    assert media["image0.png"].shape == (8, 8, 3)
    assert media["video0.mp4"].frames.shape[0] == 4 and media["video0.mp4"].audio is not None
    assert media["codec0.npy"].dtype == np.int16 and media["codec0.npy"].shape == (4, 3)
    assert media["spk.npy"].dtype == np.float32


@pytest.mark.parametrize("members,member", [
    ({"json": b"{not json"}, "json"),
    ({"json": json.dumps({"no_messages": 1}).encode()}, "json"),
    ({"image0.png": b"not an image"}, "image0.png"),
    ({"audio0.flac": b"\x00" * 100}, "audio0.flac"),
    ({"video0.mp4": b"\x00" * 100}, "video0.mp4"),
    ({"codec0.npy": _npy(np.array([{"a": 1}], dtype=object))}, "codec0.npy"),  # pickle refused
    ({"extra.exe": b"MZ"}, "extra.exe"),
])
def test_decode_sample_errors_name_the_member(members, member):
    with pytest.raises(SampleError) as err:
        decode_sample(raw_sample(**members))
    assert err.value.key == "s00000001" and err.value.member == member


def test_missing_member_is_an_error():
    raw = raw_sample()
    del raw["image0.png"]
    with pytest.raises(SampleError, match="missing") as err:
        decode_sample(raw)
    assert err.value.member == "image0.png"
