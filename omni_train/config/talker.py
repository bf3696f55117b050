"""The Talker's sizes and the ids its conditioning reads: one dataclass tree, primitives only, the schema of
``model.talker`` (conf/model/<flavor>.yaml) and what ``omni_train/models/talker/`` builds from.

Defaults are the released Qwen3-Omni-30B-A3B Talker (its ``config.json``, ``talker_config``), NOT the
defaults of transformers' config classes (those have 32 code groups, other special ids, accept layer 18,
top-8 routing and no shared expert size). ``models/talker/hf_config.py`` maps these to and from
transformers' configs.

Three parts, as in the release:
    backbone        MoE transformer over summed codec + text embeddings -> codebook 0 (``codec_head``)
    code_predictor  dense transformer (the report's MTP module) -> residual codebooks 1 .. G-1
    conditioning    which Thinker signals enter, through ``text_projection`` / ``hidden_projection``
Code2Wav is transformers' own module (``models/talker/code2wav.py``), sized by its HF config, carried as is.

It lives in the config layer (not beside the model) so that Hydra's structured config and
``config/validate.py`` check it before anything is built; ``models/talker/config.py`` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from omegaconf import MISSING

# transformers' generate never samples codec ids in [codec_vocab_size - 1024, codec_vocab_size) except eos
# (models/talker/generate.py): codebook 0's codes must lie below that span.
SUPPRESSED_CODEC_SPAN = 1024


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
    thinker_hidden_size: int = 2048  # must equal model.thinker.hidden_size
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


POSITIVE_SIZES = ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "head_dim",
                  "num_experts", "moe_ffn_hidden_size", "shared_expert_ffn_hidden_size", "codec_vocab_size",
                  "thinker_hidden_size", "projection_ffn_hidden_size", "code_predictor.num_layers",
                  "code_predictor.num_attention_heads", "code_predictor.num_query_groups",
                  "code_predictor.head_dim", "code_predictor.ffn_hidden_size", "code_predictor.codebook_size")


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _codec_ids(cfg) -> List[Tuple[str, int]]:
    c = cfg.codec
    ids = [(name, getattr(c, name)) for name in ("pad", "bos", "eos", "nothink", "think_bos", "think_eos")]
    return ids + [(f"speakers.{name}", value) for name, value in c.speakers.items()]


def talker_config_problems(cfg) -> List[Tuple[str, str]]:
    """(field, problem) for every field of ``cfg`` (a TalkerConfig or its DictConfig) that cannot build a
    Talker, in the order they are checked; fields are relative to the TalkerConfig (``code_predictor.x``)."""
    problems = [(name, f"must be > 0, got {_get(cfg, name)}") for name in POSITIVE_SIZES if _get(cfg, name) <= 0]
    if problems:
        return problems  # the rules below divide by these
    cp, vocab = cfg.code_predictor, cfg.codec_vocab_size
    rules = [
        ("mrope_section", 2 * sum(cfg.mrope_section) == cfg.head_dim,
         f"sections {list(cfg.mrope_section)} must sum to head_dim/2={cfg.head_dim // 2}"),
        ("code_predictor.hidden_size", cp.hidden_size == cfg.hidden_size,
         f"{cp.hidden_size} must equal hidden_size={cfg.hidden_size} (it reads the backbone's hidden state)"),
        ("num_code_groups", cfg.num_code_groups >= 2,
         f"must be >= 2 (codebook 0 and at least one residual codebook), got {cfg.num_code_groups}"),
        ("router_topk", 0 < cfg.router_topk <= cfg.num_experts,
         f"{cfg.router_topk} must be in 1..num_experts={cfg.num_experts}"),
        ("num_query_groups", cfg.num_attention_heads % cfg.num_query_groups == 0,
         f"{cfg.num_query_groups} does not divide num_attention_heads={cfg.num_attention_heads}"),
        ("code_predictor.num_query_groups", cp.num_attention_heads % cp.num_query_groups == 0,
         f"{cp.num_query_groups} does not divide code_predictor.num_attention_heads={cp.num_attention_heads}"),
        ("code_predictor.codebook_size", cp.codebook_size <= vocab - SUPPRESSED_CODEC_SPAN,
         f"{cp.codebook_size} codes must lie below codec_vocab_size - {SUPPRESSED_CODEC_SPAN}="
         f"{vocab - SUPPRESSED_CODEC_SPAN} (generate never samples the codec vocabulary's top "
         f"{SUPPRESSED_CODEC_SPAN} ids but eos)"),
    ]
    problems = [(name, problem) for name, ok, problem in rules if not ok]
    for name, value in _codec_ids(cfg):  # special ids sit above the codes, inside the codec vocabulary
        if not cp.codebook_size <= value < vocab:
            problems.append((f"codec.{name}", f"{value} is outside code_predictor.codebook_size.."
                                              f"codec_vocab_size-1 ({cp.codebook_size}..{vocab - 1})"))
    return problems


# Tensor-parallel splits of the backbone (heads and query groups, expert and shared-expert FFN, codec vocabulary).
TP_SPLIT_SIZES = ("num_attention_heads", "num_query_groups", "moe_ffn_hidden_size", "shared_expert_ffn_hidden_size",
                  "codec_vocab_size")


def talker_layout_problems(cfg, parallel) -> List[Tuple[str, str]]:
    """(key, problem) for every way the layout ``parallel`` (a ParallelConfig or its DictConfig: tp, pp, cp, ep,
    sequence_parallel, token_dispatcher) cannot run the Talker ``cfg``; keys are ``parallel.<name>``.
    Supported: tp (with sequence parallelism), pp and ep dividing the sizes; cp = 1 (models/talker/model.py
    says how). ``build_talker`` raises on the first; config/validate.py can report it by key."""
    tp, pp, cp, ep, sp = parallel.tp, parallel.pp, parallel.cp, parallel.ep, parallel.sequence_parallel
    rules = [
        ("parallel.cp", cp == 1,
         f"the Talker runs at cp=1 only, got cp={cp}: it builds each conversation's sequence whole and the code "
         "predictor reads the backbone's states at frame positions anywhere in it (no context-parallel split)"),
        ("parallel.sequence_parallel", sp or tp == 1,
         f"tp={tp} needs sequence_parallel=true: megatron-core refuses MoE layers under tensor parallelism "
         "without it when training"),
        ("parallel.sequence_parallel", not sp or tp > 1, "needs tp > 1"),
        ("parallel.pp", cfg.num_layers % pp == 0,
         f"model.talker.num_layers={cfg.num_layers} is not divisible by pp={pp}"),
        ("parallel.token_dispatcher", pp == 1 or parallel.token_dispatcher == "alltoall",
         f"pp={pp} sends each batch's own sequence length between stages, which megatron-core's "
         f"{parallel.token_dispatcher!r} dispatcher refuses: use alltoall"),
    ]
    problems = [(key, problem) for key, ok, problem in rules if not ok]
    for name in TP_SPLIT_SIZES:
        if _get(cfg, name) % tp:
            problems.append(("parallel.tp", f"model.talker.{name}={_get(cfg, name)} is not divisible by tp={tp}"))
    if cfg.num_experts % ep:
        problems.append(("parallel.ep", f"model.talker.num_experts={cfg.num_experts} is not divisible by ep={ep}"))
    return problems


def check_talker_config(cfg: TalkerConfig) -> None:
    """Raise ValueError naming the first field that cannot build a Talker."""
    problems = talker_config_problems(cfg)
    if problems:
        name, problem = problems[0]
        raise ValueError(f"talker config: {name}: {problem} (see omni_train/config/talker.py)")


@dataclass
class Code2WavConfig:
    """``model.code2wav``: a Code2Wav (transformers' ``Qwen3OmniMoeCode2Wav``) for a run that has none from an
    import: the Talker stages of a run trained from scratch build it, frozen, from ``seed`` (its weights saved
    in their checkpoints as ``code2wav.*``, exported with the Talker). It turns the Talker's codes into the
    audio samples each Talker stage writes and the export's speech. A run started from an import carries the
    release's Code2Wav instead and needs none. Fields are transformers' ``Qwen3OmniMoeCode2WavConfig``'s."""

    codebook_size: int = 2048
    num_quantizers: int = 16
    hidden_size: int = 1024
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    intermediate_size: int = 3072
    decoder_dim: int = 1536
    sliding_window: int = 72
    # 8 * 5 * 4 * 3 * 2 * 2 = 1920 samples per frame: 12.5 frames/s at 24 kHz
    upsample_rates: List[int] = field(default_factory=lambda: [8, 5, 4, 3])
    upsampling_ratios: List[int] = field(default_factory=lambda: [2, 2])
    initializer_range: float = 0.02
    layer_scale_initial_scale: float = 0.01
    seed: int = 0

    def hf_config(self) -> Dict[str, object]:
        """transformers' ``code2wav_config`` dict (``seed`` is ours)."""
        from dataclasses import asdict

        out = asdict(self)
        out.pop("seed")
        return out


DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust")
DPO_CODEBOOKS = ("first", "all")


@dataclass
class DPOConfig:
    """``stage.dpo``: the talker_dpo stage's preference loss (losses/dpo.py, trl's DPOTrainer formulas) against a
    frozen reference Talker (the stage's starting Talker)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"  # "sigmoid" | "ipo" | "robust"
    label_smoothing: float = 0.0  # sigmoid: cDPO; robust: the assumed flip rate (< 0.5); ipo: none
    # the sequence log-probability: summed over codebook 0 ("first") or over every codebook ("all")
    codebooks: str = "first"
    sft_weight: float = 0.0  # > 0: + weight x the chosen codes' NLL per target (trl's loss_type [..., "sft"])


@dataclass
class SpeakerConfig:
    """``stage.speaker``: the voice the speaker_finetune stage trains (stages/speaker_finetune.py)."""

    # The voice's name: a new one (added to model.talker.codec.speakers at the first free codec id, or at
    # `id`) or one of model.talker.codec.speakers (refined). Export writes it into talker_config.speaker_id,
    # which transformers' generate(speaker=<name>) reads.
    name: str = MISSING
    id: Optional[int] = None  # a new voice's codec id; null: the first free id above the special ids
    # A new voice's embedding row starts as: "mean" (of the configured speakers' rows) or a speaker's name
    init: str = "mean"
    # Every sample of the stage speaks with this voice, whatever its `speaker` field says (one speaker's data).
    override_data_speaker: bool = True


@dataclass
class AudioSamplesConfig:
    """``stage.audio_samples``: what a Talker stage speaks when it finishes (stages/audio_samples.py)."""

    count: int = 2  # conversations of the stage's data answered and written as WAVs; 0: none
    max_frames: int = 125  # the longest generated answer, in 12.5 Hz codec frames (10 s)
