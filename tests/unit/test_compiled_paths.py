"""The elementwise chains that CUDA runs compiled (rotary rotation, RMSNorm, the MoE combine's gather-sum):
eagerly (as on CPU) they compute exactly what megatron / torch compute; compiled (inductor's CPU backend
here, Triton on CUDA) they match the eager values and gradients."""

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from megatron.core.transformer import attention

from omni_train.config.schema import ThinkerConfig, ParallelConfig
from omni_train.kernels.compiled import compiled
from omni_train.models.common.local_dispatch import sum_copies
from omni_train.compat.megatron_rotary import apply_rotary_pos_emb, rotate
from omni_train.models.thinker.lm import RMSNorm, build_thinker_lm, rms_norm

TINY = ThinkerConfig(
    vocab_size=128, hidden_size=32, num_layers=1, num_attention_heads=4,
    num_query_groups=2, head_dim=16, num_experts=4, router_topk=2, moe_ffn_hidden_size=24,
    mrope_section=[4, 2, 2],
)


def _rotary_inputs(dtype, heads=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(12, 2, heads, 16, generator=g).to(dtype)
    freqs = torch.rand(12, 2, 1, 16, generator=g) * 40.0
    return t, freqs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_is_megatrons_unfused_rotation(dtype):
    t, freqs = _rotary_inputs(dtype)
    assert torch.equal(rotate(t, freqs), _apply_rotary_pos_emb_bshd(t, freqs))


def test_megatron_attention_rotates_through_ours_and_falls_back_where_it_must(megatron_world1):
    build_thinker_lm(TINY, ParallelConfig(), device="cpu", params_dtype=torch.float32)
    assert attention.apply_rotary_pos_emb is apply_rotary_pos_emb
    model = build_thinker_lm(TINY, ParallelConfig(), device="cpu", params_dtype=torch.float32)
    config = model.config
    t, freqs = _rotary_inputs(torch.float32)
    assert torch.equal(apply_rotary_pos_emb(t, freqs, config), rotate(t, freqs))
    # a partial rotary dimension is megatron's business (its result passes the rest through)
    partial = apply_rotary_pos_emb(t, freqs[..., :8], config)
    assert torch.equal(partial, _apply_rotary_pos_emb_bshd(t, freqs[..., :8]))
    assert torch.equal(partial[..., 8:], t[..., 8:])


def _values_and_grads(fn, inputs, weights):
    out = fn(*inputs)
    grads = torch.autograd.grad((out.float() * weights).sum(), [x for x in inputs if torch.is_tensor(x)
                                                                  and x.requires_grad])
    return (out, *grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_compiled_equals_eager(inductor_cpu, dtype):
    t, freqs = _rotary_inputs(dtype, seed=1)
    t.requires_grad_(True)
    weights = torch.randn(t.shape, generator=torch.Generator().manual_seed(2))
    eager = _values_and_grads(rotate, (t, freqs), weights)
    fused = _values_and_grads(compiled(rotate), (t, freqs), weights)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    for a, b in zip(eager, fused):
        torch.testing.assert_close(b, a, **tol)


def test_rms_norm_module_is_torchs(megatron_world1):
    model = build_thinker_lm(TINY, ParallelConfig(), device="cpu", params_dtype=torch.float32)
    norm = model.decoder.layers[0].self_attention.q_layernorm
    assert isinstance(norm, RMSNorm)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape) + 0.5)
    reference = torch.nn.RMSNorm(norm.weight.shape[0], eps=norm.eps)
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(6, 2, 4, norm.weight.shape[0])
    assert torch.equal(norm(x), reference(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_compiled_equals_eager(inductor_cpu, dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(10, 3, 64, generator=g) * 3).to(dtype).requires_grad_(True)
    weight = (torch.rand(64, generator=g) + 0.5).to(dtype).requires_grad_(True)
    weights = torch.randn(10, 3, 64, generator=g)
    eager = _values_and_grads(rms_norm, (x, weight, 1e-6), weights)
    fused = _values_and_grads(compiled(rms_norm), (x, weight, 1e-6), weights)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for a, b in zip(eager, fused):
        torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_copies_compiled_equals_eager(inductor_cpu, dtype):
    g = torch.Generator().manual_seed(4)
    tokens, topk = 9, 3
    rows = torch.randn(tokens * topk, 32, generator=g).to(dtype)
    inverse = torch.randperm(tokens * topk, generator=g)
    eager = sum_copies(rows, inverse, topk)
    expected = torch.stack([rows[inverse[i * topk:(i + 1) * topk]].float().sum(0) for i in range(tokens)])
    torch.testing.assert_close(eager.float(), expected, rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-2)
    torch.testing.assert_close(compiled(sum_copies)(rows, inverse, topk), eager,
                               rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5 if dtype == torch.float32 else 1e-2)
