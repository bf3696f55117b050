"""TalkerConfig <-> transformers' Qwen3-Omni talker configs (as dicts, the form config.json holds).

``hf_talker_config`` gives the kwargs of ``Qwen3OmniMoeTalkerConfig`` (its ``text_config`` and
``code_predictor_config`` included), ``hf_top_level_ids`` the ids that live on ``Qwen3OmniMoeConfig`` itself
(tts_*, im_start, user, assistant). It sets the fields transformers reads without declaring them
(``head_dim``, ``shared_expert_intermediate_size``, ``spatial_merge_size``). ``talker_config_from_hf`` is
the inverse, from a released ``config.json``'s ``talker_config`` and its top level.
"""

from __future__ import annotations

from typing import Any, Dict

from omni_train.models.talker.config import CodecIds, CodePredictorConfig, TalkerConfig, TextIds


def hf_code_predictor_config(cfg: TalkerConfig) -> Dict[str, Any]:
    cp = cfg.code_predictor
    return dict(
        vocab_size=cp.codebook_size, hidden_size=cp.hidden_size, intermediate_size=cp.ffn_hidden_size,
        num_hidden_layers=cp.num_layers, num_attention_heads=cp.num_attention_heads,
        num_key_value_heads=cp.num_query_groups, head_dim=cp.head_dim, hidden_act="silu",
        max_position_embeddings=cp.max_position_embeddings, rms_norm_eps=cp.rms_norm_eps,
        rope_parameters=dict(rope_type="default", rope_theta=float(cp.rope_theta)),
        num_code_groups=cfg.num_code_groups, attention_bias=False, tie_word_embeddings=False,
        initializer_range=cfg.init_std,
    )


def hf_talker_text_config(cfg: TalkerConfig) -> Dict[str, Any]:
    if cfg.load_balancing != "aux_loss":
        raise ValueError(f"talker load_balancing={cfg.load_balancing!r} has no Hugging Face equivalent")
    return dict(
        vocab_size=cfg.codec_vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.projection_ffn_hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, initializer_range=cfg.init_std,
        rope_parameters=dict(rope_type="default", rope_theta=float(cfg.rope_theta),
                             mrope_section=list(cfg.mrope_section), interleaved=True),
        decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=cfg.moe_ffn_hidden_size,
        num_experts=cfg.num_experts, num_experts_per_tok=cfg.router_topk, norm_topk_prob=cfg.norm_topk_prob,
        shared_expert_intermediate_size=cfg.shared_expert_ffn_hidden_size,
        router_aux_loss_coef=cfg.aux_loss_coeff, attention_bias=False, tie_word_embeddings=False,
    )


def hf_talker_config(cfg: TalkerConfig) -> Dict[str, Any]:
    """kwargs of transformers' ``Qwen3OmniMoeTalkerConfig``."""
    c, t = cfg.codec, cfg.text
    return dict(
        text_config=hf_talker_text_config(cfg), code_predictor_config=hf_code_predictor_config(cfg),
        num_code_groups=cfg.num_code_groups, thinker_hidden_size=cfg.thinker_hidden_size,
        accept_hidden_layer=cfg.accept_hidden_layer, spatial_merge_size=cfg.spatial_merge_size,
        position_id_per_seconds=cfg.position_id_per_seconds,
        codec_eos_token_id=c.eos, codec_nothink_id=c.nothink, codec_think_bos_id=c.think_bos,
        codec_think_eos_id=c.think_eos, codec_pad_id=c.pad, codec_bos_id=c.bos, speaker_id=dict(c.speakers),
        audio_token_id=t.audio, image_token_id=t.image, video_token_id=t.video,
        vision_start_token_id=t.vision_start, audio_start_token_id=t.audio_start,
        initializer_range=cfg.init_std, tie_word_embeddings=False,
    )


def hf_top_level_ids(cfg: TalkerConfig) -> Dict[str, int]:
    """The ids ``Qwen3OmniMoeConfig`` holds itself (``generate`` reads them to build the Talker's context)."""
    t = cfg.text
    return dict(im_start_token_id=t.im_start, im_end_token_id=t.im_end, user_token_id=t.user,
                assistant_token_id=t.assistant, tts_pad_token_id=t.tts_pad, tts_bos_token_id=t.tts_bos,
                tts_eos_token_id=t.tts_eos)


