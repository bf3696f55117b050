"""launcher=slurm: render an sbatch script, keep it in the run directory, submit it.

The script runs one torchrun per node through srun (rendezvous at the job's first node) and handles
preemption: SLURM sends USR1 `launcher.signal_seconds` before the time limit; the script passes it on,
training saves and exits with PREEMPTED_EXIT_CODE, and the script requeues the job (also when training
stopped some other way after the USR1). A TERM (scancel, preemption, `scontrol requeue`) is passed on too,
but what follows it is SLURM's decision. Every start of the job resumes from <run_dir>/checkpoints/latest.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import OmegaConf

from omni_train.config import ClusterConfig, LauncherConfig, TrainConfig
from omni_train.resilience import PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]

BATCH_SCRIPT = """#!/bin/bash
%(sbatch)s
# Written by `omni-train launcher=slurm` (omni_train/launch/slurm.py); `sbatch` this file to run it again.
# USR1 (%(signal_seconds)s s before the time limit): training saves, exits %(preempted)s and the job requeues.
# TERM (scancel, preemption, scontrol requeue): training saves and stops; SLURM decides what follows.
echo "omni-train: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}"
%(setup)s
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port=%(port)s
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / %(nproc)s > 0 ? $(nproc) / %(nproc)s : 1 ))}

signal=""
forward() {
    signal=$1
    echo "omni-train: SIG$1: passing it to training"
    kill -s "$1" "$step" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

%(srun)s &
step=$!
# wait returns early whenever a trapped signal arrives, while training may still be saving.
while kill -0 "$step" 2>/dev/null; do wait "$step"; done
wait "$step"; status=$?
echo "omni-train: training exited with status $status"
requeue=no
[ "$status" -eq %(preempted)s ] && requeue=yes  # training saved and asks to be resumed
[ "$signal" = USR1 ] && [ "$status" -ne 0 ] && requeue=yes  # stopped otherwise: resume from the last save
[ "$signal" = TERM ] && requeue=no  # scancel, preemption, scontrol requeue: SLURM decides
if [ "$requeue" = yes ]; then
    echo "omni-train: requeueing job $SLURM_JOB_ID; it resumes from the latest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
"""


def job_name(launcher: LauncherConfig, stage: str, run_dir: Path) -> str:
    """One name per run directory: with --dependency=singleton, two jobs never share a run directory."""
    if launcher.job_name:
        return launcher.job_name
    return f"omni-train-{stage}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]}"


def sbatch_options(launcher: LauncherConfig, cluster: ClusterConfig, name: str, run_dir: Path,
                   workdir: Path) -> List[str]:
    options = [f"--job-name={name}", f"--nodes={cluster.nodes}", "--ntasks-per-node=1"]
    if cluster.gpus_per_node > 0:
        options.append(f"--gpus-per-node={cluster.gpus_per_node}")
    optional = {"cpus-per-task": cluster.cpus_per_node, "mem": cluster.mem, "partition": cluster.partition,
                "account": cluster.account, "qos": cluster.qos}
    options += [f"--{key}={value}" for key, value in optional.items() if value is not None]
    options += [f"--time={cluster.time}", "--requeue", f"--signal=B:USR1@{launcher.signal_seconds}",
                "--dependency=singleton", "--open-mode=append", f"--output={run_dir}/launch/slurm-%j.out",
                f"--chdir={workdir}", *cluster.sbatch_args]
    return options


def srun_command(cfg: TrainConfig, overrides: List[str], nproc: int, workdir: Path) -> str:
    """One torchrun per node; "$head", "$port" and SLURM's variables are expanded by the batch shell."""
    cluster = cfg.cluster
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if cluster.container_image:
        srun += [f"--container-image={cluster.container_image}", f"--container-workdir={workdir}"]
        if cluster.container_mounts:
            srun.append(f"--container-mounts={','.join(cluster.container_mounts)}")
    python = cluster.python or ("python" if cluster.container_image else sys.executable)
    lines = [
        shlex.join([*srun, python, "-m", "omni_train.launch.torchrun"]),
        ('--nnodes "$SLURM_NNODES" --rdzv_backend c10d --rdzv_endpoint "$head:$port" '
         '--rdzv_id "$SLURM_JOB_ID"'),
        shlex.join(["--nproc_per_node", str(nproc), "-m", "omni_train.train", *overrides]),
    ]
    return " \\\n    ".join(lines)


def render_sbatch(cfg: TrainConfig, overrides: List[str], nproc: int, run_dir: Path, workdir: Path) -> str:
    """The batch script: #SBATCH options, set-up, srun + torchrun, signal forwarding and requeue."""
    launcher, cluster = cfg.launcher, cfg.cluster
    options = sbatch_options(launcher, cluster, job_name(launcher, cfg.stage.name, run_dir), run_dir, workdir)
    port = launcher.rdzv_port if launcher.rdzv_port is not None else "$(( 20000 + SLURM_JOB_ID % 10000 ))"
    return BATCH_SCRIPT % {
        "sbatch": "\n".join(f"#SBATCH {option}" for option in options),
        "signal_seconds": launcher.signal_seconds,
        "preempted": PREEMPTED_EXIT_CODE,
        "setup": "\n".join(cluster.setup),
        "port": port,
        "nproc": nproc,
        "srun": srun_command(cfg, overrides, nproc, workdir),
    }


def code_version(repo: Path = REPO) -> Dict[str, Optional[object]]:
    """The commit the run was launched from and whether tracked files differed from it."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {"commit": None, "dirty": None, "repo": str(repo)}
    dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    return {"commit": head.stdout.strip(), "dirty": dirty, "repo": str(repo)}


def write_launch_dir(cfg: TrainConfig, script: str, launch_dir: Path) -> Path:
    """sbatch.sh, the resolved config and the code version, next to the run they start."""
    launch_dir.mkdir(parents=True, exist_ok=True)
    path = launch_dir / "sbatch.sh"
    path.write_text(script)
    path.chmod(0o755)
    OmegaConf.save(OmegaConf.structured(cfg), launch_dir / "config.yaml", resolve=True)
    version = code_version()
    (launch_dir / "code_version.json").write_text(json.dumps(version, indent=2) + "\n")
    if version["dirty"]:
        diff = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD"], capture_output=True, text=True)
        (launch_dir / "uncommitted.diff").write_text(diff.stdout)
    return path


def launch(cfg: TrainConfig, overrides: List[str]) -> int:
    from omni_train.launch import nproc_per_node

    workdir = Path.cwd()
    run_dir = (workdir / cfg.run_dir).resolve()
    script = render_sbatch(cfg, overrides, nproc_per_node(cfg), run_dir, workdir)
    if cfg.launcher.dry_run:
        print(script, end="", flush=True)
        return 0
    path = write_launch_dir(cfg, script, run_dir / "launch")
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        print(f"omni-train: sbatch not found; the script is {path}", file=sys.stderr, flush=True)
        return 127
    if proc.returncode != 0:
        print(f"omni-train: sbatch failed: {proc.stderr.strip()}", file=sys.stderr, flush=True)
        return proc.returncode
    job = proc.stdout.strip().split(";")[0]
    print(f"submitted job {job}; log: {run_dir}/launch/slurm-{job}.out; script: {path}", flush=True)
    return 0
