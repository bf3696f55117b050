"""Stage multimodal_pretrain: the tiny Thinker with its towers trains on synth shards (audio, images,
video+audio, text) through the real CLI, media reach the towers, resume is exact, data parallel works;
collate_media lays media out as the processor; tower layouts that cannot run are refused."""

import json
import shutil
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cli import run, torchrun
from omni_train.config import ConfigError, compose, validate_config
from omni_train.data.chat import MediaItem
from omni_train.data.features import audio_features, image_patches, video_patches
from omni_train.data.media_batch import collate_media
from omni_train.data.shards import ShardSource


@pytest.fixture
def synth(synth_shards):
    """The session's synthetic shards (tests/conftest.py): ROOT/good, ROOT/tok; read only."""
    return synth_shards


def _overrides(root, *extra, run_dir="unused"):
    return ["recipe=tiny/multimodal_pretrain", f"data.datasets=[{{path: {root / 'good'}}}]",
            f"data.tokenizer={root / 'tok'}", "trainer.max_steps=3",
            "optim.warmup_steps=1", "checkpoint.save_every=2", f"run_dir={run_dir}", *extra]


def _records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _rerun_from(run_dir, step):
    """Make `step`'s checkpoint the newest, as if the job had died right after saving it."""
    root = run_dir / "checkpoints"
    for later in root.glob("step_*"):
        if int(later.name.split("_")[1]) > step:
            shutil.rmtree(later)
    (root / "latest").write_text(f"step_{step:08d}")


def _train_then_repeat_last_step(run, run_dir, *extra):
    """Train 3 steps (checkpoints after 2 and 3), resume from step 2, redo step 3; both step-3 records."""
    run(_overrides(*extra, run_dir=run_dir))
    _rerun_from(run_dir, 2)
    run(_overrides(*extra, run_dir=run_dir))
    records = _records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 3]
    return records


