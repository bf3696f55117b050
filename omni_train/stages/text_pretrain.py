"""Text-only pretraining of the Thinker LM on a token stream."""

from __future__ import annotations

from functools import partial

from omni_train.data import build_source
from omni_train.models.common.attention import document_attention
from omni_train.losses.lm import masked_token_loss
from omni_train.models.common.init import init_layout_independent
from omni_train.models.thinker.lm import build_thinker_lm
from omni_train.stages import Stage


def build_model(cfg, env, params_dtype, pre_process=True, post_process=True):
    model = build_thinker_lm(cfg.model.thinker, cfg.parallel, device=env.device, params_dtype=params_dtype,
                             pre_process=pre_process, post_process=post_process,
                             recompute=cfg.trainer.recompute)
    init_layout_independent(model, cfg.model.thinker.init_std, cfg.model.thinker.num_layers, cfg.trainer.seed)
    return model


def build_data(cfg, env):
    return build_source(cfg, env)


def forward(model, batch, frozen=None):
    # Packed shard batches carry their documents' boundaries; attention stays inside each document.
    # (The synthetic stream is one document per row: plain causal attention.)
    per_token_loss = model(batch["input_ids"], batch["position_ids"], labels=batch["labels"],
                           **document_attention(batch))
    return per_token_loss, partial(masked_token_loss, loss_mask=batch["loss_mask"])


STAGE = Stage(build_model=build_model, build_data=build_data, forward=forward)
