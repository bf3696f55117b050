"""Every parameter one rank holds, by name and shape, computed from the configs (nothing is built).

Names are those of the model the stages build: the towers under ``audio_tower.`` / ``visual.`` (their
transformers names, as in ``OmniThinker``) and the megatron LM under ``language_model.`` when
``model.thinker.towers`` is on; the bare megatron names (``decoder.layers.{i}...``) for the LM alone. Stage
``trainable`` / ``frozen`` patterns match these names, so the memory estimate can tell trainable from
frozen parameters per phase. The tower tables follow transformers' ``Qwen3OmniMoeAudioEncoder`` and
``Qwen3OmniMoeVisionEncoder`` (tests/configs/test_30b_recipes.py compares them, name for name and shape
for shape, with the modules built on the meta device).

The Talker's table (``talker_shapes``) holds the names of the ``Talker`` that ``models/talker/model.py``
builds (megatron backbone under ``backbone.``, the projections, the code predictor with transformers'
module names), under ``talker.`` in a rank's inventory so that stage patterns tell it from the Thinker
(tests/configs/test_talker_config.py compares it with the meta build, and its counts with transformers'
``Qwen3OmniMoeTalkerForConditionalGeneration``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

from omni_train.config.schema import AudioTowerConfig, ThinkerConfig, ParallelConfig, VisionTowerConfig
from omni_train.config.talker import TalkerConfig
from omni_train.models.thinker.lm import count_parameters, describe_shards

VISION_IN_CHANNELS = 3  # RGB; transformers' Qwen3OmniMoeVisionEncoderConfig.in_channels

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class RankParam:
    """One parameter as one rank holds it."""

    name: str
    numel: int
    expert: bool  # an MoE expert weight: sharded over ep, its optimizer state over expert data parallel


def _numel(shape: Shape) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _linear(name: str, out_features: int, in_features: int, bias: bool = True) -> List[Tuple[str, Shape]]:
    params = [(f"{name}.weight", (out_features, in_features))]
    return params + [(f"{name}.bias", (out_features,))] if bias else params


def _layer_norm(name: str, width: int) -> List[Tuple[str, Shape]]:
    return [(f"{name}.weight", (width,)), (f"{name}.bias", (width,))]


def audio_conv_out_bins(num_mel_bins: int) -> int:
    """Mel bins left after the three stride-2 convolutions (kernel 3, padding 1): ceil(x / 2) three times."""
    bins = num_mel_bins
    for _ in range(3):
        bins = (bins + 1) // 2
    return bins


def audio_tower_shapes(audio: AudioTowerConfig, output_dim: int) -> List[Tuple[str, Shape]]:
    """(name, shape) of every parameter of transformers' Qwen3OmniMoeAudioEncoder."""
    d, c = audio.d_model, audio.downsample_hidden_size
    shapes: List[Tuple[str, Shape]] = []
    for i in range(audio.num_layers):
        layer = f"layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes += _linear(f"{layer}.self_attn.{proj}", d, d)
        shapes += _layer_norm(f"{layer}.self_attn_layer_norm", d)
        shapes += _linear(f"{layer}.fc1", audio.ffn_dim, d) + _linear(f"{layer}.fc2", d, audio.ffn_dim)
        shapes += _layer_norm(f"{layer}.final_layer_norm", d)
    shapes += _layer_norm("ln_post", d)
    shapes += [("conv2d1.weight", (c, 1, 3, 3)), ("conv2d1.bias", (c,))]
    for conv in ("conv2d2", "conv2d3"):
        shapes += [(f"{conv}.weight", (c, c, 3, 3)), (f"{conv}.bias", (c,))]
    shapes += _linear("conv_out", d, c * audio_conv_out_bins(audio.num_mel_bins), bias=False)
    shapes += _linear("proj1", d, d) + _linear("proj2", output_dim, d)
    return shapes


def _patch_merger(name: str, vision: VisionTowerConfig, output_dim: int, postshuffle_norm: bool):
    merged = vision.hidden_size * vision.spatial_merge_size**2
    shapes = _layer_norm(f"{name}.ln_q", merged if postshuffle_norm else vision.hidden_size)
    return shapes + _linear(f"{name}.mlp.0", merged, merged) + _linear(f"{name}.mlp.2", output_dim, merged)


