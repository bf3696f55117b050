"""A real one-node SLURM cluster on localhost for this session (tests/slurm/local_cluster.sh).

Where SLURM cannot run here (not root, no apt-get, the install fails), the tests that need it are skipped
and the reason is printed at the end of the run; under CI (tests/ci.py) they fail with that reason instead.
Any other failure to start is a test error.
"""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ci import in_ci, skip_or_fail

SCRIPT = Path(__file__).with_name("local_cluster.sh")
CANNOT_RUN_HERE = 77
_skip_reason = []


@pytest.fixture(scope="session")
def slurm_cluster():
    """{"SLURM_CONF": path} for the running cluster; its daemons are stopped after the session."""
    state = Path(tempfile.mkdtemp(prefix="omni-train-slurm-"))
    up = subprocess.run(["bash", str(SCRIPT), "up", str(state)], capture_output=True, text=True, timeout=600)
    if up.returncode == CANNOT_RUN_HERE:
        shutil.rmtree(state, ignore_errors=True)
        reason = up.stderr.strip().splitlines()[-1]
        _skip_reason.append(reason)
        skip_or_fail(reason)
    env = {"SLURM_CONF": str(state / "slurm.conf")}
    try:
        assert up.returncode == 0, f"tests/slurm/local_cluster.sh up failed:\n{up.stderr[-4000:]}"
        yield env
    finally:
        _cancel_all_jobs({**os.environ, **env})
        subprocess.run(["bash", str(SCRIPT), "down", str(state)], capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def _cancel_all_jobs(env) -> None:
    """Leave no job behind (its processes outlive slurmd); this cluster runs only this session's jobs."""
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    subprocess.run(["scancel", f"--user={user}"], env=env, capture_output=True, timeout=60)
    for _ in range(60):
        queue = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True, timeout=60)
        if queue.returncode != 0 or not queue.stdout.strip():
            return
        time.sleep(0.5)


def pytest_terminal_summary(terminalreporter):
    for reason in _skip_reason:
        if in_ci():
            terminalreporter.write_line(f"SLURM tests failed: cannot run here: {reason}", red=True)
        else:
            terminalreporter.write_line(f"SLURM tests skipped: {reason}", yellow=True)
