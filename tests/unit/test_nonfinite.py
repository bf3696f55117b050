"""trainer.nonfinite=skip: a step with a NaN loss changes no weight and no optimizer state, and is counted."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from omni_train.config import compose
from omni_train.parallel.setup import ParallelEnv
from omni_train.resilience import NonFiniteError


def _trainer(tmp_path, *overrides):
    from omni_train.loops.supervised import SupervisedLoop
    from omni_train.session import Session

    cfg = OmegaConf.to_object(compose([f"run_dir={tmp_path}", "trainer.max_steps=6", "optim.warmup_steps=1",
                                       *overrides]))
    env = ParallelEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), dp_rank=0, dp_size=1)
    return SupervisedLoop(Session(cfg, env, resolved={}))


def _snapshot(trainer):
    """Every weight and every Adam state tensor (the step count included), copied."""
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    adam = [{k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
            for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
            for state in opt.optimizer.state.values()]
    return weights, adam


def _same(a, b) -> bool:
    (wa, sa), (wb, sb) = a, b
    return (all(torch.equal(wa[n], wb[n]) for n in wa) and len(sa) == len(sb)
            and all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])) for x, y in zip(sa, sb) for k in x))


def _poison_loss(monkeypatch, trainer):
    stage = trainer.session.stage
    real = stage.forward

    def forward(model, batch, frozen):
        output, loss_func = real(model, batch, frozen)
        return output * float("nan"), loss_func

    monkeypatch.setattr(stage, "forward", forward)
    return lambda: monkeypatch.setattr(stage, "forward", real)


def test_skip_policy_skips_the_update_and_counts_it(megatron_world1, tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "trainer.nonfinite=skip", "trainer.max_nonfinite_skips=1")
    trainer.train_step()
    before = _snapshot(trainer)

    heal = _poison_loss(monkeypatch, trainer)
    values = trainer.train_step()
    heal()
    assert math.isnan(values["loss"]) and math.isnan(values["grad_norm"])
    assert trainer.state.step == 2 and trainer.state.nonfinite_skipped == 1
    assert _same(_snapshot(trainer), before)  # no weight, no exp_avg(_sq), no Adam step moved

    values = trainer.train_step()  # the next batch trains normally
    assert math.isfinite(values["loss"]) and trainer.state.step == 3
    weights, adam = _snapshot(trainer)
    assert not torch.equal(weights["module.embedding.word_embeddings.weight"],
                           before[0]["module.embedding.word_embeddings.weight"])
    assert all(int(s["step"]) == int(b["step"]) + 1 for s, b in zip(adam, before[1]))

    _poison_loss(monkeypatch, trainer)  # a second one is more than max_nonfinite_skips=1 allows
    with pytest.raises(NonFiniteError, match="non-finite loss and gradients at step 4") as err:
        trainer.train_step()
    assert "more than trainer.max_nonfinite_skips=1 steps skipped" in str(err.value)
    assert "non-finite loss on samples synthetic:24, synthetic:25, synthetic:26, synthetic:27" in str(err.value)

