"""Thinker LM weights: HF Qwen3-Omni on-disk names <-> megatron GPTModel names, one table read both ways.

HF side: the released safetensors layout (``thinker.model.layers.N.*``, one tensor per expert
``mlp.experts.{i}.{gate,up,down}_proj.weight``), i.e. what ``save_pretrained`` writes, not the fused
in-memory experts. Megatron side: unsharded names (tp = ep = pp = 1). ``tp_slice`` cuts an unsharded
tensor into a tensor-parallel rank's piece; layer (pp) and expert (ep) offsets are the caller's.

Each row is (megatron template, HF templates, transform, HF shapes); ``{layer}`` and ``{expert}`` are
filled in. HF shapes are written in the size names of ``_sizes`` so that import can name a mis-shaped
tensor before touching it. ``HF_PREFIXES`` renames the Qwen3-Omni names for a plain Qwen3-MoE LM or a
dense Qwen3 LM (Qwen3ForCausalLM). A row applies to MoE layers, dense layers, untied output layers or
always (``Row.applies``); tied embeddings have no ``lm_head`` tensor on disk (the output layer reads the
embedding: megatron's shared weight at pp = 1, a copy filled from ``embed_tokens`` on the last stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

import torch

from omni_train.config.schema import ThinkerConfig

_L = "thinker.model.layers.{layer}"
_M = "decoder.layers.{layer}"
_E = "mlp.experts.local_experts.{expert}"


@dataclass(frozen=True)
class Row:
    megatron: str
    hf: Tuple[str, ...]
    kind: str  # "copy" | "qkv" | "gated_mlp"
    shapes: Tuple[Tuple[str, ...], ...]  # one per HF tensor, in size names (see _sizes)
    applies: str = "always"  # "always" | "moe" | "dense" | "untied" (a separate lm_head)


_H, _V, _D, _F, _E_ = ("hidden",), ("vocab",), ("head_dim",), ("ffn",), ("experts",)
_DENSE_F = ("dense_ffn",)


TABLE: List[Row] = [
    Row("embedding.word_embeddings.weight", ("thinker.model.embed_tokens.weight",), "copy", (_V + _H,)),
    Row("decoder.final_layernorm.weight", ("thinker.model.norm.weight",), "copy", (_H,)),
    Row("output_layer.weight", ("thinker.lm_head.weight",), "copy", (_V + _H,), applies="untied"),
    Row(f"{_M}.input_layernorm.weight", (f"{_L}.input_layernorm.weight",), "copy", (_H,)),
    Row(
        f"{_M}.self_attention.linear_qkv.weight",
        tuple(f"{_L}.self_attn.{p}_proj.weight" for p in "qkv"),
        "qkv",
        (("q_rows",) + _H, ("kv_rows",) + _H, ("kv_rows",) + _H),
    ),
    Row(f"{_M}.self_attention.q_layernorm.weight", (f"{_L}.self_attn.q_norm.weight",), "copy", (_D,)),
    Row(f"{_M}.self_attention.k_layernorm.weight", (f"{_L}.self_attn.k_norm.weight",), "copy", (_D,)),
    Row(f"{_M}.self_attention.linear_proj.weight", (f"{_L}.self_attn.o_proj.weight",), "copy",
        (_H + ("q_rows",),)),
    Row(f"{_M}.pre_mlp_layernorm.weight", (f"{_L}.post_attention_layernorm.weight",), "copy", (_H,)),
    Row(f"{_M}.mlp.router.weight", (f"{_L}.mlp.gate.weight",), "copy", (_E_ + _H,), applies="moe"),
    Row(
        f"{_M}.{_E}.linear_fc1.weight",
        (f"{_L}.mlp.experts.{{expert}}.gate_proj.weight", f"{_L}.mlp.experts.{{expert}}.up_proj.weight"),
        "gated_mlp",
        (_F + _H, _F + _H),
        applies="moe",
    ),
    Row(f"{_M}.{_E}.linear_fc2.weight", (f"{_L}.mlp.experts.{{expert}}.down_proj.weight",), "copy",
        (_H + _F,), applies="moe"),
    # a dense layer's MLP: fc1 = [gate; up] like an expert's, split per half over tp
    Row(f"{_M}.mlp.linear_fc1.weight", (f"{_L}.mlp.gate_proj.weight", f"{_L}.mlp.up_proj.weight"), "gated_mlp",
        (_DENSE_F + _H, _DENSE_F + _H), applies="dense"),
    Row(f"{_M}.mlp.linear_fc2.weight", (f"{_L}.mlp.down_proj.weight",), "copy", (_H + _DENSE_F,),
        applies="dense"),
]
TIED_OUTPUT = ("output_layer.weight", "embedding.word_embeddings.weight")  # (tied name, what it reads)

# HF name prefixes per source layout: the table is written in the Qwen3-Omni names.
HF_PREFIXES: Dict[str, Dict[str, str]] = {
    "qwen3_omni_moe": {},
    "qwen3_moe": {"thinker.model.": "model.", "thinker.lm_head.": "lm_head."},
    "qwen3": {"thinker.model.": "model.", "thinker.lm_head.": "lm_head."},
}


def _applies(row: Row, cfg: ThinkerConfig) -> bool:
    dense = cfg.num_experts == 0
    return {"always": True, "moe": not dense, "dense": dense, "untied": not cfg.tie_word_embeddings}[row.applies]


def _merge_qkv(q, k, v, cfg: ThinkerConfig) -> torch.Tensor:
    """Megatron's fused QKV: per query group, [its query heads, its key head, its value head]."""
    groups, d = cfg.num_query_groups, cfg.head_dim
    hidden = q.shape[-1]
    q = q.reshape(groups, -1, hidden)
    k = k.reshape(groups, d, hidden)
    v = v.reshape(groups, d, hidden)
    return torch.cat((q, k, v), dim=1).reshape(-1, hidden)