def _rope(text_config: Dict[str, Any]):
    params = text_config.get("rope_parameters") or text_config.get("rope_scaling") or {}
    theta = params.get("rope_theta", text_config.get("rope_theta", 1_000_000.0))
    if params.get("rope_type", params.get("type", "default")) != "default":
        raise ValueError(f"talker rope_type {params.get('rope_type')!r} is not supported (only 'default')")
    return float(theta), params.get("mrope_section")


def _check_supported(text: Dict[str, Any]) -> None:
    need = {"decoder_sparse_step": 1, "attention_bias": False, "hidden_act": "silu"}
    for key, value in need.items():
        if key in text and text[key] != value:
            raise ValueError(f"talker_config.text_config.{key}={text[key]!r} is not supported (need {value!r})")
    if text.get("mlp_only_layers"):
        raise ValueError("talker_config.text_config.mlp_only_layers is not supported (every layer is MoE)")
    if not text.get("shared_expert_intermediate_size"):
        raise ValueError("talker_config.text_config.shared_expert_intermediate_size is missing")


def talker_config_from_hf(talker: Dict[str, Any], top: Dict[str, Any]) -> TalkerConfig:
    """A TalkerConfig from ``config.json``'s ``talker_config`` (``talker``) and its top level (``top``:
    tts_*, im_start, user, assistant ids; ``im_end_token_id`` defaults to the release's)."""
    text, cp = talker["text_config"], talker["code_predictor_config"]
    _check_supported(text)
    theta, section = _rope(text)
    cp_theta, _ = _rope(cp)
    experts = text.get("num_experts", text.get("num_local_experts"))
    heads, cp_heads = text["num_attention_heads"], cp["num_attention_heads"]
    defaults = TextIds()
    return TalkerConfig(
        hidden_size=text["hidden_size"], num_layers=text["num_hidden_layers"], num_attention_heads=heads,
        num_query_groups=text.get("num_key_value_heads", heads),
        head_dim=text.get("head_dim") or text["hidden_size"] // heads, num_experts=experts,
        router_topk=text["num_experts_per_tok"], norm_topk_prob=bool(text.get("norm_topk_prob", False)),
        moe_ffn_hidden_size=text["moe_intermediate_size"],
        shared_expert_ffn_hidden_size=text["shared_expert_intermediate_size"],
        codec_vocab_size=text["vocab_size"], rope_theta=theta,
        mrope_section=list(section) if section is not None else [24, 20, 20],
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        max_position_embeddings=text.get("max_position_embeddings", 65536),
        init_std=text.get("initializer_range", 0.02), aux_loss_coeff=text.get("router_aux_loss_coef", 1e-3),
        thinker_hidden_size=talker["thinker_hidden_size"], projection_ffn_hidden_size=text["intermediate_size"],
        accept_hidden_layer=talker["accept_hidden_layer"], num_code_groups=talker["num_code_groups"],
        position_id_per_seconds=talker.get("position_id_per_seconds", 13),
        spatial_merge_size=talker.get("spatial_merge_size", 2),
        codec=CodecIds(pad=talker["codec_pad_id"], bos=talker["codec_bos_id"], eos=talker["codec_eos_token_id"],
                       nothink=talker["codec_nothink_id"], think_bos=talker["codec_think_bos_id"],
                       think_eos=talker["codec_think_eos_id"], speakers=dict(talker.get("speaker_id") or {})),
        text=TextIds(im_start=top["im_start_token_id"], im_end=top.get("im_end_token_id", defaults.im_end),
                     user=top["user_token_id"], assistant=top["assistant_token_id"],
                     tts_pad=top["tts_pad_token_id"], tts_bos=top["tts_bos_token_id"],
                     tts_eos=top["tts_eos_token_id"], audio=talker["audio_token_id"],
                     image=talker["image_token_id"], video=talker["video_token_id"],
                     vision_start=talker["vision_start_token_id"], audio_start=talker["audio_start_token_id"]),
        code_predictor=CodePredictorConfig(
            hidden_size=cp["hidden_size"], num_layers=cp["num_hidden_layers"], num_attention_heads=cp_heads,
            num_query_groups=cp.get("num_key_value_heads", cp_heads),
            head_dim=cp.get("head_dim") or cp["hidden_size"] // cp_heads, ffn_hidden_size=cp["intermediate_size"],
            codebook_size=cp["vocab_size"], rope_theta=cp_theta, rms_norm_eps=cp.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cp.get("max_position_embeddings", 32768)),
    )
