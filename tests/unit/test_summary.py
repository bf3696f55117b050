"""The pipeline's one-page summary (omni_train/summary.py) from metrics.jsonl files written here, and its
W&B side with real wandb offline: stage runs grouped, audio samples and the summary page as media."""

import json
import math
import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from omni_train.config import LoggerConfig
from omni_train.metrics import MetricsLogger
from omni_train.summary import FIGSIZE, DPI, log_summary_to_wandb, pipeline_group, write_summary
from wandb_log import read_records


def _write(run_dir: Path, records) -> Path:
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")  # json writes NaN / Infinity as the logger does
    return run_dir


def _png_size(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def pipeline(tmp_path):
    """sft (4 steps, step 3 logged twice by a resume, a NaN and an inf), a talker stage that never ran,
    dpo (one step) and gspo (3 steps)."""
    root = tmp_path / "run"
    sft = _write(root / "sft", [
        {"step": 1, "loss": 4.0, "loss_text": 4.5, "loss_text_count": 10.0, "loss_audio": 3.5, "lr": 1e-4},
        {"step": 2, "loss": float("nan"), "loss_text": 4.0, "loss_audio": float("inf")},
        {"step": 3, "loss": 9.0, "loss_text": 9.0},  # the run died before its checkpoint at step 3 ...
        {"step": 3, "loss": 3.0, "loss_text": 3.2, "loss_audio": 2.9},  # ... and the resume logged it again
        {"step": 4, "loss": 2.5, "loss_text": 2.6, "loss_audio": float("nan"), "moe_load_imbalance": [1.0, 2.0]},
    ])
    dpo = _write(root / "dpo", [{"step": 1, "loss": 0.69, "loss_dpo": 0.69, "rewards_accuracy": 0.5,
                                 "rewards_margin": 0.01, "rewards_chosen": 0.2, "rewards_accuracy_count": 4.0}])
    gspo = _write(root / "gspo", [
        {"step": s, "loss": -0.01 * s, "reward": 0.1 * s, "reward/match_mean": 0.2 * s, "reward/match_std": 0.3,
         "reward_wait_s": 0.01, "kl_reference": 0.05 / s, "kl_reference_count": 8.0, "mismatch_kl": 1e-9}
        for s in (1, 2, 3)])
    return root, [("sft", sft), ("talker", root / "talker"), ("dpo", dpo), ("gspo", gspo)]


def test_summary_puts_stages_on_one_axis(pipeline):
    root, stages = pipeline
    png = write_summary(root, stages, root / "summary.png")
    assert png == root / "summary.png"
    assert _png_size(png) == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
    summary = json.loads((root / "summary.json").read_text())
    assert summary["total_steps"] == 4 + 0 + 1 + 3
    by_name = {s["name"]: s for s in summary["stages"]}
    assert [s["name"] for s in summary["stages"]] == ["sft", "talker", "dpo", "gspo"]
    assert [s["offset"] for s in summary["stages"]] == [0, 4, 4, 5]
    assert [s["steps"] for s in summary["stages"]] == [4, 0, 1, 3]
    assert by_name["talker"]["missing"] and by_name["talker"]["values"] == {}

    sft = by_name["sft"]
    assert sft["logged_steps"] == 4 and not sft["missing"]
    assert set(sft["values"]) == {"loss", "loss_text", "loss_audio"}  # no lr, counts or lists
    assert sft["values"]["loss"] == {"first": 4.0, "last": 2.5, "first_step": 1, "last_step": 4}
    assert sft["values"]["loss_audio"] == {"first": 3.5, "last": 2.9, "first_step": 1, "last_step": 3}
    assert sft["values"]["loss_text"]["last"] == 2.6

    dpo = by_name["dpo"]["values"]
    assert set(dpo) == {"loss", "loss_dpo", "rewards_accuracy", "rewards_margin"}
    assert dpo["rewards_accuracy"]["first"] == dpo["rewards_accuracy"]["last"] == 0.5

    gspo = by_name["gspo"]["values"]
    assert set(gspo) == {"loss", "reward", "reward/match_mean", "kl_reference"}
    assert gspo["reward"]["first"] == pytest.approx(0.1) and gspo["reward"]["last"] == pytest.approx(0.3)
    assert gspo["kl_reference"]["last"] == pytest.approx(0.05 / 3)
    assert all(math.isfinite(v["first"]) and math.isfinite(v["last"])
               for s in summary["stages"] for v in s["values"].values())


def test_summary_reads_what_the_logger_writes(tmp_path):
    """MetricsLogger's records, through a kill that cut a line short and the resume that follows it."""
    run_dir = tmp_path / "sft"
    run_dir.mkdir()

    def log(logger, step):
        logger.log(step, {"loss": 3.0 / step, "loss_text": 3.1 / step, "loss_text_count": 12.0,
                          "grad_norm": float("nan"), "moe_load_imbalance": [1.5, 1.25]})

    logger = MetricsLogger(LoggerConfig(), run_dir, {})
    for step in (1, 2):
        log(logger, step)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')  # killed mid-write
    resumed = MetricsLogger(LoggerConfig(), run_dir, {})
    for step in (3, 4):
        log(resumed, step)
    write_summary(tmp_path, [("sft", run_dir)], tmp_path / "pipeline.png")
    stage = json.loads((tmp_path / "pipeline.json").read_text())["stages"][0]
    assert (stage["steps"], stage["logged_steps"]) == (4, 4)
    assert stage["values"]["loss"] == {"first": 3.0, "last": 0.75, "first_step": 1, "last_step": 4}
    assert set(stage["values"]) == {"loss", "loss_text"}


def test_pipeline_group_is_stable_and_tells_run_dirs_apart(tmp_path):
    a, b = tmp_path / "a" / "tiny_pretrain", tmp_path / "b" / "tiny_pretrain"
    assert pipeline_group(a) == pipeline_group(tmp_path / "a" / "." / "tiny_pretrain")
    assert pipeline_group(a) != pipeline_group(b)
    assert pipeline_group(a).startswith("tiny_pretrain-")


def _offline_run(run_dir: Path):
    """(files directory, {record kind: [records]}) of the one offline W&B run under run_dir."""
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = {}
    for record in read_records(path):
        records.setdefault(record.WhichOneof("record_type"), []).append(record)
    return path.parent / "files", records


def _wav(path: Path, hz: float, sample_rate: int = 24000, seconds: float = 0.1) -> Path:
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * hz * t)).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return path


