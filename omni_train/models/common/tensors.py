"""Moving dicts of tensors between devices (media inputs, tower plans, batches)."""

from __future__ import annotations

from typing import Any, Dict

import torch


def tensors_to(inputs: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """The tower inputs (or a tower's plan, models.thinker.tower_plan) on the model's device: tensors copied, None
    and numbers as they are (the loop moves only top-level batch tensors)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in inputs.items()}
