"""The training loop on real shards (omni-data synth): packed, document-masked batches, exact resume,
and corrupt samples skipped and counted rather than stopping the run."""

import pytest

from cli import metrics, omni_train


@pytest.fixture
def synth(synth_shards):
    """The session's synthetic shards (tests/conftest.py): ROOT/good, its damaged copy ROOT/bad, ROOT/tok."""
    return synth_shards


def _overrides(root, dataset, run_dir, *extra):
    return ["data=shards", f"data.datasets=[{{path: {root / dataset}}}]", f"data.tokenizer={root / 'tok'}",
            "data.num_workers=0", "data.min_samples_for_skip_rate=1000", "trainer.seq_length=256",
            "trainer.max_steps=6", "optim.warmup_steps=1", "checkpoint.save_every=100",
            f"run_dir={run_dir}", *extra]


def test_resume_on_shards_is_bitwise_identical(synth, tmp_path):
    omni_train(_overrides(synth, "good", tmp_path / "straight"))
    omni_train(_overrides(synth, "good", tmp_path / "resumed", "trainer.stop_at_step=3"))
    omni_train(_overrides(synth, "good", tmp_path / "resumed"))
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 7))
    for step in range(4, 7):
        for key in ("loss", "grad_norm", "pad_fraction"):
            assert resumed[step][key] == straight[step][key], (step, key)
    assert 0 <= straight[6]["pad_fraction"] < 0.5
    assert straight[6]["data_skipped"] == 0


def test_corrupt_samples_are_skipped_and_counted(synth, tmp_path):
    proc = omni_train(_overrides(synth, "bad", tmp_path / "run"))
    last = metrics(tmp_path / "run")[6]
    assert last["data_skipped"] >= 2  # the undecodable flac and the message pointing to a missing member
    assert "skipped sample" in proc.stderr + proc.stdout
