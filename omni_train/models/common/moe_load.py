"""Counts the tokens each router sends to each expert, per MoE layer, for the load-imbalance metric.

Forwards that are not training (a rollout engine decoding with the trained model, the old policy's
log-probabilities) run inside ``uncounted()``: the metric counts the tokens the model trains on.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router import TopKRouter


_counting = [True]


@contextlib.contextmanager
def uncounted():
    """No tracker counts the forwards run inside."""
    previous, _counting[0] = _counting[0], False
    try:
        yield
    finally:
        _counting[0] = previous


class ExpertLoadTracker:
    """Forward hooks on every TopKRouter accumulate tokens per expert until `imbalance()` reads them."""

    def __init__(self, model: torch.nn.Module):
        self.routers: List[TopKRouter] = [m for m in model.modules() if isinstance(m, TopKRouter)]
        self.counts: Dict[int, torch.Tensor] = {}
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, index: int):
        def hook(module, inputs, outputs):
            if not _counting[0]:
                return
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