def vision_tower_shapes(vision: VisionTowerConfig, output_dim: int) -> List[Tuple[str, Shape]]:
    """(name, shape) of every parameter of transformers' Qwen3OmniMoeVisionEncoder."""
    hv = vision.hidden_size
    patch = (hv, VISION_IN_CHANNELS, vision.temporal_patch_size, vision.patch_size, vision.patch_size)
    shapes: List[Tuple[str, Shape]] = [("patch_embed.proj.weight", patch), ("patch_embed.proj.bias", (hv,)),
                                        ("pos_embed.weight", (vision.num_position_embeddings, hv))]
    for i in range(vision.depth):
        block = f"blocks.{i}"
        shapes += _layer_norm(f"{block}.norm1", hv) + _layer_norm(f"{block}.norm2", hv)
        shapes += _linear(f"{block}.attn.qkv", 3 * hv, hv) + _linear(f"{block}.attn.proj", hv, hv)
        shapes += _linear(f"{block}.mlp.linear_fc1", vision.intermediate_size, hv)
        shapes += _linear(f"{block}.mlp.linear_fc2", hv, vision.intermediate_size)
    shapes += _patch_merger("merger", vision, output_dim, postshuffle_norm=False)
    for j in range(len(vision.deepstack_visual_indexes)):
        shapes += _patch_merger(f"merger_list.{j}", vision, output_dim, postshuffle_norm=True)
    return shapes


def tower_parameter_counts(model_cfg: ThinkerConfig) -> Tuple[int, int]:
    """(audio tower, vision tower) parameter counts; both 0 without towers."""
    if not model_cfg.towers:
        return 0, 0
    audio = sum(_numel(s) for _, s in audio_tower_shapes(model_cfg.audio_tower, model_cfg.hidden_size))
    vision = sum(_numel(s) for _, s in vision_tower_shapes(model_cfg.vision_tower, model_cfg.hidden_size))
    return audio, vision


def count_thinker_parameters(model_cfg: ThinkerConfig) -> Tuple[int, int]:
    """(total, active per token) of the Thinker: the LM, plus the audio and vision towers when
    ``model.thinker.towers`` is on (the towers are dense: every tower parameter is active)."""
    lm_total, lm_active = count_parameters(model_cfg)
    towers = sum(tower_parameter_counts(model_cfg))
    return lm_total + towers, lm_active + towers


def rank_parameters(model_cfg: ThinkerConfig, parallel_cfg: ParallelConfig, pipeline_stage: int = 0
                    ) -> List[RankParam]:
    """Every parameter held by one rank of ``pipeline_stage`` (tensor / expert rank 0: all ranks of a
    stage hold the same sizes). The towers, when on, are replicated on every rank (tp = pp = 1)."""
    entry = next(e for e in describe_shards(model_cfg, parallel_cfg) if e["stage"] == pipeline_stage)
    prefix = "language_model." if model_cfg.towers else ""
    params = []
    for i in range(entry["layers"]):
        for name, shape in entry["layer"]:
            params.append(RankParam(f"{prefix}decoder.layers.{i}.{name}", _numel(shape),
                                    expert=".experts." in name))
    for name, shape in entry["other"]:
        params.append(RankParam(f"{prefix}{name}", _numel(shape), expert=False))
    if model_cfg.towers:
        width = model_cfg.hidden_size
        for tower, shapes in (("audio_tower", audio_tower_shapes(model_cfg.audio_tower, width)),
                              ("visual", vision_tower_shapes(model_cfg.vision_tower, width))):
            params += [RankParam(f"{tower}.{name}", _numel(shape), expert=False) for name, shape in shapes]
    return params


# ----- the Talker ------------------------------------------------------------------------------------


def _talker_layer_shapes(t: TalkerConfig, ep: int) -> List[Tuple[str, Shape]]:
    """One backbone layer on one expert-parallel rank (tp = 1): attention, router, the local routed experts
    (stacked for experts_impl=grouped, one pair each for sequential) and the gated shared expert."""
    h, d, local = t.hidden_size, t.head_dim, t.num_experts // ep
    f, fs = t.moe_ffn_hidden_size, t.shared_expert_ffn_hidden_size
    shapes = [("input_layernorm.weight", (h,)),
              ("self_attention.linear_qkv.weight", ((t.num_attention_heads + 2 * t.num_query_groups) * d, h)),
              ("self_attention.q_layernorm.weight", (d,)), ("self_attention.k_layernorm.weight", (d,)),
              ("self_attention.linear_proj.weight", (h, t.num_attention_heads * d)),
              ("pre_mlp_layernorm.weight", (h,)), ("mlp.router.weight", (t.num_experts, h))]
    if t.experts_impl == "grouped":
        shapes += [("mlp.experts.linear_fc1_weight", (local, 2 * f, h)),
                   ("mlp.experts.linear_fc2_weight", (local, h, f))]
    else:
        for i in range(local):
            shapes += [(f"mlp.experts.local_experts.{i}.linear_fc1.weight", (2 * f, h)),
                       (f"mlp.experts.local_experts.{i}.linear_fc2.weight", (h, f))]
    return shapes + [("mlp.shared_experts.gate_weight", (1, h)),
                     ("mlp.shared_experts.linear_fc1.weight", (2 * fs, h)),
                     ("mlp.shared_experts.linear_fc2.weight", (h, fs))]


