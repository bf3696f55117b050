"""FirstWriteDDP (parallel/wrap.py) against megatron-core's DistributedDataParallel: the same main grads
after gradient accumulation, whether the first gradient is copied into the buffers or, with nothing to
reduce, adopted as the main grad without a copy (buffers released)."""

import pytest
import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from omni_train.config.schema import ThinkerConfig, ParallelConfig
from omni_train.models.thinker.lm import build_thinker_lm
from omni_train.parallel.wrap import FirstWriteDDP, wrap_data_parallel

TINY = ThinkerConfig(
    vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=4,
    num_query_groups=2, head_dim=16, num_experts=4, router_topk=2, moe_ffn_hidden_size=24,
    mrope_section=[4, 2, 2],
)


def _accumulated_grads(state, dtype, fp32_grads: bool, megatron: bool, steps: int = 2):
    """Main grads after the last of ``steps`` steps of 2 accumulated micro-batches each."""
    model = build_thinker_lm(TINY, ParallelConfig(), device="cpu", params_dtype=dtype)
    model.load_state_dict(state)
    if megatron:  # the reference: megatron's own class with wrap_data_parallel's config
        config = DistributedDataParallelConfig(grad_reduce_in_fp32=fp32_grads, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False, check_for_nan_in_grad=False)
        ddp = DistributedDataParallel(config=model.config, ddp_config=config, module=model)
    else:
        ddp = wrap_data_parallel(model, ParallelConfig(), on_gpu=False, fp32_grads=fp32_grads)
    for step in range(steps):
        ddp.zero_grad_buffer()
        for micro in range(2):
            g = torch.Generator().manual_seed(10 * step + micro)
            tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=g)
            positions = torch.arange(16).expand(3, 2, 16)
            ddp(tokens, positions, None, labels=tokens.roll(-1, dims=1)).float().sum().backward()
        ddp.finish_grad_sync()
    return ddp, {n: p.main_grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype, fp32_grads, owns", [
    (torch.float32, True, True),     # grads in the parameters' dtype: adopted
    (torch.bfloat16, False, True),   # bf16 parameters and grads: adopted
    (torch.bfloat16, True, False),   # fp32 grads of bf16 parameters: copied (cast) into the buffers
])
def test_main_grads_equal_megatrons_ddp(megatron_world1, dtype, fp32_grads, owns):
    torch.manual_seed(0)
    state = build_thinker_lm(TINY, ParallelConfig(), device="cpu", params_dtype=dtype).state_dict()
    ddp, ours = _accumulated_grads(state, dtype, fp32_grads, megatron=False)
    _, theirs = _accumulated_grads(state, dtype, fp32_grads, megatron=True)
    assert isinstance(ddp, FirstWriteDDP) and ddp.owns_grads == owns
    for name in theirs:  # 0 + g1 + g2 == g1 + g2 bit for bit
        assert ours[name].dtype == theirs[name].dtype, name
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)
    assert all(g.abs().sum() > 0 for g in theirs.values())
    buffers = ddp.buffers + ddp.expert_parallel_buffers
    if owns:  # the buffers hold no memory; the main grads are autograd's tensors
        assert all(b.grad_data.untyped_storage().size() == 0 for b in buffers)
        storages = {b.grad_data.untyped_storage().data_ptr() for b in buffers}
        params = list(ddp.module.parameters())
        assert all(p.main_grad.untyped_storage().data_ptr() not in storages for p in params)
    else:
        assert all(b.grad_data.untyped_storage().size() > 0 for b in buffers)


def test_parameters_without_gradient_get_zeros_and_the_step_releases_its_grads(megatron_world1):
    torch.manual_seed(0)
    model = build_thinker_lm(TINY, ParallelConfig(), device="cpu", params_dtype=torch.float32)
    ddp = wrap_data_parallel(model, ParallelConfig(), on_gpu=False)
    assert ddp.owns_grads
    tokens = torch.randint(0, TINY.vocab_size, (2, 16))
    positions = torch.arange(16).expand(3, 2, 16)
    ddp.zero_grad_buffer()
    # a loss that reaches no decoder parameter but the embedding: everything else gets no gradient
    model.embedding(tokens.t().contiguous(), position_ids=None).float().pow(2).sum().backward()
    ddp.finish_grad_sync()
    embedding = model.embedding.word_embeddings.weight
    assert embedding.main_grad.abs().sum() > 0
    for name, param in model.named_parameters():
        assert param.main_grad.shape == param.shape, name
        if param is not embedding:
            assert param.main_grad.abs().sum() == 0, name
    held = embedding.main_grad
    ddp.zero_grad_buffer()  # the next step starts: last step's gradients are let go
    assert embedding.main_grad is not held
