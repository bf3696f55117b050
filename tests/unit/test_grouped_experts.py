"""Grouped-GEMM experts: the same function, gradients and checkpoints as megatron's SequentialMLP."""

import dataclasses

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.dict_utils import nested_values

from omni_train.config.schema import ThinkerConfig, ParallelConfig
from omni_train.models.common.grouped_experts import GroupedExperts, grouped_linear, grouped_mm_supported
from omni_train.models.common.local_dispatch import LocalTokenDispatcher
from omni_train.models.thinker.lm import build_thinker_lm

TINY = ThinkerConfig(
    vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=4,
    num_query_groups=2, head_dim=16, num_experts=4, router_topk=2, moe_ffn_hidden_size=24,
    mrope_section=[4, 2, 2],
)
SEQUENTIAL = dataclasses.replace(TINY, experts_impl="sequential")


def per_expert_reference(x, counts, weights):
    pieces = x.split(counts)
    return torch.cat([piece @ w.t() for piece, w in zip(pieces, weights)])


@pytest.mark.parametrize("counts", [[3, 0, 9, 4], [0, 0, 16, 0], [5, 5, 5, 1]])
def test_grouped_linear_matches_a_matmul_per_expert(counts):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), 32, generator=g, requires_grad=True)
    weight = torch.randn(len(counts), 48, 32, generator=g, requires_grad=True)
    assert grouped_mm_supported(x, weight)
    out = grouped_linear(x, torch.tensor(counts), weight)
    upstream = torch.randn(out.shape, generator=g)
    grad_x, grad_w = torch.autograd.grad(out, [x, weight], upstream)

    x_ref = x.detach().clone().requires_grad_()
    w_ref = [w.detach().clone().requires_grad_() for w in weight]
    ref = per_expert_reference(x_ref, counts, w_ref)
    ref_grads = torch.autograd.grad(ref, [x_ref, *w_ref], upstream)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x, ref_grads[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_w, torch.stack(ref_grads[1:]), rtol=1e-5, atol=1e-5)
    for count, grad in zip(counts, grad_w):
        if count == 0:  # an expert without tokens gets an exact zero gradient
            assert torch.count_nonzero(grad) == 0


def test_unaligned_sizes_take_the_per_expert_path():
    x = torch.randn(6, 30)  # 30 fp32 = 120 bytes per row: not a multiple of 16
    weight = torch.randn(2, 10, 30)
    assert not grouped_mm_supported(x, weight)
    out = grouped_linear(x, torch.tensor([2, 4]), weight)
    torch.testing.assert_close(out, per_expert_reference(x, [2, 4], weight.unbind(0)))


def _per_expert(grads, experts):
    """Grouped grads/weights renamed and split as SequentialMLP names them."""
    out = {}
    for name, value in grads.items():
        for projection in ("linear_fc1", "linear_fc2"):
            suffix = f".mlp.experts.{projection}_weight"
            if name.endswith(suffix):
                for i in range(experts):
                    out[name.removesuffix(suffix) + f".mlp.experts.local_experts.{i}.{projection}.weight"] = value[i]
                break
        else:
            out[name] = value
    return out


def _loss_and_grads(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand(3, *tokens.shape)
    loss = model(tokens, positions, None, labels=tokens.roll(-1, dims=1)).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thinker_lm_with_grouped_experts_matches_sequential_mlp(megatron_world1, dtype):
    sequential = build_thinker_lm(SEQUENTIAL, ParallelConfig(), device="cpu", params_dtype=dtype)
    grouped = build_thinker_lm(TINY, ParallelConfig(), device="cpu", params_dtype=dtype)
    experts = grouped.decoder.layers[0].mlp.experts
    assert isinstance(experts, GroupedExperts)
    assert type(sequential.decoder.layers[0].mlp.experts).__name__ == "SequentialMLP"
    # all experts local: the grouped model permutes without megatron's alltoall dispatcher (the sequential
    # model keeps it, so the comparison below also checks the dispatch)
    assert isinstance(grouped.decoder.layers[0].mlp.token_dispatcher, LocalTokenDispatcher)
    assert type(sequential.decoder.layers[0].mlp.token_dispatcher).__name__ == "MoEAlltoAllTokenDispatcher"
    # two trainable tensors per layer instead of two per expert, the same number of weights
    grouped_params = dict(grouped.named_parameters())
    assert len(grouped_params) == len(dict(sequential.named_parameters())) - 2 * TINY.num_layers * (
        TINY.num_experts - 1)
    assert experts.linear_fc1_weight.shape == (4, 2 * 24, 32)
    assert experts.linear_fc2_weight.shape == (4, 32, 24)
    assert sum(p.numel() for p in grouped.parameters()) == sum(p.numel() for p in sequential.parameters())
    grouped.load_state_dict(sequential.state_dict())  # SequentialMLP's per-expert state dict is accepted

    tokens = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    loss_seq, grads_seq = _loss_and_grads(sequential, tokens)
    loss_grp, grads_grp = _loss_and_grads(grouped, tokens)
    grads_grp = _per_expert(grads_grp, TINY.num_experts)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss_grp, loss_seq, **tol)
    assert grads_grp.keys() == grads_seq.keys()
    assert sum(".local_experts." in n for n in grads_grp) == 2 * TINY.num_layers * TINY.num_experts
    for name in grads_grp:
        torch.testing.assert_close(grads_grp[name], grads_seq[name], **tol, msg=name)


