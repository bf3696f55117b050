"""The Talker's DPO stage through the real CLI, on synthetic preference pairs (data kind ``speech_preference``: one
answer spoken twice, the chosen codes drawn from 0..15, the rejected from 48..63), from a random Thinker and
Talker: at step 1 the policy is the reference (every reward 0, the loss exactly log 2); the loss falls; on
held-out pairs the trained Talker prefers the chosen answer where the reference cannot tell them apart; the
reference Talker rides in the checkpoints unchanged; a sample without a pair is skipped and counted; a resumed
run repeats the uninterrupted one exactly. (The loss itself equals trl's DPOTrainer: test_dpo_loss.py.)"""

import json
import math
import os
import shutil

import pytest
import torch

from cli import metrics, omni_train
from tests.posttrain.test_talker_stages import _tensors

STEPS = 8


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory):
    """ROOT/train (16 pairs), ROOT/held_out (8 other pairs), ROOT/mixed (a pair and a sample whose pair was
    removed), ROOT/tokenizer (all their texts)."""
    from data_pipelines.build import BuildOptions, build
    from data_pipelines.pretrain_synth import write_kind
    from data_pipelines.sources import ManifestSource
    from omni_train.data.chat import build_test_tokenizer

    root = tmp_path_factory.mktemp("pairs")
    src = root / "src"
    entries = write_kind("speech_preference", str(src), 26, seed=0)
    texts = [json.dumps(e) for e in entries]
    del entries[25]["preference"]
    for name, rows in {"train": slice(0, 16), "held_out": slice(16, 24), "mixed": slice(24, 26)}.items():
        manifest = src / f"{name}.jsonl"
        manifest.write_text("".join(json.dumps(e) + "\n" for e in entries[rows]))
        result = build(ManifestSource(str(manifest)), str(root / name), BuildOptions(progress=False))
        assert not result.errors
    build_test_tokenizer(str(root / "tokenizer"), extra_texts=texts)
    return root


def _overrides(root, run_dir, *extra):
    return ["recipe=tiny/talker_dpo", f"run_dir={run_dir}", "init_from=null", f"data.tokenizer={root / 'tokenizer'}",
            f"data.datasets=[{{path: {root / 'train'}, weight: 1.0}}, {{path: {root / 'mixed'}, weight: 0.25}}]",
            f"trainer.max_steps={STEPS}", "checkpoint.save_every=4", *extra]


@pytest.fixture(scope="module")
def dpo_run(pairs_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dpo") / "talker_dpo"
    overrides = _overrides(pairs_root, run_dir)
    proc = omni_train(overrides)
    return run_dir, overrides, proc


def _held_out_rewards(overrides, checkpoint, held_out):
    """{name: mean over the held-out pairs} of the stage's report, the checkpoint's policy and reference
    scoring every held-out pair once (in this process, through the stage's own build, data and forward)."""
    from megatron.core import dist_checkpointing
    from omegaconf import OmegaConf

    from omni_train.checkpoint import safe_load
    from omni_train.config import compose
    from omni_train.parallel.setup import init_parallel, shutdown_parallel
    from omni_train.stages import load_stage
    from tests.conftest import free_port

    cfg = OmegaConf.to_object(compose([*overrides, f"data.datasets=[{{path: {held_out}, weight: 1.0}}]",
                                       "trainer.global_batch_size=8", "trainer.micro_batch_size=8"]))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env = init_parallel(cfg.parallel, torch.device("cpu"), seed=0)
    try:
        stage = load_stage(cfg.stage)
        model = stage.build_model(cfg, env, torch.float32)
        safe_load.apply()
        model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, str(checkpoint))["model"])
        (micro,) = stage.build_data(cfg, env).next_microbatches()  # the 8 held-out pairs, once each
        assert len(micro["keys"]) == 16 and len(set(micro["keys"])) == 8  # both sides of each pair
        output, loss_func = stage.forward(model, micro, None, **stage.forward_options(cfg))
        _, pairs, report = loss_func(output)
        assert int(pairs) == 8
        return {name: float(value[0] / value[1]) for name, value in report.items()}
    finally:
        shutdown_parallel()


