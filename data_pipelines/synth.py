"""`omni-data synth`: a small dataset of real, decodable media, built through the normal build path.

Media files and a manifest are written to a source folder, then `build` turns them into shards.
Eight sample templates cycle (ASR audio, speech output with codec targets and a speaker, image QA,
video with an AAC track used as audio-in-video, stereo 44.1 kHz audio + image with teacher responses,
text only, a preference pair, multi-turn text with a teacher). Everything is deterministic in the seed.
"""

import json
import math
import os
import tempfile

import numpy as np

from data_pipelines.build import BuildOptions, build
from data_pipelines.sources import ManifestSource

CODEBOOKS = 16
CODEC_FRAMES_PER_SECOND = 12.5


def speech_like(rng, seconds, rate, channels=1):
    """A voiced-speech stand-in: harmonics of a drifting pitch, formant weighting, syllables, pauses."""
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    f0_mean = rng.uniform(100, 220)
    f0 = f0_mean * (1 + 0.06 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    formants = rng.uniform([400, 1200, 2300], [800, 1800, 3000])
    wave = np.zeros(n)
    for k in range(1, 16):
        if k * f0_mean < rate / 2 - 500:
            weight = sum(np.exp(-((k * f0_mean - f) ** 2) / (2 * 150.0 ** 2)) for f in formants) + 0.05
            wave += weight / k * np.sin(k * phase)
    syllables = 0.5 * (1 - np.cos(2 * np.pi * rng.uniform(3, 5) * t))
    gate = np.ones(n)
    pos = int(rate * rng.uniform(0.3, 0.8))
    while pos < n:  # pauses between "words"
        pause = int(rate * rng.uniform(0.1, 0.3))
        gate[pos:pos + pause] = 0
        pos += pause + int(rate * rng.uniform(0.4, 0.9))
    wave = wave * syllables * gate + 0.003 * rng.standard_normal(n)
    wave = (0.5 * wave / max(1e-6, np.abs(wave).max())).astype(np.float32)
    if channels == 2:
        wave = np.stack([wave, 0.8 * np.roll(wave, int(0.0004 * rate))], axis=1)
    return wave


def write_audio(path, rng, seconds, rate, channels=1):
    import soundfile

    wave = speech_like(rng, seconds, rate, channels)
    soundfile.write(path, wave, rate, subtype="PCM_16")
    return {"kind": "audio", "seconds": len(wave) / rate}


def draw_image(rng, width, height):
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:height, 0:width]
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    mix = ((x / max(1, width - 1) + y / max(1, height - 1)) / 2)[..., None]
    image = Image.fromarray((c0 * (1 - mix) + c1 * mix).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        x1, y1 = x0 + int(rng.integers(6, width // 2 + 8)), y0 + int(rng.integers(6, height // 2 + 8))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = [draw.rectangle, draw.ellipse][int(rng.integers(0, 2))]
        shape([x0, y0, x1, y1], fill=color)
    return image


def write_image(path, rng, fmt):
    width, height = int(rng.integers(48, 320)), int(rng.integers(48, 240))
    image = draw_image(rng, width, height)
    image.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return {"kind": "image", "width": width, "height": height}


def write_video(path, rng, seconds=2, fps=4, width=64, height=48, audio_rate=16000):
    """An H.264 mp4 with a moving shape and an AAC speech-like track of the same length."""
    import av

    frames = int(seconds * fps)
    wave = speech_like(rng, seconds, audio_rate)
    background = np.asarray(draw_image(rng, width, height))
    with av.open(path, "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps, options={"threads": "1"})
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = container.add_stream("aac", rate=audio_rate)
        audio.layout = "mono"
        for i in range(frames):
            image = background.copy()
            x = int(i * (width - 12) / max(1, frames - 1))
            image[height // 3:height // 3 + 12, x:x + 12] = (255, 255, 255)
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        _encode_audio(container, audio, wave, audio_rate)
    return {"kind": "video", "seconds": frames / fps, "frames": frames, "width": width, "height": height,
            "audio_seconds": len(wave) / audio_rate}


def _encode_audio(container, stream, wave, rate):
    import av

    step = stream.codec_context.frame_size or 1024
    for start in range(0, len(wave), step):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[None, start:start + step]), format="fltp",
                                           layout="mono")
        frame.sample_rate, frame.pts = rate, start
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def _text(content):
    return [{"type": "text", "text": content}]


def make_entry(i, rng, src):
    """Write the media of sample i into src; return (manifest entry, media descriptions)."""
    template, media = i % 8, []

    def add(name, description):
        media.append({**description, "file": name})
        return name

    seconds = round(float(rng.uniform(1.0, 3.0)), 2)
    if template == 0:
        audio = add(f"{i}_asr.flac", write_audio(os.path.join(src, f"{i}_asr.flac"), rng, seconds, 16000))
        return {"messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "audio", "audio": audio}, *_text("Transcribe the audio.")]},
            {"role": "assistant", "content": f"synthetic utterance number {i}"}]}, media
    if template == 1:
        audio = add(f"{i}_say.wav", write_audio(os.path.join(src, f"{i}_say.wav"), rng, seconds, 24000))
        frames = int(math.ceil(seconds * CODEC_FRAMES_PER_SECOND))
        np.save(os.path.join(src, f"{i}_codec.npy"), rng.integers(0, 2048, (frames, CODEBOOKS)).astype(np.int16))
        embedding = rng.standard_normal(192).astype(np.float32)
        np.save(os.path.join(src, f"{i}_spk.npy"), embedding / np.linalg.norm(embedding))
        return {"messages": [
            {"role": "user", "content": _text(f"Please say the number {i}.")},
            {"role": "assistant", "content": [*_text(f"The number is {i}."),
                                              {"type": "audio", "audio": audio, "codec": f"{i}_codec.npy"}]}],
            "speaker": {"id": f"spk_{i % 3:04d}", "embedding": f"{i}_spk.npy"}}, media
    if template == 2:
        image = add(f"{i}_photo.jpg", write_image(os.path.join(src, f"{i}_photo.jpg"), rng, "JPEG"))
        return {"messages": [
            {"role": "user", "content": [{"type": "image", "image": image}, *_text("What shapes are in the image?")]},
            {"role": "assistant", "content": "Some rectangles and ellipses on a gradient."}]}, media
    if template == 3:
        video = add(f"{i}_clip.mp4", write_video(os.path.join(src, f"{i}_clip.mp4"), rng, seconds=2 + i % 2))
        return {"messages": [
            {"role": "user", "content": [{"type": "video", "video": video, "use_audio_in_video": True},
                                         *_text("Describe what you see and hear.")]},
            {"role": "assistant", "content": "A white square moves right while someone hums."}]}, media
    return _text_heavy_entry(i, template, rng, src, add, seconds), media


def _text_heavy_entry(i, template, rng, src, add, seconds):
    if template == 4:
        audio = add(f"{i}_stereo.wav", write_audio(os.path.join(src, f"{i}_stereo.wav"), rng, seconds, 44100, 2))
        image = add(f"{i}_chart.png", write_image(os.path.join(src, f"{i}_chart.png"), rng, "PNG"))
        return {"messages": [
            {"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "image", "image": image},
                                         *_text("Does the sound match the picture?")]},
            {"role": "assistant", "content": "Not really: the picture is abstract."}],
            "teacher": [{"model": "teacher-a", "messages": [{"role": "assistant", "content": "No, it does not."}]},
                        {"model": "teacher-b", "messages": [{"role": "assistant", "content": "Hard to say."}]}]}
    if template == 5:
        return {"messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{2 * i}."}], "meta": {"lang": "en"}}
    if template == 6:
        audio = add(f"{i}_room.flac", write_audio(os.path.join(src, f"{i}_room.flac"), rng, seconds, 44100, 2))
        return {"messages": [
            {"role": "user", "content": [{"type": "audio", "audio": audio}, *_text("Is the speaker calm?")]}],
            "preference": {"chosen": [{"role": "assistant", "content": "Yes, the voice is steady."}],
                           "rejected": [{"role": "assistant", "content": "I cannot hear anything."}]}}
    return {"messages": [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green."}],
        "teacher": [{"model": "teacher-a", "messages": [{"role": "assistant", "content": "Red."},
                                                         {"role": "assistant", "content": "Yellow."}]}]}


def write_source(src, samples, seed):
    """Write media + manifest.jsonl into src. Returns {"manifest", "entries", "media"} (the ground truth)."""
    os.makedirs(src, exist_ok=True)
    entries, media = [], []
    for i in range(samples):
        entry, described = make_entry(i, np.random.default_rng([seed, i]), src)
        entries.append(entry)
        media += [{**m, "sample": i, "use_audio_in_video": m["kind"] == "video"} for m in described]
    manifest = os.path.join(src, "manifest.jsonl")
    with open(manifest, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)
    with open(os.path.join(src, "truth.json"), "w", encoding="utf-8") as f:
        json.dump({"entries": entries, "media": media}, f, indent=1)
    return {"manifest": manifest, "entries": entries, "media": media}


def synth(out_dir, samples=12, seed=0, source_dir=None, options=None):
    """Write a synthetic source and build it into out_dir. Returns (truth, BuildResult)."""
    options = options or BuildOptions(samples_per_shard=4, progress=False)
    with tempfile.TemporaryDirectory(prefix="omni-synth-") as tmp:
        truth = write_source(source_dir or tmp, samples, seed)
        result = build(ManifestSource(truth["manifest"]), out_dir, options)
    return truth, result
