"""Next-token cross-entropy, summed over the tokens a mask keeps (normalised once per global batch)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from omni_train.data.packing import MODALITIES


def masked_token_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor,
                      modality_ids: Optional[torch.Tensor] = None,
                      ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """megatron's per-token-loss contract: (sum of losses, number of tokens, values to report).

    The loop divides by the token count of the whole global batch, so every data-parallel layout and
    every micro-batch split gives the same loss and gradients. The report (omni_train/loops/report.py)
    holds ``loss`` (loss sum, token count) and, with ``modality_ids`` ([B, L], an index into
    data.packing.MODALITIES per token, -1 on padding), ``loss_<modality>`` for every modality.
    """
    mask = loss_mask.to(per_token_loss.dtype)
    loss_sum = (per_token_loss.float() * mask.float()).sum()
    num_tokens = mask.sum().to(torch.int)
    report = {"loss": torch.stack([loss_sum.detach(), num_tokens.detach().float()])}
    if modality_ids is not None:
        table = _per_modality(per_token_loss.detach().float(), mask.detach().float(), modality_ids)
        report.update({f"loss_{name}": pair for name, pair in zip(MODALITIES, table)})
    return loss_sum, num_tokens, report


def _per_modality(per_token_loss: torch.Tensor, mask: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
    onehot = torch.nn.functional.one_hot(modality_ids.clamp_min(0).long(), len(MODALITIES)).float()
    onehot = onehot * (modality_ids >= 0).unsqueeze(-1).float() * mask.unsqueeze(-1)
    sums = (onehot * per_token_loss.unsqueeze(-1)).flatten(0, -2).sum(0)
    return torch.stack([sums, onehot.flatten(0, -2).sum(0)], dim=1)
