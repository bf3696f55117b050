"""omni-data codec: a random tiny MimiModel encodes the assistant speech of a built dataset.

The reference is transformers' own `MimiModel.encode` on each audio alone, [1, 1, T] at 24 kHz (the
tool encodes sorted, padded batches of 4). The random model gets random codebooks: transformers
initialises them to zeros, and every code would then be 0.
"""

import io
import json
import math
import os
import shutil
from fractions import Fraction

import numpy as np
import pytest
import soundfile
import torch
from transformers import MimiConfig, MimiModel

from data_pipelines import shards
from data_pipelines.cli import main
from data_pipelines.corrupt import _rewrite
from omni_train.data.decode import decode_audio

TINY = dict(hidden_size=16, num_filters=4, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            head_dim=8, intermediate_size=32, codebook_size=64, codebook_dim=8, vector_quantization_hidden_dimension=8,
            num_quantizers=16, upsample_groups=16, sliding_window=6, max_position_embeddings=512)
# name: (sampling rate, seconds, channels); speech.wav is long (3 s > --max-seconds 2.5)
AUDIO = {"a.wav": (16000, 0.77, 1), "b.flac": (24000, 1.3, 2), "c.wav": (44100, 0.5, 1), "d.flac": (22050, 0.61, 1),
         "long.wav": (24000, 3.0, 1), "question.wav": (16000, 0.4, 1)}


def _speech(*names, text=None):
    parts = [{"type": "text", "text": text}] if text else []
    return {"role": "assistant", "content": parts + [{"type": "audio", "audio": n} for n in names]}


def _user(text, audio=None):
    return {"role": "user", "content": ([{"type": "audio", "audio": audio}] if audio else [])
            + [{"type": "text", "text": text}]}


ENTRIES = [  # manifest line i -> sample s0000000i; 3 samples per shard
    {"messages": [_user("Say hello."), _speech("a.wav", text="Hello.")]},
    {"messages": [_user("What was asked?", "question.wav"), _speech("b.flac"), _user("Again."),
                  _speech("c.wav", "b.flac")]},  # b.flac twice: one member, one codec
    {"messages": [_user("Read the long text."), _speech("long.wav")]},
    {"messages": [_user("Just text."), {"role": "assistant", "content": "No speech here."}]},
    {"messages": [_user("Keep this one."), {"role": "assistant", "content": [
        {"type": "audio", "audio": "c.wav", "codec": "given.npy"}]}]},
    {"messages": [_user("Say more."), _speech("d.flac")]},
]
SPEECH = {"s00000000": ["a.wav"], "s00000001": ["b.flac", "c.wav"], "s00000005": ["d.flac"]}  # encoded


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("codec")
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    frames, samples = {}, {}
    for name, (rate, seconds, channels) in AUDIO.items():
        n = round(rate * seconds)
        t = np.arange(n) / rate
        wave = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(n)
        soundfile.write(src / name, np.stack([wave] * channels, 1).astype(np.float32), rate)
        frames[name] = math.ceil(Fraction(n, rate) * Fraction(25, 2))  # 12.5 frames/s
        samples[name] = math.ceil(Fraction(n * 24000, rate))  # at 24 kHz
    np.save(src / "given.npy", np.arange(3 * 16, dtype=np.int32).reshape(3, 16))
    (src / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ENTRIES))
    data = root / "data"
    assert main(["build", str(src / "manifest.jsonl"), str(data), "--samples-per-shard", "3", "--no-progress"]) == 0
    torch.manual_seed(0)
    model = MimiModel(MimiConfig(**TINY))
    for module in model.modules():
        if type(module).__name__ == "MimiEuclideanCodebook":
            module.embed_sum.normal_()
            module._embed = None
    model.save_pretrained(root / "mimi")
    return {"root": root, "data": data, "mimi": root / "mimi", "model": model.eval(), "frames": frames,
            "samples": samples}


def read_dataset(directory):
    samples = {}
    for entry in shards.read_index(directory)["shards"]:
        samples.update(shards.iter_tar_samples(os.path.join(directory, entry["name"])))
    return samples


def speech_parts(sample):
    return [p for m in sample["messages"] if m["role"] == "assistant" and isinstance(m["content"], list)
            for p in m["content"] if p["type"] == "audio"]


@pytest.fixture
def count_calls(monkeypatch):
    calls = []
    encode = MimiModel.encode

    def counted(self, input_values, *args, **kwargs):
        calls.append(tuple(input_values.shape))
        return encode(self, input_values, *args, **kwargs)

    monkeypatch.setattr(MimiModel, "encode", counted)
    return calls


def run_codec(setup, out, *extra):
    return main(["codec", str(setup["data"]), str(out), "--codec-model", str(setup["mimi"]), "--batch-size", "4",
                 "--max-seconds", "2.5", "--no-progress", *extra])


