"""Core attention on torch's scaled_dot_product_attention, with all-gather K/V context parallelism.

``SDPAttention`` is a drop-in for megatron-core 0.16.1's local ``DotProductAttention`` (same
constructor and forward), for machines without Transformer Engine:
  * causal attention through ``F.scaled_dot_product_attention``: flash / memory-efficient kernels on
    GPU (no S x S score matrix), the exact math kernel on CPU; GQA without repeating K/V.
  * context parallelism (cp > 1): each CP rank holds sequence chunks r and 2*cp-1-r (megatron's
    load-balanced layout, ``omni_train.parallel.context_parallel``). K and V are all-gathered over the
    CP group (backward: reduce-scatter of their gradients back to the owning rank), put back in global
    order, and each local query chunk c attends to the global keys 0 .. (c+1)*L - 1 with a causal mask
    aligned to the lower right (query i of chunk c sees keys <= c*L + i).

Tensors: query [sq, b, np, hn], key/value [sk, b, ng, hn] (np, ng: heads / query groups of this
tensor-parallel rank) -> output [sq, b, np * hn].
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.nn.attention.bias import causal_lower_right

from omni_train.compat.transformers_attention import uses_flash_kernel, varlen_kernel
from omni_train.parallel.context_parallel import slice_for_cp_rank, zigzag_chunks


class SDPAttention(MegatronModule):
    """Causal self-attention core (no dropout, no padding masks, no packed sequences)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        # cp_comm_type (megatron's default "p2p" ring) is ignored: K/V are always all-gathered.
        _check_supported(config, attn_mask_type, attention_type, attention_dropout)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        # Heads per tensor-parallel rank are read off the q/k/v shapes; only the CP group is needed.
        self.cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if self.cp_group is None and config.context_parallel_size > 1:
            self.cp_group = parallel_state.get_context_parallel_group()
        self.softmax_scale = (
            1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else softmax_scale
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        cp = self.cp_group is not None and self.cp_group.size() > 1
        if mask_type == AttnMaskType.no_mask:
            # megatron's static inference (rollout/megatron.py) after the prompt: the queries are the newest
            # token(s), the keys the whole KV cache; unmasked only for one query token (it sees every key)
            if cp or packed_seq_params is not None or (attention_mask is None and query.shape[0] != 1):
                raise NotImplementedError("SDPAttention: no_mask only for one decoded token or with an explicit "
                                          "attention_mask, at cp = 1, unpacked")
        elif mask_type != AttnMaskType.causal:
            raise NotImplementedError(f"SDPAttention computes causal attention only, got {mask_type}")
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention does not support attention_bias")
        if packed_seq_params is not None:
            return self._attend_packed(query, key, value, packed_seq_params, cp)
        sq, b = query.shape[:2]
        # [s, b, heads, hn] -> [b, heads, s, hn], the layout SDPA kernels take.
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if attention_mask is not None:
            context = self._attend_masked(q, key, value, attention_mask, cp)
        elif not cp:
            context = self._attend(q, k, v, is_causal=mask_type == AttnMaskType.causal)
        else:
            context = self._attend_context_parallel(q, key, value)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _attend_packed(self, query, key, value, packed: PackedSeqParams, cp: bool) -> torch.Tensor:
        """Causal attention within the documents of packed rows: ``packed.cu_seqlens_q`` (= ``_kv``) are
        the documents' boundaries over the batch's rows laid end to end (row r starts at r * s; its padding,
        if any, is a document of its own), ``packed.max_seqlen_q`` the longest. On CUDA in bf16/fp16 one
        call of torch's varlen flash attention, with no [s, s] mask and no work outside the documents;
        elsewhere the equivalent boolean mask and SDPA (``_attend_masked``)."""
        if packed.qkv_format != "sbhd":
            raise NotImplementedError(f"SDPAttention: packed sequences in {packed.qkv_format!r} layout")
        if packed.cu_seqlens_kv is not None and packed.cu_seqlens_kv is not packed.cu_seqlens_q:
            raise NotImplementedError("SDPAttention: packed self-attention with cu_seqlens_q == cu_seqlens_kv")
        if cp:
            raise NotImplementedError("SDPAttention: packed sequences under context parallelism "
                                      "(pass the document attention mask)")
        sq, b = query.shape[:2]
        cu = packed.cu_seqlens_q
        if uses_flash_kernel(query):
            flat = [x.transpose(0, 1).reshape(b * sq, *x.shape[2:]) for x in (query, key, value)]
            longest = int(packed.max_seqlen_q) if packed.max_seqlen_q is not None else sq
            out = causal_varlen_attention(*flat, cu, longest, self.softmax_scale)  # [b * s, np, hn]
            return out.view(b, sq, -1).transpose(0, 1).contiguous()
        mask = segment_attention_mask(cu, b, sq)
        q = query.permute(1, 2, 0, 3)
        return self._attend_masked(q, key, value, mask, cp=False).permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _attend(self, q, k, v, is_causal=False, attn_mask=None) -> torch.Tensor:
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.softmax_scale,
            enable_gqa=gqa,
        )

    def _attend_masked(self, q, key, value, attention_mask, cp: bool) -> torch.Tensor:
        """Packed documents: ``attention_mask`` [b, 1, S, S] (full sequence, True = not attended,
        megatron's convention) already holds causality and document boundaries. Under context
        parallelism the queries are this rank's zigzag chunks and the keys the whole gathered sequence."""
        if cp:
            key, value = gather_kv_in_global_order(key, value, self.cp_group)
            attention_mask = slice_for_cp_rank(attention_mask, 2, self.cp_group.rank(), self.cp_group.size())
        k, v = (x.permute(1, 2, 0, 3) for x in (key, value))
        return self._attend(q, k, v, attn_mask=~attention_mask)

    def _attend_context_parallel(self, q, key, value) -> torch.Tensor:
        """q [b, np, 2L, hn] holds global chunks (r, 2cp-1-r); key/value [2L, b, ng, hn] likewise."""
        cp_size, cp_rank = self.cp_group.size(), self.cp_group.rank()
        k_global, v_global = gather_kv_in_global_order(key, value, self.cp_group)
        chunk = q.shape[2] // 2
        outputs = []
        for local, global_chunk in enumerate(zigzag_chunks(cp_rank, cp_size)):
            q_chunk = q[:, :, local * chunk : (local + 1) * chunk]
            visible = (global_chunk + 1) * chunk  # keys 0 .. end of this chunk
            k = k_global[:visible].permute(1, 2, 0, 3)
            v = v_global[:visible].permute(1, 2, 0, 3)
            outputs.append(self._attend(q_chunk, k, v, attn_mask=causal_lower_right(chunk, visible)))
        return torch.cat(outputs, dim=2)


