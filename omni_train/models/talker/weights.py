"""Talker and Code2Wav weights: Hugging Face on-disk names <-> ours, one declarative table per module,
read both ways (the import / export table of ``omni-convert``).

HF side: the released safetensors layout (``talker.model.layers.N.*`` with one tensor per expert,
``talker.code_predictor.*``, ``code2wav.*``), i.e. what ``save_pretrained`` writes. Our side: the
``Talker`` module's state dict, unsharded (tp = ep = pp = 1): ``backbone.*`` (megatron GPTModel names),
``text_projection.*``, ``hidden_projection.*``, ``code_predictor.*``; and the ``Code2Wav`` wrapper's
``model.*``. Rows are the Thinker bridge's (``models/thinker/bridge.py``: kind "copy", "qkv" (megatron's
per-group fused QKV) or "gated_mlp" ([gate; up] fused fc1)); ``bridge.tp_slice`` cuts a row's tensor for
a tensor-parallel rank. Placeholders: ``{layer}`` backbone layer, ``{expert}`` routed expert,
``{cp_layer}`` code predictor layer, ``{group}`` residual codebook (0 .. G-2).
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

import torch

from omni_train.models.talker.config import TalkerConfig
from omni_train.models.thinker.bridge import Row, to_hf, to_megatron

_HL = "talker.model.layers.{layer}"
_ML = "backbone.decoder.layers.{layer}"
_ME = "mlp.experts.local_experts.{expert}"
_H, _V, _D = ("hidden",), ("codec_vocab",), ("head_dim",)

BACKBONE: List[Row] = [
    Row("backbone.embedding.word_embeddings.weight", ("talker.model.codec_embedding.weight",), "copy", (_V + _H,)),
    Row("backbone.decoder.final_layernorm.weight", ("talker.model.norm.weight",), "copy", (_H,)),
    Row("backbone.output_layer.weight", ("talker.codec_head.weight",), "copy", (_V + _H,)),
    Row(f"{_ML}.input_layernorm.weight", (f"{_HL}.input_layernorm.weight",), "copy", (_H,)),
    Row(f"{_ML}.self_attention.linear_qkv.weight", tuple(f"{_HL}.self_attn.{p}_proj.weight" for p in "qkv"), "qkv",
        (("q_rows",) + _H, ("kv_rows",) + _H, ("kv_rows",) + _H)),
    Row(f"{_ML}.self_attention.q_layernorm.weight", (f"{_HL}.self_attn.q_norm.weight",), "copy", (_D,)),
    Row(f"{_ML}.self_attention.k_layernorm.weight", (f"{_HL}.self_attn.k_norm.weight",), "copy", (_D,)),
    Row(f"{_ML}.self_attention.linear_proj.weight", (f"{_HL}.self_attn.o_proj.weight",), "copy", (_H + ("q_rows",),)),
    Row(f"{_ML}.pre_mlp_layernorm.weight", (f"{_HL}.post_attention_layernorm.weight",), "copy", (_H,)),
    Row(f"{_ML}.mlp.router.weight", (f"{_HL}.mlp.gate.weight",), "copy", (("experts",) + _H,)),
    Row(f"{_ML}.{_ME}.linear_fc1.weight",
        (f"{_HL}.mlp.experts.{{expert}}.gate_proj.weight", f"{_HL}.mlp.experts.{{expert}}.up_proj.weight"),
        "gated_mlp", (("ffn",) + _H, ("ffn",) + _H)),
    Row(f"{_ML}.{_ME}.linear_fc2.weight", (f"{_HL}.mlp.experts.{{expert}}.down_proj.weight",), "copy",
        (_H + ("ffn",),)),
    Row(f"{_ML}.mlp.shared_experts.linear_fc1.weight",
        (f"{_HL}.mlp.shared_expert.gate_proj.weight", f"{_HL}.mlp.shared_expert.up_proj.weight"),
        "gated_mlp", (("shared_ffn",) + _H, ("shared_ffn",) + _H)),
    Row(f"{_ML}.mlp.shared_experts.linear_fc2.weight", (f"{_HL}.mlp.shared_expert.down_proj.weight",), "copy",
        (_H + ("shared_ffn",),)),
    Row(f"{_ML}.mlp.shared_experts.gate_weight", (f"{_HL}.mlp.shared_expert_gate.weight",), "copy", (("one",) + _H,)),
]

PROJECTIONS: List[Row] = [
    Row(f"{name}.{fc}.{p}", (f"talker.{name}.{fc}.{p}",), "copy", shape)
    for name in ("text_projection", "hidden_projection")
    for fc, p, shape in (("linear_fc1", "weight", (("proj_ffn", "thinker_hidden"),)),
                         ("linear_fc1", "bias", (("proj_ffn",),)),
                         ("linear_fc2", "weight", (_H + ("proj_ffn",),)),
                         ("linear_fc2", "bias", (_H,)))
]

_CL, _HC = "code_predictor.layers.{cp_layer}", "talker.code_predictor.model.layers.{cp_layer}"
CODE_PREDICTOR: List[Row] = [
    Row(f"{_CL}.{name}", (f"{_HC}.{name}",), "copy", shape)
    for name, shape in (
        ("input_layernorm.weight", (("cp_hidden",),)),
        ("self_attn.q_proj.weight", (("cp_q_rows", "cp_hidden"),)),
        ("self_attn.k_proj.weight", (("cp_kv_rows", "cp_hidden"),)),
        ("self_attn.v_proj.weight", (("cp_kv_rows", "cp_hidden"),)),
        ("self_attn.o_proj.weight", (("cp_hidden", "cp_q_rows"),)),
        ("self_attn.q_norm.weight", (("cp_head_dim",),)),
        ("self_attn.k_norm.weight", (("cp_head_dim",),)),
        ("post_attention_layernorm.weight", (("cp_hidden",),)),
        ("mlp.gate_proj.weight", (("cp_ffn", "cp_hidden"),)),
        ("mlp.up_proj.weight", (("cp_ffn", "cp_hidden"),)),
        ("mlp.down_proj.weight", (("cp_hidden", "cp_ffn"),)),
    )
] + [
    Row("code_predictor.norm.weight", ("talker.code_predictor.model.norm.weight",), "copy", (("cp_hidden",),)),
    Row("code_predictor.codec_embedding.{group}.weight",
        ("talker.code_predictor.model.codec_embedding.{group}.weight",), "copy", (("codebook", "cp_hidden"),)),
    Row("code_predictor.lm_head.{group}.weight", ("talker.code_predictor.lm_head.{group}.weight",), "copy",
        (("codebook", "cp_hidden"),)),
]

TALKER: List[Row] = BACKBONE + PROJECTIONS + CODE_PREDICTOR

# Code2Wav is transformers' module carried unchanged: a prefix, not a table of rows.
CODE2WAV_PREFIXES = ("code2wav.", "model.")  # (HF on-disk, ours in the Code2Wav wrapper)


def _ranges(cfg: TalkerConfig) -> Dict[str, range]:
    return dict(layer=range(cfg.num_layers), expert=range(cfg.num_experts),
                cp_layer=range(cfg.code_predictor.num_layers), group=range(cfg.num_code_groups - 1))


def _expand(row: Row, cfg: TalkerConfig) -> Iterator[Tuple[str, Tuple[str, ...]]]:
    """Every concrete (our name, HF names) pair one row stands for."""
    keys = [k for k in ("layer", "expert", "cp_layer", "group") if "{" + k + "}" in row.megatron]
    ranges = _ranges(cfg)
    combos = [{}]
    for key in keys:
        combos = [dict(c, **{key: i}) for c in combos for i in ranges[key]]
    for fill in combos:
        yield row.megatron.format(**fill), tuple(h.format(**fill) for h in row.hf)


def expand_table(cfg: TalkerConfig) -> Iterator[Tuple[Row, str, Tuple[str, ...]]]:
    """(row, our unsharded name, HF names) for every Talker tensor, table order."""
    for row in TALKER:
        for ours, hf in _expand(row, cfg):
            yield row, ours, hf


def hf_to_talker(hf_state: Dict[str, torch.Tensor], cfg: TalkerConfig) -> Dict[str, torch.Tensor]:
    """HF on-disk Talker tensors -> our unsharded Talker state dict (other HF keys are ignored)."""
    return {ours: to_megatron(row, [hf_state[n] for n in hf], cfg) for row, ours, hf in expand_table(cfg)}


def talker_to_hf(state: Dict[str, torch.Tensor], cfg: TalkerConfig) -> Dict[str, torch.Tensor]:
    """Our unsharded Talker state dict -> HF on-disk Talker tensors."""
    out = {}
    for row, ours, hf in expand_table(cfg):
        out.update(zip(hf, to_hf(row, state[ours], cfg)))
    return out


def hf_to_code2wav(hf_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    hf, ours = CODE2WAV_PREFIXES
    return {ours + k[len(hf):]: v for k, v in hf_state.items() if k.startswith(hf)}


def code2wav_to_hf(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    hf, ours = CODE2WAV_PREFIXES
    return {hf + k[len(ours):]: v for k, v in state.items() if k.startswith(ours)}


def _sizes(cfg: TalkerConfig) -> Dict[str, int]:
    cp = cfg.code_predictor
    return dict(
        hidden=cfg.hidden_size, codec_vocab=cfg.codec_vocab_size, head_dim=cfg.head_dim,
        ffn=cfg.moe_ffn_hidden_size, shared_ffn=cfg.shared_expert_ffn_hidden_size, experts=cfg.num_experts,
        q_rows=cfg.num_attention_heads * cfg.head_dim, kv_rows=cfg.num_query_groups * cfg.head_dim, one=1,
        thinker_hidden=cfg.thinker_hidden_size, proj_ffn=cfg.projection_ffn_hidden_size,
        cp_hidden=cp.hidden_size, cp_q_rows=cp.num_attention_heads * cp.head_dim,
        cp_kv_rows=cp.num_query_groups * cp.head_dim, cp_head_dim=cp.head_dim, cp_ffn=cp.ffn_hidden_size,
        codebook=cp.codebook_size,
    )


def hf_shapes(row: Row, cfg: TalkerConfig) -> List[Tuple[int, ...]]:
    """The shape each of the row's HF tensors must have for these sizes."""
    sizes = _sizes(cfg)
    return [tuple(sizes[n] for n in names) for names in row.shapes]
