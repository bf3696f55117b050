"""The Talker's pretraining stages through the real CLI: talker_pretrain trains the tiny Talker on spoken answers
with codec targets, conditioned on a frozen Thinker (a fresh random Thinker checkpoint): both losses fall, every
Thinker tensor of its checkpoint is the Thinker checkpoint's bit for bit and has no optimizer state, a sample
whose speech has no codec targets is skipped and counted, a resumed run repeats the uninterrupted run's
losses bit for bit; talker_cpt continues from its checkpoint at 4x the length on long speech."""

import json
import shutil

import numpy as np
import pytest
import torch

from cli import metrics, omni_train
from tests.conftest import TALKER_STEPS as STEPS
from tests.integration.test_multimodal_stage import _rerun_from


def _tensors(step_dir, keep):
    """The global tensors of a dist checkpoint whose keys ``keep`` accepts, read without a process group."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(step_dir))
    meta = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if isinstance(m, TensorStorageMetadata) and keep(k)}
    load(state, storage_reader=FileSystemReader(str(step_dir)), no_dist=True)
    return state


def test_both_losses_fall_and_the_thinker_stays_frozen(pretrain_run, thinker_checkpoint):
    run_dir, _, proc = pretrain_run
    assert "initialised the Thinker (the Talker starts from its initialisation)" in proc.stdout
    records = metrics(run_dir)
    assert sorted(records) == list(range(1, STEPS + 1))
    for key in ("loss_codec0", "loss_residual"):
        curve = [records[s][key] for s in range(1, STEPS + 1)]
        assert curve[-1] < curve[0] - 0.3, (key, curve)
    first = records[1]
    assert first["loss"] == pytest.approx(first["loss_codec0"] + 0.3 * first["loss_residual"], rel=1e-4)
    assert first["loss_residual_count"] == 15 * (first["loss_codec0_count"] - 4)  # 15 codebooks per frame; 4 eos
    for record in records.values():  # every conversation has a user context of one kind
        shares = [record[f"context_{k}"] for k in ("text", "audio", "image", "video")]
        assert record["context_text_count"] == 4 and sum(shares) == pytest.approx(1.0)
    final = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    before = _tensors(thinker_checkpoint, lambda k: True)
    after = _tensors(final, lambda k: not k.startswith(("talker.", "optimizer.", "code2wav.")))
    assert sorted(after) == sorted(before) and len(before) > 100
    # the seeded Code2Wav (model.code2wav) is saved beside them, unchanged by training
    code2wav = _tensors(final, lambda k: k.startswith("code2wav.model."))
    assert code2wav and not any(k.startswith("optimizer.state.exp_avg.code2wav") for k in _tensors(final, lambda k: True))
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor), key
    talker = _tensors(final, lambda k: k.startswith("talker."))
    assert "talker.backbone.embedding.word_embeddings.weight" in talker
    assert any(k.startswith("talker.code_predictor.lm_head.") for k in talker)
    moments = _tensors(final, lambda k: k.startswith("optimizer.state.exp_avg."))
    assert moments and all(k.startswith("optimizer.state.exp_avg.talker.") for k in moments)


def test_speech_without_codec_targets_is_skipped_and_counted(pretrain_run):
    run_dir, _, proc = pretrain_run
    assert metrics(run_dir)[STEPS]["data_skipped"] >= 1
    assert "assistant speech without codec targets" in proc.stderr + proc.stdout


def test_a_resumed_run_repeats_the_losses_bitwise(pretrain_run, tmp_path):
    run_dir, overrides, _ = pretrain_run
    again = tmp_path / "resumed"
    shutil.copytree(run_dir, again)
    _rerun_from(again, 3)
    omni_train([o for o in overrides if not o.startswith("run_dir=")] + [f"run_dir={again}"])
    lines = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6, 4, 5, 6]
    for first, repeat in zip(lines[3:6], lines[6:]):
        for key in ("loss", "loss_codec0", "loss_residual", "grad_norm", "data_skipped"):
            assert repeat[key] == first[key], (first["step"], key)


def test_talker_cpt_continues_at_its_longer_length(pretrain_run, speech_root, tmp_path):
    run_dir, _, _ = pretrain_run
    cpt = tmp_path / "talker_cpt"
    proc = omni_train(["recipe=tiny/talker_cpt", f"run_dir={cpt}", f"init_from={run_dir / 'checkpoints'}",
                       f"data.tokenizer={speech_root / 'tokenizer'}",
                       f"data.datasets=[{{path: {speech_root / 'speech'}, weight: 1.0}}, "
                       f"{{path: {speech_root / 'long_speech'}, weight: 3.0}}]",
                       "trainer.max_steps=2", "checkpoint.save_every=2"])
    assert "initialised the Thinker and Talker" in proc.stdout
    config = (cpt / "config.yaml").read_text()
    assert "seq_length: 1024" in config and "base: talker_pretrain" in config
    records = metrics(cpt)
    assert sorted(records) == [1, 2]
    # long answers (100-150 frames) reach it: more codebook-0 targets than 4 short ones (<= 32 frames) can have
    assert max(r["loss_codec0_count"] for r in records.values()) > 4 * 33
    assert all(np.isfinite(r["loss"]) for r in records.values())


@pytest.mark.parametrize("recipe, model, words", [
    ("tiny/talker_pretrain", "tiny_omni", "stage 'talker_pretrain' trains the Talker"),
    ("tiny/sft", "tiny_omni_talker", "stage 'sft' does not train the Talker"),
])
def test_only_the_talker_stages_take_a_talker(speech_root, recipe, model, words):
    from omni_train.config import ConfigError, compose, validate_config

    cfg = compose([f"recipe={recipe}", f"model={model}", f"data.tokenizer={speech_root / 'tokenizer'}",
                   f"data.datasets=[{{path: {speech_root / 'speech'}}}]"])
    with pytest.raises(ConfigError) as error:
        validate_config(cfg, world_size=1, cuda_available=False)
    assert error.value.key == "model.talker" and words in error.value.problem


def test_the_finished_stage_speaks(pretrain_run):
    """stage.audio_samples: the trained Talker's greedy answer to one conversation of its data, and the data's own
    codes, through the run's seeded Code2Wav into 24 kHz WAVs, listed in audio/samples.jsonl."""
    import wave

    run_dir, _, proc = pretrain_run
    assert f"audio samples: 2 WAVs (24000 Hz) in {run_dir / 'audio'}" in proc.stdout
    (record,) = [json.loads(line) for line in (run_dir / "audio" / "samples.jsonl").read_text().splitlines()]
    assert record["step"] == STEPS and 0 < record["generated_frames"] <= 25 and record["target_frames"] > 0
    for name, frames in zip(record["files"], (record["generated_frames"], record["target_frames"])):
        with wave.open(str(run_dir / "audio" / name)) as wav:
            assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24000, 1, 2)
            # Code2Wav: 1,920 samples per 12.5 Hz frame, less its transposed convolutions' trim
            assert 1920 * (frames - 1) < wav.getnframes() <= 1920 * frames, (name, wav.getnframes(), frames)
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)
            assert np.abs(pcm).max() > 0  # sound, not silence
