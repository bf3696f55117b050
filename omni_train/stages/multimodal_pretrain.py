"""Pretraining the whole Thinker (audio tower + vision tower + LM) on packed multimodal shards.

The towers' placeholder token ids come from the data's tokenizer (the ChatEncoder that writes them), so
model and data agree. Which parameters train is the stage config's (``stage.trainable`` /
``stage.frozen``, regexes over ``audio_tower.*`` / ``visual.*`` / ``language_model.*``), e.g.
``"stage.trainable=['^audio_tower\\.']"`` for an audio-encoder-only warm-up.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Dict

import torch
from megatron.core.utils import unwrap_model

from omni_train.data import build_source
from omni_train.data.chat import ChatEncoder
from omni_train.data.media_batch import collate_media
from omni_train.losses.lm import masked_token_loss
from omni_train.models.attention import document_attention
from omni_train.models.init import init_layout_independent
from omni_train.models.thinker import build_omni_thinker
from omni_train.stages import Stage

# An offset so the towers' RNG stream differs from the LM's seed usage elsewhere.
TOWER_SEED_OFFSET = 7919


def hf_thinker_config(model_cfg, token_ids: Dict[str, int]) -> Dict[str, Any]:
    """The transformers thinker config (as a dict) of the towers: sizes from ``model_cfg``, output width
    the LM's hidden size, placeholder ids from the data's tokenizer. Its text_config is not read."""
    audio, vision = model_cfg.audio_tower, model_cfg.vision_tower
    return dict(
        audio_config=dict(
            num_mel_bins=audio.num_mel_bins, encoder_layers=audio.num_layers, d_model=audio.d_model,
            encoder_attention_heads=audio.num_heads, encoder_ffn_dim=audio.ffn_dim,
            output_dim=model_cfg.hidden_size, n_window=audio.n_window, n_window_infer=audio.n_window_infer,
            downsample_hidden_size=audio.downsample_hidden_size,
            max_source_positions=audio.max_source_positions,
        ),
        vision_config=dict(
            depth=vision.depth, hidden_size=vision.hidden_size, num_heads=vision.num_heads,
            intermediate_size=vision.intermediate_size, patch_size=vision.patch_size,
            spatial_merge_size=vision.spatial_merge_size, temporal_patch_size=vision.temporal_patch_size,
            num_position_embeddings=vision.num_position_embeddings, out_hidden_size=model_cfg.hidden_size,
            deepstack_visual_indexes=list(vision.deepstack_visual_indexes),
        ),
        audio_token_id=token_ids["audio_pad"], image_token_id=token_ids["image_pad"],
        video_token_id=token_ids["video_pad"], vision_start_token_id=token_ids["vision_start"],
        audio_start_token_id=token_ids["audio_start"],
    )


def build_model(cfg, env, params_dtype, pre_process=True, post_process=True):
    if not (pre_process and post_process):
        raise NotImplementedError("multimodal_pretrain runs without pipeline stages (parallel.pp=1)")
    if not cfg.model.towers:
        raise ValueError("model.towers: multimodal_pretrain needs a model with towers (e.g. model=tiny_omni)")
    if cfg.data.tokenizer is None:
        raise ValueError("data.tokenizer: multimodal_pretrain takes its placeholder ids from the tokenizer")
    token_ids = ChatEncoder.from_pretrained(cfg.data.tokenizer).ids
    # Towers are initialised by transformers from torch's global RNG: the same seed on every rank gives
    # every rank the same tower weights. The LM is then re-drawn layout-independently.
    torch.manual_seed(cfg.trainer.seed + TOWER_SEED_OFFSET)
    model = build_omni_thinker(hf_thinker_config(cfg.model, token_ids), cfg.model, cfg.parallel,
                               device=env.device, params_dtype=params_dtype, recompute=cfg.trainer.recompute)
    init_layout_independent(model.language_model, cfg.model.init_std, cfg.model.num_layers, cfg.trainer.seed)
    return model


def build_data(cfg, env):
    if cfg.data.name != "shards":
        raise ValueError("data.name: multimodal_pretrain reads media from shards (data=shards)")
    return build_source(cfg, env)


def forward(model, batch):
    device = batch["input_ids"].device
    # collated on the host; the towers' plans are worked out there before the copy (no syncs in them)
    media = unwrap_model(model).prepare_media(collate_media(batch.get("media") or []), device)
    per_token_loss = model(batch["input_ids"], batch["position_ids"], labels=batch["labels"],
                           **document_attention(batch), **media)
    return per_token_loss, partial(masked_token_loss, loss_mask=batch["loss_mask"],
                                   modality_ids=batch.get("modality_ids"))


STAGE = Stage(build_model=build_model, build_data=build_data, forward=forward)
