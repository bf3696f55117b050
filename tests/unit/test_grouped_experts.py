"""Grouped-GEMM experts: the same function, gradients and parameters as megatron's SequentialMLP."""

import dataclasses

import pytest
import torch

from omni_train.config.schema import ModelConfig, ParallelConfig
from omni_train.models.grouped_experts import GroupedExperts, grouped_linear, grouped_mm_supported
from omni_train.models.local_dispatch import LocalTokenDispatcher
from omni_train.models.thinker_lm import build_thinker_lm

TINY = ModelConfig(
    flavor="tiny", vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=4,
    num_query_groups=2, head_dim=16, num_experts=4, router_topk=2, moe_ffn_hidden_size=24,
    mrope_section=[4, 2, 2],
)


def per_expert_reference(x, counts, weights):
    pieces = x.split(counts)
    return torch.cat([piece @ w.t() for piece, w in zip(pieces, weights)])


@pytest.mark.parametrize("counts", [[3, 0, 9, 4], [0, 0, 16, 0], [5, 5, 5, 1]])
def test_grouped_linear_matches_a_matmul_per_expert(counts):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), 32, generator=g, requires_grad=True)
    weights = [torch.randn(48, 32, generator=g, requires_grad=True) for _ in counts]
    assert grouped_mm_supported(x, weights)
    tokens = torch.tensor(counts)
    out = grouped_linear(x, tokens, weights)
    upstream = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, [x, *weights], upstream)

    x_ref = x.detach().clone().requires_grad_()
    w_ref = [w.detach().clone().requires_grad_() for w in weights]
    ref = per_expert_reference(x_ref, counts, w_ref)
    ref_grads = torch.autograd.grad(ref, [x_ref, *w_ref], upstream)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for count, grad in zip(counts, grads[1:]):
        if count == 0:  # an expert without tokens gets an exact zero gradient
            assert torch.count_nonzero(grad) == 0


def test_unaligned_sizes_take_the_per_expert_path():
    x = torch.randn(6, 30)  # 30 fp32 = 120 bytes per row: not a multiple of 16
    weights = [torch.randn(10, 30) for _ in range(2)]
    assert not grouped_mm_supported(x, weights)
    out = grouped_linear(x, torch.tensor([2, 4]), weights)
    torch.testing.assert_close(out, per_expert_reference(x, [2, 4], weights))


def _loss_and_grads(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand(3, *tokens.shape)
    loss = model(tokens, positions, None, labels=tokens.roll(-1, dims=1)).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thinker_lm_with_grouped_experts_matches_sequential_mlp(megatron_world1, dtype):
    sequential = build_thinker_lm(dataclasses.replace(TINY, experts_impl="sequential"), ParallelConfig(),
                                  device="cpu", params_dtype=dtype)
    grouped = build_thinker_lm(TINY, ParallelConfig(), device="cpu", params_dtype=dtype)
    experts = grouped.decoder.layers[0].mlp.experts
    assert isinstance(experts, GroupedExperts)
    assert type(sequential.decoder.layers[0].mlp.experts).__name__ == "SequentialMLP"
    # all experts local: the grouped model permutes without megatron's alltoall dispatcher (the sequential
    # model keeps it, so the comparison below also checks the dispatch)
    assert isinstance(grouped.decoder.layers[0].mlp.token_dispatcher, LocalTokenDispatcher)
    assert type(sequential.decoder.layers[0].mlp.token_dispatcher).__name__ == "MoEAlltoAllTokenDispatcher"
    # the same parameter names and shapes: checkpoints, the HF bridge and freezing see no difference
    shapes = {n: p.shape for n, p in grouped.named_parameters()}
    assert shapes == {n: p.shape for n, p in sequential.named_parameters()}
    assert "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight" in shapes
    grouped.load_state_dict(sequential.state_dict())
    sharded = grouped.sharded_state_dict()
    assert {v.key for v in sharded.values() if hasattr(v, "key")} == {
        v.key for v in sequential.sharded_state_dict().values() if hasattr(v, "key")}

    tokens = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    loss_seq, grads_seq = _loss_and_grads(sequential, tokens)
    loss_grp, grads_grp = _loss_and_grads(grouped, tokens)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss_grp, loss_seq, **tol)
    assert grads_grp.keys() == grads_seq.keys()
    expert_grads = [n for n in grads_grp if ".local_experts." in n]
    assert len(expert_grads) == 2 * TINY.num_layers * TINY.num_experts
    for name in grads_grp:
        torch.testing.assert_close(grads_grp[name], grads_seq[name], **tol, msg=name)


