"""Training stages: what a stage trains, on which data, with which loss (conf/stage/<name>.yaml).

A stage's Python code is registered here once under a name; stages that differ only in configuration
(trainable sets, phases, data mixture) name that code with ``stage.base`` and need no file of their own
(the report's S1/S2/S3 all run ``multimodal_pretrain``).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from omni_train.config import StageConfig

STAGES = {
    "text_pretrain": "omni_train.stages.text_pretrain",
    "multimodal_pretrain": "omni_train.stages.multimodal_pretrain",
    "distill_offpolicy": "omni_train.stages.distill_offpolicy",
    "distill_onpolicy": "omni_train.stages.distill_onpolicy",
    "gspo": "omni_train.stages.gspo",
    "talker_pretrain": "omni_train.stages.talker_pretrain",
    "talker_dpo": "omni_train.stages.talker_dpo",
    "speaker_finetune": "omni_train.stages.speaker_finetune",
}


@dataclass
class Stage:
    # (TrainConfig, ParallelEnv, params_dtype, pre_process, post_process) -> megatron model on env.device.
    # Frozen models of the stage (stage.frozen_models) are built with it too, from their own sizes.
    build_model: Callable[..., torch.nn.Module]
    # (TrainConfig, ParallelEnv) -> this rank's batch source: next_microbatches() -> list of batches (one
    # optimizer step; omni_train/data/batch.py), state_dict() / load_state_dict() (in checkpoints), stats()
    build_data: Callable[..., Any]
    # (model, batch, frozen: {name: frozen model}) -> (output tensor, loss_func(output) ->
    # (loss_sum, num_tokens, report)); report: {name: tensor [2] (sum, count)}, logged as sum / count over
    # the global batch (omni_train/loops/report.py), "loss" being the optimised one.
    forward: Callable[..., Tuple[torch.Tensor, Callable]]
    # (TrainConfig) -> keyword arguments the forward takes from the config (e.g. loss weights), checked
    # before anything is built; None: the forward takes none.
    options: Optional[Callable[..., Dict[str, Any]]] = None
    # regions of the forward the stage times (metrics.DeviceTimer, e.g. a teacher's forward), logged by the
    # loop as "<name>_time_s" per step
    timers: Dict[str, Any] = field(default_factory=dict)
    # rollout loop only: (loop, this rank's samples of the step) -> loops.rollout.RolloutPlan (scores, the
    # mini-batches to update on, the fields their micro-batches carry); None: one update on all samples
    plan_rollout: Optional[Callable[..., Any]] = None
    # (checkpoint path, model) -> what it loaded: how ``init_from`` fills the model (a stage whose model holds
    # more than the checkpoint it starts from); None: every model weight from the checkpoint
    load_init: Optional[Callable[..., str]] = None
    # (session) -> anything: run by every rank once the stage reaches trainer.max_steps in this run, after the
    # final checkpoint (the Talker's stages: spoken samples, stages/audio_samples.py); None: nothing
    finish: Optional[Callable[..., Any]] = None

    def forward_options(self, cfg) -> Dict[str, Any]:
        return self.options(cfg) if self.options is not None else {}


def stage_code(cfg: StageConfig) -> str:
    """The registered code a stage runs: ``stage.base``, else its own name."""
    return cfg.base or cfg.name


def load_stage(cfg: StageConfig) -> Stage:
    code = stage_code(cfg)
    if code not in STAGES:
        key = "stage.base" if cfg.base else "stage.name"
        raise KeyError(f"{key}: unknown stage {code!r}; registered: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[code]).STAGE


@dataclass(frozen=True)
class Phase:
    """Steps [start, end) of a stage, trained with one trainable set."""

    index: int
    name: str
    start: int
    end: int
    trainable: Tuple[str, ...]
    frozen: Tuple[str, ...]


def phase_plan(cfg: StageConfig, max_steps: int) -> List[Phase]:
    """The stage's phases in order (one phase, the whole run, when the stage declares none)."""
    if not cfg.phases:
        return [Phase(0, cfg.name, 0, max_steps, tuple(cfg.trainable), tuple(cfg.frozen))]
    plan, start = [], 0
    for i, phase in enumerate(cfg.phases):
        plan.append(Phase(i, phase.name, start, start + phase.steps, tuple(phase.trainable),
                          tuple(phase.frozen)))
        start += phase.steps
    return plan


def phase_at(plan: List[Phase], step: int) -> Phase:
    """The phase that trains the step after `step` completed steps (the last phase once all are done)."""
    return next((p for p in plan if step < p.end), plan[-1])


def apply_trainable(model: torch.nn.Module, trainable: Sequence[str], frozen: Sequence[str]) -> Dict[str, int]:
    """Freeze every parameter not matched by `trainable`, or matched by `frozen` (regexes)."""
    counts = {"trainable": 0, "frozen": 0}
    for name, param in model.named_parameters():
        train = any(re.search(p, name) for p in trainable) and not any(re.search(p, name) for p in frozen)
        param.requires_grad_(train)
        counts["trainable" if train else "frozen"] += param.numel()
    if counts["trainable"] == 0:
        raise ValueError(f"stage.trainable: patterns {list(trainable)} (frozen {list(frozen)}) match no "
                         f"parameter; names look like {next(iter(dict(model.named_parameters())))!r}")
    return counts
