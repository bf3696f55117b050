"""The one training loop: accumulate micro-batches, clip, step, log, checkpoint.

What a stage trains, on which data and with which loss comes from its Stage (omni_train/stages/); the
loop itself never asks which stage it runs.
"""

from __future__ import annotations

import functools
import gc
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config
from omegaconf import OmegaConf

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
from omni_train.data.packing import MODALITIES
from omni_train.metrics import MetricsLogger, Throughput, peak_memory_gib
from omni_train.models.common.moe_load import ExpertLoadTracker
from omni_train.parallel.context_parallel import split_for_context_parallel
from omni_train.parallel.setup import ParallelEnv
from omni_train.parallel.update import GradScaling, apply_update, finalize_grads, grad_norm
from omni_train.parallel.wrap import build_optimizer, build_scheduler, use_fused_adamw, wrap_data_parallel
from omni_train.resilience import NonFiniteGuard, Preempted, Preemption, explain_collective_failures
from omni_train.stages import Phase, Stage, apply_trainable, load_stage, phase_at, phase_plan


def _to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _loss_sums(reports: List[Dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """Collective, without waiting for the device: float64 [1 + len(MODALITIES), 2], (loss sum, target
    tokens) over the global batch for the loss and for each modality (data.packing.MODALITIES), when the
    stage reports them.

    Loss lives on the last pipeline stage; tensor-parallel ranks hold copies, so only tp rank 0 of the
    last stage contributes its (loss sum, token count) pairs to a world-wide sum.
    """
    total = torch.zeros(1 + len(MODALITIES), 2, dtype=torch.float64, device=device)
    contributes = parallel_state.is_pipeline_last_stage() and (
        parallel_state.get_tensor_model_parallel_rank() == 0)
    if contributes:
        for report in reports:
            total[0] += report["lm_loss"].to(device, torch.float64)
            if "modality_loss" in report:
                total[1:] += report["modality_loss"].to(device, torch.float64)
    dist.all_reduce(total)
    return total


def _mean_losses(total: List[List[float]]) -> Dict[str, float]:
    """Mean loss per token from ``_loss_sums``: ``loss``, and ``loss_<modality>`` with its
    ``target_tokens_<modality>`` for each modality with target tokens in this batch."""
    losses = {"loss": total[0][0] / max(total[0][1], 1.0)}
    for name, (loss_sum, count) in zip(MODALITIES, total[1:]):
        if count > 0:
            losses[f"loss_{name}"] = loss_sum / count
            losses[f"target_tokens_{name}"] = count
    return losses


def _to_host(tensor: torch.Tensor):
    """Start copying ``tensor`` to the host; returns (host tensor, CUDA event to wait on, or None). Waiting
    on the event waits for the work queued so far only, not for what is launched after this call."""
    if tensor.device.type != "cuda":
        return tensor, None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


class Trainer:
    def __init__(self, cfg: TrainConfig, env: ParallelEnv, resolved: Dict[str, Any]):
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run_dir)
        self.stage: Stage = load_stage(cfg.stage)
        precision = cfg.trainer.precision
        self.bf16 = precision == "bf16" or (precision == "auto" and env.on_gpu)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep_last)
        self.plan = phase_plan(cfg.stage, cfg.trainer.max_steps)
        latest = latest_checkpoint(self.checkpoints.root)
        self._setup(phase_at(self.plan, checkpoint_step(latest) if latest else 0))
        self.data = self.stage.build_data(cfg, env)
        self.state = self._restore(latest)
        self.logger = MetricsLogger(cfg.logger, self.run_dir, resolved) if env.is_main else None
        self.throughput = Throughput(cfg.model.thinker, cfg.trainer.seq_length, env.world_size)
        self.nonfinite = NonFiniteGuard(cfg.trainer.nonfinite, cfg.trainer.max_nonfinite_skips, env.device)
        self.preemption: Optional[Preemption] = None  # set by fit(); train_step asks it before each update
        self.stop_requested = False

    def _setup(self, phase: Phase) -> None:
        """Model, optimizer and LR schedule for one phase: only its trainable parameters get gradient
        buffers and optimizer state. A new phase starts from a fresh build loaded from the checkpoint
        saved at the boundary, exactly as a resumed run does."""
        cfg, env = self.cfg, self.env
        self.model = self.optimizer = self.scheduler = None
        gc.collect()
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        model = self.stage.build_model(
            cfg, env, dtype,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
        counts = apply_trainable(model, phase.trainable, phase.frozen)
        label = cfg.stage.name if len(self.plan) == 1 else f"{cfg.stage.name}, phase {phase.name!r}"
        self._say(f"stage {label}: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen parameters "
                  f"on rank 0")
        self.phase = phase
        self.model = wrap_data_parallel(model, cfg.parallel, env.on_gpu,
                                        fp32_grads=cfg.optim.master_weights or not self.bf16)
        self.optimizer = build_optimizer(cfg.optim, self.model, cfg.parallel, self.bf16, env.on_gpu)
        self.scheduler = build_scheduler(cfg.optim, cfg.trainer, self.optimizer)
        self._connect_schedule()
        self.load_tracker = ExpertLoadTracker(self.model)

    def _connect_schedule(self) -> None:
        """What megatron's forward/backward schedule calls back into (as Megatron-LM's trainer does)."""
        config = get_model_config(self.model)
        config.no_sync_func = self.model.no_sync
        self.grad_scaling = GradScaling()
        config.finalize_model_grads_func = functools.partial(finalize_grads, pending=self.grad_scaling)
        config.grad_scale_func = self.optimizer.scale_loss
        self.forward_backward = get_forward_backward_func()

    def _restore(self, latest: Optional[Path]) -> TrainState:
        if latest is not None:
            step = checkpoint_step(latest)
            # A checkpoint holds the optimizer state of the phase that trained its last step; at a phase
            # boundary that is the previous phase's, which the new trainable set does not take.
            same_phase = step == 0 or phase_at(self.plan, step - 1) is self.phase
            state = self.checkpoints.load(latest, self.model, self.optimizer if same_phase else None,
                                          self.scheduler, self.data)
            use_fused_adamw(self.optimizer, self.cfg.optim.kernel)
            self._say(f"resumed from {latest} at step {state.step}")
            return state
        if self.cfg.init_from:
            source = resolve_init_from(self.cfg.init_from, self.run_dir)
            load_model_weights(source, self.model)
            self.checkpoints.provenance = read_provenance(source)
            self._say(f"initialised model weights from {source}")
        return TrainState()

    def _next_phase(self) -> None:
        """Save, then rebuild for the phase that trains the next step and load that checkpoint."""
        latest = latest_checkpoint(self.checkpoints.root)
        if latest is None or checkpoint_step(latest) != self.state.step:
            self.save()
        self._setup(phase_at(self.plan, self.state.step))
        self.state = self._restore(latest_checkpoint(self.checkpoints.root))

    def _say(self, text: str) -> None:
        if self.env.is_main:
            print(text, flush=True)

    def _forward_step(self, data_iterator, model):
        return self.stage.forward(model, next(data_iterator))

    def _prepare(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        batch = split_for_context_parallel(batch, parallel_state.get_context_parallel_rank(),
                                           parallel_state.get_context_parallel_world_size())
        return _to_device(batch, self.env.device)

    def train_step(self) -> Dict[str, float]:
        """One optimizer step. The host waits for the device once, for the end of backward (what it must
        know of the step), while the update already runs; it then goes on to launch the next step, whose
        forward queues up behind the update."""
        trainer = self.cfg.trainer
        micro = [self._prepare(batch) for batch in self.data.next_microbatches()]
        batches = iter(micro)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self.forward_backward(
            forward_step_func=self._forward_step, data_iterator=batches, model=[self.model],
            num_microbatches=len(micro), seq_length=trainer.seq_length,
            micro_batch_size=trainer.micro_batch_size, forward_only=False,
        )
        # The LR of step s+1 (1-based) applies to this update; the schedule ends at max_steps.
        self.scheduler.step(increment=1)
        # The grads are still sums over target tokens: the division and the clipping happen inside AdamW.
        overflow = self.optimizer.prepare_grads()  # True only for fp16 loss scaling that overflowed
        norm = grad_norm(self.optimizer, self.grad_scaling)
        # What the host must know of this step (non-finite flags, a preemption signal on any rank, the
        # losses, the norm), reduced over ranks and copied to the host; the update is launched before the
        # host waits for that copy, with the non-finite skip decided on the device, so the device goes from
        # backward to the update without idling and the host on to the next step.
        flags = self.nonfinite.flags(reports, norm)
        signal = (self.preemption.flag() if self.preemption is not None
                  else torch.zeros(1, dtype=torch.int32, device=self.env.device))
        summary = torch.cat([flags.double(), signal.double(), norm.to(self.env.device, torch.float64).reshape(1),
                             _loss_sums(reports, self.env.device).flatten()])
        host, ready = _to_host(summary)
        if not overflow:
            apply_update(self.optimizer, norm, self.grad_scaling, self.cfg.optim.clip_grad, skip=flags.amax())
        if ready is not None:
            ready.synchronize()
        bad_loss, bad_grad, signum, norm_value, *sums = host.tolist()
        skip = overflow or self.nonfinite.decide(self.state.step + 1, int(bad_loss), int(bad_grad), reports,
                                                 micro, self.model, self.state)
        # collective (the flag above): every rank agrees now, and stops after this step
        self.stop_requested = self.preemption is not None and self.preemption.agree(int(signum))
        values = {
            **_mean_losses([sums[i:i + 2] for i in range(0, len(sums), 2)]),
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float("nan") if skip else norm_value,
        }
        self.state.step += 1
        self.state.consumed_samples += trainer.global_batch_size
        self.throughput.add(trainer.global_batch_size * trainer.seq_length)
        return values

    def _log(self, values: Dict[str, float]) -> None:
        imbalance = self.load_tracker.imbalance(
            parallel_state.get_data_parallel_group(with_context_parallel=True))
        if self.logger is None:
            return
        values = dict(values, **self.throughput.report(), **self.data.stats())
        values["peak_memory_gib"] = peak_memory_gib(self.env.device)
        if self.cfg.trainer.nonfinite == "skip":
            values["nonfinite_skipped"] = self.state.nonfinite_skipped
        if imbalance:
            values["moe_load_imbalance_max"] = max(imbalance)
            values["moe_load_imbalance"] = imbalance
        self.logger.log(self.state.step, values)

    def save(self) -> None:
        path = self.checkpoints.save(self.model, self.optimizer, self.scheduler, self.state, self.data)
        self._say(f"saved checkpoint {path}")

    def fit(self) -> None:
        trainer, ckpt = self.cfg.trainer, self.cfg.checkpoint
        last = trainer.stop_at_step or trainer.max_steps
        if self.state.step >= last:
            self._say(f"nothing to do: already at step {self.state.step} (target {last})")
        saved_at = self.state.step
        preemption = self.preemption = Preemption(self.env.device)
        while self.state.step < last:
            values = self.train_step()
            step = self.state.step
            if step % trainer.log_every == 0 or step == last:
                self._log(values)
            if self.stop_requested:  # agreed by all ranks in train_step
                self._say(f"received {preemption.signal_name} during step {step}: saving a checkpoint")
                break
            if step % ckpt.save_every == 0:
                self.save()
                saved_at = step
            if step == self.phase.end and step < last:
                self._next_phase()
                saved_at = step
        finished = self.state.step >= trainer.max_steps
        if saved_at != self.state.step and (not finished or ckpt.save_at_end):
            self.save()  # stop_at_step always saves: the job is expected to be resumed
        if not finished and not preemption.signal_name:
            self._say(f"stopped after step {self.state.step} (trainer.stop_at_step); rerun to resume")
        if self.logger is not None:
            self.logger.finish()
        preemption.restore()
        self.preemption = None
        if preemption.signal_name and not finished:
            self._say(f"received {preemption.signal_name}: saved step_{self.state.step:08d}, exiting "
                      f"(rerun to resume)")
            raise Preempted()


def train(cfg: TrainConfig, env: ParallelEnv) -> None:
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    if env.is_main:
        OmegaConf.save(OmegaConf.create(resolved), Path(cfg.run_dir) / "config.yaml")
    start = time.perf_counter()
    trainer: Optional[Trainer] = None

    def where() -> str:
        return f"last completed step: {trainer.state.step}" if trainer else "while setting up"

    with explain_collective_failures(env.rank, cfg.parallel.collective_timeout_s, where):
        trainer = Trainer(cfg, env, resolved)
        trainer.fit()
    if env.is_main:
        print(f"done in {time.perf_counter() - start:.1f}s; run directory: {cfg.run_dir}", flush=True)
