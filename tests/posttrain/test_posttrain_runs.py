"""The tiny post-training recipes through the real CLI: off-policy distillation lowers the student's NLL of
held-out teacher responses (other prompts, same teacher), and the captioner's loss falls."""

import pytest
import torch
from omegaconf import OmegaConf

from cli import metrics, omni_train
from omni_train.checkpoint.manager import latest_checkpoint, load_model_weights
from omni_train.config import compose
from omni_train.data.shards import ShardSource
from omni_train.parallel.setup import ParallelEnv
from omni_train.stages.distill_offpolicy import build_model, forward


def _data(root, kind):
    return [f"data.datasets=[{{path: {root / kind}, weight: 1.0}}]", f"data.tokenizer={root / 'tokenizer'}"]


@torch.no_grad()
def held_out_nll(cfg, model, micro_batches=3):
    """Mean NLL per target token of the first packed micro-batches of cfg.data (teacher responses)."""
    source = ShardSource(cfg.data, cfg.trainer.seq_length, cfg.trainer.micro_batch_size, micro_batches, 0, 1)
    total, count = 0.0, 0
    for batch in source.next_microbatches():
        output, loss_func = forward(model.eval(), batch)
        loss_sum, num, _ = loss_func(output)
        total, count = total + loss_sum.item(), count + int(num)
    return total / count


def test_offpolicy_distillation_lowers_nll_of_held_out_teacher_responses(megatron_world1, posttrain_root,
                                                                         offpolicy_run):
    run_dir, overrides = offpolicy_run
    records = metrics(run_dir)
    assert records[10]["loss"] < records[1]["loss"]
    assert records[10]["data_skipped"] == 0  # teacher-small's cut responses are filtered out, not skipped

    held_out = compose([*overrides, f"data.datasets=[{{path: {posttrain_root / 'held_out' / 'distill'}, weight: 1.0}}]"])
    env = ParallelEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), dp_rank=0, dp_size=1)
    model = build_model(held_out, env, torch.float32)  # the run's first weights: same seed, same init
    before = held_out_nll(held_out, model)
    load_model_weights(latest_checkpoint(run_dir / "checkpoints"), model)
    after = held_out_nll(held_out, model)
    assert after < 0.8 * before, (before, after)


def test_captioner_recipe_loss_falls(posttrain_root, tmp_path):
    run_dir = tmp_path / "captioner"
    proc = omni_train(["recipe=tiny/captioner", "init_from=null", f"run_dir={run_dir}", "trainer.max_steps=8",
                       *_data(posttrain_root, "caption")])
    records = metrics(run_dir)
    assert records[8]["loss"] < 0.8 * records[1]["loss"]
    # every target token is the caption's (audio in, text out): the loss is all on audio documents
    assert all(r["loss_audio_count"] > 0 and "loss_text" not in r for r in records.values())
    assert "stage sft" in proc.stdout
    config = OmegaConf.load(run_dir / "config.yaml")
    assert config.stage.name == "sft" and config.data.chat.think == "strip"


@pytest.fixture(scope="session", autouse=True)
def _held_out(posttrain_root):
    """Teacher responses to other prompts (seed 1), in the same layout."""
    from data_pipelines.pretrain_synth import synth_suite

    if not (posttrain_root / "held_out").exists():
        synth_suite(str(posttrain_root / "held_out"), {"distill": 6}, seed=1)
