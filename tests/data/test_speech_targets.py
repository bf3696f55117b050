"""The Talker's targets: bad codec targets name the sample and the member, and the loader skips and counts
such samples (never trained on)."""

import json

import numpy as np
import pytest
import soundfile as sf

from data_pipelines.cli import main as omni_data
from omni_train.data.chat import ChatEncoder, build_test_tokenizer
from omni_train.data.decode import decode_sample
from omni_train.data.errors import SampleError
from omni_train.data.mixture import build_loader
from omni_train.data.speech import speech_codes

GROUPS, CODEBOOK = 16, 2048
GOOD = np.arange(20 * GROUPS, dtype=np.int32).reshape(20, GROUPS) % CODEBOOK


def _entry(codec=None, speech=True):
    reply = [{"type": "text", "text": "Hello there."}]
    if speech:
        reply.append({"type": "audio", "audio": "reply.wav", **({"codec": codec} if codec else {})})
    return {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": reply}]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Six samples: good, 8 codebooks, a code of 2048, negative codes, speech without codec, text only."""
    src = tmp_path_factory.mktemp("speech_src")
    sf.write(src / "reply.wav", np.zeros(24000, np.float32), 24000)
    arrays = {"good.npy": GOOD, "eight.npy": GOOD[:, :8], "high.npy": np.where(GOOD == 5, CODEBOOK, GOOD),
              "negative.npy": GOOD - 3}
    for name, array in arrays.items():
        np.save(src / name, array)
    entries = [_entry("good.npy"), _entry("eight.npy"), _entry("high.npy"), _entry("negative.npy"), _entry(None),
               _entry(speech=False)]
    (src / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert omni_data(["build", str(src / "manifest.jsonl"), str(src / "data"), "--no-progress"]) == 0
    build_test_tokenizer(str(src / "tok"))
    return src


def _encode(raw, encoder):
    return speech_codes(encoder.encode(decode_sample(raw)), GROUPS, CODEBOOK)


def test_bad_codec_targets_are_named(dataset):
    encoder = ChatEncoder.from_pretrained(str(dataset / "tok"))
    loader = build_loader([(dataset / "data", 1.0)], shuffle=False, transform=lambda raw: raw)
    raws = {raw["__key__"]: raw for raw in (next(loader) for _ in range(6))}
    assert _encode(raws["s00000000"], encoder)[0].tolist() == GOOD.tolist()
    cases = {"s00000001": r"codec0.npy.*shape \[20, 8\]: the Talker takes \[frames, 16\]",
             "s00000002": r"codec0.npy.*codes outside 0..2047 \(min 0, max 2048\)",
             "s00000003": r"codec0.npy.*codes outside 0..2047 \(min -3",
             "s00000004": r"audio0.wav.*without codec targets",
             "s00000005": r"no assistant speech"}
    for key, match in cases.items():
        with pytest.raises(SampleError, match=f"{key}.*{match}"):
            _encode(raws[key], encoder)


def test_loader_skips_and_counts_them(dataset):
    encoder = ChatEncoder.from_pretrained(str(dataset / "tok"))
    loader = build_loader([(dataset / "data", 1.0)], shuffle=False, transform=lambda raw: _encode(raw, encoder))
    got = [next(loader) for _ in range(3)]  # only the good sample comes out, again and again (epochs)
    assert all(codes[0].tolist() == GOOD.tolist() for codes in got)
    stats = loader.stats()
    assert stats["skipped"] >= 5 and stats["yielded"] == 3
