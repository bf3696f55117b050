"""A process killed in the middle of a checkpoint save leaves the previous checkpoint loadable."""

import signal

from cli import metrics, omni_train, run

# Runs the real CLI with dist_checkpointing.save wrapped: the second save writes its files into
# step_00000004.tmp and then the job's whole process group (its checkpoint writer processes too) is
# SIGKILLed, as a scheduler kills a job, before the save could complete.
KILL_IN_SECOND_SAVE = """
import os, signal, sys
from megatron.core import dist_checkpointing
real_save, calls = dist_checkpointing.save, []
def save(*args, **kwargs):
    calls.append(1)
    real_save(*args, **kwargs)
    if len(calls) == 2:
        os.killpg(os.getpgid(0), signal.SIGKILL)
dist_checkpointing.save = save
from omni_train.train import main
sys.argv = ["omni-train"] + sys.argv[1:]
main()
"""


def test_kill_during_save_keeps_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["trainer.max_steps=6", "checkpoint.save_every=2", "checkpoint.keep_last=5",
                 f"run_dir={run_dir}"]
    proc = run(["-c", KILL_IN_SECOND_SAVE, *overrides], timeout=300, new_session=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "step_00000004.tmp").is_dir()  # the half-finished save is there ...
    assert (ckpts / "latest").read_text().strip() == "step_00000002"  # ... but nothing points to it

    resumed = omni_train(overrides)
    assert "resumed from" in resumed.stdout and "step_00000002" in resumed.stdout
    assert not (ckpts / "step_00000004.tmp").exists()
    assert sorted(metrics(run_dir))[-1] == 6
    assert (ckpts / "latest").read_text().strip() == "step_00000006"
