"""The supervised loop: accumulate micro-batches, clip, step, log, checkpoint (pretraining, SFT, off-policy
distillation, DPO: every stage whose batches come from data rather than from the model itself).

What a stage trains, on which data and with which loss comes from its Stage (omni_train/stages/) through
the Session (omni_train/session.py); the loop never asks which stage it runs, and what it logs of the loss
is whatever the stage reports (omni_train/loops/report.py).
"""

from __future__ import annotations

import functools
from typing import Dict, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from omni_train.data.batch import to_device
from omni_train.loops.report import LossReport
from omni_train.metrics import peak_memory_gib
from omni_train.parallel.context_parallel import split_for_context_parallel
from omni_train.parallel.update import GradScaling, apply_update, finalize_grads, grad_norm
from omni_train.resilience import NonFiniteGuard, Preempted, Preemption
from omni_train.session import Session


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


class SupervisedLoop:
    def __init__(self, session: Session):
        self.session = session
        self.cfg, self.env = session.cfg, session.env
        self.report = LossReport()
        self.forward_options = session.stage.forward_options(self.cfg)
        self.nonfinite = NonFiniteGuard(self.cfg.trainer.nonfinite, self.cfg.trainer.max_nonfinite_skips,
                                        self.env.device)
        self.preemption: Optional[Preemption] = None  # set by fit(); train_step asks it before each update
        self.stop_requested = False
        self._connected = None
        self._connect_schedule()

    # The session's current phase objects (a phase switch replaces them).
    model = property(lambda self: self.session.model)
    optimizer = property(lambda self: self.session.optimizer)
    state = property(lambda self: self.session.state)

    def _connect_schedule(self) -> None:
        """What megatron's forward/backward schedule calls back into (as Megatron-LM's trainer does); again
        after each phase switch, which builds a new model and optimizer."""
        if self._connected is self.model:
            return
        config = get_model_config(self.model)
        config.no_sync_func = self.model.no_sync
        self.grad_scaling = GradScaling()
        config.finalize_model_grads_func = functools.partial(finalize_grads, pending=self.grad_scaling)
        config.grad_scale_func = self.optimizer.scale_loss
        self.forward_backward = get_forward_backward_func()
        self._connected = self.model

    def _forward_step(self, data_iterator, model):
        return self.session.stage.forward(model, next(data_iterator), self.session.frozen, **self.forward_options)

    def _prepare(self, batch):
        batch = split_for_context_parallel(batch, parallel_state.get_context_parallel_rank(),
                                           parallel_state.get_context_parallel_world_size())
        return to_device(batch, self.env.device)

    def train_step(self) -> Dict[str, float]:
        """One optimizer step. The host waits for the device once, for the end of backward (what it must
        know of the step), while the update already runs; it then goes on to launch the next step, whose
        forward queues up behind the update."""
        self._connect_schedule()
        micro = [self._prepare(batch) for batch in self.next_microbatches()]
        # The LR of step s+1 (1-based) applies to this update; the schedule ends at max_steps.
        self.session.scheduler.step(increment=1)
        values = self.update(micro)
        self.state.step += 1
        self.state.consumed_samples += self.samples_per_step()
        self.session.throughput.add(self.tokens_per_step(micro))
        return values

    def update(self, micro) -> Dict[str, float]:
        """Forward, backward and one optimizer update over ``micro`` (this rank's prepared micro-batches;
        every rank of a data-parallel group passes as many): the loss report's means, lr and grad_norm."""
        trainer = self.cfg.trainer
        batches = iter(micro)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self.forward_backward(
            forward_step_func=self._forward_step, data_iterator=batches, model=[self.model],
            num_microbatches=len(micro), seq_length=trainer.seq_length,
            micro_batch_size=trainer.micro_batch_size, forward_only=False,
        )
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
                             self.report.sums(reports, self.env.device).flatten()])
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
            **self.report.means(sums),
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float("nan") if skip else norm_value,
        }
        return values

    # ---- what a loop that makes its own batches replaces (loops/rollout.py) ----------------------------

    def next_microbatches(self):
        """This rank's micro-batches of one optimizer step."""
        return self.session.data.next_microbatches()

    def samples_per_step(self) -> int:
        return self.cfg.trainer.global_batch_size

    def tokens_per_step(self, micro) -> int:
        """Tokens of the global batch (what throughput counts)."""
        return self.cfg.trainer.global_batch_size * self.cfg.trainer.seq_length

    def _log(self, values: Dict[str, float]) -> None:
        session = self.session
        load = session.moe_load()  # collective: every rank
        if session.logger is None:
            return
        values = dict(values, **session.throughput.report(), **session.data.stats())
        values["peak_memory_gib"] = peak_memory_gib(self.env.device)
        if self.cfg.trainer.nonfinite == "skip":
            values["nonfinite_skipped"] = self.state.nonfinite_skipped
        session.logger.log(self.state.step, dict(values, **load))

    def fit(self) -> None:
        session, trainer, ckpt = self.session, self.cfg.trainer, self.cfg.checkpoint
        last = trainer.stop_at_step or trainer.max_steps
        if self.state.step >= last:
            session.say(f"nothing to do: already at step {self.state.step} (target {last})")
        saved_at = started_at = self.state.step
        preemption = self.preemption = Preemption(self.env.device)
        while self.state.step < last:
            values = self.train_step()
            step = self.state.step
            if step % trainer.log_every == 0 or step == last:
                self._log(values)
            if self.stop_requested:  # agreed by all ranks in train_step
                session.say(f"received {preemption.signal_name} during step {step}: saving a checkpoint")
                break
            if step % ckpt.save_every == 0:
                session.save()
                saved_at = step
            if step == session.phase.end and step < last:
                session.next_phase()
                saved_at = step
        finished = self.state.step >= trainer.max_steps
        if saved_at != self.state.step and (not finished or ckpt.save_at_end):
            session.save()  # stop_at_step always saves: the job is expected to be resumed
        if not finished and not preemption.signal_name:
            session.say(f"stopped after step {self.state.step} (trainer.stop_at_step); rerun to resume")
        if finished and self.state.step > started_at and session.stage.finish is not None:
            session.stage.finish(session)
        if session.logger is not None:
            session.logger.finish()
        preemption.restore()
        self.preemption = None
        if preemption.signal_name and not finished:
            session.say(f"received {preemption.signal_name}: saved step_{self.state.step:08d}, exiting "
                        f"(rerun to resume)")
            raise Preempted()


def run(session: Session) -> None:
    SupervisedLoop(session).fit()
