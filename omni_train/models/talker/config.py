"""The Talker's sizes and the ids its conditioning reads: one dataclass tree, primitives only.

Defaults are the released Qwen3-Omni-30B-A3B Talker (its ``config.json``, ``talker_config``), NOT the
defaults of transformers' config classes (those have 32 code groups, other special ids, accept layer 18,
top-8 routing and no shared expert size). ``hf_config.py`` maps these to and from transformers' configs.

Three parts, as in the release:
    backbone        MoE transformer over summed codec + text embeddings -> codebook 0 (``codec_head``)
    code_predictor  dense transformer (the report's MTP module) -> residual codebooks 1 .. G-1
    conditioning    which Thinker signals enter, through ``text_projection`` / ``hidden_projection``
Code2Wav is transformers' own module (``code2wav.py``), sized by its HF config, carried as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List


@dataclass
class CodePredictorConfig:
    """The dense code predictor: ``num_code_groups - 1`` input embeddings and as many heads over
    ``codebook_size`` codes (transformers' Qwen3OmniMoeTalkerCodePredictorConfig, ``vocab_size``)."""

    hidden_size: int = 1024  # must equal the backbone's hidden_size (it reads the backbone's state)
    num_layers: int = 5
    num_attention_heads: int = 16
    num_query_groups: int = 8
    head_dim: int = 128
    ffn_hidden_size: int = 3072
    codebook_size: int = 2048
    rope_theta: float = 1_000_000.0  # plain 1-D RoPE over the frame's 16 positions
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768


@dataclass
class CodecIds:
    """Special ids of the codec vocabulary (backbone input embedding / codec head). Everything from
    ``codec_vocab_size - 1024`` up is never generated except ``eos`` (transformers' ``generate``)."""

    pad: int = 2148
    bos: int = 2149
    eos: int = 2150
    nothink: int = 2155
    think_bos: int = 2156
    think_eos: int = 2157
    # a voice is one codec token at prefix position 6 (no speaker encoder)
    speakers: Dict[str, int] = field(default_factory=lambda: {"chelsie": 2301, "ethan": 2302, "aiden": 2303})


@dataclass
class TextIds:
    """Thinker-vocabulary ids the conditioning reads (Qwen3-Omni tokenizer)."""

    im_start: int = 151644
    im_end: int = 151645  # the Thinker's end of turn: the reply text ends here (not spoken)
    user: int = 872
    assistant: int = 77091
    tts_pad: int = 151671
    tts_bos: int = 151672
    tts_eos: int = 151673
    audio: int = 151675
    image: int = 151655
    video: int = 151656
    vision_start: int = 151652
    audio_start: int = 151669


@dataclass
class TalkerConfig:
    """The Talker (backbone, code predictor, conditioning, loss weights)."""

    # backbone: every layer MoE (softmax top-k, renormalised) + one shared expert with a sigmoid gate
    hidden_size: int = 1024
    num_layers: int = 20
    num_attention_heads: int = 16
    num_query_groups: int = 2
    head_dim: int = 128
    num_experts: int = 128
    router_topk: int = 6
    norm_topk_prob: bool = True  # False: softmax over all experts, top-k kept without renormalising
    moe_ffn_hidden_size: int = 384  # per routed expert
    shared_expert_ffn_hidden_size: int = 768
    codec_vocab_size: int = 3072  # codebook 0 (2048 codes) + special tokens
    rope_theta: float = 1_000_000.0
    # M-RoPE angles for the temporal / height / width ids, interleaved as the Thinker's (TM-RoPE)
    mrope_section: List[int] = field(default_factory=lambda: [24, 20, 20])
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 65536
    init_std: float = 0.02
    # load balancing, routed experts implementation: as ThinkerConfig (models/thinker/lm.py reads them)
    load_balancing: str = "aux_loss"
    aux_loss_coeff: float = 1e-3
    expert_bias_update_rate: float = 1e-3
    experts_impl: str = "grouped"

    # conditioning on the Thinker
    thinker_hidden_size: int = 2048
    projection_ffn_hidden_size: int = 2048  # text_projection / hidden_projection: thinker -> this -> hidden
    accept_hidden_layer: int = 24  # hidden_states[24]: the output of the Thinker's 24th decoder layer
    num_code_groups: int = 16
    # TM-RoPE of multimodal user context (tm_rope_position_ids); text-only context is plain positions
    position_id_per_seconds: int = 13
    spatial_merge_size: int = 2

    codec: CodecIds = field(default_factory=CodecIds)
    text: TextIds = field(default_factory=TextIds)
    code_predictor: CodePredictorConfig = field(default_factory=CodePredictorConfig)

    # loss = CE(codebook 0) + residual_loss_weight * CE(codebooks 1..G-1) (+ megatron's MoE aux loss)
    residual_loss_weight: float = 0.3  # Qwen3-TTS


def check_talker_config(cfg: TalkerConfig) -> None:
    """Raise ValueError naming the first field that cannot build a Talker."""
    problems = {
        "mrope_section": 2 * sum(cfg.mrope_section) != cfg.head_dim,
        "code_predictor.hidden_size": cfg.code_predictor.hidden_size != cfg.hidden_size,
        "num_code_groups": cfg.num_code_groups < 2,
        "router_topk": not 0 < cfg.router_topk <= cfg.num_experts,
        "num_query_groups": cfg.num_attention_heads % cfg.num_query_groups != 0,
        "code_predictor.num_query_groups":
            cfg.code_predictor.num_attention_heads % cfg.code_predictor.num_query_groups != 0,
        "codec.eos": not 0 <= cfg.codec.eos < cfg.codec_vocab_size,
    }
    bad = [name for name, wrong in problems.items() if wrong]
    if bad:
        raise ValueError(f"talker config: inconsistent {bad[0]} (see omni_train/models/talker/config.py)")
