"""Shared fixtures: a world-size-1 gloo process group with megatron's parallel_state on top."""

import os
import socket

import pytest
import torch
import torch.distributed as dist

from ci import skip_or_fail


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redraw_weights(model, scale: float, seed: int = 0) -> None:
    """Re-draw a Thinker's weights large (norms 1 + 0.1 noise, the rest `scale` x noise, seeded): its outputs
    then depend on positions, documents and media, and greedy choices are not near ties (the parity tests'
    way of making a wrong rope section or tower visible)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.1 * noise if "norm" in name or ".ln_" in name else scale * noise)


@pytest.fixture
def library_patches():
    """The run-time patches of megatron-core, torch and transformers (omni_train/compat/), as init_parallel
    applies them, for tests that build models without it."""
    from omni_train import compat

    compat.apply_all("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def megatron_world1(library_patches):
    """Initialize gloo (world size 1), megatron parallel_state and its RNG; tear down after the test."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from omni_train.parallel.process_state import reset_moe_aux_state

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    reset_moe_aux_state()
    model_parallel_cuda_manual_seed(1234)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


_INDUCTOR_CPU = {}


@pytest.fixture
def inductor_cpu():
    """Skip unless torch.compile's CPU backend (inductor, which builds C++ with the system compiler) works
    here: probed once on a trivial function, so that a missing toolchain skips with its reason (under CI:
    fails with it, tests/ci.py) while a failure of the code under test still fails."""
    if "reason" not in _INDUCTOR_CPU:
        try:
            torch.compile(lambda x: x * 2 + 1, fullgraph=True)(torch.ones(4))
            _INDUCTOR_CPU["reason"] = None
        except Exception as exc:  # toolchain missing or broken
            _INDUCTOR_CPU["reason"] = f"torch.compile on CPU unavailable: {type(exc).__name__}: {str(exc)[:200]}"
    if _INDUCTOR_CPU["reason"]:
        skip_or_fail(_INDUCTOR_CPU["reason"])


# Built once per session and shared (issue 15): synthetic datasets and short reference runs that several
# modules read. They are read-only; a test that writes into a dataset or a run directory copies it first
# (shutil.copytree) or builds its own.


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory):
    """`omni-data synth` once: ROOT/good (24 samples, seed 0, every medium), ROOT/tok (a tokenizer trained
    on its texts) and ROOT/bad (a damaged copy: an undecodable flac, bad JSON, a missing member, a
    truncated shard)."""
    from data_pipelines.cli import main as omni_data

    root = tmp_path_factory.mktemp("synth_shards")
    assert omni_data(["synth", str(root / "good"), "--samples", "24", "--tokenizer", str(root / "tok"),
                      "--corrupt", str(root / "bad"), "--no-progress"]) == 0
    return root


@pytest.fixture(scope="session")
def synth_suite_root(tmp_path_factory):
    """`omni-data synth-suite` once: ROOT/<kind> per pretraining data kind and ROOT/tokenizer."""
    from data_pipelines.pretrain_synth import synth_suite

    root = tmp_path_factory.mktemp("synth_suite")
    synth_suite(str(root), {"audio_text": 8})
    return root


@pytest.fixture(scope="session")
def text_run_6_steps(tmp_path_factory):
    """(run dir, metrics by step): the tiny text recipe, 6 steps, one process (cli.TEXT_6_STEPS)."""
    from cli import TEXT_6_STEPS, metrics, omni_train

    run_dir = tmp_path_factory.mktemp("text6") / "run"
    omni_train([*TEXT_6_STEPS, f"run_dir={run_dir}"])
    return run_dir, metrics(run_dir)


@pytest.fixture(scope="session")
def text_torchrun_6_steps(tmp_path_factory):
    """(run dir, metrics by step): cli.TEXT_6_STEPS on 2 data-parallel processes (plain torchrun: its
    agent, its rendezvous, its workers)."""
    from cli import TEXT_6_STEPS, metrics, torchrun

    run_dir = tmp_path_factory.mktemp("text6_dp2") / "run"
    torchrun(2, [*TEXT_6_STEPS, f"run_dir={run_dir}"], fresh_interpreter=True)
    return run_dir, metrics(run_dir)


@pytest.fixture(scope="session")
def tiny_recipe_run(tmp_path_factory):
    """(run root, metrics by step): `omni-train recipe=tiny/text_pretrain` as the README runs it (100
    steps, final checkpoint), at ROOT/text_pretrain so that a later stage names it `stage:text_pretrain`
    (hand-off tests write their own stage beside it, never into it)."""
    from cli import metrics, omni_train

    root = tmp_path_factory.mktemp("tiny_recipe")
    omni_train(["recipe=tiny/text_pretrain", f"run_dir={root / 'text_pretrain'}"])
    return root, metrics(root / "text_pretrain")


