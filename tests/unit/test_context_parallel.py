"""Context parallelism on CPU (2 gloo processes): cp=2 computes what cp=1 computes.

1. SDPAttention alone: zigzag-split q/k/v at cp=2 give this rank's slice of the cp=1 output, and the
   gradients of this rank's q/k/v slices (K/V gradients come back through the all-gather's
   reduce-scatter).
2. The tiny Thinker LM (same layout-independent weights): per-token loss summed over CP ranks and
   parameter gradients summed over CP ranks equal the single-sequence cp=1 run.

megatron (0.16.1, calculate_per_token_loss) scales each rank's MoE aux-loss gradient by its *local*
token count, so at cp=N the aux-loss gradient summed over CP ranks would be 1/N of the cp=1 one;
build_transformer_config compensates (models/thinker/lm.py: _aux_loss_coeff), and this test checks
that the compensated model's gradients equal cp=1's.
"""

import os

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType

from cli import spawn
from omni_train import compat
from omni_train.config.schema import ThinkerConfig, ParallelConfig
from omni_train.models.common.attention import SDPAttention
from omni_train.models.common.init import init_layout_independent
from omni_train.models.thinker.lm import build_thinker_lm
from omni_train.parallel.context_parallel import slice_for_cp_rank, split_for_context_parallel
from tests.conftest import free_port

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU (gloo) test")

TINY = ThinkerConfig(
    vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=4,
    num_query_groups=2, head_dim=16, num_experts=4, router_topk=2, moe_ffn_hidden_size=24,
    mrope_section=[4, 2, 2],
)
CP = 2
SEQ = 16  # 2 * CP chunks of 4 tokens


def init_megatron(cp: int):
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    model_parallel_cuda_manual_seed(1234)


def attention(cp: int) -> SDPAttention:
    cfg = TransformerConfig(
        num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        attention_dropout=0.0, hidden_dropout=0.0, context_parallel_size=cp,
        use_cpu_initialization=True, params_dtype=torch.float32,
    )
    return SDPAttention(cfg, 1, AttnMaskType.causal, "self")


def check_attention(cp_rank: int):
    """cp=2 SDPAttention vs the same module at cp=1, on the same full-sequence tensors."""
    gen = torch.Generator().manual_seed(0)  # same on both ranks
    q = torch.randn(SEQ, 2, 4, 16, generator=gen)
    k = torch.randn(SEQ, 2, 2, 16, generator=gen)
    v = torch.randn(SEQ, 2, 2, 16, generator=gen)
    grad_out = torch.randn(SEQ, 2, 64, generator=gen)

    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = attention(cp=1)(*full, None)
    ref_grads = torch.autograd.grad(ref_out, full, grad_out)

    local = [slice_for_cp_rank(t, 0, cp_rank, CP).requires_grad_() for t in (q, k, v)]
    out = attention(cp=CP)(*local, None)
    grads = torch.autograd.grad(out, local, slice_for_cp_rank(grad_out, 0, cp_rank, CP))

    mine = lambda t: slice_for_cp_rank(t, 0, cp_rank, CP)  # noqa: E731
    torch.testing.assert_close(out, mine(ref_out), rtol=1e-5, atol=1e-6)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, mine(want), rtol=1e-5, atol=1e-6, msg=f"d{name}")


def lm_batch():
    gen = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, TINY.vocab_size, (2, SEQ), generator=gen)
    t = torch.arange(SEQ)
    positions = torch.stack([t, t // 2, t % 3])[:, None, :].expand(3, 2, SEQ).contiguous()
    return dict(input_ids=input_ids, labels=torch.roll(input_ids, -1, dims=1), position_ids=positions)


def lm_loss_and_grads(layout: ParallelConfig, batch: dict):
    """Sum of the per-token loss and parameter grads, both summed over the CP group."""
    model_cfg = TINY  # build_transformer_config scales the aux coefficient by cp itself
    model = build_thinker_lm(model_cfg, layout, device="cpu", params_dtype=torch.float32)
    init_layout_independent(model, std=0.02, num_layers=TINY.num_layers, seed=11)
    loss = model(batch["input_ids"], batch["position_ids"], None, labels=batch["labels"])
    assert loss.shape == batch["labels"].shape
    loss.sum().backward()
    cp_group = parallel_state.get_context_parallel_group()
    total = loss.detach().double().sum()
    dist.all_reduce(total, group=cp_group)
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=cp_group)
        grads[name] = grad
    return total, grads


def check_thinker_lm(cp_rank: int):
    batch = lm_batch()
    init_megatron(cp=1)  # world 2 = dp 2: each rank runs the whole sequence as the reference
    ref_total, ref_grads = lm_loss_and_grads(ParallelConfig(), batch)
    init_megatron(cp=CP)
    assert parallel_state.get_context_parallel_rank() == cp_rank
    local = split_for_context_parallel(batch, cp_rank, CP)
    assert local["input_ids"].shape == (2, SEQ // CP)
    total, grads = lm_loss_and_grads(ParallelConfig(cp=CP), local)
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-5 * scale, msg=name)
    assert any(g.abs().max() > 0 for g in grads.values())


def _worker(rank: int, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    compat.apply_all("cpu")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        init_megatron(cp=CP)
        check_attention(parallel_state.get_context_parallel_rank())
        check_thinker_lm(rank)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_cp2_matches_cp1():
    spawn(_worker, [free_port()])  # tests/cli.py: as torch.multiprocessing.spawn
