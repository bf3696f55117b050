"""Training stages. Each module states only what differs: model, data, loss (conf/stage/<name>.yaml)."""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import torch

from omni_train.config import StageConfig

STAGES = {
    "text_pretrain": "omni_train.stages.text_pretrain",
    "multimodal_pretrain": "omni_train.stages.multimodal_pretrain",
    "audio_align": "omni_train.stages.audio_align",
    "vision_align": "omni_train.stages.vision_align",
    "general_pretrain": "omni_train.stages.general_pretrain",
    "long_context": "omni_train.stages.long_context",
}


@dataclass
class Stage:
    # (TrainConfig, ParallelEnv, pre_process, post_process) -> megatron model on env.device
    build_model: Callable[..., torch.nn.Module]
    # (TrainConfig, ParallelEnv) -> this rank's batch source: next_microbatches() -> list of dicts of
    # tensors (one optimizer step), state_dict() / load_state_dict() (saved in checkpoints), stats()
    build_data: Callable[..., Any]
    # (model, batch) -> (output tensor, loss_func(output) -> (loss_sum, num_tokens, report))
    forward: Callable[..., Tuple[torch.Tensor, Callable]]


def load_stage(cfg: StageConfig) -> Stage:
    if cfg.name not in STAGES:
        raise KeyError(f"stage.name: unknown stage {cfg.name!r}; known: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[cfg.name]).STAGE


def apply_trainable(model: torch.nn.Module, cfg: StageConfig) -> Dict[str, int]:
    """Freeze every parameter not matched by cfg.trainable, or matched by cfg.frozen."""
    counts = {"trainable": 0, "frozen": 0}
    for name, param in model.named_parameters():
        train = any(re.search(p, name) for p in cfg.trainable) and not any(
            re.search(p, name) for p in cfg.frozen)
        param.requires_grad_(train)
        counts["trainable" if train else "frozen"] += param.numel()
    return counts
