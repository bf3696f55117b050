"""Provider for the Thinker's MoE language model on megatron-core's GPTModel (or, with
``num_experts: 0``, a dense Qwen3 LM: a SwiGLU MLP of ``ffn_hidden_size`` in every layer, e.g. a teacher).

sizes (ThinkerConfig) + layout (ParallelConfig) -> TransformerConfig -> local layer spec -> GPTModel.
No Transformer Engine: routed experts are omni_train.models.common.grouped_experts.GroupedExperts (torch's
grouped GEMM over two stacked weights per layer, SequentialMLP's checkpoint layout) or, with ``model.thinker.experts_impl=sequential``,
megatron's SequentialMLP itself. The caller initializes
megatron's parallel_state; nothing here reads the environment or chooses parallel degrees.

Forward contract (megatron's GPTModel):
    model(input_ids [B, S], position_ids [3, B, S] or [B, S], attention_mask=None, labels=[B, S])
    -> per-token loss [B, S] (fp32); without labels -> logits [B, S, V / tp].
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Tuple

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from omni_train.config.schema import ThinkerConfig, ParallelConfig
from omni_train.models.common.attention import SDPAttention
from omni_train.kernels.compiled import fused
from omni_train.models.common.cross_entropy import cross_entropy
from omni_train.models.common.grouped_experts import GroupedExperts
from omni_train.models.common.local_dispatch import OmniMoELayer
from omni_train.models.common.rotary import InterleavedMRotaryEmbedding

_LOAD_BALANCING = ("aux_loss", "expert_bias")
EXPERTS_IMPLS = ("grouped", "sequential")


def _aux_loss_coeff(model_cfg: ThinkerConfig, parallel_cfg: ParallelConfig) -> float:
    """The coefficient to hand megatron so the load-balancing loss weighs what it does on one process.

    With calculate_per_token_loss, megatron-core 0.16 computes the aux loss over the tokens of the
    whole sequence (tokens-per-expert reduced over the tensor x context parallel group) but scales its
    gradient by the rank's own token count; when the sequence is split over ranks (context parallel,
    or tensor parallel with sequence parallelism) the aux-loss gradient comes out 1/(split) of the
    single-process one. Measured: cp=2 and tp=2+SP match tp=cp=1 step for step only with this factor.
    """
    split = parallel_cfg.cp * (parallel_cfg.tp if parallel_cfg.sequence_parallel else 1)
    return model_cfg.aux_loss_coeff * split


def _router_settings(model_cfg: ThinkerConfig, parallel_cfg: ParallelConfig) -> dict:
    """Qwen3 routing: softmax over the top-k logits == softmax, top-k, renormalize (norm_topk_prob).

    "expert_bias" (aux-loss-free) uses megatron's expert bias, which megatron only allows with
    sigmoid scores (top-k scores renormalized); it is therefore not bit-equal to Qwen3's router.
    """
    if model_cfg.load_balancing not in _LOAD_BALANCING:
        raise ValueError(f"load_balancing must be one of {_LOAD_BALANCING}")
    common = dict(moe_router_topk=model_cfg.router_topk, moe_router_dtype="fp32")
    if model_cfg.load_balancing == "aux_loss":
        return dict(
            common,
            moe_router_score_function="softmax",
            moe_router_pre_softmax=False,
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=_aux_loss_coeff(model_cfg, parallel_cfg),
        )
    return dict(
        common,
        moe_router_score_function="sigmoid",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=model_cfg.expert_bias_update_rate,
    )


def _fusions_off() -> dict:
    """Fused kernels need CUDA (and partly Transformer Engine / apex); off everywhere for now."""
    return dict(
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
    )


def is_dense(model_cfg: ThinkerConfig) -> bool:
    """A dense LM (no routed experts): every layer has one SwiGLU MLP of ``ffn_hidden_size``."""
    return model_cfg.num_experts == 0


def _mlp_settings(model_cfg: ThinkerConfig, parallel_cfg: ParallelConfig) -> dict:
    """The MoE fields of TransformerConfig, or a dense MLP's width. A dense LM builds no expert-parallel
    layers (megatron refuses ep > 1 without experts): under an ep > 1 layout its layers are replicated
    over the expert-parallel ranks, as a dense layer of an MoE model is."""
    if is_dense(model_cfg):
        if model_cfg.ffn_hidden_size <= 0:
            raise ValueError(f"a dense LM (num_experts=0) needs ffn_hidden_size > 0, got {model_cfg.ffn_hidden_size}")
        return dict(ffn_hidden_size=model_cfg.ffn_hidden_size, expert_model_parallel_size=1)
    return dict(
        ffn_hidden_size=model_cfg.moe_ffn_hidden_size,
        num_moe_experts=model_cfg.num_experts,
        moe_ffn_hidden_size=model_cfg.moe_ffn_hidden_size,
        moe_layer_freq=1,
        moe_grouped_gemm=False,
        moe_token_dispatcher_type=parallel_cfg.token_dispatcher,
        expert_model_parallel_size=parallel_cfg.ep,
        **_router_settings(model_cfg, parallel_cfg),
    )


def build_transformer_config(
    model_cfg: ThinkerConfig,
    parallel_cfg: ParallelConfig,
    *,
    params_dtype: torch.dtype,
    use_cpu_initialization: bool,
) -> TransformerConfig:
    """Map the Thinker LM sizes and the parallel layout onto megatron's TransformerConfig."""
    if parallel_cfg.token_dispatcher not in ("alltoall", "allgather"):
        raise ValueError(f"unknown token_dispatcher {parallel_cfg.token_dispatcher!r}")
    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=model_cfg.head_dim,
        qk_layernorm=True,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model_cfg.init_std,
        **_mlp_settings(model_cfg, parallel_cfg),
        mrope_section=list(model_cfg.mrope_section),
        tensor_model_parallel_size=parallel_cfg.tp,
        pipeline_model_parallel_size=parallel_cfg.pp,
        context_parallel_size=parallel_cfg.cp,
        sequence_parallel=parallel_cfg.sequence_parallel,
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=use_cpu_initialization,
        calculate_per_token_loss=True,
        **_fusions_off(),
    )


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm, usable under sequence parallelism: its weight is marked ``sequence_parallel``
    so megatron's finalize_model_grads sums its grads over TP ranks. (megatron's WrappedTorchNorm,
    its only norm without TE/apex, refuses sequence parallelism, which megatron requires for MoE+TP.)

    On CUDA the norm is compiled (one Triton kernel forward, one backward): torch's own kernels take
    rows of Qwen3's 128-wide query/key norm at under 1 TB/s on an H100."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused(rms_norm, x.device, dynamic=False)(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: Optional[float]) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _decoder_spec(config: TransformerConfig, experts_impl: str) -> TransformerBlockSubmodules:
    """megatron's local (no TE) MoE layer spec (a dense MLP without experts) with our RMSNorm everywhere,
    SDPA core attention (context-parallel capable) and grouped-GEMM experts, for this pipeline stage."""
    if experts_impl not in EXPERTS_IMPLS:
        raise ValueError(f"model.thinker.experts_impl must be one of {EXPERTS_IMPLS}, got {experts_impl!r}")
    layer = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=False,
        qk_layernorm=True,
        normalization="RMSNorm",
    )
    layer.submodules.input_layernorm = RMSNorm
    layer.submodules.pre_mlp_layernorm = RMSNorm
    layer.submodules.self_attention.submodules.q_layernorm = RMSNorm
    layer.submodules.self_attention.submodules.k_layernorm = RMSNorm
    layer.submodules.self_attention.submodules.core_attention = SDPAttention
    if experts_impl == "grouped" and config.num_moe_experts:
        layer.submodules.mlp.submodules.experts.module = GroupedExperts
        # all experts local (ep = tp = 1): permutation without communication or host syncs
        layer.submodules.mlp.module = OmniMoELayer
    num_layers = get_num_layers_to_build(config)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=RMSNorm)


