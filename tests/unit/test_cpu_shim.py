"""megatron-core on CPU + gloo through omni_train/compat/megatron_cpu.py: model, DDP, optimizer with
gradient clipping, alltoall expert parallelism, tensor parallelism and dist_checkpointing, at world
size 1 and 2 (two spawned processes)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from cli import spawn
from omni_train import compat
from omni_train.config.schema import ThinkerConfig, ParallelConfig
from omni_train.models.thinker.lm import build_thinker_lm, describe_shards

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only shim")

TINY = ThinkerConfig(
    vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=4,
    num_query_groups=2, head_dim=16, num_experts=4, router_topk=2, moe_ffn_hidden_size=24,
    mrope_section=[4, 2, 2],
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_training(parallel_cfg: ParallelConfig, seed: int = 7):
    """Tiny LM wrapped in megatron DDP plus the (non-distributed) megatron AdamW with clip_grad=1."""
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    model = build_thinker_lm(TINY, parallel_cfg, device="cpu", params_dtype=torch.float32)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=False)
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=1.0,
                                 use_distributed_optimizer=False)
    return model, ddp, get_megatron_optimizer(opt_config, [ddp])


def batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, TINY.vocab_size, (2, 8), generator=gen)
    positions = torch.stack([torch.arange(8), torch.arange(8) // 2, torch.arange(8) % 3])
    return input_ids, positions[:, None, :].expand(3, 2, 8)


def forward_backward(ddp, data_seed: int):
    ddp.zero_grad_buffer()
    input_ids, positions = batch(data_seed)
    loss = ddp(input_ids, positions, None, labels=input_ids)
    loss.sum().backward()
    num_tokens = torch.tensor(loss.numel())
    finalize_model_grads([ddp], num_tokens=num_tokens)  # DP all-reduce, then scale by 1/tokens
    return loss.detach()


def expected_grad_norm(model) -> float:
    """Independent reference for layouts whose split group is the whole world: parameters split over
    ranks (TP shards when tp > 1, experts when ep > 1) sum over ranks; replicated ones count once."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    replicated = torch.zeros((), dtype=torch.float64)
    distributed = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        sq = p.main_grad.double().pow(2).sum()
        is_expert = not getattr(p, "allreduce", True)
        tp_split = getattr(p, "tensor_model_parallel", False) and tp > 1
        if tp_split or (is_expert and ep > 1):
            distributed += sq
        else:
            replicated += sq
    dist.all_reduce(distributed)
    return float((replicated + distributed).sqrt())


def check_clipped_step(model, opt):
    """opt.step() returns the true global grad norm and clips by it (clip_grad=1.0)."""
    reference = expected_grad_norm(model)
    grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    success, grad_norm, _ = opt.step()
    assert success
    assert grad_norm == pytest.approx(reference, rel=1e-5), (grad_norm, reference)
    assert reference > 1.0, "test needs clipping to be active"
    for name, p in model.named_parameters():  # grads were scaled by 1 / norm before the update
        torch.testing.assert_close(p.grad, grads[name] / (reference + 1e-6), rtol=1e-4, atol=1e-7)


def checkpoint_round_trip(model, ddp, opt, ckpt_dir: str):
    """Save model + optimizer (torch_dist), train on, load, and compare exactly to what was saved."""
    os.makedirs(ckpt_dir, exist_ok=True)
    saved_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    saved_state = [{k: v.clone() for k, v in s.items()} for s in _adam_states(opt)]
    model_sd = model.sharded_state_dict()
    dist_checkpointing.save({"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd)}, ckpt_dir)
    forward_backward(ddp, data_seed=99)
    opt.step()
    assert not torch.equal(next(model.parameters()), next(iter(saved_params.values())))
    model_sd = model.sharded_state_dict()
    template = {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, is_loading=True)}
    loaded = dist_checkpointing.load(template, ckpt_dir)
    model.load_state_dict(loaded["model"], strict=False)
    opt.load_state_dict(loaded["optimizer"])
    for name, p in model.named_parameters():
        assert torch.equal(p, saved_params[name]), name
    for before, after in zip(saved_state, _adam_states(opt)):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(before[key], after[key]), key


def _adam_states(opt):
    optimizers = getattr(opt, "chained_optimizers", [opt])
    return [o.optimizer.state[p] for o in optimizers for g in o.optimizer.param_groups for p in g["params"]]


def init_megatron(tp: int = 1, ep: int = 1):
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep
    )


# ---------------------------------------------------------------------------------------------------
# world size 1


def test_world1_ddp_optimizer_clip_and_checkpoint(megatron_world1, tmp_path):
    model, ddp, opt = build_training(ParallelConfig())
    losses = []
    for step in range(3):
        losses.append(forward_backward(ddp, data_seed=0).mean().item())
        check_clipped_step(model, opt)
    assert losses[-1] < losses[0]
    checkpoint_round_trip(model, ddp, opt, str(tmp_path / "ckpt"))


def test_rng_tracker_forks_cpu_state(megatron_world1):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        a = torch.rand(3)
    with get_cuda_rng_tracker().fork():
        b = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(a, b)  # the forked stream advanced


def test_router_runs_without_transformer_engine(library_patches):
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None


# ---------------------------------------------------------------------------------------------------
# world size 2


def _worker(rank: int, port: int, ckpt_root: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    compat.apply_all("cpu")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        _expert_parallel_alltoall(rank, ckpt_root)
        _tensor_parallel(rank)
        _data_parallel_checkpoint(rank, ckpt_root)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _expert_parallel_alltoall(rank: int, ckpt_root: str):
    init_megatron(ep=2)
    losses = {}
    for dispatcher in ("alltoall", "allgather"):
        layout = ParallelConfig(ep=2, token_dispatcher=dispatcher)
        model, ddp, opt = build_training(layout)
        assert len(model.decoder.layers[0].mlp.experts.local_experts) == 2
        losses[dispatcher] = forward_backward(ddp, data_seed=rank)
        check_clipped_step(model, opt)
    torch.testing.assert_close(losses["alltoall"], losses["allgather"], rtol=1e-6, atol=1e-6)
    checkpoint_round_trip(model, ddp, opt, os.path.join(ckpt_root, "ep2"))


def _tensor_parallel(rank: int):
    init_megatron(tp=2)
    layout = ParallelConfig(tp=2, sequence_parallel=True)  # megatron: MoE + TP needs SP
    model, ddp, opt = build_training(layout)
    shards = describe_shards(TINY, layout)
    assert sum(p.numel() for p in model.parameters()) == shards[rank]["num_params"]
    forward_backward(ddp, data_seed=0)  # same data on both TP ranks
    check_clipped_step(model, opt)


def _data_parallel_checkpoint(rank: int, ckpt_root: str):
    init_megatron()
    model, ddp, opt = build_training(ParallelConfig())
    forward_backward(ddp, data_seed=rank)
    check_clipped_step(model, opt)
    checkpoint_round_trip(model, ddp, opt, os.path.join(ckpt_root, "dp2"))


def test_world2_ep_alltoall_tp_dp_checkpoint(tmp_path):
    spawn(_worker, [free_port(), str(tmp_path)])  # tests/cli.py: as torch.multiprocessing.spawn
