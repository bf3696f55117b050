"""Thinker LM weights: HF Qwen3-Omni on-disk names <-> megatron GPTModel names, one table read both ways.

HF side: the released safetensors layout (``thinker.model.layers.N.*``, one tensor per expert
``mlp.experts.{i}.{gate,up,down}_proj.weight``), i.e. what ``save_pretrained`` writes, not the fused
in-memory experts. Megatron side: unsharded names (tp = ep = pp = 1); sharding is megatron's business.

Each row is (megatron template, HF templates, transform); ``{layer}`` and ``{expert}`` are filled in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from omni_train.config.schema import ModelConfig

_L = "thinker.model.layers.{layer}"
_M = "decoder.layers.{layer}"
_E = "mlp.experts.local_experts.{expert}"


@dataclass(frozen=True)
class Row:
    megatron: str
    hf: Tuple[str, ...]
    kind: str  # "copy" | "qkv" | "gated_mlp"


TABLE: List[Row] = [
    Row("embedding.word_embeddings.weight", ("thinker.model.embed_tokens.weight",), "copy"),
    Row("decoder.final_layernorm.weight", ("thinker.model.norm.weight",), "copy"),
    Row("output_layer.weight", ("thinker.lm_head.weight",), "copy"),
    Row(f"{_M}.input_layernorm.weight", (f"{_L}.input_layernorm.weight",), "copy"),
    Row(
        f"{_M}.self_attention.linear_qkv.weight",
        tuple(f"{_L}.self_attn.{p}_proj.weight" for p in "qkv"),
        "qkv",
    ),
    Row(f"{_M}.self_attention.q_layernorm.weight", (f"{_L}.self_attn.q_norm.weight",), "copy"),
    Row(f"{_M}.self_attention.k_layernorm.weight", (f"{_L}.self_attn.k_norm.weight",), "copy"),
    Row(f"{_M}.self_attention.linear_proj.weight", (f"{_L}.self_attn.o_proj.weight",), "copy"),
    Row(f"{_M}.pre_mlp_layernorm.weight", (f"{_L}.post_attention_layernorm.weight",), "copy"),
    Row(f"{_M}.mlp.router.weight", (f"{_L}.mlp.gate.weight",), "copy"),
    Row(
        f"{_M}.{_E}.linear_fc1.weight",
        (f"{_L}.mlp.experts.{{expert}}.gate_proj.weight", f"{_L}.mlp.experts.{{expert}}.up_proj.weight"),
        "gated_mlp",
    ),
    Row(f"{_M}.{_E}.linear_fc2.weight", (f"{_L}.mlp.experts.{{expert}}.down_proj.weight",), "copy"),
]


def _merge_qkv(q, k, v, cfg: ModelConfig) -> torch.Tensor:
    """Megatron's fused QKV: per query group, [its query heads, its key head, its value head]."""
    groups, d = cfg.num_query_groups, cfg.head_dim
    hidden = q.shape[-1]
    q = q.reshape(groups, -1, hidden)
    k = k.reshape(groups, d, hidden)
    v = v.reshape(groups, d, hidden)
    return torch.cat((q, k, v), dim=1).reshape(-1, hidden)


def _split_qkv(qkv, cfg: ModelConfig):
    groups, d = cfg.num_query_groups, cfg.head_dim
    q_rows = cfg.num_attention_heads // groups * d
    per_group = qkv.reshape(groups, q_rows + 2 * d, -1)
    q, k, v = per_group.split((q_rows, d, d), dim=1)
    hidden = qkv.shape[-1]
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def _to_megatron(row: Row, tensors, cfg: ModelConfig) -> torch.Tensor:
    if row.kind == "qkv":
        return _merge_qkv(*tensors, cfg)
    if row.kind == "gated_mlp":
        return torch.cat(tensors, dim=0)  # fc1 = [gate; up]
    return tensors[0]


def _to_hf(row: Row, tensor: torch.Tensor, cfg: ModelConfig):
    if row.kind == "qkv":
        return _split_qkv(tensor, cfg)
    if row.kind == "gated_mlp":
        return tensor.chunk(2, dim=0)
    return (tensor,)


def _expand(row: Row, cfg: ModelConfig):
    """Every concrete (megatron name, HF names) pair one table row stands for."""
    if "{layer}" not in row.megatron:
        yield row.megatron, row.hf
        return
    experts = range(cfg.num_experts) if "{expert}" in row.megatron else [None]
    for layer in range(cfg.num_layers):
        for expert in experts:
            fill = dict(layer=layer, expert=expert)
            yield row.megatron.format(**fill), tuple(h.format(**fill) for h in row.hf)


def hf_to_megatron(hf_state: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """HF on-disk Thinker LM tensors -> unsharded megatron state dict (other HF keys are ignored)."""
    out = {}
    for row in TABLE:
        for mg_name, hf_names in _expand(row, cfg):
            out[mg_name] = _to_megatron(row, [hf_state[n] for n in hf_names], cfg)
    return out


def megatron_to_hf(mg_state: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Unsharded megatron state dict -> HF on-disk Thinker LM tensors."""
    out = {}
    for row in TABLE:
        for mg_name, hf_names in _expand(row, cfg):
            for name, tensor in zip(hf_names, _to_hf(row, mg_state[mg_name], cfg)):
                out[name] = tensor.contiguous()
    return out