def test_wandb_offline_groups_stages_and_holds_audio_and_summary(pipeline, monkeypatch):
    root, stages = pipeline
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(root))
    cfg = LoggerConfig(name="wandb", mode="offline", group=pipeline_group(root))

    stage_dir = root / "talker"
    stage_dir.mkdir()
    logger = MetricsLogger(cfg, stage_dir, {"stage": {"name": "talker_pretrain"}})
    assert logger.wandb.group == cfg.group and logger.wandb.job_type == "talker_pretrain"
    logger.log(1, {"loss": 2.0, "loss_codec0": 2.5})
    # W&B names media by content: two different sounds, two files
    wavs = [("hello", _wav(root / "hello.wav", 440.0)), ("digit 3", _wav(root / "three.wav", 660.0))]
    logger.log_audio(1, wavs, sample_rate=24000)
    logger.finish()

    files, records = _offline_run(stage_dir)
    (run,) = records["run"]
    assert (run.run.run_group, run.run.job_type) == (cfg.group, "talker_pretrain")
    audio = sorted((files / "media" / "audio").glob("audio_samples_*.wav"))
    assert len(audio) == 2 and all(p.stat().st_size == (root / "hello.wav").stat().st_size for p in audio)
    (listed,) = [json.loads(line) for line in (stage_dir / "audio_samples.jsonl").read_text().splitlines()]
    assert listed == {"step": 1, "sample_rate": 24000,
                      "samples": [{"caption": c, "path": str(p)} for c, p in wavs]}
    assert [json.loads(line)["step"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()] == [1]

    png = write_summary(root, stages, root / "summary.png")
    assert log_summary_to_wandb(cfg, root, png, png.with_suffix(".json")) == cfg.group
    files, records = _offline_run(root)
    (run,) = records["run"]
    assert (run.run.run_group, run.run.job_type) == (cfg.group, "summary")
    (image,) = (files / "media" / "images").glob("pipeline_summary_*.png")
    assert _png_size(image) == _png_size(png)
    (table,) = (files / "media" / "table").glob("pipeline_values_*.table.json")
    rows = json.loads(table.read_text())["data"]
    assert ["gspo", "reward", 1, pytest.approx(0.1), 3, pytest.approx(0.3)] in rows

    assert log_summary_to_wandb(LoggerConfig(), root, png, png.with_suffix(".json")) is None