def build_thinker_lm(
    model_cfg: ThinkerConfig,
    parallel_cfg: ParallelConfig,
    *,
    device: torch.device | str,
    params_dtype: torch.dtype,
    pre_process: bool = True,
    post_process: bool = True,
    recompute: str = "none",
) -> GPTModel:
    """The Thinker MoE (or dense) LM as a megatron GPTModel with TM-RoPE, on ``device``."""
    device = torch.device(device)
    # megatron's process-wide MoE state (aux-loss tracker and gradient scale) is not the builder's: a model
    # built beside a trained one must not reset it (parallel/process_state.py; the session resets it when
    # it builds the trained model, init_parallel when megatron's groups start).
    config = build_transformer_config(
        model_cfg,
        parallel_cfg,
        params_dtype=params_dtype,
        use_cpu_initialization=device.type != "cuda",
    )
    # On "meta" build inside the device context so that nothing is allocated (dry runs).
    on_meta = torch.device("meta") if device.type == "meta" else contextlib.nullcontext()
    with on_meta:
        model = _build_gpt_model(model_cfg, config, pre_process, post_process)
    if recompute not in ("none", "full"):
        raise ValueError(f"trainer.recompute: unknown mode {recompute!r}")
    if recompute == "full":
        recompute_layers(model)
    _release_routing_probs(model)
    return model.to(device)


