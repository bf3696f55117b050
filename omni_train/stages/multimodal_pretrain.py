"""Pretraining the whole Thinker (audio tower + vision tower + LM) on packed multimodal shards.

The towers' placeholder token ids come from the data's tokenizer (the ChatEncoder that writes them), so
model and data agree. Which parameters train is the stage config's (``stage.trainable`` /
``stage.frozen``, regexes over ``audio_tower.*`` / ``visual.*`` / ``language_model.*``), e.g.
``"stage.trainable=['^audio_tower\\.']"`` for an audio-encoder-only warm-up.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core.utils import unwrap_model

from omni_train.data import build_source
from omni_train.data.chat import ChatEncoder
from omni_train.losses.lm import masked_token_loss
from omni_train.models.common.attention import document_attention
from omni_train.models.common.init import init_layout_independent
from omni_train.models.thinker.hf_config import hf_thinker_config
from omni_train.models.thinker.omni import build_omni_thinker
from omni_train.stages import Stage

# An offset so the towers' RNG stream differs from the LM's seed usage elsewhere.
TOWER_SEED_OFFSET = 7919


def build_model(cfg, env, params_dtype, pre_process=True, post_process=True):
    if not (pre_process and post_process):
        raise NotImplementedError("multimodal_pretrain runs without pipeline stages (parallel.pp=1)")
    if not cfg.model.thinker.towers:
        raise ValueError("model.thinker.towers: multimodal_pretrain needs a model with towers (e.g. model=tiny_omni)")
    if cfg.data.name != "shards":
        raise ValueError("data.name: multimodal_pretrain reads media from shards (data=shards)")
    if cfg.data.tokenizer is None:
        raise ValueError("data.tokenizer: multimodal_pretrain takes its placeholder ids from the tokenizer")
    token_ids = ChatEncoder.from_pretrained(cfg.data.tokenizer).ids
    # Towers are initialised by transformers from torch's global RNG: the same seed on every rank gives
    # every rank the same tower weights. The LM is then re-drawn layout-independently.
    torch.manual_seed(cfg.trainer.seed + TOWER_SEED_OFFSET)
    model = build_omni_thinker(hf_thinker_config(cfg.model.thinker, token_ids), cfg.model.thinker, cfg.parallel,
                               device=env.device, params_dtype=params_dtype, recompute=cfg.trainer.recompute)
    init_layout_independent(model.language_model, cfg.model.thinker.init_std, cfg.model.thinker.num_layers, cfg.trainer.seed)
    return model


def build_data(cfg, env):
    if cfg.data.name != "shards":
        raise ValueError("data.name: multimodal_pretrain reads media from shards (data=shards)")
    return build_source(cfg, env)


def forward(model, batch, frozen=None):
    device = batch["input_ids"].device
    # media: the towers' inputs, collated by the loader and copied with the batch (data/batch.py); their
    # plans are worked out from media_sizes, which stays on the host (no syncs in them)
    media = unwrap_model(model).prepare_media(batch["media"], batch["media_sizes"], device)
    per_token_loss = model(batch["input_ids"], batch["position_ids"], labels=batch["labels"],
                           **document_attention(batch), **media)
    return per_token_loss, partial(masked_token_loss, loss_mask=batch["loss_mask"],
                                   modality_ids=batch.get("modality_ids"))


STAGE = Stage(build_model=build_model, build_data=build_data, forward=forward)
