"""Next-token cross-entropy, summed over the tokens a mask keeps (normalised once per global batch)."""

from __future__ import annotations

from typing import Dict, Tuple

import torch


def masked_token_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """megatron's per-token-loss contract: (sum of losses, number of tokens, values to report).

    The loop divides by the token count of the whole global batch, so every data-parallel layout and
    every micro-batch split gives the same loss and gradients.
    """
    mask = loss_mask.to(per_token_loss.dtype)
    loss_sum = (per_token_loss.float() * mask.float()).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.detach().float()])
    return loss_sum, num_tokens, {"lm_loss": report}
