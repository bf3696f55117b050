"""omni-data synth / validate / stats: real media, the corrupt fixtures caught by name, exact totals."""

import io
import json
import math
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from data_pipelines import schema, shards
from data_pipelines.cli import main
from data_pipelines.tokens import estimate_tokens, smart_resize


@pytest.fixture(scope="module")
def datasets_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    good, bad, src = root / "good", root / "bad", root / "src"
    assert main(["synth", str(good), "--samples", "12", "--seed", "7", "--corrupt", str(bad),
                 "--source-dir", str(src), "--no-progress"]) == 0
    truth = json.loads((src / "truth.json").read_text())
    corruptions = json.loads((bad / "corruptions.json").read_text())
    return good, bad, truth, corruptions


def all_members(directory):
    for entry in shards.read_index(directory)["shards"]:
        for key, members in shards.iter_tar_samples(os.path.join(directory, entry["name"])):
            yield key, members


def test_validate_passes_on_good_data(datasets_dirs, capsys):
    good = datasets_dirs[0]
    assert main(["validate", str(good)]) == 0
    assert capsys.readouterr().out.strip() == "OK 12 samples in 3 shards"


def test_validate_names_every_corruption(datasets_dirs, capsys):
    _, bad, _, corruptions = datasets_dirs
    assert main(["validate", str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    flac, bad_json, missing = corruptions["undecodable_flac"], corruptions["bad_json"], corruptions["missing_member"]
    expected = [
        (f"BAD {flac['shard']}: {flac['key']}: undecodable member {flac['member']}",),
        (f"BAD {bad_json['shard']}: {bad_json['key']}: bad JSON member {bad_json['member']}",),
        (f"BAD {missing['shard']}: {missing['key']}:", "points to missing member",
         repr(missing["member"].split(".", 1)[1])),
        (f"BAD {corruptions['truncated_shard']['shard']}: truncated or damaged tar",),
        (f"BAD {corruptions['truncated_shard']['shard']}: sha256 differs",),
    ]
    for pieces in expected:
        assert any(all(p in line for p in pieces) for line in out), (pieces, out)
    assert len(out) == 6  # the five above plus the truncated shard's size mismatch


def test_validate_flags_unlisted_and_missing_shards(datasets_dirs, tmp_path, capsys):
    good = datasets_dirs[0]
    copy = tmp_path / "copy"
    os.makedirs(copy)
    for name in ["index.json", "shard-000000.tar", "shard-000002.tar"]:
        (copy / name).write_bytes((good / name).read_bytes())
    (copy / "shard-000007.tar").write_bytes((good / "shard-000001.tar").read_bytes())
    assert main(["validate", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "BAD shard-000001.tar: listed in index.json but missing" in out
    assert "BAD shard-000007.tar: shard on disk is not listed in index.json" in out


# The token rules docs/data_format.md states, counted here without data_pipelines.tokens (what stats uses):
# audio one token per 80 ms; an image or a video frame pair one token per 32 x 32 pixels after the
# processor's resize (transformers' own smart_resize), images within 4..1280 tokens, video frames within
# 768; video sampled at 2 frames per second, at most its own frames, an even count; text one per 4 chars.
AUDIO_MS_PER_TOKEN = 80
CELL = 32


def _audio_tokens(seconds):
    return math.ceil(Fraction(str(seconds)) * 1000 / AUDIO_MS_PER_TOKEN)


def _cells(height, width, max_tokens):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as processor_resize

    h, w = processor_resize(height, width, factor=CELL, min_pixels=4 * CELL * CELL,
                            max_pixels=max_tokens * CELL * CELL)
    return (h // CELL) * (w // CELL)


def _video_tokens(video):
    frames = min(max(2, round(video["seconds"] * 2)), max(2, video["frames"]))
    frames += frames % 2
    return frames // 2 * _cells(video["height"], video["width"], 768) + _audio_tokens(video["audio_seconds"])


def _texts(entry):
    """Every text of the manifest entry's conversation: string contents and text parts."""
    for message in entry["messages"]:
        content = message["content"]
        yield from [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]


def test_stats_equal_hand_computed_totals(datasets_dirs, capsys):
    good, _, truth, _ = datasets_dirs
    media = truth["media"]  # what synth wrote: each medium's duration, size and frame count
    audio = [m for m in media if m["kind"] == "audio"]
    images = [m for m in media if m["kind"] == "image"]
    videos = [m for m in media if m["kind"] == "video"]
    assert len(audio) == 6 and len(images) == 3 and len(videos) == 2
    video_tokens = sum(_video_tokens(v) for v in videos)
    text_tokens = sum(math.ceil(len(t) / 4) for e in truth["entries"] for t in _texts(e) if t)
    assert text_tokens > 12 and video_tokens > 0
    for recount in ([], ["--recount"]):
        assert main(["stats", str(good), "--json", *recount]) == 0
        stats = json.loads(capsys.readouterr().out)
        m = stats["modalities"]
        assert stats["num_samples"] == 12 and stats["num_shards"] == 3
        assert stats["audio_hours"] == pytest.approx(sum(a["seconds"] for a in audio) / 3600, abs=1e-6)
        assert m["audio"]["tokens"] == sum(_audio_tokens(a["seconds"]) for a in audio)
        assert stats["images"] == 3
        assert m["image"]["tokens"] == sum(_cells(i["height"], i["width"], 1280) for i in images)
        assert stats["video_minutes"] == pytest.approx(sum(v["seconds"] for v in videos) / 60, abs=1e-4)
        assert m["video"]["tokens"] == video_tokens
        assert m["text"] == {"samples": 12, "tokens": text_tokens}


def test_synth_media_really_decode(datasets_dirs):
    import av
    import soundfile
    from PIL import Image

    good, _, truth, _ = datasets_dirs
    seen = {"flac": 0, "wav": 0, "jpg": 0, "png": 0, "mp4": 0, "codec": 0, "spk": 0}
    rates = set()
    for key, members in all_members(good):
        for suffix, data in members.items():
            ext = suffix.rsplit(".", 1)[-1]
            if ext in ("flac", "wav"):
                wave, rate = soundfile.read(io.BytesIO(data))
                assert len(wave) > rate // 2 and np.abs(wave).max() > 0.1
                rates.add((rate, wave.ndim))
            elif ext in ("jpg", "png"):
                with Image.open(io.BytesIO(data)) as image:
                    assert image.format == {"jpg": "JPEG", "png": "PNG"}[ext] and min(image.size) >= 48
            elif ext == "mp4":
                with av.open(io.BytesIO(data)) as container:
                    assert container.streams.audio[0].codec_context.name == "aac"
                    assert sum(1 for _ in container.decode(video=0)) >= 8
                with av.open(io.BytesIO(data)) as container:
                    assert sum(f.samples for f in container.decode(audio=0)) >= 2 * 16000
            elif suffix.startswith("codec"):
                codes = np.load(io.BytesIO(data), allow_pickle=False)
                assert codes.dtype == np.int16 and codes.ndim == 2 and codes.shape[1] == 16
                ext = "codec"
            elif suffix == "spk.npy":
                assert np.load(io.BytesIO(data), allow_pickle=False).dtype == np.float32
                ext = "spk"
            seen[ext] = seen.get(ext, 0) + 1
    assert all(seen[k] > 0 for k in ("flac", "wav", "jpg", "png", "mp4", "codec", "spk")), seen
    assert {(16000, 1), (44100, 2), (24000, 1)} <= rates
    samples = [json.loads(m["json"]) for _, m in all_members(good)]
    assert any("teacher" in s for s in samples) and any("preference" in s for s in samples)
    assert any(all(isinstance(m["content"], str) for m in s["messages"]) for s in samples)


def test_synth_is_deterministic(datasets_dirs, tmp_path):
    good = datasets_dirs[0]
    assert main(["synth", str(tmp_path / "again"), "--samples", "12", "--seed", "7", "--no-progress"]) == 0
    assert (tmp_path / "again" / "index.json").read_bytes() == (good / "index.json").read_bytes()
    assert main(["synth", str(tmp_path / "other"), "--samples", "12", "--seed", "8", "--no-progress"]) == 0
    assert (tmp_path / "other" / "index.json").read_bytes() != (good / "index.json").read_bytes()


def test_schema_rejects_bad_samples():
    ok = {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "audio0.flac"}]},
                       {"role": "assistant", "content": "hi"}]}
    assert schema.check_sample(ok, members={"json", "audio0.flac"}) == []
    assert "points to missing member 'audio0.flac'" in schema.check_sample(ok, members={"json"})[0]
    wrong_ext = {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "audio0.jpg"}]}]}
    assert "is not a member name" in schema.check_sample(wrong_ext, members={"json", "audio0.jpg"})[0]
    codec_on_user = {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.flac", "codec": "c"}]}]}
    assert "only allowed on assistant audio" in schema.check_sample(codec_on_user)[0]
    assert "preference.rejected: missing" in schema.check_sample({**ok, "preference": {"chosen": []}})[1]
    assert schema.check_sample({"messages": []}) == ["messages: must be a non-empty list of messages"]


def test_token_estimates_by_hand():
    assert estimate_tokens("audio", seconds=2.0) == 25 and estimate_tokens("audio", seconds=1.0) == 13
    assert estimate_tokens("image", height=224, width=224) == 49  # 224 -> 224 (7 x 7 patches of 32)
    assert smart_resize(10, 10) == (64, 64)  # scaled up to the 4-token minimum
    assert estimate_tokens("image", height=4000, width=4000) <= 1280
    assert estimate_tokens("video", height=64, width=64, frames=8) == 4 * 4
    assert estimate_tokens("text", text="abcdefghi") == 3


def test_console_entry_runs(datasets_dirs):
    good = datasets_dirs[0]
    result = subprocess.run([sys.executable, "-m", "data_pipelines.cli", "stats", str(good)],
                            capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert "samples        12 in 3 shards" in result.stdout
