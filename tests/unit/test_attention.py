"""SDPAttention (torch SDPA core attention) vs megatron's local DotProductAttention, world size 1;
the context-parallel input split."""

import pytest
import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from omni_train.models.common.attention import SDPAttention
from omni_train.parallel.context_parallel import split_for_context_parallel, zigzag_chunks

HEADS, GROUPS, HEAD_DIM = 4, 2, 16


def config(**overrides) -> TransformerConfig:
    settings = dict(
        num_layers=1, hidden_size=32, num_attention_heads=HEADS, num_query_groups=GROUPS,
        kv_channels=HEAD_DIM, attention_dropout=0.0, hidden_dropout=0.0, masked_softmax_fusion=False,
        use_cpu_initialization=True, params_dtype=torch.float32,
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


def build(cls, cfg, **kwargs):
    return cls(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self", **kwargs)


def qkv(seq: int, batch: int, groups: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(seq, batch, HEADS, HEAD_DIM, generator=gen, requires_grad=True)
    k = torch.randn(seq, batch, groups, HEAD_DIM, generator=gen, requires_grad=True)
    v = torch.randn(seq, batch, groups, HEAD_DIM, generator=gen, requires_grad=True)
    return q, k, v


def run(module, q, k, v, grad_out):
    out = module(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, grads


@pytest.mark.parametrize("groups", [GROUPS, HEADS], ids=["gqa", "mha"])
@pytest.mark.parametrize("softmax_scale", [None, 0.3])
def test_matches_megatron_dot_product_attention(megatron_world1, groups, softmax_scale):
    cfg = config(num_query_groups=groups)
    ours = build(SDPAttention, cfg, softmax_scale=softmax_scale)
    reference = build(DotProductAttention, cfg, softmax_scale=softmax_scale)
    q, k, v = qkv(seq=12, batch=3, groups=groups)
    grad_out = torch.randn(12, 3, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(1))
    out, grads = run(ours, q, k, v, grad_out)
    ref_out, ref_grads = run(reference, q, k, v, grad_out)
    assert out.shape == (12, 3, HEADS * HEAD_DIM)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"d{name}")


def test_is_causal(megatron_world1):
    """Changing a later key/value leaves earlier outputs unchanged (a test that can fail: it would with
    a full mask)."""
    attn = build(SDPAttention, config())
    q, k, v = (t.detach() for t in qkv(seq=8, batch=1, groups=GROUPS))
    out = attn(q, k, v, None)
    k2, v2 = k.clone(), v.clone()
    k2[5:] += 1.0
    v2[5:] -= 1.0
    out2 = attn(q, k2, v2, None)
    torch.testing.assert_close(out2[:5], out[:5], rtol=0, atol=0)
    assert not torch.allclose(out2[5:], out[5:])


def test_refuses_what_it_does_not_support(megatron_world1):
    with pytest.raises(NotImplementedError, match="dropout"):
        build(SDPAttention, config(attention_dropout=0.1))
    with pytest.raises(NotImplementedError, match="causal"):
        SDPAttention(config(), 1, AttnMaskType.padding, "self")
    attn = build(SDPAttention, config())
    q, k, v = qkv(seq=4, batch=1, groups=GROUPS)
    with pytest.raises(NotImplementedError, match="thd"):
        attn(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
    with pytest.raises(NotImplementedError, match="attention_bias"):
        attn(q, k, v, None, attention_bias=torch.zeros(1))


def per_document_causal_attention(q, k, v, cu_seqlens):
    """The reference for packed rows: each document (``cu_seqlens`` over the rows laid end to end) through
    plain causal SDPA on its own slice, K/V heads repeated for their query group; [s, b, np * hn]."""
    sq, b = q.shape[:2]
    flat = [x.transpose(0, 1).reshape(b * sq, *x.shape[2:]) for x in (q, k, v)]  # [b * s, heads, hn]
    outputs = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        dq, dk, dv = (x[start:end].transpose(0, 1) for x in flat)  # [heads, n, hn]
        dk, dv = (x.repeat_interleave(HEADS // x.shape[0], dim=0) for x in (dk, dv))
        out = torch.nn.functional.scaled_dot_product_attention(dq, dk, dv, is_causal=True)
        outputs.append(out.transpose(0, 1).reshape(end - start, -1))
    return torch.cat(outputs).view(b, sq, -1).transpose(0, 1)


@pytest.mark.parametrize("groups", [GROUPS, HEADS], ids=["gqa", "mha"])
def test_packed_documents_equal_a_loop_over_documents(megatron_world1, groups):
    """Packed rows given as document boundaries (PackedSeqParams, as data.packing's cu_seqlens), run as
    SDPAttention runs them on CPU: outputs and q/k/v gradients equal each document attended alone
    (the padding at a row's end is a document of its own). The dense document mask gives the same.
    On CUDA the boundaries drive varlen flash attention instead: benchmarks/varlen_check.py on the GPU."""
    from omni_train.models.common.attention import document_attention, document_attention_mask, segment_attention_mask

    document_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, -1], [0, 0, 0, 0, 0, 1, 1, 1, -1, -1]])
    cu = torch.tensor([0, 3, 7, 9, 10, 15, 18, 20], dtype=torch.int32)
    assert torch.equal(segment_attention_mask(cu, 2, 10), document_attention_mask(document_ids))
    args = document_attention({"document_ids": document_ids, "cu_seqlens": cu, "max_seqlen": 5})
    packed = args["packed_seq_params"]
    assert packed.max_seqlen_q == 5 and packed.cu_seqlens_q is cu and args["attention_mask"] is None
    attn = build(SDPAttention, config(num_query_groups=groups))
    q, k, v = qkv(seq=10, batch=2, groups=groups)
    grad_out = torch.randn(10, 2, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(3))

    def with_grads(out):
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    reference = with_grads(per_document_causal_attention(q, k, v, cu))
    packed_path = with_grads(attn(q, k, v, None, packed_seq_params=packed))
    mask_path = with_grads(attn(q, k, v, document_attention_mask(document_ids)))
    for name, want, got, masked in zip(["out", "dq", "dk", "dv"], reference, packed_path, mask_path):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"packed {name}")
        torch.testing.assert_close(masked, want, rtol=1e-5, atol=1e-6, msg=f"mask {name}")
    assert document_attention({"input_ids": q}) == {"attention_mask": None}  # one document a row: causal


@pytest.mark.parametrize("groups", [GROUPS, HEADS], ids=["gqa", "mha"])
def test_document_mask_matches_megatron(megatron_world1, groups):
    """Packed sequences: the block-diagonal causal mask of omni_train.data.shards, same as megatron's
    DotProductAttention given that mask; and a document never sees another document."""
    from omni_train.models.common.attention import document_attention_mask

    document_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, -1], [0, 0, 0, 0, 0, 1, 1, 1, -1, -1]])
    mask = document_attention_mask(document_ids)
    cfg = config(num_query_groups=groups)
    q, k, v = qkv(seq=10, batch=2, groups=groups)
    grad_out = torch.randn(10, 2, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(2))
    outs = {}
    for cls in (SDPAttention, DotProductAttention):
        module = build(cls, cfg)
        out = module(q, k, v, mask, attn_mask_type=AttnMaskType.causal)
        outs[cls] = (out, torch.autograd.grad(out, (q, k, v), grad_out))
    torch.testing.assert_close(outs[SDPAttention][0], outs[DotProductAttention][0], rtol=1e-5, atol=1e-5)
    for got, want in zip(outs[SDPAttention][1], outs[DotProductAttention][1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Document 1 of row 0 (positions 3..6) alone gives the same outputs as inside the pack.
    alone = build(SDPAttention, cfg)(q[3:7, :1].detach(), k[3:7, :1].detach(), v[3:7, :1].detach(), None)
    torch.testing.assert_close(outs[SDPAttention][0][3:7, :1], alone, rtol=1e-5, atol=1e-6)


def test_split_for_context_parallel_zigzag():
    seq = 8  # cp=2: 4 chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    ids = torch.arange(2 * seq).view(2, seq)
    positions = torch.arange(seq).expand(3, 2, seq)
    batch = dict(input_ids=ids, labels=ids + 100, loss_mask=torch.ones(2, seq), position_ids=positions,
                 num_tokens=16)
    rank0 = split_for_context_parallel(batch, cp_rank=0, cp_size=2)
    rank1 = split_for_context_parallel(batch, cp_rank=1, cp_size=2)
    assert rank0["input_ids"][0].tolist() == [0, 1, 6, 7]
    assert rank1["input_ids"][0].tolist() == [2, 3, 4, 5]
    assert rank1["labels"][1].tolist() == [110, 111, 112, 113]
    assert rank0["loss_mask"].shape == (2, 4)
    assert rank0["position_ids"] is positions and rank0["num_tokens"] == 16
    assert split_for_context_parallel(batch, 0, 1) is batch
    assert [zigzag_chunks(r, 4) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    with pytest.raises(ValueError, match="divisible"):
        split_for_context_parallel(dict(input_ids=torch.zeros(1, 6)), 0, 2)
