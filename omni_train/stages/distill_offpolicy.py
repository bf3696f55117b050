"""Off-policy distillation (report section 4.1, strong-to-weak, first phase): the Thinker trains on the
responses of a teacher stored with each sample (``data.responses.source=teacher``).

The loss is the cross-entropy on the teacher's response tokens; with ``data.responses.top_logprobs`` K > 0
it adds ``stage.loss.top_k_weight`` times the KL from the teacher's stored top-k distribution (plus a tail
bucket) to the student's (``losses.distill.top_k_kl``), both averaged over the response tokens of the
global batch. Logged: ``loss`` (what is optimised), ``loss_nll`` and ``kl_top_k`` (per token that has the
teacher's distribution), and the per-modality cross-entropies.
"""

from __future__ import annotations

import torch
from megatron.core.utils import unwrap_model

from omni_train.losses.distill import token_nll, top_k_kl
from omni_train.losses.lm import masked_token_loss
from omni_train.models.common.attention import document_attention
from omni_train.stages import Stage
from omni_train.stages.multimodal_pretrain import build_data, build_model
from omni_train.stages.multimodal_pretrain import forward as cross_entropy_forward


def options(cfg):
    return {"top_k_weight": float(cfg.stage.loss.top_k_weight)}


def _loss(logits, batch, top_k_weight: float):
    nll = token_nll(logits, batch["labels"])
    loss_sum, num_tokens, report = masked_token_loss(nll, batch["loss_mask"], batch.get("modality_ids"))
    report["loss_nll"] = report["loss"]
    kl = top_k_kl(logits, batch["top_ids"], batch["top_logprobs"], batch["top_mask"])
    kl_sum = (kl * batch["loss_mask"].to(kl.dtype)).sum()
    loss_sum = loss_sum + top_k_weight * kl_sum
    report["kl_top_k"] = torch.stack([kl_sum.detach(), (batch["top_mask"] & (batch["loss_mask"] > 0)).sum().float()])
    report["loss"] = torch.stack([loss_sum.detach(), report["loss"][1]])
    return loss_sum, num_tokens, report


def forward(model, batch, frozen=None, top_k_weight: float = 1.0):
    if "top_ids" not in batch:  # teacher responses without stored distributions: cross-entropy only
        return cross_entropy_forward(model, batch, frozen)
    device = batch["input_ids"].device
    media = unwrap_model(model).prepare_media(batch["media"], batch["media_sizes"], device)
    logits = model(batch["input_ids"], batch["position_ids"], labels=None, **document_attention(batch), **media)
    return logits, lambda output: _loss(output, batch, top_k_weight)


STAGE = Stage(build_model=build_model, build_data=build_data, forward=forward, options=options)