def _release_routing_probs(model: GPTModel) -> None:
    """megatron's token dispatchers keep the last routing probabilities, autograd graph included, as an
    attribute after the MoE layer's forward. Under recomputation that graph is built during the backward
    pass and never back-propagated, so it would keep each layer's recomputed activations alive until the
    next step (~0.7 GB per layer per 8k tokens at Qwen3-Omni width). Drop the reference once the layer
    is done with it."""
    def release(module, args, output):
        for name in ("probs", "local_probs"):
            if getattr(module.token_dispatcher, name, None) is not None:
                setattr(module.token_dispatcher, name, None)

    for module in model.modules():
        if hasattr(module, "token_dispatcher"):
            module.register_forward_hook(release)


def recompute_layers(model: GPTModel) -> None:
    """Full activation recomputation: each decoder layer keeps only its inputs and recomputes its
    activations in the backward pass. torch's non-reentrant checkpoint rather than megatron's reentrant
    one: tensors joined in by hooks after a layer (the Thinker's DeepStack features, which carry the vision
    tower's graph) then keep their own autograd graph instead of being back-propagated inside the
    recomputation and again afterwards."""
    for layer in model.decoder.layers:
        def checkpointed(*args, _forward=layer.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            # the whole layer is recomputed (no early stop), so its MoE layer's hooks run to the end
            with torch.utils.checkpoint.set_checkpoint_early_stop(False):
                return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed


class ThinkerGPTModel(GPTModel):
    """megatron's GPTModel; without tensor parallelism the loss is our cross-entropy on the bf16 logits.

    megatron's vocab-parallel cross-entropy (needed when the vocabulary is split over TP ranks) makes ~8
    passes over an fp32 copy of the [tokens, vocab] logits (upcast, max, subtract, exp, sum, divide; in
    backward a copy and a multiply) and keeps that copy for backward: ~25 ms per step and 5 GB at 8k tokens
    and Qwen3-Omni's 152k vocabulary on an H100. ``models.common.cross_entropy`` reads the bf16 logits once
    forward and once backward and keeps nothing but them and one number per token. Same function."""

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if parallel_state.get_tensor_model_parallel_world_size() > 1 or self.config.cross_entropy_loss_fusion:
            return super().compute_language_model_loss(labels, logits)
        # logits [s, b, v], labels [b, s] -> loss [b, s]; tokens in [s, b] order, the big tensor never reordered
        seq, batch, vocab = logits.shape
        loss = cross_entropy(logits.reshape(-1, vocab), labels.t().reshape(-1))
        return loss.view(seq, batch).t().contiguous()


def _build_gpt_model(model_cfg: ThinkerConfig, config: TransformerConfig, pre_process, post_process):
    model = ThinkerGPTModel(
        config=config,
        transformer_layer_spec=_decoder_spec(config, model_cfg.experts_impl),
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model_cfg.tie_word_embeddings,
        position_embedding_type="mrope",
        rotary_base=int(model_cfg.rope_theta),
    )
    model.rotary_pos_emb = InterleavedMRotaryEmbedding(
        head_dim=model_cfg.head_dim,
        mrope_section=list(model_cfg.mrope_section),
        rotary_base=model_cfg.rope_theta,
        cp_group=parallel_state.get_context_parallel_group(check_initialized=False),
    )
    return model


# ---------------------------------------------------------------------------------------------------
# Parameter counts and shard shapes, computed analytically (nothing is allocated).


def _layer_shards(m: ThinkerConfig, tp: int, ep: int) -> List[Tuple[str, Tuple[int, ...]]]:
    """(name, local shape) of one decoder layer on one (tp rank, ep rank); expert TP = TP. A dense
    layer's MLP is split over tp only."""
    h, d, e = m.hidden_size, m.head_dim, m.num_experts
    qkv_rows = (m.num_attention_heads + 2 * m.num_query_groups) * d
    shards = [
        ("input_layernorm.weight", (h,)),
        ("self_attention.linear_qkv.weight", (qkv_rows // tp, h)),
        ("self_attention.q_layernorm.weight", (d,)),
        ("self_attention.k_layernorm.weight", (d,)),
        ("self_attention.linear_proj.weight", (h, m.num_attention_heads * d // tp)),
        ("pre_mlp_layernorm.weight", (h,)),
    ]
    if is_dense(m):
        return shards + [("mlp.linear_fc1.weight", (2 * m.ffn_hidden_size // tp, h)),
                         ("mlp.linear_fc2.weight", (h, m.ffn_hidden_size // tp))]
    shards.append(("mlp.router.weight", (e, h)))
    for i in range(e // ep):
        expert = f"mlp.experts.local_experts.{i}"
        shards.append((f"{expert}.linear_fc1.weight", (2 * m.moe_ffn_hidden_size // tp, h)))
        shards.append((f"{expert}.linear_fc2.weight", (h, m.moe_ffn_hidden_size // tp)))
    return shards


def _numel(shape: Tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_divisible(m: ThinkerConfig, p: ParallelConfig) -> None:
    checks = {
        "num_layers % pp": m.num_layers % p.pp,
        "num_query_groups % tp": m.num_query_groups % p.tp,
        "vocab_size % tp": m.vocab_size % p.tp,
        "num_experts % ep": m.num_experts % p.ep,
        "moe_ffn_hidden_size % tp": m.moe_ffn_hidden_size % p.tp,
        "ffn_hidden_size % tp": m.ffn_hidden_size % p.tp,
    }
    bad = [name for name, rest in checks.items() if rest]
    if bad:
        raise ValueError(f"layout tp={p.tp} pp={p.pp} ep={p.ep} does not divide: {bad}")


def describe_shards(model_cfg: ThinkerConfig, parallel_cfg: ParallelConfig) -> List[Dict]:
    """Per-rank shard shapes for the layout (tp, pp, ep), without allocating.

    One entry per (pipeline stage, tp rank, ep rank): ``layer`` lists (name, local shape) of one
    representative decoder layer, ``other`` the embedding / final norm / output layer held by that
    stage, and ``num_params`` counts every parameter that rank holds (non-expert parameters are
    replicated over ep ranks, expert parameters over data-parallel ranks). With tied embeddings the last
    stage holds the output layer only under pipeline parallelism (a copy of the embedding); at pp = 1
    the embedding is the output layer.
    """
    m, p = model_cfg, parallel_cfg
    _check_divisible(m, p)
    layers_per_stage = m.num_layers // p.pp
    h, v = m.hidden_size, m.vocab_size
    layer = _layer_shards(m, p.tp, p.ep)
    layer_numel = sum(_numel(shape) for _, shape in layer)
    report = []
    for stage in range(p.pp):
        other = []
        if stage == 0:
            other.append(("embedding.word_embeddings.weight", (v // p.tp, h)))
        if stage == p.pp - 1:
            other.append(("decoder.final_layernorm.weight", (h,)))
            if not (m.tie_word_embeddings and p.pp == 1):
                other.append(("output_layer.weight", (v // p.tp, h)))
        num_params = layers_per_stage * layer_numel + sum(_numel(s) for _, s in other)
        for tp_rank in range(p.tp):
            for ep_rank in range(p.ep):
                report.append(
                    dict(stage=stage, tp_rank=tp_rank, ep_rank=ep_rank, layers=layers_per_stage,
                         layer=layer, other=other, num_params=num_params)
                )
    return report


def count_parameters(model_cfg: ThinkerConfig) -> Tuple[int, int]:
    """(total, active per token) parameter counts of the unsharded LM, embeddings included (a dense LM:
    every parameter active; tied embeddings counted once)."""
    m = model_cfg
    shards = _layer_shards(m, tp=1, ep=1)
    layer_total = sum(_numel(shape) for _, shape in shards)
    expert = 3 * m.hidden_size * m.moe_ffn_hidden_size
    layer_active = layer_total - (m.num_experts - m.router_topk) * expert
    tables = 1 if m.tie_word_embeddings else 2  # input, output
    embeddings = tables * m.vocab_size * m.hidden_size + m.hidden_size  # + final norm
    total = m.num_layers * layer_total + embeddings
    active = m.num_layers * layer_active + embeddings
    return total, active