def test_unknown_experts_impl_is_refused(megatron_world1):
    with pytest.raises(ValueError, match="experts_impl"):
        build_thinker_lm(dataclasses.replace(TINY, experts_impl="batched"), ParallelConfig(), device="cpu",
                         params_dtype=torch.float32)


def test_under_megatron_ddp_expert_grads_land_in_the_grad_buffer_once(megatron_world1):
    """With DDP, GroupedExperts adds expert grads straight into the main grads (DDP's hook must not add
    them again): after two micro-batches the buffer equals SequentialMLP's, which goes through the hook."""
    from omni_train.parallel.wrap import wrap_data_parallel

    def main_grads(experts_impl):
        torch.manual_seed(0)
        model = build_thinker_lm(dataclasses.replace(TINY, experts_impl=experts_impl), ParallelConfig(),
                                 device="cpu", params_dtype=torch.float32)
        model.load_state_dict(reference_state)
        ddp = wrap_data_parallel(model, ParallelConfig(), on_gpu=False)
        ddp.zero_grad_buffer()
        g = torch.Generator().manual_seed(3)
        for _ in range(2):  # gradient accumulation over two micro-batches
            tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=g)
            positions = torch.arange(16).expand(3, 2, 16)
            ddp(tokens, positions, None, labels=tokens.roll(-1, dims=1)).mean().backward()
        return {n: p.main_grad.clone() for n, p in model.named_parameters()}

    torch.manual_seed(0)
    reference_state = build_thinker_lm(dataclasses.replace(TINY, experts_impl="sequential"), ParallelConfig(),
                                       device="cpu", params_dtype=torch.float32).state_dict()
    sequential = main_grads("sequential")
    grouped = main_grads("grouped")
    assert any(".local_experts." in n and g.abs().sum() > 0 for n, g in grouped.items())
    for name in sequential:
        torch.testing.assert_close(grouped[name], sequential[name], rtol=1e-5, atol=1e-6, msg=name)


def test_expert_weights_are_read_in_place_until_moved(megatron_world1):
    """Built weights are slices of one storage (the kernel reads them without a copy); a parameter given
    storage of its own (as megatron's distributed optimizer does) falls back to a stacked copy, same values."""
    from omni_train.models.grouped_experts import stacked

    model = build_thinker_lm(TINY, ParallelConfig(), device="cpu", params_dtype=torch.float32)
    reference = build_thinker_lm(dataclasses.replace(TINY, experts_impl="sequential"), ParallelConfig(),
                                 device="cpu", params_dtype=torch.float32)
    experts = model.decoder.layers[0].mlp.experts
    want = vars(reference.decoder.layers[0].mlp.experts.local_experts[0].linear_fc1.weight)
    fc1 = [e.linear_fc1.weight for e in experts.local_experts]
    view = stacked(fc1)
    assert view.untyped_storage().data_ptr() == fc1[0].untyped_storage().data_ptr()
    assert view.shape == (TINY.num_experts, 2 * TINY.moe_ffn_hidden_size, TINY.hidden_size)
    for i, w in enumerate(fc1):
        assert torch.equal(view[i], w)
        assert vars(w) == want  # megatron's attributes (allreduce, tensor_model_parallel, ...) survive
    assert "allreduce" in want
    for w in fc1:  # moved, as megatron's distributed optimizer moves every parameter into its buffer
        w.data = w.data.clone()
    copy = stacked(fc1)
    assert copy.untyped_storage().data_ptr() != fc1[0].untyped_storage().data_ptr()
    torch.testing.assert_close(copy, view)