def _split_qkv(qkv, cfg: ThinkerConfig):
    groups, d = cfg.num_query_groups, cfg.head_dim
    q_rows = cfg.num_attention_heads // groups * d
    per_group = qkv.reshape(groups, q_rows + 2 * d, -1)
    q, k, v = per_group.split((q_rows, d, d), dim=1)
    hidden = qkv.shape[-1]
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def _to_megatron(row: Row, tensors, cfg: ThinkerConfig) -> torch.Tensor:
    if row.kind == "qkv":
        return _merge_qkv(*tensors, cfg)
    if row.kind == "gated_mlp":
        return torch.cat(tensors, dim=0)  # fc1 = [gate; up]
    return tensors[0]


def _to_hf(row: Row, tensor: torch.Tensor, cfg: ThinkerConfig):
    if row.kind == "qkv":
        return _split_qkv(tensor, cfg)
    if row.kind == "gated_mlp":
        return tensor.chunk(2, dim=0)
    return (tensor,)


def _expand(row: Row, cfg: ThinkerConfig):
    """Every concrete (megatron name, HF names) pair one table row stands for (none if it does not apply)."""
    if not _applies(row, cfg):
        return
    if "{layer}" not in row.megatron:
        yield row.megatron, row.hf
        return
    experts = range(cfg.num_experts) if "{expert}" in row.megatron else [None]
    for layer in range(cfg.num_layers):
        for expert in experts:
            fill = dict(layer=layer, expert=expert)
            yield row.megatron.format(**fill), tuple(h.format(**fill) for h in row.hf)


def hf_to_megatron(hf_state: Dict[str, torch.Tensor], cfg: ThinkerConfig) -> Dict[str, torch.Tensor]:
    """HF on-disk Thinker LM tensors -> unsharded megatron state dict (other HF keys are ignored)."""
    out = {}
    for row in TABLE:
        for mg_name, hf_names in _expand(row, cfg):
            out[mg_name] = _to_megatron(row, [hf_state[n] for n in hf_names], cfg)
    return out


def megatron_to_hf(mg_state: Dict[str, torch.Tensor], cfg: ThinkerConfig) -> Dict[str, torch.Tensor]:
    """Unsharded megatron state dict -> HF on-disk Thinker LM tensors."""
    out = {}
    for row in TABLE:
        for mg_name, hf_names in _expand(row, cfg):
            for name, tensor in zip(hf_names, _to_hf(row, mg_state[mg_name], cfg)):
                out[name] = tensor.contiguous()
    return out


# ---------------------------------------------------------------------------------------------------
# Helpers for streaming conversion (omni_train.export): one tensor at a time, any layout.


def _sizes(cfg: ThinkerConfig) -> Dict[str, int]:
    return dict(
        hidden=cfg.hidden_size, vocab=cfg.vocab_size, head_dim=cfg.head_dim, ffn=cfg.moe_ffn_hidden_size,
        dense_ffn=cfg.ffn_hidden_size, experts=cfg.num_experts, q_rows=cfg.num_attention_heads * cfg.head_dim,
        kv_rows=cfg.num_query_groups * cfg.head_dim,
    )


