"""S1 audio alignment in-process: phase 1 trains only the audio adapter, phase 2 the whole audio encoder;
every other parameter stays bit-identical, and frozen parameters hold no optimizer state. The phase
boundary is crossed by resuming from the checkpoint saved there, as a preempted job would."""

import pytest
import torch
from omegaconf import OmegaConf

from omni_train.config import compose
from omni_train.loops.supervised import SupervisedLoop
from omni_train.session import Session
from omni_train.parallel.setup import init_parallel, shutdown_parallel

ADAPTER = ("audio_tower.ln_post.", "audio_tower.proj1.", "audio_tower.proj2.")


@pytest.fixture
def suite(synth_suite_root):
    """The session's synth-suite (tests/conftest.py): ROOT/audio_text, ROOT/tokenizer; read only."""
    return synth_suite_root


def _config(suite, run_dir, *extra):
    return OmegaConf.to_object(compose([
        "recipe=tiny/audio_align", f"data.datasets=[{{path: {suite / 'audio_text'}, weight: 1.0}}]",
        f"data.tokenizer={suite / 'tokenizer'}", f"run_dir={run_dir}", "trainer.max_steps=4",
        "stage.phases.0.steps=2", "stage.phases.1.steps=2", "trainer.global_batch_size=2",
        "trainer.micro_batch_size=1", "trainer.seq_length=256", "optim.warmup_steps=1",
        "checkpoint.save_every=100", *extra]))


def _optimized(trainer) -> set:
    """ids of the parameters megatron's optimizer updates, and of those it holds state for."""
    params, stateful = set(), set()
    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        for group in opt.optimizer.param_groups:
            params |= {id(p) for p in group["params"]}
        stateful |= {id(p) for p, s in opt.optimizer.state.items() if s}
    return params, stateful


def _named(trainer):
    return dict(trainer.model.module.named_parameters())


def test_audio_align_phases_train_only_their_parameters(suite, tmp_path):
    run_dir = tmp_path / "audio_align"
    cfg = _config(suite, run_dir, "trainer.stop_at_step=2")
    env = init_parallel(cfg.parallel, torch.device("cpu"), cfg.trainer.seed)
    try:
        first = SupervisedLoop(Session(cfg, env, {}))
        assert first.session.phase.name == "adapter"
        initial = {n: p.detach().clone() for n, p in _named(first).items()}
        adapter = {n for n in initial if n.startswith(ADAPTER)}
        audio = {n for n in initial if n.startswith("audio_tower.")}
        assert adapter and audio - adapter and set(initial) - audio

        first.fit()  # stops at the phase boundary (step 2) and saves there
        named = _named(first)
        params, stateful = _optimized(first)
        assert params == stateful == {id(named[n]) for n in adapter}
        changed = {n for n, p in named.items() if not torch.equal(p, initial[n])}
        assert changed == adapter

        second = SupervisedLoop(Session(_config(suite, run_dir), env, {}))  # resume: the boundary checkpoint, phase 2
        assert second.state.step == 2 and second.session.phase.name == "encoder"
        named = _named(second)
        assert all(torch.equal(named[n], first_p) for n, first_p in _named(first).items())
        params, _ = _optimized(second)
        assert params == {id(named[n]) for n in audio}
        second.fit()
        named = _named(second)
        params, stateful = _optimized(second)
        assert params == stateful == {id(named[n]) for n in audio}
        changed = {n for n, p in named.items() if not torch.equal(p, initial[n])}
        assert changed <= audio and changed - adapter  # the encoder body trained in phase 2 ...
        frozen = set(initial) - audio
        assert all(torch.equal(named[n], initial[n]) for n in frozen)  # ... and nothing else moved
    finally:
        shutdown_parallel()
