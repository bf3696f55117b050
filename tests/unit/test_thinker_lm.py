"""Thinker LM provider: TM-RoPE layout vs transformers, forward contract, parameter counts, shard shapes."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeThinkerTextModel,
    Qwen3OmniMoeThinkerTextRotaryEmbedding,
)

from omni_train.config.schema import ThinkerConfig, ParallelConfig
from omni_train.models.common.rotary import InterleavedMRotaryEmbedding, interleaved_section_index
from omni_train.models.thinker.lm import (
    build_thinker_lm,
    build_transformer_config,
    count_parameters,
    describe_shards,
)

TINY = ThinkerConfig(
    vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=4,
    num_query_groups=2, head_dim=16, num_experts=4, router_topk=2, moe_ffn_hidden_size=24,
    mrope_section=[4, 2, 2],
)
QWEN3_OMNI_30B = ThinkerConfig(
    vocab_size=152064, hidden_size=2048, num_layers=48,
    num_attention_heads=32, num_query_groups=4, head_dim=128, num_experts=128, router_topk=8,
    moe_ffn_hidden_size=768, mrope_section=[24, 20, 20],
)


def hf_text_config(m: ThinkerConfig) -> Qwen3OmniMoeTextConfig:
    return Qwen3OmniMoeTextConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
        head_dim=m.head_dim, moe_intermediate_size=m.moe_ffn_hidden_size, num_experts=m.num_experts,
        num_experts_per_tok=m.router_topk, decoder_sparse_step=1, mlp_only_layers=[],
        tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=m.rope_theta,
                             mrope_section=list(m.mrope_section), interleaved=True),
    )


def test_section_index_is_interleaved():
    assert interleaved_section_index([2, 1, 1]).tolist() == [0, 1, 2, 0]
    index = interleaved_section_index([24, 20, 20])
    assert index[:6].tolist() == [0, 1, 2, 0, 1, 2]
    assert [(index == row).sum().item() for row in range(3)] == [24, 20, 20]
    assert (index[60:] == 0).all()


@pytest.mark.parametrize("model_cfg", [TINY, QWEN3_OMNI_30B], ids=["tiny", "30b"])
def test_rotary_matches_transformers_for_distinct_thw(model_cfg):
    batch, seq = 2, 40
    t = torch.arange(seq).expand(batch, seq)
    h = torch.arange(seq) // 4 + torch.tensor([[0], [7]])
    w = (torch.arange(seq) * 3) % 11
    positions = torch.stack([t, h, w.expand(batch, seq)])
    ours = InterleavedMRotaryEmbedding(model_cfg.head_dim, model_cfg.mrope_section, model_cfg.rope_theta)
    emb = ours(positions)  # [S, B, 1, D]
    ref_cos, ref_sin = Qwen3OmniMoeThinkerTextRotaryEmbedding(hf_text_config(model_cfg))(
        torch.zeros(1, dtype=torch.float32), positions
    )
    torch.testing.assert_close(emb[:, :, 0].transpose(0, 1).cos(), ref_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(emb[:, :, 0].transpose(0, 1).sin(), ref_sin, rtol=0, atol=1e-6)
    # Contiguous sections (megatron's 'mrope') would give different angles for these positions.
    contiguous = torch.repeat_interleave(torch.arange(3), torch.tensor(model_cfg.mrope_section))
    assert not torch.equal(contiguous, ours.section_index)


def test_text_positions_reduce_to_1d_rope():
    rope = InterleavedMRotaryEmbedding(16, [4, 2, 2], 10000.0)
    pos = torch.arange(9).expand(2, 9)
    angles = rope.angles(pos)
    torch.testing.assert_close(angles, pos[..., None].float() * rope.inv_freq)
    assert torch.equal(rope(pos), rope(pos.expand(3, -1, -1)))


def test_transformer_config_mapping():
    cfg = build_transformer_config(TINY, ParallelConfig(), params_dtype=torch.float32,
                                   use_cpu_initialization=True)
    assert (cfg.num_query_groups, cfg.kv_channels, cfg.qk_layernorm) == (2, 16, True)
    assert cfg.normalization == "RMSNorm" and cfg.gated_linear_unit and cfg.activation_func is F.silu
    assert not cfg.add_bias_linear and cfg.calculate_per_token_loss
    assert cfg.moe_router_score_function == "softmax" and not cfg.moe_router_pre_softmax
    assert cfg.moe_router_dtype == "fp32" and cfg.moe_token_dispatcher_type == "alltoall"
    bias = build_transformer_config(dataclasses.replace(TINY, load_balancing="expert_bias"),
                                    ParallelConfig(), params_dtype=torch.float32,
                                    use_cpu_initialization=True)
    assert bias.moe_router_enable_expert_bias and bias.moe_aux_loss_coeff == 0.0


@pytest.mark.parametrize("load_balancing", ["aux_loss", "expert_bias"])
def test_forward_contract(megatron_world1, load_balancing):
    model_cfg = dataclasses.replace(TINY, load_balancing=load_balancing)
    model = build_thinker_lm(model_cfg, ParallelConfig(), device="cpu", params_dtype=torch.float32)
    input_ids = torch.randint(0, 128, (2, 8))
    text_pos = torch.arange(8).expand(2, 8)
    loss = model(input_ids, text_pos, None, labels=input_ids)
    assert loss.shape == (2, 8) and loss.dtype == torch.float32
    loss.sum().backward()
    router = model.decoder.layers[0].mlp.router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    with torch.no_grad():
        logits = model(input_ids, text_pos, None)
        logits_3row = model(input_ids, text_pos.expand(3, -1, -1), None)
    assert logits.shape == (2, 8, 128)
    assert torch.equal(logits, logits_3row)
    ref = F.cross_entropy(logits.transpose(1, 2), input_ids, reduction="none")
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-5)


def test_counts_match_built_model(megatron_world1):
    model = build_thinker_lm(TINY, ParallelConfig(), device="cpu", params_dtype=torch.float32)
    numel = sum(p.numel() for p in model.parameters())
    total, active = count_parameters(TINY)
    assert total == numel
    (only_rank,) = describe_shards(TINY, ParallelConfig())
    assert only_rank["num_params"] == numel
    # shard shapes per expert, as checkpoints (and megatron's SequentialMLP) hold them; the grouped experts
    # hold the same shards stacked ([experts, out, in] per projection)
    sequential = build_thinker_lm(dataclasses.replace(TINY, experts_impl="sequential"), ParallelConfig(),
                                  device="cpu", params_dtype=torch.float32)
    shapes = dict(sequential.named_parameters())
    experts = model.decoder.layers[0].mlp.experts
    assert tuple(experts.linear_fc1_weight.shape) == (TINY.num_experts, *shapes[
        "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"].shape)
    assert tuple(experts.linear_fc2_weight.shape) == (TINY.num_experts, *shapes[
        "decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight"].shape)
    for name, shape in only_rank["layer"]:
        assert tuple(shapes[f"decoder.layers.0.{name}"].shape) == shape, name
    for name, shape in only_rank["other"]:
        assert tuple(shapes[name].shape) == shape, name
    expert = 3 * TINY.hidden_size * TINY.moe_ffn_hidden_size
    assert total - active == TINY.num_layers * (TINY.num_experts - TINY.router_topk) * expert


def test_30b_counts_match_transformers_on_meta():
    with torch.device("meta"):
        hf = Qwen3OmniMoeThinkerTextModel(hf_text_config(QWEN3_OMNI_30B))
    lm_head = QWEN3_OMNI_30B.vocab_size * QWEN3_OMNI_30B.hidden_size
    hf_total = sum(p.numel() for p in hf.parameters()) + lm_head
    total, active = count_parameters(QWEN3_OMNI_30B)
    assert total == hf_total
    assert 30.3e9 < total < 30.7e9
    assert 3.2e9 < active < 3.45e9


def test_describe_shards_layout():
    layout = ParallelConfig(tp=2, pp=4, ep=8)
    report = describe_shards(QWEN3_OMNI_30B, layout)
    assert len(report) == 4 * 2 * 8
    first, last = report[0], report[-1]
    shapes = dict(first["layer"])
    assert shapes["self_attention.linear_qkv.weight"] == ((32 + 2 * 4) * 128 // 2, 2048)
    assert shapes["self_attention.linear_proj.weight"] == (2048, 32 * 128 // 2)
    assert sum(name.endswith("linear_fc1.weight") for name in shapes) == 128 // 8
    assert first["layers"] == 12
    assert [n for n, _ in first["other"]] == ["embedding.word_embeddings.weight"]
    assert [n for n, _ in last["other"]] == ["decoder.final_layernorm.weight", "output_layer.weight"]
    with pytest.raises(ValueError):
        describe_shards(QWEN3_OMNI_30B, ParallelConfig(tp=8))  # 4 query groups over 8 ranks


def test_chunked_loss_equals_megatrons_cross_entropy(megatron_world1, monkeypatch):
    """The tp=1 loss (models.common.cross_entropy, eager over token chunks on CPU) against megatron's
    vocab-parallel one, for the value and the gradient of the logits, with chunks smaller than the batch."""
    from megatron.core import tensor_parallel

    import omni_train.models.common.cross_entropy as ce

    model = build_thinker_lm(TINY, ParallelConfig(), device="cpu", params_dtype=torch.float32)
    monkeypatch.setattr(ce, "_EAGER_CHUNK_BYTES", 16 * TINY.vocab_size * 5)  # 5 tokens per chunk
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(7, 3, TINY.vocab_size, generator=g, requires_grad=True)  # [s, b, v]
    labels = torch.randint(0, TINY.vocab_size, (3, 7), generator=g)  # [b, s]
    loss = model.compute_language_model_loss(labels, logits)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = tensor_parallel.vocab_parallel_cross_entropy(ref_logits, labels.t().contiguous()).t()
    assert loss.shape == (3, 7)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    weights = torch.rand(3, 7, generator=g)
    (grad,) = torch.autograd.grad((loss * weights).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), ref_logits)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
