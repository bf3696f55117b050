"""The Talker at expert parallel 2 (two gloo processes, megatron's alltoall dispatcher, each rank its own
conversation, 3 of the 6 experts per rank) gives the single-process Talker's teacher-forced logits."""

import os
import re

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from omni_train.config.schema import ParallelConfig
from omni_train.models.talker import conditioning as cond
from omni_train.models.talker.model import build_talker
from omni_train.models.talker.weights import hf_to_talker
from omni_train.parallel.setup import init_parallel, shutdown_parallel
from tests.conftest import free_port
from tests.parity.test_talker_vs_transformers import THINKER_HIDDEN, conversation, tiny_omni, toy_config

EP = 2


def sample(seed: int, cfg) -> cond.TalkerSample:
    gen = torch.Generator().manual_seed(seed)
    ids = conversation(gen)
    embeds = torch.randn(len(ids), THINKER_HIDDEN, generator=gen)
    codes = torch.randint(0, cfg.code_predictor.codebook_size, (6, cfg.num_code_groups), generator=gen)
    return cond.TalkerSample(ids, embeds, torch.randn(embeds.shape, generator=gen),
                             torch.randn(3, THINKER_HIDDEN, generator=gen), codes, "ethan")


def rank_state(state, cfg, rank: int, size: int):
    """The unsharded state with only this expert-parallel rank's experts, renumbered locally."""
    per = cfg.num_experts // size
    local = {}
    for key, value in state.items():
        found = re.search(r"local_experts\.(\d+)\.", key)
        if found:
            expert = int(found.group(1))
            if expert // per != rank:
                continue
            key = key.replace(f"local_experts.{expert}.", f"local_experts.{expert % per}.")
        local[key] = value
    return local


def logits(cfg, layout, state, seed):
    talker = build_talker(cfg, layout, device="cpu", params_dtype=torch.float32)
    missing, unexpected = talker.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    with torch.no_grad():
        out = talker.eval()([sample(seed, cfg)], return_logits=True)
    return out["codec0_logits"], out["residual_logits"]


def _worker(rank, port, weights, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(EP))
    torch.set_num_threads(1)
    init_parallel(ParallelConfig(ep=EP), torch.device("cpu"), seed=0)
    try:
        cfg = toy_config("b")
        state = rank_state(hf_to_talker(load_file(weights), cfg), cfg, rank, EP)
        torch.save(logits(cfg, ParallelConfig(ep=EP), state, seed=rank), result_dir / f"rank{rank}.pt")
    finally:
        shutdown_parallel()


def test_expert_parallel_matches_one_process(megatron_world1, tmp_path):
    cfg = toy_config("b")
    tiny_omni(cfg).save_pretrained(tmp_path)
    weights = str(tmp_path / "model.safetensors")
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_worker, args=(free_port(), weights, tmp_path), nprocs=EP, join=True)
    state = hf_to_talker(load_file(weights), cfg)
    for rank in range(EP):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        want = logits(cfg, ParallelConfig(), state, seed=rank)
        for ours, reference in zip(got, want):
            assert ours.shape == reference.shape
            assert (ours - reference).abs().max() <= 1e-5