def test_codes_equal_mimi_encode_and_the_dataset_validates(setup, tmp_path, capsys, count_calls):
    out = tmp_path / "out"
    assert run_codec(setup, out) == 0
    longest = [(3, 1, setup["samples"]["b.flac"]), (1, 1, setup["samples"]["d.flac"])]
    assert count_calls == longest  # shard 0: b.flac, a.wav, c.wav padded in one call; shard 1: d.flac
    assert "codebooks (the first 16 used) of 64 codes, 24000 Hz, 12.5 frames/s" in capsys.readouterr().err
    before, after = read_dataset(setup["data"]), read_dataset(out)
    assert list(after) == list(before)
    for key, audios in SPEECH.items():
        sample = json.loads(after[key]["json"])
        members = {p["audio"]: p["codec"] for p in speech_parts(sample)}
        assert sorted(set(members.values())) == [f"codec{i}.npy" for i in range(len(audios))]
        assert set(after[key]) == set(before[key]) | set(members.values())
        for suffix, codec in members.items():
            assert after[key][suffix] == before[key][suffix]  # media bytes unchanged
            stored = np.load(io.BytesIO(after[key][codec]), allow_pickle=False)
            wave = torch.from_numpy(decode_audio(before[key][suffix], 24000)).view(1, 1, -1)
            with torch.inference_mode():
                expected = setup["model"].encode(wave, num_quantizers=16).audio_codes[0].T.numpy()
            assert stored.dtype == np.int32 and stored.shape == expected.shape
            assert np.array_equal(stored, expected), (key, suffix)
            assert len(np.unique(stored)) > 8  # real codes, not one repeated id
        source = [p["audio"] for m in ENTRIES[int(key[1:])]["messages"] if m["role"] == "assistant"
                  for p in (m["content"] if isinstance(m["content"], list) else []) if p["type"] == "audio"]
        for part, name in zip(speech_parts(sample), source):
            shape = np.load(io.BytesIO(after[key][part["codec"]])).shape
            assert shape == (setup["frames"][name], 16), (key, name)
    for key in ("s00000003", "s00000004"):  # no assistant audio; a codec given in the manifest, kept
        assert after[key] == before[key]
    assert after["s00000002"] == before["s00000002"]  # too long: reported, copied without codec
    report = [json.loads(line) for line in (out / "codec_report.jsonl").read_text().splitlines()]
    assert report == [{"key": "s00000002", "shard": "shard-000000.tar",
                       "reason": "audio audio0.wav is 3.00 s, longer than --max-seconds 2.5"}]
    assert main(["validate", str(out)]) == 0
    assert "OK 6 samples in 2 shards" in capsys.readouterr().out

    mtimes = {n: os.stat(out / n).st_mtime_ns for n in ("shard-000000.tar", "shard-000001.tar")}
    count_calls.clear()
    assert run_codec(setup, out, "--strict") == 1  # the failure is remembered: --strict still says so
    assert count_calls == []
    assert {n: os.stat(out / n).st_mtime_ns for n in mtimes} == mtimes
    assert "0 shards written, 2 done earlier" in capsys.readouterr().err

    os.remove(out / "shard-000001.tar")
    assert run_codec(setup, out) == 0
    assert count_calls == longest[1:]
    assert read_dataset(out) == after
    assert main(["validate", str(out)]) == 0


def test_overwrite_and_undecodable_audio(setup, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(setup["data"], data)
    index = shards.read_index(data)

    def damage(key, members):
        if key == "s00000005":
            members["audio0.flac"] = b"fLaC" + bytes(range(256)) * 4

    _rewrite(str(data), index, 1, damage)
    shards.write_json_atomic(str(data / shards.INDEX_NAME), index)
    assert main(["codec", str(data), str(out), "--codec-model", str(setup["mimi"]), "--overwrite", "--strict",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no codec: shard-000001.tar: s00000005: undecodable audio audio0.flac: " in err
    before, after = read_dataset(data), read_dataset(out)
    assert after["s00000005"] == before["s00000005"]
    kept = json.loads(after["s00000004"]["json"])
    assert speech_parts(kept)[0]["codec"] == "codec0.npy" and set(after["s00000004"]) == set(before["s00000004"])
    codes = np.load(io.BytesIO(after["s00000004"]["codec0.npy"]))
    assert codes.shape == (setup["frames"]["c.wav"], 16)  # re-encoded over the manifest's 3 frames


@pytest.mark.parametrize("change, key", [
    ({"num_quantizers": 8}, "num_quantizers"),
    ({"sampling_rate": 16000}, "sampling_rate"),
    ({"codebook_size": 4096}, "codebook_size"),
    ({"upsampling_ratios": [8, 6, 5, 2]}, "frame_rate"),
])
def test_a_codec_model_that_does_not_fit_the_talker_is_refused(setup, tmp_path, capsys, change, key):
    MimiConfig(**{**TINY, **change}).save_pretrained(tmp_path / "mimi")
    out = tmp_path / "out"
    assert main(["codec", str(setup["data"]), str(out), "--codec-model", str(tmp_path / "mimi")]) == 2
    err = capsys.readouterr().err
    assert f"omni-data codec: error: --codec-model {tmp_path / 'mimi'}: config `{key}` is " in err
    assert not out.exists()  # refused before any work


def test_not_a_mimi_directory_is_refused(setup, tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "encodec"}))
    assert main(["codec", str(setup["data"]), str(tmp_path / "out"), "--codec-model", str(tmp_path / "model")]) == 2
    assert "config `model_type` is 'encodec', not 'mimi'" in capsys.readouterr().err