def _checkpoint_entries(model):
    """{(key, global offset): data} of every ShardedTensor the model's sharded state dict builds."""
    out = {}
    for item in model.sharded_state_dict().values():
        items = nested_values(item.build()) if isinstance(item, ShardedTensorFactory) else [item]
        for sharded in items:
            if isinstance(sharded, ShardedTensor):
                out[(sharded.key, sharded.global_offset)] = (sharded.global_shape, sharded.data)
    return out


def test_checkpoints_are_sequential_mlps_both_ways(megatron_world1, tmp_path):
    """The grouped model writes SequentialMLP's per-expert checkpoint entries (same keys, offsets, values)
    and each model loads the other's checkpoint."""
    torch.manual_seed(0)
    sequential = build_thinker_lm(SEQUENTIAL, ParallelConfig(), device="cpu", params_dtype=torch.float32)
    grouped = build_thinker_lm(TINY, ParallelConfig(), device="cpu", params_dtype=torch.float32)
    grouped.load_state_dict(sequential.state_dict())
    ours, theirs = _checkpoint_entries(grouped), _checkpoint_entries(sequential)
    assert ours.keys() == theirs.keys()
    assert any("experts.linear_fc1" in key for key, _ in ours)
    for entry in ours:
        assert ours[entry][0] == theirs[entry][0], entry
        torch.testing.assert_close(ours[entry][1], theirs[entry][1], msg=str(entry))

    for source, target_cfg, name in ((grouped, SEQUENTIAL, "from_grouped"),
                                     (sequential, TINY, "from_sequential")):
        loaded = _through_dist_checkpoint(source, target_cfg, tmp_path / name)
        for key, value in _per_expert(source.state_dict(), TINY.num_experts).items():
            if torch.is_tensor(value):
                torch.testing.assert_close(loaded[key], value, msg=key)


def _through_dist_checkpoint(source, target_cfg, path):
    """Save ``source`` with dist_checkpointing and load it into a fresh model of ``target_cfg``: that model's
    state dict, in SequentialMLP's per-expert names."""
    path.mkdir()
    dist_checkpointing.save(source.sharded_state_dict(), str(path))
    target = build_thinker_lm(target_cfg, ParallelConfig(), device="cpu", params_dtype=torch.float32)
    target.load_state_dict(dist_checkpointing.load(target.sharded_state_dict(), str(path)))
    return _per_expert(target.state_dict(), TINY.num_experts)


def test_under_megatron_ddp_expert_grads_match_sequential_mlp(megatron_world1):
    """Through megatron's DDP grad buffer and two micro-batches of gradient accumulation."""
    from omni_train.parallel.wrap import wrap_data_parallel

    torch.manual_seed(0)
    reference_state = build_thinker_lm(SEQUENTIAL, ParallelConfig(), device="cpu",
                                       params_dtype=torch.float32).state_dict()

    def main_grads(model_cfg):
        model = build_thinker_lm(model_cfg, ParallelConfig(), device="cpu", params_dtype=torch.float32)
        model.load_state_dict(reference_state)
        ddp = wrap_data_parallel(model, ParallelConfig(), on_gpu=False)
        ddp.zero_grad_buffer()
        g = torch.Generator().manual_seed(3)
        for _ in range(2):
            tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=g)
            positions = torch.arange(16).expand(3, 2, 16)
            ddp(tokens, positions, None, labels=tokens.roll(-1, dims=1)).mean().backward()
        return {n: p.main_grad.clone() for n, p in model.named_parameters()}

    sequential = main_grads(SEQUENTIAL)
    grouped = _per_expert(main_grads(TINY), TINY.num_experts)
    assert grouped.keys() == sequential.keys()
    assert any(".local_experts." in n and g.abs().sum() > 0 for n, g in grouped.items())
    for name in sequential:
        torch.testing.assert_close(grouped[name], sequential[name], rtol=1e-5, atol=1e-6, msg=name)


def test_unknown_experts_impl_is_refused(megatron_world1):
    with pytest.raises(ValueError, match="experts_impl"):
        build_thinker_lm(dataclasses.replace(TINY, experts_impl="batched"), ParallelConfig(), device="cpu",
                         params_dtype=torch.float32)


def test_weighted_glu_compiled_equals_eager(inductor_cpu):
    """weighted_glu as CUDA runs it (torch.compile; here inductor's CPU backend): values and both
    gradients equal its eager run."""
    import torch.nn.functional as F

    from omni_train.kernels.compiled import compiled
    from omni_train.models.common.grouped_experts import weighted_glu

    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 16, generator=g, requires_grad=True)
    probs = torch.rand(24, generator=g, requires_grad=True)
    weights = torch.randn(24, 8, generator=g)
    results = []
    for fn in (weighted_glu, compiled(weighted_glu)):
        out = fn(x, probs, F.silu, None, 0.0)
        results.append((out, *torch.autograd.grad((out * weights).sum(), (x, probs))))
    for eager, fused in zip(*results):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
