"""launcher=slurm on a real one-node SLURM cluster: the job's per-step losses equal a local run's with the
same two processes, also when the job is requeued and when it is told that its time is up."""

import re
import subprocess
import sys
import time

import pytest

from cli import REPO, _env, metrics, torchrun

# Two CPU processes (gloo), a checkpoint every step so that a preempted job loses no step.
STEPS = ["trainer.max_steps=8", "checkpoint.save_every=1"]
SLURM = ["launcher=slurm", "cluster=localhost", "launcher.nproc_per_node=2"]
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


@pytest.fixture(scope="module")
def local_losses(tmp_path_factory):
    """Per-step losses of the same recipe with 2 local processes (plain torchrun)."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    torchrun(2, [*STEPS, f"run_dir={run_dir}"])
    return {step: record["loss"] for step, record in metrics(run_dir).items()}


def _slurm(args, cluster):
    proc = subprocess.run(args, env=_env(cluster), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr}"
    return proc.stdout


def _submit(run_dir, cluster) -> str:
    """`omni-train launcher=slurm ...` as a user types it; returns the job id."""
    cmd = [sys.executable, "-m", "omni_train.train", *SLURM, *STEPS, f"run_dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(cluster, threads=1), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def _job(job, cluster):
    fields = dict(re.findall(r"(\w+)=(\S*)", _slurm(["scontrol", "-o", "show", "job", job], cluster)))
    return fields["JobState"], int(fields["Restarts"])


def _log(run_dir, job) -> str:
    path = run_dir / "launch" / f"slurm-{job}.out"
    return path.read_text() if path.exists() else ""


def _wait(condition, what, run_dir, job, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s; log:\n{_log(run_dir, job)[-4000:]}"
        time.sleep(0.5)


def _losses(run_dir):
    return {step: record["loss"] for step, record in metrics(run_dir).items()}


@pytest.mark.slow
def test_slurm_job_equals_local_two_process_run(slurm_cluster, local_losses, tmp_path):
    run_dir = tmp_path / "run"
    job = _submit(run_dir, slurm_cluster)
    _wait(lambda: _job(job, slurm_cluster)[0] in FINISHED, "finished job", run_dir, job)
    log = _log(run_dir, job)
    assert _job(job, slurm_cluster) == ("COMPLETED", 0), log[-4000:]
    assert "SLURM_RESTART_COUNT=0" in log and "resumed from" not in log
    assert _losses(run_dir) == local_losses
    kept = {path.name for path in (run_dir / "launch").iterdir()}
    assert {"sbatch.sh", "config.yaml", "code_version.json", f"slurm-{job}.out"} <= kept


@pytest.mark.slow
def test_requeued_and_time_limited_job_resumes_to_the_same_losses(slurm_cluster, local_losses, tmp_path):
    """Preempted twice: `scontrol requeue` (SLURM restarts it), then the time-limit warning USR1 that
    `--signal=B:USR1@...` sends the batch script (the script requeues the job itself)."""
    run_dir = tmp_path / "run"
    job = _submit(run_dir, slurm_cluster)
    _wait(lambda: 2 in metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else False, "step 2",
          run_dir, job)
    _slurm(["scontrol", "requeue", job], slurm_cluster)

    def restarted_and_at_step_5():
        parts = _log(run_dir, job).split("SLURM_RESTART_COUNT=1")
        return len(parts) == 2 and "step=5 " in parts[1]

    _wait(restarted_and_at_step_5, "step 5 after the restart", run_dir, job)
    _slurm(["scancel", "--batch", "--signal=USR1", job], slurm_cluster)
    _wait(lambda: "SLURM_RESTART_COUNT=2" in _log(run_dir, job) and _job(job, slurm_cluster)[0] in FINISHED,
          "finished second restart", run_dir, job)

    log = _log(run_dir, job)
    assert _job(job, slurm_cluster) == ("COMPLETED", 2), log[-4000:]
    # After USR1 training saved and exited 75, and the batch script requeued the job (SLURM does not).
    assert "training exited with status 75\nomni-train: requeueing job" in log, log[-4000:]
    resumed_at = [int(step) for step in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert len(resumed_at) == 2 and 0 < resumed_at[0] < resumed_at[1] < 8, log[-4000:]
    assert _losses(run_dir) == local_losses