def hf_shapes(row: Row, cfg: ThinkerConfig) -> List[Tuple[int, ...]]:
    """The shape each of the row's HF tensors must have for these sizes."""
    sizes = _sizes(cfg)
    return [tuple(sizes[n] for n in names) for names in row.shapes]


def expand_table(cfg: ThinkerConfig) -> Iterator[Tuple[Row, str, Tuple[str, ...]]]:
    """(row, unsharded megatron name, HF names) for every LM tensor, table order."""
    for row in TABLE:
        for mg_name, hf_names in _expand(row, cfg):
            yield row, mg_name, hf_names


def rename_hf(name: str, layout: str) -> str:
    """A table (Qwen3-Omni) HF name in the given source layout's names."""
    for old, new in HF_PREFIXES[layout].items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def to_megatron(row: Row, tensors, cfg: ThinkerConfig) -> torch.Tensor:
    return _to_megatron(row, tensors, cfg)


def to_hf(row: Row, tensor: torch.Tensor, cfg: ThinkerConfig):
    return tuple(t.contiguous() for t in _to_hf(row, tensor, cfg))


def tp_slice(row: Row, full: torch.Tensor, partition_dim: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The tensor-parallel rank's piece of an unsharded megatron tensor split along ``partition_dim``.

    Fused QKV is laid out per query group, so a contiguous cut is whole groups. Fused fc1 = [gate; up]
    is cut per half (each rank holds [gate_r; up_r]), as megatron's column-parallel GLU does.
    """
    if tp_size == 1:
        return full
    if row.kind == "gated_mlp":
        return torch.cat([h.chunk(tp_size, dim=partition_dim)[tp_rank] for h in full.chunk(2, dim=0)])
    return full.chunk(tp_size, dim=partition_dim)[tp_rank]


def tp_unslice(row: Row, pieces: List[torch.Tensor], partition_dim: int) -> torch.Tensor:
    """The unsharded megatron tensor from every tensor-parallel rank's piece (in rank order): the inverse
    of ``tp_slice``."""
    if len(pieces) == 1:
        return pieces[0]
    if row.kind == "gated_mlp":
        halves = [p.chunk(2, dim=partition_dim) for p in pieces]
        return torch.cat([torch.cat([h[0] for h in halves], dim=partition_dim),
                          torch.cat([h[1] for h in halves], dim=partition_dim)], dim=partition_dim)
    return torch.cat(pieces, dim=partition_dim)


_DEFAULT_MROPE = {128: [24, 20, 20]}


def _rope(text_config: dict) -> Tuple[float, List[int] | None]:
    """rope theta and mrope section from transformers v5 ``rope_parameters`` or v4 ``rope_scaling``."""
    params = text_config.get("rope_parameters") or {}
    scaling = text_config.get("rope_scaling") or {}
    theta = params.get("rope_theta", text_config.get("rope_theta", 1_000_000.0))
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise ValueError(f"text_config.rope_parameters.rope_type={rope_type!r} is not supported (only 'default')")
    section = params.get("mrope_section", scaling.get("mrope_section"))
    return float(theta), (list(section) if section is not None else None)


def is_dense_config(text_config: dict) -> bool:
    """A dense Qwen3 LM's config.json (Qwen3ForCausalLM, ``model_type: qwen3``): no routed experts."""
    return text_config.get("model_type") == "qwen3"


def _check_dense(text_config: dict) -> None:
    need = {"attention_bias": False, "hidden_act": "silu", "use_sliding_window": False}
    for field, value in need.items():
        if field in text_config and text_config[field] != value:
            raise ValueError(f"text_config.{field}={text_config[field]!r} is not supported (need {value!r})")
    other = sorted({t for t in text_config.get("layer_types") or [] if t != "full_attention"})
    if other:
        raise ValueError(f"text_config.layer_types holds {other}: not supported (every layer full attention)")
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if field not in text_config:
            raise ValueError(f"text_config.{field} is missing")


def _check_supported(text_config: dict) -> None:
    need = {"norm_topk_prob": True, "tie_word_embeddings": False, "attention_bias": False,
            "decoder_sparse_step": 1}
    for field, value in need.items():
        if field in text_config and text_config[field] != value:
            raise ValueError(f"text_config.{field}={text_config[field]!r} is not supported (need {value!r})")
    if text_config.get("mlp_only_layers"):
        raise ValueError(f"text_config.mlp_only_layers={text_config['mlp_only_layers']!r} is not supported "
                         "(every layer must be MoE)")
    if text_config.get("shared_expert_intermediate_size"):
        raise ValueError("text_config.shared_expert_intermediate_size is not supported (no shared expert)")


def model_config_from_hf(text_config: dict) -> ThinkerConfig:
    """Thinker LM sizes from an HF text config (the Qwen3-Omni thinker's, a Qwen3-MoE config.json or a dense
    Qwen3 config.json: ``num_experts: 0`` and ``ffn_hidden_size``, plain RoPE as for Qwen3-MoE).

    Fields the Thinker LM cannot represent raise ValueError naming the field.
    """
    if is_dense_config(text_config):
        _check_dense(text_config)
        text_config = dict(text_config, num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0)
    else:
        _check_supported(text_config)
    if "num_experts" not in text_config and "num_local_experts" in text_config:
        # transformers 5 writes Qwen3-MoE's expert count under this name; released config.json files do not
        text_config = dict(text_config, num_experts=text_config["num_local_experts"])
    if text_config.get("num_experts_per_tok") == 1 and text_config["num_experts"]:
        raise ValueError("text_config.num_experts_per_tok=1 is not supported: megatron-core's softmax router "
                         "needs top-k >= 2 for Qwen3's routing (softmax over all experts, then top-k)")
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        if field not in text_config:
            raise ValueError(f"text_config.{field} is missing")
    heads = text_config["num_attention_heads"]
    head_dim = text_config.get("head_dim") or text_config["hidden_size"] // heads
    theta, section = _rope(text_config)
    if section is None:  # plain RoPE (Qwen3-MoE): any section gives the same angles for text positions
        section = _DEFAULT_MROPE.get(head_dim, [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6])
    if sum(section) != head_dim // 2:
        raise ValueError(f"text_config mrope_section={section} must sum to head_dim/2={head_dim // 2}")
    return ThinkerConfig(
        vocab_size=text_config["vocab_size"],
        hidden_size=text_config["hidden_size"],
        num_layers=text_config["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=text_config.get("num_key_value_heads", heads),
        head_dim=head_dim,
        num_experts=text_config["num_experts"],
        router_topk=text_config["num_experts_per_tok"],
        moe_ffn_hidden_size=text_config["moe_intermediate_size"],
        ffn_hidden_size=text_config["intermediate_size"] if text_config["num_experts"] == 0 else 0,
        tie_word_embeddings=bool(text_config.get("tie_word_embeddings", False)),
        rope_theta=theta,
        mrope_section=section,
        rms_norm_eps=text_config.get("rms_norm_eps", 1e-6),
        max_position_embeddings=text_config.get("max_position_embeddings", 65536),
        init_std=text_config.get("initializer_range", 0.02),
        aux_loss_coeff=text_config.get("router_aux_loss_coef", 1e-3),
    )


def hf_text_config(cfg: ThinkerConfig) -> dict:
    """The HF Qwen3-Omni thinker ``text_config`` (as a dict) of these sizes: the inverse of
    ``model_config_from_hf``. Only the aux-loss router (Qwen3's softmax top-k) has an HF equivalent."""
    if cfg.num_experts == 0 or cfg.tie_word_embeddings:
        raise ValueError("model.thinker: a dense LM (num_experts=0) or tied embeddings have no Qwen3-Omni "
                         "thinker equivalent; need num_experts > 0 and tie_word_embeddings=false")
    if cfg.load_balancing != "aux_loss":
        raise ValueError(f"model.thinker.load_balancing={cfg.load_balancing!r} has no Hugging Face equivalent "
                         "(its sigmoid expert-bias router is not Qwen3's softmax top-k); need 'aux_loss'")
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.head_dim, num_experts=cfg.num_experts, num_experts_per_tok=cfg.router_topk,
        moe_intermediate_size=cfg.moe_ffn_hidden_size, intermediate_size=cfg.moe_ffn_hidden_size,
        rope_parameters=dict(rope_type="default", rope_theta=float(cfg.rope_theta),
                             mrope_section=list(cfg.mrope_section), interleaved=True),
        rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.init_std, router_aux_loss_coef=cfg.aux_loss_coeff, hidden_act="silu",
        norm_topk_prob=True, tie_word_embeddings=False, attention_bias=False, decoder_sparse_step=1,
        mlp_only_layers=[],
    )
