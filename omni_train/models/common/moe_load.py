"""Counts the tokens each router sends to each expert, per MoE layer, for the load-imbalance metric."""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router import TopKRouter


class ExpertLoadTracker:
    """Forward hooks on every TopKRouter accumulate tokens per expert until `imbalance()` reads them."""

    def __init__(self, model: torch.nn.Module):
        self.routers: List[TopKRouter] = [m for m in model.modules() if isinstance(m, TopKRouter)]
        self.counts: Dict[int, torch.Tensor] = {}
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, index: int):
        def hook(module, inputs, outputs):
            _, routing_map = outputs
            counts = routing_map.detach().sum(dim=0).float()
            if index in self.counts:
                self.counts[index] += counts
            else:
                self.counts[index] = counts

        return hook

    def imbalance(self, group=None) -> List[float]:
        """max / mean tokens per expert for each local MoE layer, summed over `group`; then reset."""
        if not self.counts:
            return []
        stacked = torch.stack([self.counts[i] for i in sorted(self.counts)])
        if dist.is_initialized():
            dist.all_reduce(stacked, group=group)
        self.counts = {}
        mean = stacked.mean(dim=1).clamp_min(1e-9)
        return (stacked.max(dim=1).values / mean).tolist()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
