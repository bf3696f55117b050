"""What keeps an interruption from costing more than time: preemption, non-finite steps, failed collectives.

- Preemption: SIGTERM or SIGUSR1 (what SLURM's ``--signal`` and a preempting scheduler send) only sets a
  flag. After each step the ranks agree on it (a MAX all-reduce: the signal may reach ranks at different
  times, and every rank must stop after the same step); the loop then saves a checkpoint and the process
  exits with ``PREEMPTED_EXIT_CODE``, on which the SLURM script requeues the job. A rerun resumes there.
- Non-finite loss or gradients: flagged on every rank after backward (the gradients through their global
  norm) and agreed on; the update launched after it is skipped by the AdamW kernel itself when a flag is
  set (parallel/update.py). ``trainer.nonfinite=skip`` drops the update (parameters and optimizer state untouched; the
  step and its batch are spent) and counts it; ``stop`` raises ``NonFiniteError`` with a report naming the
  step, the sample keys of its batch and the first parameter with a non-finite gradient.
- Collectives: a collective that times out (``parallel.collective_timeout_s``) or loses its peer
  becomes one ``CollectiveError`` naming this rank and the step, instead of a backend message.
"""

from __future__ import annotations

import multiprocessing.resource_tracker
import os
import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

# EX_TEMPFAIL: "try again later". The SLURM batch script requeues the job when training exits with it.
PREEMPTED_EXIT_CODE = 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
MAX_KEYS_SHOWN = 32


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is saved: the process exits with PREEMPTED_EXIT_CODE."""

    def __init__(self) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)


def _start_checkpoint_helper_shielded() -> None:
    """Start megatron-core's checkpoint-writer result queue with the preemption signals blocked.

    It is a multiprocessing Manager: a spawned process, otherwise started at the first save, that every
    later save talks to. A spawned process keeps no Python handler but inherits the blocked-signal mask;
    without it, a signal sent to the whole process group (SLURM's TERM) would kill the Manager and the
    preemption checkpoint would fail with BrokenPipeError. Signals that arrive meanwhile are delivered
    to this process when the mask is restored.
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        start = filesystem_async._get_write_results_queue
    except (ImportError, AttributeError):
        return
    # Started first: launching it unblocks SIGTERM in this process, which would undo the mask below.
    multiprocessing.resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Preemption:
    """Catches SIGTERM / SIGUSR1 in this process; ``flag()`` then ``agree()`` give the ranks' common answer."""

    def __init__(self, device: torch.device):
        self.device = device
        self.received: Optional[int] = None  # the first signal this process got
        self.signal_name: Optional[str] = None  # set once the ranks agreed to stop
        self._owner = os.getpid()
        self._previous: Dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            _start_checkpoint_helper_shielded()
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        # Forked helpers (data loader workers, checkpoint writers) inherit this handler: they ignore the
        # signal, so a signal sent to the whole process group neither breaks the step nor the save; the
        # training process ends them when it exits.
        if os.getpid() == self._owner and self.received is None:
            self.received = signum

    def flag(self) -> torch.Tensor:
        """Collective, without waiting for the device: the signal number any rank got (the largest), as
        an int32 [1] device tensor; its value goes to ``agree``."""
        flags = torch.tensor([self.received or 0], dtype=torch.int32, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags

    def agree(self, signum: int) -> bool:
        if signum and self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
        return bool(signum)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


class NonFiniteError(RuntimeError):
    """A step's loss or gradients were not finite (trainer.nonfinite=stop, or too many skips)."""


def first_nonfinite_grad(model) -> Optional[str]:
    """Name (unprefixed, as in checkpoints) of the first parameter whose gradient has a NaN or Inf."""
    for name, param in model.named_parameters():
        grad = getattr(param, "main_grad", None)
        grad = param.grad if grad is None else grad
        if grad is not None and not torch.isfinite(grad).all():
            return name.removeprefix("module.")
    return None


def _keys(batch: Dict[str, Any]) -> List[str]:
    return [str(k) for k in batch.get("keys") or []]


def _shown(keys: List[str]) -> str:
    if not keys:
        return "(no sample keys)"
    more = f" ... (+{len(keys) - MAX_KEYS_SHOWN} more)" if len(keys) > MAX_KEYS_SHOWN else ""
    return ", ".join(keys[:MAX_KEYS_SHOWN]) + more


class NonFiniteGuard:
    """Flags one step's non-finite loss reports and gradients, and decides what follows (trainer.nonfinite)."""

    def __init__(self, policy: str, max_skips: int, device: torch.device):
        self.policy, self.max_skips, self.device = policy, max_skips, device

    def flags(self, reports: List[Dict[str, Any]], grad_norm: torch.Tensor) -> torch.Tensor:
        """Collective, without waiting for the device: int32 [2] on the device, whether any rank's loss
        reports / gradients hold a NaN or Inf.

        ``grad_norm``, the step's global gradient norm, stands for the gradients (a NaN or Inf anywhere
        makes it non-finite; so would a finite gradient whose square overflows fp32, ~1e19): no pass over
        the gradient buffers."""
        no = torch.zeros((), dtype=torch.bool, device=self.device)
        loss_bad = torch.stack([no] + [~torch.isfinite(v).all() for report in reports for v in report.values()
                                       if torch.is_tensor(v)]).any()
        grads_bad = ~torch.isfinite(grad_norm.to(self.device))
        flags = torch.stack([loss_bad, grads_bad]).to(torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags

    def decide(self, step: int, bad_loss: int, bad_grad: int, reports: List[Dict[str, Any]],
               micro_batches: List[Dict[str, Any]], model, state) -> bool:
        """Collective when a flag is set (every rank has the same flags). True: skip this step's update
        (``state.nonfinite_skipped`` counts it). Raises NonFiniteError under the stop policy or past
        ``max_skips``."""
        if not (bad_loss or bad_grad):
            return False
        bad_micro = [i for i, report in enumerate(reports)
                     if any(not torch.isfinite(v).all() for v in report.values() if torch.is_tensor(v))]
        report = self._report(step, bad_loss, bad_grad, bad_micro, micro_batches, model)
        if self.policy == "skip" and state.nonfinite_skipped < self.max_skips:
            state.nonfinite_skipped += 1
            if dist.get_rank() == 0:
                print(f"{report}\n  update skipped ({state.nonfinite_skipped} of at most "
                      f"{self.max_skips}, trainer.max_nonfinite_skips)", flush=True)
            return True
        why = ("trainer.nonfinite=stop; trainer.nonfinite=skip skips such steps" if self.policy == "stop"
               else f"more than trainer.max_nonfinite_skips={self.max_skips} steps skipped")
        raise NonFiniteError(f"{report}\n  stopped ({why}); no update was applied and the last "
                             f"checkpoint is intact")

    @staticmethod
    def _report(step, bad_loss, bad_grad, bad_micro, micro_batches, model) -> str:
        """Every rank's view (sample keys, first bad parameter), gathered: the culprit may be anywhere."""
        local = {"rank": dist.get_rank(), "keys": [k for b in micro_batches for k in _keys(b)],
                 "bad_loss_keys": [k for i in bad_micro for k in _keys(micro_batches[i])],
                 "bad_param": first_nonfinite_grad(model) if bad_grad else None}
        views = [local]
        if dist.get_world_size() > 1:
            views = [None] * dist.get_world_size()
            dist.all_gather_object(views, local)
        what = " and ".join(w for w, bad in (("loss", bad_loss), ("gradients", bad_grad)) if bad)
        lines = [f"non-finite {what} at step {step}"]
        for view in views:
            if view["bad_loss_keys"]:
                lines.append(f"  rank {view['rank']}: non-finite loss on samples {_shown(view['bad_loss_keys'])}")
        first_bad = next((v for v in views if v["bad_param"]), None)
        if first_bad:
            lines.append(f"  first parameter with a non-finite gradient: {first_bad['bad_param']} "
                         f"(rank {first_bad['rank']})")
        elif bad_grad:
            lines.append("  every gradient is finite, but their global norm overflowed fp32 (gradients ~1e19)")
        for view in views:
            lines.append(f"  rank {view['rank']}: sample keys of step {step}: {_shown(view['keys'])}")
        return "\n".join(lines)


class CollectiveError(RuntimeError):
    """A collective timed out or lost a peer: another rank died or hangs."""


_TIMEOUT = ("timed out", "timeout")
_LOST_PEER = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
              "socket closed")


def describe_collective_failure(exc: BaseException, rank: int, timeout_s: float, where: str) -> Optional[str]:
    """One line for a backend error that means "another rank is gone or stuck", else None."""
    text = str(exc).lower()
    if not isinstance(exc, dist.DistError) and not any(b in text for b in ("gloo", "nccl", "c10d")):
        return None  # not from a collective (e.g. a data loader's own timeout)
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if any(m in text for m in _TIMEOUT):
        return (f"rank {rank}: a collective timed out after {timeout_s:g} s ({where}): another rank may be "
                f"dead or stuck (parallel.collective_timeout_s sets the limit). Backend: {cause}")
    if any(m in text for m in _LOST_PEER):
        return (f"rank {rank}: a collective lost its connection to another rank ({where}): that rank has "
                f"probably died (the launcher's report names the rank that exited first). Backend: {cause}")
    return None


@contextmanager
def explain_collective_failures(rank: int, timeout_s: float, where: Callable[[], str]) -> Iterator[None]:
    """Re-raise a collective timeout or a lost peer as CollectiveError naming ``rank`` and ``where()``."""
    try:
        yield
    except RuntimeError as exc:  # gloo and NCCL errors (torch.distributed.DistError is a RuntimeError)
        if isinstance(exc, (CollectiveError, NonFiniteError)):
            raise
        message = describe_collective_failure(exc, rank, timeout_s, where())
        if message is None:
            raise
        raise CollectiveError(message) from exc
