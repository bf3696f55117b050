"""launcher=torchrun starts the same processes as torchrun by hand: the same per-step losses."""

import subprocess
import sys

from cli import REPO, _env, metrics
from cli import TEXT_6_STEPS as STEPS


def test_torchrun_launcher_equals_plain_torchrun(tmp_path, text_torchrun_6_steps):
    """The plain torchrun run is the session's (tests/conftest.py), which the parity tests also use."""
    cmd = [sys.executable, "-m", "omni_train.train", "launcher=torchrun", "launcher.nproc_per_node=2", *STEPS,
           f"run_dir={tmp_path / 'launched'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(threads=1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    plain, launched = text_torchrun_6_steps[1], metrics(tmp_path / "launched")
    assert sorted(launched) == list(range(1, 7))
    for step in launched:
        assert launched[step]["loss"] == plain[step]["loss"], step
        assert launched[step]["grad_norm"] == plain[step]["grad_norm"], step