@pytest.fixture(scope="session")
def multimodal_run(synth_shards, tmp_path_factory):
    """(run dir, metrics records in order): tiny multimodal_pretrain from scratch on synth_shards, 3 steps
    with checkpoints after 2 and 3, then step 3 again from the step-2 checkpoint (records of steps 1, 2, 3,
    3); its final checkpoint is the one the export tests export."""
    from cli import omni_train
    from tests.integration.test_multimodal_stage import _train_then_repeat_last_step

    run_dir = tmp_path_factory.mktemp("multimodal") / "run" / "multimodal_pretrain"
    return run_dir, _train_then_repeat_last_step(omni_train, run_dir, synth_shards)


@pytest.fixture(scope="session")
def tiny_hf_omni_dir(tmp_path_factory):
    """tests/parity/test_convert.py's tiny Qwen3-Omni (thinker, towers, talker, code2wav; seed 0), saved
    once in several safetensors shards (a reader must follow the index). Read only."""
    from tests.parity.test_convert import tiny_omni_model

    path = tmp_path_factory.mktemp("hf_omni")
    tiny_omni_model().save_pretrained(path, max_shard_size="200KB")
    return path

# The Talker's synthetic speech and its pretraining run, shared by the Talker stages' tests
# (tests/posttrain/test_talker_stages.py, tests/integration/test_export_talker_run.py).
TALKER_STEPS = 6


@pytest.fixture(scope="session")
def speech_root(tmp_path_factory):
    """`omni-data synth-suite` of the spoken kinds (ROOT/speech, ROOT/long_speech, ROOT/tokenizer) and ROOT/bad:
    two conversations, the second's speech without codec targets."""
    import json

    import numpy as np

    from data_pipelines.build import BuildOptions, build
    from data_pipelines.posttrain_synth import speech_entry
    from data_pipelines.pretrain_synth import synth_suite
    from data_pipelines.sources import ManifestSource

    root = tmp_path_factory.mktemp("speech")
    synth_suite(str(root), {"speech": 8, "long_speech": 4})
    src = root / "bad_src"
    src.mkdir()
    entries = [speech_entry(i, np.random.default_rng(i), str(src))[0] for i in range(2)]
    del entries[1]["messages"][1]["content"][1]["codec"]
    (src / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    result = build(ManifestSource(str(src / "manifest.jsonl")), str(root / "bad"), BuildOptions(progress=False))
    assert not result.errors
    return root


@pytest.fixture(scope="session")
def thinker_checkpoint(speech_root, tmp_path_factory):
    """A freshly initialised tiny Thinker (tiny_omni, the speech tokenizer's ids) saved as a checkpoint."""
    import json

    from megatron.core import dist_checkpointing
    from omegaconf import OmegaConf

    from omni_train.checkpoint.manager import MARKER
    from omni_train.config import compose
    from omni_train.config.schema import ParallelConfig, ThinkerConfig
    from omni_train.data.shards import chat_encoder
    from omni_train.models.thinker.hf_config import hf_thinker_config
    from omni_train.models.thinker.omni import build_omni_thinker
    from omni_train.parallel.setup import init_parallel, shutdown_parallel

    cfg = compose(["recipe=tiny/talker_pretrain", f"data.tokenizer={speech_root / 'tokenizer'}"])
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ThinkerConfig), cfg.model.thinker))
    step = tmp_path_factory.mktemp("thinker") / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    init_parallel(ParallelConfig(), torch.device("cpu"), seed=0)
    try:
        model = build_omni_thinker(hf_thinker_config(model_cfg, chat_encoder(cfg.data).ids), model_cfg,
                                   ParallelConfig(), device="cpu", params_dtype=torch.float32)
        dist_checkpointing.save({"model": model.sharded_state_dict()}, str(step))
    finally:
        shutdown_parallel()
    (step / MARKER).write_text(json.dumps({"step": 1, "consumed_samples": 0}))
    return step


def talker_overrides(root, run_dir, *extra):
    return ["recipe=tiny/talker_pretrain", f"run_dir={run_dir}", f"data.tokenizer={root / 'tokenizer'}",
            f"data.datasets=[{{path: {root / 'speech'}, weight: 1.0}}, {{path: {root / 'bad'}, weight: 0.25}}]",
            f"trainer.max_steps={TALKER_STEPS}", "checkpoint.save_every=3", *extra]


@pytest.fixture(scope="session")
def pretrain_run(speech_root, thinker_checkpoint, tmp_path_factory):
    """(run dir, overrides, the finished process): tiny/talker_pretrain from thinker_checkpoint, TALKER_STEPS steps
    with checkpoints every 3 (tests/posttrain/test_talker_stages.py checks it; later Talker stages start from it)."""
    from cli import omni_train

    run_dir = tmp_path_factory.mktemp("talker") / "talker_pretrain"
    overrides = talker_overrides(speech_root, run_dir, f"init_from={thinker_checkpoint}")
    proc = omni_train(overrides)
    return run_dir, overrides, proc
