"""Run the real omni-train CLI in a subprocess and read what it wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]

# The short text run that the parity, launcher and resume tests compare against (one run per session:
# tests/conftest.py, text_run_6_steps and text_torchrun_6_steps).
TEXT_6_STEPS = ["trainer.max_steps=6", "checkpoint.save_every=100", "checkpoint.save_at_end=false"]


def _env(extra: Optional[Dict[str, str]] = None, threads: int = 2) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RANK", "WORLD_SIZE",
                                                                     "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    env.update(extra or {})
    return env


def omni_train(overrides: List[str], env: Optional[Dict[str, str]] = None, timeout: int = 600,
               check: bool = True) -> subprocess.CompletedProcess:
    """`python -m omni_train.train OVERRIDES` in one process."""
    cmd = [sys.executable, "-m", "omni_train.train", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def torchrun(nproc: int, overrides: List[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m omni_train.train OVERRIDES`, one CPU thread per process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(port), "-m", "omni_train.train", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(threads=1), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def metrics(run_dir: Path) -> Dict[int, dict]:
    """metrics.jsonl by step (a resumed run appends to the same file)."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records}