def test_trains_and_resumes_bitwise(multimodal_run):
    _, records = multimodal_run  # tests/conftest.py: _train_then_repeat_last_step with omni_train
    losses = [r["loss"] for r in records[:3]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    straight, resumed = records[2], records[3]
    for key in ("loss", "grad_norm", "pad_fraction"):
        assert resumed[key] == straight[key], key


@pytest.fixture(scope="module")
def data_parallel_run(synth_shards, tmp_path_factory):
    """2 data-parallel ranks (cli.torchrun): 3 steps, then step 3 again from the step-2 checkpoint."""
    return _train_then_repeat_last_step(partial(torchrun, 2), tmp_path_factory.mktemp("dp") / "run",
                                        synth_shards)


@pytest.mark.slow
def test_two_data_parallel_ranks_resume_exactly(data_parallel_run):
    """The replicated towers are saved once (data-parallel rank 0); a resumed run repeats the step."""
    straight, resumed = data_parallel_run[2], data_parallel_run[3]
    assert resumed["loss"] == straight["loss"] and resumed["grad_norm"] == straight["grad_norm"]


class _BothRanks:
    """Data-parallel ranks 0 and 1 of 2 read in one process: their micro-batches are one global batch,
    the one a 2-process run trains on (each rank packs its own shards, so one rank of 1 would not)."""

    def __init__(self, cfg):
        t = cfg.trainer
        per_rank = t.global_batch_size // 2 // t.micro_batch_size
        self.ranks = [ShardSource(cfg.data, t.seq_length, t.micro_batch_size, per_rank, r, 2) for r in (0, 1)]

    def next_microbatches(self):
        return [batch for rank in self.ranks for batch in rank.next_microbatches()]

    def state_dict(self):
        return {"ranks": [rank.state_dict() for rank in self.ranks]}

    def load_state_dict(self, state):
        for rank, saved in zip(self.ranks, state["ranks"]):
            rank.load_state_dict(saved)

    def stats(self):
        return {}


# The trainer on one process, fed both data-parallel ranks' micro-batches (rank 0's, then rank 1's).
ONE_PROCESS_ON_BOTH_RANKS = """
import sys
from pathlib import Path
import torch
from omegaconf import OmegaConf
sys.path.insert(0, "tests")
from tests.integration.test_multimodal_stage import _BothRanks, _overrides
from omni_train.config import compose
from omni_train.loops import run_stage
from omni_train.parallel.setup import init_parallel, shutdown_parallel
from omni_train.stages import multimodal_pretrain
multimodal_pretrain.STAGE.build_data = lambda cfg, env: _BothRanks(cfg)
synth, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
cfg = OmegaConf.to_object(compose(_overrides(synth, "checkpoint.save_every=100", "checkpoint.save_at_end=false",
                                             run_dir=run_dir)))
torch.set_num_threads(1)  # as each torchrun process: the same summation order in CPU kernels
env = init_parallel(cfg.parallel, torch.device("cpu"), cfg.trainer.seed)
try:
    run_stage(cfg, env)
finally:
    shutdown_parallel()
"""


@pytest.mark.slow
def test_data_parallel_matches_one_process(synth, data_parallel_run, tmp_path):
    """One process on the 2 ranks' global batch gives the 2-process per-step losses (text-only
    micro-batches on a rank included: their zero tower term keeps the gradient reduction in step).
    The one-process run is a process of its own (megatron keeps process-wide MoE state; tests/cli.py)."""
    run_dir = tmp_path / "one"
    proc = run(["-c", ONE_PROCESS_ON_BOTH_RANKS, synth, run_dir], threads=1, timeout=600,
               env={"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = _records(run_dir)
    assert [r["step"] for r in one] == [1, 2, 3]
    for reference, parallel in zip(one, data_parallel_run[:3]):
        assert abs(parallel["loss"] - reference["loss"]) <= 1e-5, (reference, parallel)
    assert one[2]["loss"] != one[0]["loss"]


def test_media_reach_the_towers(synth, megatron_world1):
    """A real micro-batch with audio, images and a video with its audio track: both towers get non-zero
    gradients; a text-only batch gives them exact zeros (the zero term that keeps data-parallel
    reduction in step)."""
    from omni_train.stages.multimodal_pretrain import build_data, build_model, forward

    cfg = OmegaConf.to_object(compose(_overrides(synth)))
    env = SimpleNamespace(device=torch.device("cpu"), dp_rank=0, dp_size=1)
    model, data = build_model(cfg, env, torch.float32), build_data(cfg, env)
    for _ in range(20):
        batch = data.next_microbatches()[0]
        if all(batch["media"][k] is not None for k in ("input_features", "pixel_values", "pixel_values_videos")):
            break
    else:
        pytest.fail("no micro-batch with audio, images and video in 20 steps")
    output, loss_func = forward(model, batch)
    loss_sum, num_tokens, _ = loss_func(output)
    (loss_sum / num_tokens).backward()
    for tower in (model.audio_tower, model.visual):
        assert sum(float(p.grad.abs().sum()) for p in tower.parameters() if p.grad is not None) > 0
    model.zero_grad(set_to_none=True)
    text_only = dict(batch, media=dict.fromkeys(batch["media"]), media_sizes=dict.fromkeys(batch["media_sizes"]))
    text_only["input_ids"] = torch.where(batch["input_ids"] >= 0, batch["input_ids"] % 64, batch["input_ids"])
    output, loss_func = forward(model, text_only)
    loss_sum, num_tokens, _ = loss_func(output)
    (loss_sum / num_tokens).backward()
    for tower in (model.audio_tower, model.visual):
        assert all(p.grad is not None and not p.grad.any() for p in tower.parameters())


def _item(kind, name, features):
    return MediaItem(kind, name, (0, 0), 0, features)


def test_collate_media_order_and_padding():
    rng = np.random.default_rng(0)
    img_a = image_patches(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
    img_b = image_patches(rng.integers(0, 255, (96, 64, 3), dtype=np.uint8))
    speech = audio_features(rng.standard_normal(16000).astype(np.float32) * 0.1)
    video = video_patches(rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8), fps=2.0)
    video["audio"] = audio_features(rng.standard_normal(8000).astype(np.float32) * 0.1)
    items = [_item("image", "a", img_a), _item("audio", "s", speech), _item("video", "v", video),
             _item("image", "b", img_b)]
    out = collate_media(items)
    assert torch.equal(out["pixel_values"], torch.cat([img_a["pixel_values"], img_b["pixel_values"]]))
    assert out["image_grid_thw"].tolist() == [list(img_a["grid_thw"]), list(img_b["grid_thw"])]
    assert torch.equal(out["pixel_values_videos"], video["pixel_values_videos"])
    assert out["video_grid_thw"].tolist() == [list(video["grid_thw"])]
    # audio in item order (the video's track after the user audio), padded to the longest, with a mask
    lengths = [speech["num_frames"], video["audio"]["num_frames"]]
    assert out["input_features"].shape == (2, 128, max(lengths))
    assert out["feature_attention_mask"].sum(1).tolist() == lengths
    assert torch.equal(out["input_features"][0, :, : lengths[0]], speech["input_features"])
    assert torch.equal(out["input_features"][1, :, : lengths[1]], video["audio"]["input_features"])
    assert not out["input_features"][1, :, lengths[1]:].any()
    assert collate_media([]) == dict.fromkeys(out)


@pytest.mark.parametrize("overrides,key", [
    (["parallel.tp=2", "parallel.sequence_parallel=true"], "parallel.tp"),
    (["parallel.pp=2"], "parallel.pp"),
    (["parallel.cp=2"], "parallel.cp"),
    (["model.thinker.vision_tower.patch_size=14"], "model.thinker.vision_tower.patch_size"),
    (["model.thinker.vision_tower.deepstack_visual_indexes=[0,5]"], "model.thinker.vision_tower.deepstack_visual_indexes"),
])
def test_tower_layouts_that_cannot_run_are_refused(overrides, key):
    cfg = compose(["model=tiny_omni", "stage=multimodal_pretrain", *overrides])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg, world_size=2, cuda_available=False)
    validate_config(compose(["model=tiny_omni"]), world_size=2, cuda_available=False)


def test_released_tower_sizes_are_transformers_defaults():
    """qwen3_omni_30b_a3b's towers: transformers' encoder config defaults (the released sizes), with the
    output width the LM's hidden size (the released output_dim / out_hidden_size, 2048)."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
        Qwen3OmniMoeAudioEncoderConfig, Qwen3OmniMoeVisionEncoderConfig)

    from omni_train.models.thinker.hf_config import hf_thinker_config

    model = OmegaConf.to_object(compose(["model=qwen3_omni_30b_a3b"])).model.thinker
    ours = hf_thinker_config(model, dict.fromkeys(
        ("audio_pad", "image_pad", "video_pad", "vision_start", "audio_start"), 0))
    for config, reference, width in ((ours["audio_config"], Qwen3OmniMoeAudioEncoderConfig(), "output_dim"),
                                     (ours["vision_config"], Qwen3OmniMoeVisionEncoderConfig(),
                                      "out_hidden_size")):
        for key, value in config.items():
            expected = model.hidden_size if key == width else getattr(reference, key)
            assert value == (list(expected) if isinstance(expected, tuple) else expected), key
    assert model.hidden_size == 2048
