"""launcher=torchrun: this process becomes torchrun, which starts nproc_per_node training processes.

`python -m omni_train.launch.torchrun <torchrun arguments>` is torchrun with two changes for preemption:
- TERM and USR1 go to the training processes alone, and torchrun keeps watching them while they finish
  their step, save and exit with PREEMPTED_EXIT_CODE. torchrun would signal each worker's whole process
  group and kill the helper processes that the save needs (megatron's checkpoint writer and its queue).
- Its exit status: torchrun exits 1 whenever a worker fails; a run that stopped on request exits
  PREEMPTED_EXIT_CODE ("rerun me to resume"), on which the SLURM batch script requeues the job.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import List

from omni_train.config import TrainConfig
from omni_train.resilience import PREEMPTED_EXIT_CODE

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"  # the rest of torchrun's defaults: it stops the workers


def torchrun_command(cfg: TrainConfig, overrides: List[str], nproc: int) -> List[str]:
    launcher = cfg.launcher
    if launcher.nnodes > 1:
        rendezvous = ["--nnodes", str(launcher.nnodes), "--rdzv_backend", "c10d",
                      "--rdzv_endpoint", launcher.rdzv_endpoint, "--rdzv_id", "omni-train"]
    else:
        rendezvous = ["--standalone"]  # a free local port, so several runs can share a machine
    return [sys.executable, "-m", "omni_train.launch.torchrun", *rendezvous, "--nproc_per_node", str(nproc),
            "-m", "omni_train.train", *overrides]


def launch(cfg: TrainConfig, overrides: List[str]) -> int:
    from omni_train.launch import nproc_per_node

    nproc = nproc_per_node(cfg)
    cmd = torchrun_command(cfg, overrides, nproc)
    if cfg.launcher.dry_run:
        print(shlex.join(cmd), flush=True)
        return 0
    # Each process gets an equal share of the cores unless the user chose otherwise.
    os.environ.setdefault("OMP_NUM_THREADS", str(max((os.cpu_count() or 1) // nproc, 1)))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)  # signals reach torchrun directly; its exit status is ours


def _children() -> List[int]:
    """The processes this one started: the training processes (torchrun's c10d store is a thread)."""
    me, pids = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == me:
                pids.append(int(stat.parent.name))
    return pids


def _pass_to_workers(signum, frame) -> None:
    workers = _children()
    print(f"torchrun: {signal.Signals(signum).name}: passing it to {len(workers)} training processes",
          file=sys.stderr, flush=True)
    if not workers:  # still in rendezvous: nothing to save
        sys.exit(PREEMPTED_EXIT_CODE)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def run_torchrun(argv: List[str]) -> int:
    """torchrun with `argv`; a run that stopped on request exits PREEMPTED_EXIT_CODE, not 1."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, _pass_to_workers)
    try:
        torchrun_main(["--signals_to_handle", TORCHRUN_SIGNALS, *argv])
    except ChildFailedError as exc:
        codes = [failure.exitcode for failure in exc.failures.values()]
        return PREEMPTED_EXIT_CODE if PREEMPTED_EXIT_CODE in codes else (codes[0] if codes[0] > 0 else 1)
    except SignalException as exc:  # INT, HUP, QUIT: torchrun stopped the workers
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(run_torchrun(sys.argv[1:]))