def test_dpo_starts_at_log2_learns_and_generalises(dpo_run, pairs_root):
    run_dir, overrides, proc = dpo_run
    assert "Traceback" not in proc.stderr
    records = metrics(run_dir)
    assert sorted(records) == list(range(1, STEPS + 1))
    first = records[1]
    # the policy is the reference: rewards exactly 0, the sigmoid loss log 2, no pair "accurate"
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["loss_dpo"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy"):
        assert first[key] == 0.0, key
    assert first["loss_dpo_count"] == 4 and first["logps_chosen"] < 0
    last = records[STEPS]
    assert last["loss"] < 0.35 and last["rewards_margin"] > 0.5 and last["rewards_accuracy"] == 1.0
    assert last["data_skipped"] >= 1  # the sample without a pair: skipped and counted, never half a pair

    final = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    held_out = _held_out_rewards(overrides, final, pairs_root / "held_out")
    assert held_out["rewards_accuracy"] >= 0.875, held_out
    assert held_out["rewards_margin"] > 0.5 and held_out["rewards_chosen"] > 0 > held_out["rewards_rejected"]


def test_the_reference_rides_in_the_checkpoints_unchanged(dpo_run):
    run_dir, _, _ = dpo_run
    middle, final = (run_dir / "checkpoints" / f"step_{s:08d}" for s in (4, STEPS))
    reference = _tensors(middle, lambda k: k.startswith("frozen.reference.talker."))
    later = _tensors(final, lambda k: k.startswith("frozen.reference.talker."))
    policy = _tensors(final, lambda k: k.startswith("talker."))
    assert reference and sorted(reference) == sorted(later)
    assert len(reference) == len(policy)
    for key, tensor in reference.items():
        assert torch.equal(later[key], tensor), key
    moved = {k for k in policy if not torch.equal(policy[k], later["frozen.reference." + k])}
    # the policy trained away from it: the backbone and projections; the code predictor (residual codebooks)
    # (its transformer and heads; its codec embeddings also feed the backbone's frame inputs) gets no gradient
    # from log-probabilities of codebook 0 (stage.dpo.codebooks=first) and no weight decay
    predictor = {k for k in policy if k.startswith("talker.code_predictor.") and ".codec_embedding." not in k}
    assert predictor and not moved & predictor
    assert moved == set(policy) - predictor - {k for k in policy if k.endswith("_extra_state")}, \
        sorted(set(policy) - predictor - moved)
    optimizer = _tensors(final, lambda k: k.startswith("optimizer.state.exp_avg."))
    assert optimizer and all(k.startswith("optimizer.state.exp_avg.talker.") for k in optimizer)


def test_resume_repeats_the_uninterrupted_run(dpo_run, pairs_root, tmp_path):
    run_dir, _, _ = dpo_run
    resumed = tmp_path / "talker_dpo"
    omni_train(_overrides(pairs_root, resumed, "trainer.stop_at_step=4"))
    proc = omni_train(_overrides(pairs_root, resumed))
    assert "resumed from" in proc.stdout
    want, got = metrics(run_dir), metrics(resumed)
    for step in range(5, STEPS + 1):
        for key in ("loss", "rewards_margin", "logps_chosen", "logps_rejected", "grad_norm"):
            assert got[step][key] == want[step][key], (step, key)
    shutil.rmtree(resumed)


def test_bad_dpo_config_fails_before_compute(pairs_root, tmp_path):
    proc = omni_train(_overrides(pairs_root, tmp_path / "bad", "stage.dpo.loss_type=ipo",
                                 "stage.dpo.label_smoothing=0.1"), check=False)
    assert proc.returncode != 0
    assert "stage.dpo.label_smoothing: ipo takes no label smoothing" in proc.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()
