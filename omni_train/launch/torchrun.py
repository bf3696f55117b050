"""launcher=torchrun: this process becomes torchrun, which starts nproc_per_node training processes.

`python -m omni_train.launch.torchrun <torchrun arguments>` is torchrun itself, except for its exit status:
torchrun exits 1 whenever a worker fails, which would hide that training stopped on request and saved
(PREEMPTED_EXIT_CODE, "rerun me to resume"). The SLURM batch script relies on that status to requeue.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from typing import List

from omni_train.config import TrainConfig

try:
    from omni_train.resilience import PREEMPTED_EXIT_CODE
except ImportError:  # the in-process preemption handling is not there yet; its agreed status
    PREEMPTED_EXIT_CODE = 75

# Signals torchrun passes on to its workers: its defaults, plus SLURM's usual time-limit warning.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def torchrun_command(cfg: TrainConfig, overrides: List[str], nproc: int) -> List[str]:
    launcher = cfg.launcher
    if launcher.nnodes > 1:
        rendezvous = ["--nnodes", str(launcher.nnodes), "--rdzv_backend", "c10d",
                      "--rdzv_endpoint", launcher.rdzv_endpoint, "--rdzv_id", "omni-train"]
    else:
        rendezvous = ["--standalone"]  # a free local port, so several runs can share a machine
    return [sys.executable, "-m", "omni_train.launch.torchrun", *rendezvous, "--nproc_per_node", str(nproc),
            "--signals_to_handle", FORWARDED_SIGNALS, "-m", "omni_train.train", *overrides]


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


def run_torchrun(argv: List[str]) -> int:
    """torchrun with `argv`; a run that stopped on request exits PREEMPTED_EXIT_CODE, not 1."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv)
    except ChildFailedError as exc:
        codes = [failure.exitcode for failure in exc.failures.values()]
        return PREEMPTED_EXIT_CODE if PREEMPTED_EXIT_CODE in codes else (codes[0] if codes[0] > 0 else 1)
    except SignalException as exc:
        # torchrun passed the signal on and waited for its workers, which save and stop on USR1/TERM.
        print(f"torchrun: stopped by {signal.Signals(exc.sigval).name}", file=sys.stderr, flush=True)
        preempting = exc.sigval in (signal.SIGUSR1, signal.SIGTERM)
        return PREEMPTED_EXIT_CODE if preempting else 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(run_torchrun(sys.argv[1:]))
