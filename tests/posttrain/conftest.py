"""Fixtures of the post-training tests: the synthetic post-training data and its tokenizer, made once."""

import pytest


@pytest.fixture(scope="session")
def posttrain_root(tmp_path_factory):
    """`omni-data synth-suite` of the post-training kinds once: ROOT/sft, ROOT/distill, ROOT/caption, ROOT/gspo and
    ROOT/tokenizer (byte-level BPE with Qwen's special tokens, <think> and </think>)."""
    from data_pipelines.pretrain_synth import synth_suite

    root = tmp_path_factory.mktemp("posttrain")
    synth_suite(str(root), {"sft": 12, "distill": 9, "caption": 4, "gspo": 16})
    return root


@pytest.fixture(scope="session")
def offpolicy_run(posttrain_root, tmp_path_factory):
    """tiny/distill_offpolicy from a fresh initialisation, 10 steps, through the CLI: (run_dir, overrides).
    Its final checkpoint is also the on-policy tests' teacher (the student starts where this run started)."""
    from cli import omni_train

    run_dir = tmp_path_factory.mktemp("distill") / "distill"
    overrides = ["recipe=tiny/distill_offpolicy", "init_from=null", f"run_dir={run_dir}", "trainer.max_steps=10",
                 "checkpoint.save_every=10", f"data.datasets=[{{path: {posttrain_root / 'distill'}, weight: 1.0}}]",
                 f"data.tokenizer={posttrain_root / 'tokenizer'}"]
    omni_train(overrides)
    return run_dir, overrides


@pytest.fixture(scope="session")
def sharp_thinker(posttrain_root, tmp_path_factory):
    """A tiny Thinker checkpoint (tiny/sft's sizes and tokenizer) with large random weights: peaked
    next-token distributions, far from a freshly initialised model's, so that greedy choices are not
    near ties and a student has a long way to go toward it. Returns (composed config, checkpoint step
    directory; its run's config.yaml beside the checkpoints, as a frozen model's source wants)."""
    import json
    import os

    import torch
    from megatron.core import dist_checkpointing
    from omegaconf import OmegaConf

    from omni_train.checkpoint.manager import MARKER
    from omni_train.config import compose
    from omni_train.config.schema import ParallelConfig, ThinkerConfig
    from omni_train.data.shards import chat_encoder
    from omni_train.models.thinker.hf_config import hf_thinker_config
    from omni_train.models.thinker.omni import build_omni_thinker
    from omni_train.parallel.setup import init_parallel, shutdown_parallel
    from tests.conftest import free_port, redraw_weights

    run = tmp_path_factory.mktemp("sharp") / "run"
    cfg = compose(["recipe=tiny/sft", "init_from=null", f"run_dir={run}",
                   f"data.datasets=[{{path: {posttrain_root / 'sft'}, weight: 1.0}}]",
                   f"data.tokenizer={posttrain_root / 'tokenizer'}"])
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ThinkerConfig), cfg.model.thinker))
    encoder = chat_encoder(cfg.data)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    init_parallel(ParallelConfig(), torch.device("cpu"), seed=0)
    try:
        model = build_omni_thinker(hf_thinker_config(model_cfg, encoder.ids), model_cfg, ParallelConfig(),
                                   device="cpu", params_dtype=torch.float32)
        redraw_weights(model, 0.15)
        step = run / "checkpoints" / "step_00000001"
        step.mkdir(parents=True)
        dist_checkpointing.save({"model": model.sharded_state_dict()}, str(step))
    finally:
        shutdown_parallel()
    (step / MARKER).write_text(json.dumps({"step": 1, "consumed_samples": 0}))
    OmegaConf.save(cfg, run / "config.yaml")
    return cfg, step
