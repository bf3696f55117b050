"""A stage's training session: what every loop needs and none should rebuild.

It builds the trained model, the stage's frozen models, the optimizer and the LR schedule for the current
phase; restores from the latest checkpoint or initialises from ``init_from``; switches phases; saves. The
loops (omni_train/loops/) drive it: the supervised loop steps on batches, a rollout loop will generate,
score and update through the same session.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from megatron.core import parallel_state

from omni_train.checkpoint.manager import (
    CheckpointManager,
    TrainState,
    checkpoint_step,
    latest_checkpoint,
    load_model_weights,
    read_provenance,
    resolve_init_from,
)
from omni_train.config import TrainConfig
from omni_train.frozen import FrozenModel, build_frozen_model, frozen_state_dicts
from omni_train.metrics import MetricsLogger, Throughput
from omni_train.models.common.moe_load import ExpertLoadTracker
from omni_train.parallel.process_state import reset_moe_aux_state
from omni_train.parallel.setup import ParallelEnv
from omni_train.parallel.wrap import build_optimizer, build_scheduler, use_fused_adamw, wrap_data_parallel
from omni_train.stages import Phase, Stage, apply_trainable, load_stage, phase_at, phase_plan


class Session:
    def __init__(self, cfg: TrainConfig, env: ParallelEnv, resolved: Dict[str, Any]):
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run_dir)
        self.stage: Stage = load_stage(cfg.stage)
        precision = cfg.trainer.precision
        self.bf16 = precision == "bf16" or (precision == "auto" and env.on_gpu)
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep_last)
        self.plan: List[Phase] = phase_plan(cfg.stage, cfg.trainer.max_steps)
        latest = latest_checkpoint(self.checkpoints.root)
        self.model = self.optimizer = self.scheduler = None
        self.load_trackers: Dict[str, ExpertLoadTracker] = {}  # "": the trained model; else frozen ones
        self.build_phase(phase_at(self.plan, checkpoint_step(latest) if latest else 0))
        self.frozen: Dict[str, FrozenModel] = self._build_frozen()
        self.data = self.stage.build_data(cfg, env)
        self.state = self.restore(latest)
        self.logger = MetricsLogger(cfg.logger, self.run_dir, resolved) if env.is_main else None
        self.throughput = Throughput(cfg.model.thinker, cfg.trainer.seq_length, env.world_size)

    # ---- building ------------------------------------------------------------------------------------

    def build_model(self, cfg: Optional[TrainConfig] = None) -> torch.nn.Module:
        """This rank's piece of the stage's model for ``cfg`` (default: the run's), unwrapped."""
        return self.stage.build_model(cfg or self.cfg, self.env, self.dtype,
                                      pre_process=parallel_state.is_pipeline_first_stage(),
                                      post_process=parallel_state.is_pipeline_last_stage())

    def build_phase(self, phase: Phase) -> None:
        """Trained model, optimizer and LR schedule for one phase: only its trainable parameters get
        gradient buffers and optimizer state. A new phase starts from a fresh build loaded from the
        checkpoint saved at the boundary, exactly as a resumed run does."""
        cfg = self.cfg
        self.model = self.optimizer = self.scheduler = None
        gc.collect()
        reset_moe_aux_state()  # the trained model's aux-loss state is megatron's one per process
        model = self.build_model()
        counts = apply_trainable(model, phase.trainable, phase.frozen)
        label = cfg.stage.name if len(self.plan) == 1 else f"{cfg.stage.name}, phase {phase.name!r}"
        self.say(f"stage {label}: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen parameters "
                 f"on rank 0")
        self.phase = phase
        self.model = wrap_data_parallel(model, cfg.parallel, self.env.on_gpu,
                                        fp32_grads=cfg.optim.master_weights or not self.bf16)
        self.optimizer = build_optimizer(cfg.optim, self.model, cfg.parallel, self.bf16, self.env.on_gpu)
        self.scheduler = build_scheduler(cfg.optim, cfg.trainer, self.optimizer)
        if "" in self.load_trackers:
            self.load_trackers[""].remove()
        self.load_trackers[""] = ExpertLoadTracker(self.model)

    def _build_frozen(self) -> Dict[str, FrozenModel]:
        frozen = {}
        for spec in self.cfg.stage.frozen_models:
            model = build_frozen_model(spec, self.cfg, self.build_model, self.run_dir, self.env.device, self.dtype)
            frozen[spec.name] = model
            self.load_trackers[spec.name] = ExpertLoadTracker(model)
            params = sum(p.numel() for p in model.parameters())
            self.say(f"frozen model {spec.name!r} from {spec.source}: {params:,} parameters on rank 0")
        return frozen

    # ---- checkpoints ---------------------------------------------------------------------------------

    def _saved_frozen(self) -> Dict[str, torch.nn.Module]:
        return frozen_state_dicts(self.frozen, self.cfg.stage.frozen_models)

    def restore(self, latest: Optional[Path]) -> TrainState:
        if latest is not None:
            step = checkpoint_step(latest)
            # A checkpoint holds the optimizer state of the phase that trained its last step; at a phase
            # boundary that is the previous phase's, which the new trainable set does not take.
            same_phase = step == 0 or phase_at(self.plan, step - 1) is self.phase
            state = self.checkpoints.load(latest, self.model, self.optimizer if same_phase else None,
                                          self.scheduler, self.data, frozen=self._saved_frozen())
            use_fused_adamw(self.optimizer, self.cfg.optim.kernel)
            self.say(f"resumed from {latest} at step {state.step}")
            return state
        if self.cfg.init_from:
            source = resolve_init_from(self.cfg.init_from, self.run_dir)
            if self.stage.load_init is None:
                load_model_weights(source, self.model)
                self.say(f"initialised model weights from {source}")
            else:
                self.say(f"initialised the {self.stage.load_init(source, self.model)} from {source}")
            self.checkpoints.provenance = read_provenance(source)
        return TrainState()

    def save(self) -> None:
        path = self.checkpoints.save(self.model, self.optimizer, self.scheduler, self.state, self.data,
                                     frozen=self._saved_frozen())
        self.say(f"saved checkpoint {path}")

    def next_phase(self) -> None:
        """Save, then rebuild for the phase that trains the next step and load that checkpoint."""
        latest = latest_checkpoint(self.checkpoints.root)
        if latest is None or checkpoint_step(latest) != self.state.step:
            self.save()
        self.build_phase(phase_at(self.plan, self.state.step))
        self.state = self.restore(latest_checkpoint(self.checkpoints.root))

    # ---- reporting -----------------------------------------------------------------------------------

    def moe_load(self) -> Dict[str, Any]:
        """Collective: max / mean tokens per expert per MoE layer since the last call, for the trained
        model (``moe_load_imbalance``) and each frozen one that ran (``<name>/moe_load_imbalance``)."""
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        values: Dict[str, Any] = {}
        for name, tracker in self.load_trackers.items():
            imbalance = tracker.imbalance(group)
            if imbalance:
                prefix = f"{name}/" if name else ""
                values[f"{prefix}moe_load_imbalance_max"] = max(imbalance)
                values[f"{prefix}moe_load_imbalance"] = imbalance
        return values

    def say(self, text: str) -> None:
        if self.env.is_main:
            print(text, flush=True)

