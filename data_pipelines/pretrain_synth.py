"""`omni-data synth-suite`: one synthetic dataset per data kind, sharing one tokenizer.

The pretraining stages mix data by kind (report section 3): text, audio-text, image-text, video-text and
video-audio, plus long audio and long video for the long-context stage; post-training adds SFT
conversations, teacher responses and captions (posttrain_synth.py). Each kind becomes its own dataset
directory (ROOT/<kind>, built through the normal build path), so recipes weight them like real corpora;
ROOT/tokenizer is a small BPE tokenizer trained on every kind's texts. Answers follow from the media where
cheap (durations, image sizes), so the towers have something to learn. Deterministic in the seed.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from data_pipelines.build import BuildOptions, build
from data_pipelines.posttrain_synth import (
    caption_entry, distill_entry, gspo_entry, sft_entry, speech_entry, speech_preference_entry,
)
from data_pipelines.sources import ManifestSource
from data_pipelines.synth import write_audio, write_image, write_video

Entry = Tuple[dict, List[dict]]  # (manifest entry, media descriptions)


def _user(media: List[dict], text: str) -> dict:
    return {"role": "user", "content": [*media, {"type": "text", "text": text}]}


def _text(i: int, rng, src: str, long: bool = False) -> Entry:
    a, b = int(rng.integers(1, 50)), int(rng.integers(1, 50))
    if i % 2:
        return {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                             {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}, []
    return {"messages": [{"role": "user", "content": f"Count from {a} to {a + 4}."},
                         {"role": "assistant", "content": " ".join(str(a + k) for k in range(5))}]}, []


def _audio(i: int, rng, src: str, long: bool = False) -> Entry:
    seconds = round(float(rng.uniform(20.0, 30.0) if long else rng.uniform(1.0, 4.0)), 2)
    name = f"{i}_speech.flac"
    described = write_audio(os.path.join(src, name), rng, seconds, 16000)
    prompt = ["Transcribe the audio.", "How long is the recording?"][i % 2]
    answer = f"About {round(seconds)} seconds of speech." if i % 2 else f"synthetic utterance {i % 10}"
    return {"messages": [_user([{"type": "audio", "audio": name}], prompt),
                         {"role": "assistant", "content": answer}]}, [{**described, "file": name}]


def _image(i: int, rng, src: str, long: bool = False) -> Entry:
    name = f"{i}_picture.png"
    described = write_image(os.path.join(src, name), rng, "PNG")
    answer = "It is wider than tall." if described["width"] > described["height"] else "It is taller than wide."
    return {"messages": [_user([{"type": "image", "image": name}], "Describe the picture's shape."),
                         {"role": "assistant", "content": answer}]}, [{**described, "file": name}]


def _video(i: int, rng, src: str, long: bool = False, with_audio: bool = False) -> Entry:
    seconds = int(rng.integers(8, 11)) if long else 2 + i % 2
    name = f"{i}_clip.mp4"
    described = write_video(os.path.join(src, name), rng, seconds=seconds)
    prompt = "Describe what you see and hear." if with_audio else "Describe what you see."
    answer = f"A white square crosses the frame in {seconds} seconds" + (" while someone hums." if with_audio
                                                                          else ".")
    part = {"type": "video", "video": name, "use_audio_in_video": with_audio}
    return {"messages": [_user([part], prompt), {"role": "assistant", "content": answer}]}, \
        [{**described, "file": name}]


KINDS: Dict[str, Callable[..., Entry]] = {
    "text": _text,
    "audio_text": _audio,
    "image_text": _image,
    "video_text": _video,
    "video_audio": lambda i, rng, src: _video(i, rng, src, with_audio=True),
    "long_audio": lambda i, rng, src: _audio(i, rng, src, long=True),
    "long_video": lambda i, rng, src: _video(i, rng, src, long=True, with_audio=True),
    # post-training (data_pipelines/posttrain_synth.py)
    "sft": sft_entry,
    "distill": distill_entry,
    "caption": caption_entry,
    "gspo": gspo_entry,
    # the Talker's stages: spoken answers with codec targets
    "speech": speech_entry,
    "long_speech": lambda i, rng, src: speech_entry(i, rng, src, long=True),
    "speech_preference": speech_preference_entry,
}


def write_kind(kind: str, src: str, samples: int, seed: int) -> List[dict]:
    """Media + manifest.jsonl for `samples` entries of `kind` in src; returns the entries."""
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; known: {', '.join(KINDS)}")
    os.makedirs(src, exist_ok=True)
    entries = []
    for i in range(samples):
        entry, _ = KINDS[kind](i, np.random.default_rng([seed, list(KINDS).index(kind), i]), src)
        entries.append(entry)
    with open(os.path.join(src, "manifest.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)
    return entries


def synth_suite(root: str, samples: Dict[str, int], seed: int = 0, workers: int = 1) -> Dict[str, int]:
    """Write ROOT/<kind> for each kind (samples per kind) and ROOT/tokenizer. Returns samples per kind."""
    from omni_train.data.chat import build_test_tokenizer

    texts, built = [], {}
    for kind, count in samples.items():
        with tempfile.TemporaryDirectory(prefix=f"omni-synth-{kind}-") as src:
            entries = write_kind(kind, src, count, seed)
            result = build(ManifestSource(os.path.join(src, "manifest.jsonl")), os.path.join(root, kind),
                           BuildOptions(samples_per_shard=8, workers=workers, progress=False))
        if result.errors:
            raise ValueError(f"synth-suite: {kind}: {len(result.errors)} samples failed to build")
        texts += [json.dumps(e) for e in entries]
        built[kind] = result.index["num_samples"]
    build_test_tokenizer(os.path.join(root, "tokenizer"), extra_texts=texts)
    return built


def parse_samples(specs: Sequence[str], default: int) -> Dict[str, int]:
    """['audio_text=32', 'text'] -> {'audio_text': 32, 'text': default}; empty -> every kind."""
    if not specs:
        return {kind: default for kind in KINDS}
    out = {}
    for spec in specs:
        kind, _, count = spec.partition("=")
        out[kind] = int(count) if count else default
    return out