def _code_predictor_shapes(t: TalkerConfig) -> List[Tuple[str, Shape]]:
    cp = t.code_predictor
    h, d = cp.hidden_size, cp.head_dim
    shapes: List[Tuple[str, Shape]] = []
    for i in range(cp.num_layers):
        layer = f"layers.{i}"
        shapes += [(f"{layer}.self_attn.q_proj.weight", (cp.num_attention_heads * d, h)),
                   (f"{layer}.self_attn.k_proj.weight", (cp.num_query_groups * d, h)),
                   (f"{layer}.self_attn.v_proj.weight", (cp.num_query_groups * d, h)),
                   (f"{layer}.self_attn.o_proj.weight", (h, cp.num_attention_heads * d)),
                   (f"{layer}.self_attn.q_norm.weight", (d,)), (f"{layer}.self_attn.k_norm.weight", (d,)),
                   (f"{layer}.mlp.gate_proj.weight", (cp.ffn_hidden_size, h)),
                   (f"{layer}.mlp.up_proj.weight", (cp.ffn_hidden_size, h)),
                   (f"{layer}.mlp.down_proj.weight", (h, cp.ffn_hidden_size)),
                   (f"{layer}.input_layernorm.weight", (h,)), (f"{layer}.post_attention_layernorm.weight", (h,))]
    shapes.append(("norm.weight", (h,)))
    for j in range(t.num_code_groups - 1):  # one input embedding and one head per residual codebook
        shapes += [(f"codec_embedding.{j}.weight", (cp.codebook_size, h)),
                   (f"lm_head.{j}.weight", (cp.codebook_size, h))]
    return shapes


def talker_shapes(t: TalkerConfig, ep: int = 1) -> Dict[str, List[Tuple[str, Shape]]]:
    """(name, shape) of every parameter of the Talker one expert-parallel rank holds, by part: ``backbone``
    (codec embedding, layers, final norm, codec head), ``projections`` (text / hidden), ``code_predictor``.
    Only the routed experts are split over ep; the rest is replicated (tp = pp = cp = 1)."""
    h = t.hidden_size
    backbone = [("backbone.embedding.word_embeddings.weight", (t.codec_vocab_size, h))]
    layer = _talker_layer_shapes(t, ep)
    for i in range(t.num_layers):
        backbone += [(f"backbone.decoder.layers.{i}.{name}", shape) for name, shape in layer]
    backbone += [("backbone.decoder.final_layernorm.weight", (h,)),
                 ("backbone.output_layer.weight", (t.codec_vocab_size, h))]
    projections = []
    for name in ("text_projection", "hidden_projection"):
        projections += _linear(f"{name}.linear_fc1", t.projection_ffn_hidden_size, t.thinker_hidden_size)
        projections += _linear(f"{name}.linear_fc2", h, t.projection_ffn_hidden_size)
    predictor = [(f"code_predictor.{name}", shape) for name, shape in _code_predictor_shapes(t)]
    return dict(backbone=backbone, projections=projections, code_predictor=predictor)


def talker_idle_expert_parameters(t: TalkerConfig) -> int:
    """Routed-expert parameters a token does not use: (E - k) experts x 3 x hidden x expert FFN per layer."""
    return t.num_layers * (t.num_experts - t.router_topk) * 3 * t.hidden_size * t.moe_ffn_hidden_size


def talker_parameter_parts(t: TalkerConfig) -> Dict[str, int]:
    """Parameter count of each part of the unsharded Talker (``talker_shapes``' parts)."""
    return {part: sum(_numel(s) for _, s in shapes) for part, shapes in talker_shapes(t).items()}


def count_talker_parameters(t: TalkerConfig) -> Tuple[int, int]:
    """(total, active per token) of the Talker: backbone, projections and code predictor; a token leaves
    E - k routed experts of every layer idle (the shared expert, the projections and the dense code
    predictor, which runs on every frame, are active)."""
    total = sum(talker_parameter_parts(t).values())
    return total, total - talker_idle_expert_parameters(t)


def talker_rank_parameters(t: TalkerConfig, ep: int) -> List[RankParam]:
    """Every Talker parameter one rank holds, named ``talker.<its name in the Talker>``."""
    return [RankParam(f"talker.{name}", _numel(shape), expert=".mlp.experts." in name)
            for shapes in talker_shapes(t, ep).values() for name, shape in shapes]
