"""omni-data build: bad entries reported and skipped, resumable, deterministic across worker counts."""

import io
import json
import os
import tarfile

import numpy as np
import pytest

from data_pipelines import shards
from data_pipelines.cli import main
from data_pipelines.synth import write_source


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """8 synthetic samples (one of each template) plus a manifest with bad lines mixed in."""
    src = tmp_path_factory.mktemp("src")
    truth = write_source(str(src), samples=8, seed=3)
    (src / "garbage.flac").write_bytes(b"fLaC" + bytes(300))
    good = [json.dumps(e) for e in truth["entries"]]
    bad = {
        2: "{not json",
        4: json.dumps({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "nowhere.flac"}]}]}),
        6: json.dumps({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "garbage.flac"}]}]}),
        8: json.dumps({"messages": [{"role": "user", "content": [{"type": "image"}]}]}),
        10: json.dumps({"messages": [{"role": "robot", "content": "hi"}]}),
    }
    lines, good_lines = [], {}
    for line_no in range(1, len(good) + len(bad) + 2):
        if line_no in bad:
            lines.append(bad[line_no])
        elif line_no == 12:
            lines.append("")  # blank lines are skipped, not reported
        else:
            good_lines[line_no] = good[len(good_lines)]
            lines.append(good_lines[line_no])
    latin1 = json.dumps({"messages": [{"role": "user", "content": "caf\u00e9"}]}).replace("\\u00e9", "\xe9")
    (src / "mixed.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + latin1.encode("latin-1") + b"\n")
    bad[len(lines) + 1] = latin1
    return {"dir": src, "truth": truth, "bad": bad, "good_lines": good_lines}


def read_dataset(directory):
    index = shards.read_index(directory)
    samples = {}
    for entry in index["shards"]:
        samples.update(shards.iter_tar_samples(os.path.join(directory, entry["name"])))
    return index, samples


def build(manifest, out, *extra):
    return main(["build", str(manifest), str(out), "--samples-per-shard", "3", "--no-progress", *extra])


def test_bad_entries_are_reported_and_good_ones_land(source, tmp_path, capsys):
    out = tmp_path / "out"
    assert build(source["dir"] / "mixed.jsonl", out) == 0
    stderr = capsys.readouterr().err
    report = [json.loads(l) for l in (out / "build_report.jsonl").read_text().splitlines()]
    reasons = {r["line"]: r["reason"] for r in report}
    assert sorted(reasons) == sorted(source["bad"])
    assert reasons[2].startswith("bad JSON")
    assert "missing file nowhere.flac" in reasons[4]
    assert "garbage.flac" in reasons[6] and "undecodable audio" in reasons[6]
    assert "image part needs a non-empty string" in reasons[8]
    assert "'robot' is not one of" in reasons[10]
    assert reasons[15].startswith("line is not UTF-8")
    for line_no in source["bad"]:
        assert f"mixed.jsonl line {line_no}:" in stderr

    index, samples = read_dataset(out)
    assert index["num_samples"] == len(source["good_lines"]) == len(samples)
    assert sorted(samples) == sorted(f"s{n - 1:08d}" for n in source["good_lines"])
    for line_no, line in source["good_lines"].items():  # media copied byte for byte
        members = samples[f"s{line_no - 1:08d}"]
        sample = json.loads(members["json"])
        assert sample["meta"] == {**json.loads(line).get("meta", {}), "source": "mixed.jsonl", "line": line_no}
        originals = [p for m in json.loads(line)["messages"] if isinstance(m["content"], list)
                     for p in m["content"] if p["type"] != "text"]
        copies = [p for m in sample["messages"] if isinstance(m["content"], list)
                  for p in m["content"] if p["type"] != "text"]
        for original, copy in zip(originals, copies, strict=True):
            kind = original["type"]
            assert members[copy[kind]] == (source["dir"] / original[kind]).read_bytes()
            if "codec" in original:
                codec = np.load(source["dir"] / original["codec"])
                assert np.array_equal(np.load(io.BytesIO(members[copy["codec"]])), codec)
    assert build(source["dir"] / "mixed.jsonl", tmp_path / "strict", "--strict") == 1


def test_rerun_rebuilds_only_the_missing_shard(source, tmp_path):
    out = tmp_path / "out"
    assert build(source["dir"] / "mixed.jsonl", out) == 0
    names = [s["name"] for s in shards.read_index(out)["shards"]]
    assert len(names) == 5  # 14 non-blank lines (8 good, 6 bad), 3 lines per shard
    first = {n: (out / n).read_bytes() for n in names}
    index_before = (out / "index.json").read_bytes()
    old = 1_000_000_000
    for n in names:
        os.utime(out / n, (old, old))
    os.remove(out / names[2])
    assert build(source["dir"] / "mixed.jsonl", out) == 0
    for n in names:
        assert (out / n).read_bytes() == first[n]
        assert (os.stat(out / n).st_mtime == old) == (n != names[2])
    assert (out / "index.json").read_bytes() == index_before
    with tarfile.open(out / names[2]) as tar:  # nothing time- or user-dependent in the tar
        assert {(m.mtime, m.uid, m.uname) for m in tar.getmembers()} == {(0, 0, "")}
    assert len((out / "build_report.jsonl").read_text().splitlines()) == len(source["bad"])


def test_changed_manifest_line_rebuilds_its_shard(source, tmp_path):
    """Manifests elsewhere with absolute media paths work; editing one line rebuilds only its shard."""
    manifest, out = tmp_path / "m.jsonl", tmp_path / "out"
    entries = [_absolute(e, source["dir"]) for e in source["truth"]["entries"]]
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert build(manifest, out) == 0
    before = {s["name"]: s["sha256"] for s in shards.read_index(out)["shards"]}
    entries[4]["messages"][-1]["content"] = "Edited answer."
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert build(manifest, out) == 0
    after = {s["name"]: s["sha256"] for s in shards.read_index(out)["shards"]}
    assert [n for n in before if before[n] != after[n]] == ["shard-000001.tar"]


def _absolute(entry, base):
    """A copy of a manifest entry with absolute media paths."""
    entry = json.loads(json.dumps(entry))
    for message in entry["messages"]:
        for part in message["content"] if isinstance(message["content"], list) else []:
            for field in ("audio", "image", "video", "codec"):
                if field in part and part["type"] != "text":
                    part[field] = os.path.join(str(base), part[field])
    if "speaker" in entry:
        entry["speaker"]["embedding"] = os.path.join(str(base), entry["speaker"]["embedding"])
    return entry


def test_two_workers_make_the_same_shards_as_one(source, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert build(source["dir"] / "mixed.jsonl", one) == 0
    assert build(source["dir"] / "mixed.jsonl", two, "--workers", "2") == 0
    assert (one / "index.json").read_bytes() == (two / "index.json").read_bytes()
    for entry in shards.read_index(one)["shards"]:
        assert (one / entry["name"]).read_bytes() == (two / entry["name"]).read_bytes()
    assert (one / "build_report.jsonl").read_bytes() == (two / "build_report.jsonl").read_bytes()


def test_shard_size_limit_cuts_shards(source, tmp_path):
    out = tmp_path / "out"
    assert main(["build", str(source["dir"] / "manifest.jsonl"), str(out), "--shard-size-mb", "0.1",
                 "--no-progress"]) == 0
    index = shards.read_index(out)
    assert index["num_samples"] == 8 and len(index["shards"]) > 2
    for entry in index["shards"]:  # over the limit only when one sample alone is bigger
        assert entry["bytes"] <= 0.1 * 2**20 + 10240 or entry["num_samples"] == 1


def test_audio_in_video_needs_an_audio_track(tmp_path, capsys):
    import av

    with av.open(str(tmp_path / "silent.mp4"), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(4):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    part = {"type": "video", "video": "silent.mp4"}
    lines = [{"messages": [{"role": "user", "content": [part]}]},
             {"messages": [{"role": "user", "content": [{**part, "use_audio_in_video": True}]}]}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    assert build(tmp_path / "m.jsonl", tmp_path / "out", "--strict") == 1
    report = [json.loads(l) for l in (tmp_path / "out" / "build_report.jsonl").read_text().splitlines()]
    assert [r["line"] for r in report] == [2] and "has no audio track" in report[0]["reason"]
    assert shards.read_index(tmp_path / "out")["modalities"]["video"]["items"] == 1
