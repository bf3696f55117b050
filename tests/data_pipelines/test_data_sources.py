"""omni-data build from local `datasets` data: save_to_disk, parquet, audiofolder and imagefolder layouts."""

import json
import os

import numpy as np
import pytest
import soundfile

from data_pipelines import shards
from data_pipelines.cli import main
from data_pipelines.synth import draw_image, speech_like


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three flac clips of known length and their transcriptions."""
    folder = tmp_path_factory.mktemp("clips")
    rows = []
    for i, seconds in enumerate([0.5, 1.0, 1.5]):
        path = folder / f"clip{i}.flac"
        soundfile.write(path, speech_like(np.random.default_rng(i), seconds, 16000), 16000)
        rows.append({"file_name": path.name, "transcription": f"clip number {i}", "seconds": seconds})
    return folder, rows


def samples_of(out):
    index = shards.read_index(out)
    result = {}
    for entry in index["shards"]:
        for key, members in shards.iter_tar_samples(os.path.join(out, entry["name"])):
            result[key] = (json.loads(members["json"]), members)
    return index, result


def asr_args(out, *extra):
    return ["build", str(out), "--column", "audio=audio", "--column", "text=transcription",
            "--prompt", "Transcribe the audio.", "--no-progress", *extra]


def check_asr(out, folder, rows, bad_rows=()):
    index, samples = samples_of(out)
    good = [i for i in range(len(rows)) if i not in bad_rows]
    assert sorted(samples) == [f"s{i:08d}" for i in good]
    for i in good:
        sample, members = samples[f"s{i:08d}"]
        user, assistant = sample["messages"]
        assert user == {"role": "user", "content": [{"type": "audio", "audio": "audio0.flac"},
                                                    {"type": "text", "text": "Transcribe the audio."}]}
        assert assistant["content"] == [{"type": "text", "text": rows[i]["transcription"]}]
        assert sample["meta"]["row"] == i
        assert members["audio0.flac"] == (folder / rows[i]["file_name"]).read_bytes()
    assert index["modalities"]["audio"]["seconds"] == pytest.approx(sum(rows[i]["seconds"] for i in good))


def test_build_from_save_to_disk(clips, tmp_path):
    import datasets

    folder, rows = clips
    audio = [{"bytes": (folder / r["file_name"]).read_bytes(), "path": r["file_name"]} for r in rows]
    audio[1] = {"bytes": b"RIFF not really a wav", "path": "broken.wav"}  # a row that must be reported
    ds = datasets.Dataset.from_dict({"audio": audio, "transcription": [r["transcription"] for r in rows]})
    ds = ds.cast_column("audio", datasets.Audio(decode=False))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "out"
    assert main(asr_args(out, "--dataset", str(tmp_path / "saved"))) == 0
    check_asr(out, folder, rows, bad_rows=(1,))
    report = [json.loads(l) for l in (out / "build_report.jsonl").read_text().splitlines()]
    assert [(r["row"], "undecodable audio" in r["reason"]) for r in report] == [(1, True)]


def test_build_from_parquet(clips, tmp_path):
    import datasets

    folder, rows = clips
    audio = [{"bytes": (folder / r["file_name"]).read_bytes(), "path": r["file_name"]} for r in rows]
    ds = datasets.Dataset.from_dict({"audio": audio, "transcription": [r["transcription"] for r in rows]})
    ds.cast_column("audio", datasets.Audio(decode=False)).to_parquet(str(tmp_path / "train.parquet"))
    out = tmp_path / "out"
    assert main(asr_args(out, "--dataset", str(tmp_path / "train.parquet"))) == 0
    check_asr(out, folder, rows)


def test_build_from_audiofolder(clips, tmp_path):
    folder, rows = clips
    (folder / "metadata.csv").write_text("file_name,transcription\n" + "".join(
        f"{r['file_name']},{r['transcription']}\n" for r in rows))
    out = tmp_path / "out"
    assert main(asr_args(out, "--dataset", str(folder), "--workers", "1")) == 0
    check_asr(out, folder, rows)


def test_build_from_imagefolder_with_labels(tmp_path):
    root = tmp_path / "images"
    sizes = {"cat/a.png": (40, 30), "cat/b.jpg": (64, 64), "dog/c.png": (100, 50)}
    for name, (w, h) in sizes.items():
        os.makedirs(root / os.path.dirname(name), exist_ok=True)
        draw_image(np.random.default_rng(w), w, h).save(root / name)
    out = tmp_path / "out"
    args = ["build", str(out), "--dataset", str(root), "--column", "image=image", "--column", "text=label",
            "--prompt", "Which animal?", "--system", "Answer with one word.", "--no-progress"]
    assert main(args) == 0
    index, samples = samples_of(out)
    answers = [samples[k][0]["messages"][-1]["content"][0]["text"] for k in sorted(samples)]
    assert answers == ["cat", "cat", "dog"]
    assert samples["s00000001"][0]["messages"][0] == {"role": "system", "content": "Answer with one word."}
    assert sorted(m for m in samples["s00000001"][1] if m != "json") == ["image0.jpg"]
    assert index["modalities"]["image"]["items"] == 3


def test_dataset_build_needs_a_text_column(tmp_path, capsys):
    assert main(["build", str(tmp_path / "out"), "--dataset", str(tmp_path), "--column", "audio=audio"]) == 2
    assert "--column text=" in capsys.readouterr().err
