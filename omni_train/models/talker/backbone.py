"""Provider for the Talker's MoE backbone on megatron-core's GPTModel, built as the Thinker LM is.

sizes (TalkerConfig) + layout (ParallelConfig) -> TransformerConfig -> local layer spec -> GPTModel, with
the Thinker's pieces (models/thinker/lm.py: RMSNorm, SDPA core attention, grouped-GEMM experts with local
dispatch, Qwen3's softmax top-k router, TM-RoPE) and the Talker's own:

- every layer MoE plus one shared expert with a sigmoid gate. megatron-core 0.16.1 has exactly this:
  ``moe_shared_expert_intermediate_size`` + ``moe_shared_expert_gate=True`` build ``SharedExpertMLP``
  (a SwiGLU MLP, column/row tensor-parallel like any MLP) whose output is scaled by
  ``sigmoid(x @ gate_weight.T)`` (gate_weight [1, hidden], marked sequence-parallel) and added to the
  routed experts' output: transformers' ``shared_expert`` + ``shared_expert_gate``;
- ``norm_topk_prob``: True is megatron's softmax over the top-k logits (``moe_router_pre_softmax=False``,
  the Thinker's); False is softmax over all experts, top-k kept as they are (``pre_softmax=True``);
- no text vocabulary: GPTModel's word embedding IS ``codec_embedding`` (codec vocab x hidden) and its output
  layer IS ``codec_head`` (untied). Inputs always arrive as ``decoder_input`` (summed embeddings).

``TalkerGPTModel.final_hidden`` runs embedding-free preprocessing (rotary angles) and the decoder (final
norm included on the last pipeline stage) and returns the hidden states [S, B, H]: both the codec head and
the code predictor read them. Layer counts per pipeline stage come from megatron
(``get_num_layers_to_build``), experts are split over ep ranks, linear layers over tp ranks.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig

from omni_train.config.schema import ParallelConfig
from omni_train.models.common.rotary import InterleavedMRotaryEmbedding
from omni_train.models.talker.config import TalkerConfig
# Shared with the Thinker LM (same megatron build, same kernels); candidates for models/common/.
from omni_train.models.thinker.lm import (
    ThinkerGPTModel,
    _decoder_spec,
    _fusions_off,
    _release_routing_probs,
    _router_settings,
    recompute_layers,
)


def build_transformer_config(cfg: TalkerConfig, parallel_cfg: ParallelConfig, *, params_dtype: torch.dtype,
                             use_cpu_initialization: bool) -> TransformerConfig:
    """The Talker backbone's megatron TransformerConfig."""
    if parallel_cfg.token_dispatcher not in ("alltoall", "allgather"):
        raise ValueError(f"unknown token_dispatcher {parallel_cfg.token_dispatcher!r}")
    router = _router_settings(cfg, parallel_cfg)
    if cfg.load_balancing == "aux_loss":
        router["moe_router_pre_softmax"] = not cfg.norm_topk_prob
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.moe_ffn_hidden_size,
        qk_layernorm=True,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        num_moe_experts=cfg.num_experts,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=cfg.shared_expert_ffn_hidden_size,
        moe_shared_expert_gate=True,
        moe_layer_freq=1,
        moe_grouped_gemm=False,
        moe_token_dispatcher_type=parallel_cfg.token_dispatcher,
        **router,
        mrope_section=list(cfg.mrope_section),
        tensor_model_parallel_size=parallel_cfg.tp,
        pipeline_model_parallel_size=parallel_cfg.pp,
        expert_model_parallel_size=parallel_cfg.ep,
        context_parallel_size=parallel_cfg.cp,
        sequence_parallel=parallel_cfg.sequence_parallel,
        variable_seq_lengths=parallel_cfg.pp > 1,  # each batch's longest conversation sets the sent shape
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=use_cpu_initialization,
        calculate_per_token_loss=True,
        **_fusions_off(),
    )


class TalkerGPTModel(ThinkerGPTModel):
    """GPTModel over the codec vocabulary; ``final_hidden`` exposes the decoder output that the codec
    head (``output_layer``) and the code predictor both read."""

    def final_hidden(self, decoder_input, position_ids, attention_mask=None, packed_seq_params=None):
        """decoder_input [S, B, H] (None past the first pipeline stage), position_ids [3, B, S] -> [S, B, H]."""
        preprocessed = self._preprocess(input_ids=None, position_ids=position_ids, decoder_input=decoder_input,
                                        packed_seq_params=packed_seq_params)
        decoder_input, rotary_pos_emb = preprocessed[0], preprocessed[1]
        return self.decoder(hidden_states=decoder_input, attention_mask=attention_mask,
                            rotary_pos_emb=rotary_pos_emb, packed_seq_params=packed_seq_params)

    def codec_embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the codec embedding (first pipeline stage; see ``codec_rows``)."""
        return codec_rows(self.embedding.word_embeddings, ids)


def codec_rows(table, ids: torch.Tensor) -> torch.Tensor:
    """Rows of a vocabulary-parallel table (megatron's VocabParallelEmbedding: ``weight``, ``vocab_start_index``,
    ``vocab_end_index``) for any id shape -> [..., H], summed over tensor-parallel vocabulary shards; never
    scattered to sequence-parallel ranks (callers add them to other inputs first)."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return F.embedding(ids, table.weight)
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    start, end = table.vocab_start_index, table.vocab_end_index
    outside = (ids < start) | (ids >= end)
    rows = F.embedding((ids - start).masked_fill(outside, 0), table.weight)
    return reduce_from_tensor_model_parallel_region(rows.masked_fill(outside.unsqueeze(-1), 0.0))


def build_talker_backbone(cfg: TalkerConfig, parallel_cfg: ParallelConfig, *, device, params_dtype: torch.dtype,
                          pre_process: bool = True, post_process: bool = True,
                          recompute: str = "none") -> TalkerGPTModel:
    """The Talker backbone as a megatron GPTModel with TM-RoPE, on ``device`` (the caller initialises
    megatron's parallel_state; nothing here reads the environment)."""
    device = torch.device(device)
    config = build_transformer_config(cfg, parallel_cfg, params_dtype=params_dtype,
                                      use_cpu_initialization=device.type != "cuda")
    on_meta = torch.device("meta") if device.type == "meta" else contextlib.nullcontext()
    with on_meta:
        model = TalkerGPTModel(
            config=config,
            transformer_layer_spec=_decoder_spec(config, cfg.experts_impl),
            vocab_size=cfg.codec_vocab_size,
            max_sequence_length=cfg.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=False,
            position_embedding_type="mrope",
            rotary_base=int(cfg.rope_theta),
        )
        model.rotary_pos_emb = InterleavedMRotaryEmbedding(
            head_dim=cfg.head_dim, mrope_section=list(cfg.mrope_section), rotary_base=cfg.rope_theta,
            cp_group=parallel_state.get_context_parallel_group(check_initialized=False))
    if recompute not in ("none", "full"):
        raise ValueError(f"trainer.recompute: unknown mode {recompute!r}")
    if recompute == "full":
        recompute_layers(model)
    _release_routing_probs(model)
    return model.to(device)