def gather_kv_in_global_order(key: torch.Tensor, value: torch.Tensor, cp_group):
    """All-gather key and value [2L, b, ng, hn] (zigzag chunks of this rank) over ``cp_group`` in one
    collective; return both as [2L * cp, b, ng, hn] in global sequence order. Backward reduce-scatters
    (sums) the gradients back to the rank that owns each chunk."""
    cp_size = cp_group.size()
    groups = key.shape[2]
    kv = torch.cat([key, value], dim=2)
    gathered = gather_from_sequence_parallel_region(kv, tensor_parallel_output_grad=True, group=cp_group)
    # rank-major [cp, 2, L, ...]: rank r holds global chunks r (slot 0) and 2cp-1-r (slot 1).
    gathered = gathered.view(cp_size, 2, -1, *gathered.shape[1:])
    ordered = torch.cat([gathered[:, 0], gathered[:, 1].flip(0)], dim=0)  # [2cp, L, ...]
    ordered = ordered.flatten(0, 1)
    return ordered[:, :, :groups], ordered[:, :, groups:]


def _check_supported(config, attn_mask_type, attention_type, attention_dropout):
    dropout = config.attention_dropout if attention_dropout is None else attention_dropout
    if dropout:
        raise NotImplementedError(f"SDPAttention: attention dropout {dropout} > 0 is not supported")
    if attn_mask_type != AttnMaskType.causal:
        raise NotImplementedError(f"SDPAttention computes causal attention only, got {attn_mask_type}")
    if attention_type != "self":
        raise NotImplementedError(f"SDPAttention supports self-attention only, got {attention_type!r}")
    if config.softmax_type != "vanilla":
        raise NotImplementedError(f"SDPAttention: softmax_type {config.softmax_type!r} is not supported")
    if config.apply_query_key_layer_scaling:
        raise NotImplementedError("SDPAttention: apply_query_key_layer_scaling is not supported")
    if config.window_size is not None:
        raise NotImplementedError("SDPAttention: sliding-window attention is not supported")


def causal_varlen_attention(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float) -> torch.Tensor:
    """torch's varlen flash attention, causal within each segment: q [tokens, np, hn], k/v [tokens, ng, hn]
    (GQA: ng divides np) -> [tokens, np, hn]."""
    varlen_attn, params = varlen_kernel()
    cu = cu_seqlens.to(torch.int32)
    extra = {}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:  # this torch's kernel takes equal head counts: repeat each K/V head for its query group
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    if "window_size" in params:
        extra["window_size"] = (-1, 0)  # causal
    else:
        extra["is_causal"] = True
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale, **extra)


def segment_attention_mask(cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """``document_attention_mask`` of rows whose segments are ``cu_seqlens`` (over the rows end to end)."""
    positions = torch.arange(batch * length, device=cu_seqlens.device)
    segment = torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)
    return document_attention_mask(segment.view(batch, length))


def document_attention(batch: dict) -> dict:
    """The model's attention keyword arguments for a micro-batch. A packed batch (``document_ids``,
    data.batch.ShardBatch) attends within its documents: at cp=1 through their boundaries (``cu_seqlens``,
    ``max_seqlen``) as megatron ``PackedSeqParams``, with no [B, 1, L, L] mask (varlen flash attention on
    CUDA); under context parallelism through the documents' boolean mask, built from the full-sequence
    ``document_ids`` (the boundaries are then unused). Rows that are one document each (no
    ``document_ids``): plain causal attention."""
    documents = batch.get("document_ids")
    if documents is None:
        return {"attention_mask": None}
    if parallel_state.get_context_parallel_world_size() > 1:
        return {"attention_mask": document_attention_mask(documents)}
    # A packed batch without its boundaries would silently fall back to the dense mask (1 GiB per 32k row).
    missing = [k for k in ("cu_seqlens", "max_seqlen") if batch.get(k) is None]
    if missing:
        raise KeyError(f"packed batch (document_ids) without {missing}: see omni_train/data/batch.py")
    cu, longest = batch["cu_seqlens"], batch["max_seqlen"]
    return {"attention_mask": None,
            "packed_seq_params": PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                 max_seqlen_q=longest, max_seqlen_kv=longest)}


def document_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool, True where attention is NOT allowed (megatron's convention): a token sees
    earlier tokens of its own document only. Padding (document id -1) sees earlier padding."""
    same = document_ids[:, :, None] == document_ids[:, None, :]
    length = document_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    return ~(same & causal)[:, None]
