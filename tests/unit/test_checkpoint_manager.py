"""CheckpointManager at world size 1: exact round trip, keep-last-K, latest pointer, stale saves."""

import torch
from omegaconf import OmegaConf

from omni_train.checkpoint.manager import CheckpointManager, TrainState, latest_checkpoint
from omni_train.config import compose
from omni_train.data.synthetic_text import SyntheticTextSource, SyntheticTextStream
from omni_train.models.thinker.lm import build_thinker_lm
from omni_train.parallel.wrap import build_optimizer, build_scheduler, wrap_data_parallel


def _build(cfg):
    model = wrap_data_parallel(build_thinker_lm(cfg.model.thinker, cfg.parallel, device="cpu",
                                                params_dtype=torch.float32), cfg.parallel, on_gpu=False)
    optimizer = build_optimizer(cfg.optim, model, cfg.parallel, bf16=False, on_gpu=False)
    return model, optimizer, build_scheduler(cfg.optim, cfg.trainer, optimizer)


def _source(cfg):
    stream = SyntheticTextStream(cfg.data, cfg.model.thinker.vocab_size, cfg.trainer.seq_length)
    return SyntheticTextSource(stream, global_batch=8, micro_batch=4, dp_rank=0, dp_size=1)


def _one_step(model, optimizer, scheduler):
    model.zero_grad_buffer()
    optimizer.zero_grad()
    ids = torch.randint(0, 1024, (2, 16))
    loss = model(ids, torch.arange(16).expand(2, 16), attention_mask=None, labels=ids).sum()
    loss.backward()
    model.finish_grad_sync()
    scheduler.step(1)
    optimizer.step()


def test_round_trip_prune_and_stale(megatron_world1, tmp_path):
    cfg = OmegaConf.to_object(compose([]))
    model, optimizer, scheduler = _build(cfg)
    _one_step(model, optimizer, scheduler)
    (tmp_path / "step_00000099.tmp").mkdir()  # a killed save from an earlier run
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert not (tmp_path / "step_00000099.tmp").exists()
    data = _source(cfg)
    for step in (1, 2, 3):
        data.next_microbatches()
        manager.save(model, optimizer, scheduler, TrainState(step=step, consumed_samples=8 * step), data)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert latest_checkpoint(tmp_path).name == "step_00000003"

    torch.manual_seed(7)
    other, other_opt, other_sched = _build(cfg)
    other_data = _source(cfg)
    state = manager.load(latest_checkpoint(tmp_path), other, other_opt, other_sched, other_data)
    assert state == TrainState(step=3, consumed_samples=24)
    assert other_data.state_dict() == {"step": 3}
    assert torch.equal(other_data.next_microbatches()[0]["input_ids"], data.next_microbatches()[0]["input_ids"])
    for (name, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), name
    assert other_sched.num_steps == scheduler.num_steps
    exp_avg, other_avg = _adam_moments(optimizer), _adam_moments(other_opt)
    assert len(exp_avg) == len(list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(exp_avg, other_avg))


def _adam_moments(optimizer):
    """exp_avg of every parameter, over megatron's (possibly chained: dense + expert) optimizers."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o.optimizer.state[p]["exp_avg"] for o in inner for g in o.optimizer.param_groups
            for p in g["params"]]
