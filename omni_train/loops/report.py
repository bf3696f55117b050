"""The loss report: whatever named (sum, count) pairs a stage's loss function returns, reduced over the
global batch and logged as sum / count, without the loop knowing what they are.

A stage's ``loss_func`` returns megatron's (loss_sum, num_tokens, report) with ``report`` a dict
``{name: tensor [2] (sum, count)}``: ``loss`` (the optimised loss per target token), ``loss_audio``,
later ``kl_teacher``, ``reward``, ``dpo_margin`` ... Each is logged as ``name = sum / count`` (omitted when
its count over the global batch is 0) with ``name_count`` beside it for every name but ``loss``. A name
ending in ``_max`` is a maximum instead: its pair is (value, 1), reduced with max and logged as the value.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state


class LossReport:
    def __init__(self) -> None:
        # The names every rank reduces, in one order: agreed once, at the first step, over all ranks
        # (ranks that compute no loss, such as earlier pipeline stages, know them only from the others).
        self.names: Optional[List[str]] = None

    def _agree(self, local: Sequence[str]) -> List[str]:
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered: List[Optional[List[str]]] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, sorted(local))
            return sorted({name for names in gathered for name in names})
        return sorted(local)

    def sums(self, reports: List[Dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
        """Collective, without waiting for the device: float64 [len(names), 2], each name's (sum, count)
        over the global batch.

        Loss lives on the last pipeline stage and tensor-parallel ranks hold copies, so only tp rank 0 of
        the last stage contributes; its pairs are summed world-wide."""
        contributes = parallel_state.is_pipeline_last_stage() and (
            parallel_state.get_tensor_model_parallel_rank() == 0)
        reports = reports if contributes else []
        if self.names is None:
            self.names = self._agree({name for report in reports for name in report})
        index = {name: i for i, name in enumerate(self.names)}
        total = torch.zeros(len(self.names), 2, dtype=torch.float64, device=device)
        for report in reports:
            for name, pair in report.items():
                if name not in index:
                    raise ValueError(f"loss report: {name!r} first appeared after step 1 (reported so far: "
                                     f"{', '.join(self.names)}); a stage reports the same names every step")
                pair = pair.to(device, torch.float64)
                i = index[name]
                total[i] = torch.maximum(total[i], pair) if name.endswith("_max") else total[i] + pair
        if any(name.endswith("_max") for name in self.names):  # decided on the host: no device sync
            is_max = torch.tensor([name.endswith("_max") for name in self.names], device=device)
            peaks = torch.where(is_max[:, None], total, torch.zeros_like(total))
            dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
            total = torch.where(is_max[:, None], torch.zeros_like(total), total)
            dist.all_reduce(total)
            return torch.where(is_max[:, None], peaks, total)
        dist.all_reduce(total)
        return total

    def means(self, flat: Sequence[float]) -> Dict[str, float]:
        """``sums`` read back on the host (flattened) -> {name: sum / count, name_count: count}."""
        values: Dict[str, float] = {}
        for i, name in enumerate(self.names or []):
            total, count = flat[2 * i], flat[2 * i + 1]
            if name == "loss":
                values["loss"] = total / max(count, 1.0)
            elif name.endswith("_max"):
                if count > 0:
                    values[name] = total
            elif count > 0:
                values[name] = total / count
                values[f"{name}_count"] = count
        return values
