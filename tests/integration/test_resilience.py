"""Interruptions cost only time: preemption signals, kill -9, a stalled rank, non-finite steps (real CLI)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


from cli import metrics, omni_train, start

STEPS = 16
COMMON = [f"trainer.max_steps={STEPS}", "optim.warmup_steps=1", "checkpoint.save_every=3", "checkpoint.keep_last=5"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """A training process (or torchrun) in its own process group, so that a signal can go to all of it
    (cli.start: `-m omni_train.train` and `-c` ranks from the test fork server, torchrun itself in a fresh
    interpreter).

    Output goes to files: helpers that megatron's checkpointing spawns outlive a rank killed with -9 and
    would hold a pipe open; finish() ends what is left of the group."""

    def __init__(self, args, env=None, threads=2):
        self.out, self.err = (Path(os.environ.get("TMPDIR", "/tmp")) / f"job-{time.time_ns()}.{k}"
                              for k in ("out", "err"))
        self.proc = start(args, self.out, self.err, env=env, threads=threads, new_session=True)
        self.pid = self.proc.pid
        self.result = None

    def poll(self):
        return self.proc.poll()

    def signal_group(self, sig) -> None:
        os.killpg(self.pid, sig)

    def finish(self, timeout: float = 300):
        """(exit code, stdout, stderr) once the process exits; its leftover helpers are killed."""
        if self.result is not None:
            return self.result
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, err = self.out.read_text(), self.err.read_text()
        for path in (self.out, self.err):
            path.unlink()
        self.result = code, out, err
        return self.result


def _start(args, env=None, threads=2) -> Job:
    return Job(args, env, threads)


def _start_cli(overrides) -> Job:
    return _start(["-m", "omni_train.train", *overrides])


def _start_torchrun(overrides) -> Job:
    return _start(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
                   "-m", "omni_train.train", *overrides], threads=1)


def _records(run_dir: Path):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for_step(proc: Job, run_dir: Path, step: int, timeout: float = 240) -> int:
    """Wait until metrics.jsonl has a record for `step` or later; return the newest step logged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = _records(run_dir)
        if records and records[-1]["step"] >= step:
            return records[-1]["step"]
        if proc.poll() is not None:
            code, _, err = proc.finish()
            raise AssertionError(f"exited early ({code}):\n{err[-3000:]}")
        time.sleep(0.05)
    proc.finish(timeout=0)
    raise AssertionError(f"no step {step} within {timeout} s")


def _wait_past_checkpoint(proc: Job, run_dir: Path, step: int) -> int:
    """Wait for a logged step >= `step` right after a checkpoint step (save_every=3): a kill then loses
    at least that step."""
    while True:
        step = _wait_for_step(proc, run_dir, step)
        if step % 3 == 1:
            return step
        step += 1


def _finish(job: Job, timeout: float = 300):
    return job.finish(timeout)


def _latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def test_sigterm_and_kill9_then_rerun_equal_an_uninterrupted_run(tmp_path):
    omni_train([*COMMON, f"run_dir={tmp_path / 'straight'}"])
    straight = metrics(tmp_path / "straight")
    run_dir = tmp_path / "run"
    overrides = [*COMMON, f"run_dir={run_dir}"]

    # SIGTERM to the whole process group (as SLURM sends it), after a first checkpoint (its writer's helper
    # processes then exist and get the signal too): finish the step, save, exit 75.
    proc = _start_cli(overrides)
    _wait_for_step(proc, run_dir, 4)
    proc.signal_group(signal.SIGTERM)
    code, out, err = _finish(proc)
    assert code == 75, err[-3000:]
    stopped = _records(run_dir)[-1]["step"]
    assert f"received SIGTERM: saved step_{stopped:08d}, exiting (rerun to resume)" in out
    assert _latest(run_dir) == f"step_{stopped:08d}"
    assert stopped < STEPS - 4

    # Rerun, then kill -9 it mid-run: only the steps since its last checkpoint are lost.
    proc = _start_cli(overrides)
    _wait_for_step(proc, run_dir, stopped + 4)
    proc.signal_group(signal.SIGKILL)
    code, out, _ = _finish(proc)
    assert code == -signal.SIGKILL and f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:08d}'}" in out
    killed_at, last_good = _records(run_dir)[-1]["step"], int(_latest(run_dir).removeprefix("step_"))
    # save_every=3: at most 3 steps lost (3 when the kill hit the save of the last step logged)
    assert killed_at - 3 <= last_good <= killed_at

    final = omni_train(overrides)
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{last_good:08d}'} at step {last_good}" in final.stdout
    resumed = metrics(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # bitwise: the interruptions changed nothing
        for key in ("loss", "grad_norm", "lr"):
            assert resumed[step][key] == straight[step][key], (step, key)


def test_torchrun_sigterm_then_rank_killed_then_rerun(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*COMMON, "parallel.ep=2", f"run_dir={run_dir}"]

    # SIGTERM to torchrun: it forwards the signal; both ranks stop after the same step and save.
    proc = _start_torchrun(overrides)
    _wait_for_step(proc, run_dir, 2)
    os.kill(proc.pid, signal.SIGTERM)  # torchrun alone
    code, out, err = _finish(proc)
    stopped = _records(run_dir)[-1]["step"]
    assert f"received SIGTERM: saved step_{stopped:08d}, exiting (rerun to resume)" in out, err[-3000:]
    assert _latest(run_dir) == f"step_{stopped:08d}" and stopped < STEPS - 4

    # Rerun; kill -9 rank 1: the job fails promptly, and the report names rank 1.
    proc = _start_torchrun(overrides)
    _wait_past_checkpoint(proc, run_dir, stopped + 3)
    rank1 = next(p for p in _children(proc.pid) if "\nRANK=1\n" in _environ(p))
    os.kill(rank1, signal.SIGKILL)
    killed = time.monotonic()
    code, out, err = _finish(proc, timeout=120)
    assert time.monotonic() - killed < 60
    assert code != 0 and f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:08d}'}" in out
    root_cause = err[err.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in root_cause and "exitcode  : -9" in root_cause, err[-3000:]
    assert "rank 0: a collective lost its connection to another rank" in err
    last_good = int(_latest(run_dir).removeprefix("step_"))
    lost = [r for r in _records(run_dir) if r["step"] > last_good]

    # Rerun: resumes from the last good checkpoint; the steps it repeats give the same losses, bitwise.
    proc = _start_torchrun(overrides)
    code, out, err = _finish(proc)
    assert code == 0, err[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{last_good:08d}'} at step {last_good}" in out
    final = metrics(run_dir)
    assert sorted(final) == list(range(1, STEPS + 1))
    assert lost
    for record in lost:
        assert final[record["step"]]["loss"] == record["loss"], record["step"]


def _children(pid: int):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _environ(pid: int) -> str:
    return "\n" + Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b"\n").decode(errors="replace") + "\n"


# Rank 1 stops before its 3rd step (as a rank stuck in I/O or a hung kernel would); rank 0 blocks in the
# next collective until parallel.collective_timeout_s.
STALL_RANK1 = """
import os, sys, time
from omni_train.loops import supervised
real_step = supervised.SupervisedLoop.train_step
def train_step(self):
    if os.environ["RANK"] == "1" and self.state.step == 2:
        time.sleep(600)
    return real_step(self)
supervised.SupervisedLoop.train_step = train_step
from omni_train.train import main
sys.argv = ["omni-train"] + sys.argv[1:]
main()
"""


def test_stalled_rank_ends_in_a_collective_timeout_naming_rank_and_step(tmp_path):
    overrides = [*COMMON, "parallel.ep=2", "parallel.collective_timeout_s=8", f"run_dir={tmp_path / 'run'}"]
    world = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port()), "WORLD_SIZE": "2"}
    ranks = [_start(["-c", STALL_RANK1, *overrides], env=dict(world, RANK=str(r), LOCAL_RANK=str(r)),
                    threads=1) for r in range(2)]
    try:
        _wait_for_step(ranks[0], tmp_path / "run", 2)
        stalled = time.monotonic()
        code, _, err = _finish(ranks[0], timeout=120)
        assert code != 0
        assert time.monotonic() - stalled < 60
        assert ("rank 0: a collective timed out after 8 s (last completed step: 2): another rank may be dead "
                "or stuck") in err
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.signal_group(signal.SIGKILL)
            proc.finish()


# A NaN in one parameter's gradient, on rank 1 only, at the micro-batch holding sample 21 (step 3).
NAN_GRAD_AT_SAMPLE_21 = """
import sys
from omni_train.stages import text_pretrain
real_forward = text_pretrain.STAGE.forward
def forward(model, batch, frozen=None):
    if "synthetic:21" in batch["keys"]:
        param = dict(model.named_parameters())["module.decoder.layers.1.mlp.router.weight"]
        handle = []
        handle.append(param.register_hook(lambda g: (handle[0].remove(), g * float("nan"))[1]))
    return real_forward(model, batch, frozen)
text_pretrain.STAGE.forward = forward
from omni_train.train import main
sys.argv = ["omni-train"] + sys.argv[1:]
main()
"""


def test_nonfinite_gradient_stops_with_a_report(tmp_path):
    run_dir = tmp_path / "run"
    cmd = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           "--no-python", sys.executable, "-c", NAN_GRAD_AT_SAMPLE_21,
           "trainer.max_steps=6", "optim.warmup_steps=1", "checkpoint.save_every=2", "parallel.ep=2",
           f"run_dir={run_dir}"]
    code, out, err = _finish(_start(cmd, threads=1))
    assert code != 0
    # every rank stopped at step 3 (rank 0's own gradients were finite until the all-reduce)
    assert "non-finite gradients at step 3" in err, err[-3000:]
    assert "first parameter with a non-finite gradient: decoder.layers.1.mlp.router.weight" in err
    # global batch 8 over 2 data-parallel ranks: rank 0 ran samples 16-19, rank 1 samples 20-23
    assert "rank 0: sample keys of step 3: synthetic:16, synthetic:17, synthetic:18, synthetic:19" in err
    assert "rank 1: sample keys of step 3: synthetic:20, synthetic:21, synthetic:22, synthetic:23" in err
    assert "stopped (trainer.nonfinite=stop" in err
    assert sorted(metrics(run_dir)) == [1, 2] and _latest(run_dir) == "step_00000002"


def test_wandb_run_continues_under_the_same_id_and_never_holds_the_api_key(tmp_path):
    from omni_train.metrics import _stable_run_id
    from wandb_log import read_records

    run_dir, secret = tmp_path / "run", "wandb-key-0123456789abcdef0123456789abcdef"
    overrides = ["logger=wandb", "trainer.max_steps=3", "optim.warmup_steps=1", f"run_dir={run_dir}"]
    first = omni_train([*overrides, "trainer.stop_at_step=2"], env={"WANDB_API_KEY": secret})
    second = omni_train(overrides, env={"WANDB_API_KEY": secret})  # a requeued job: same command

    run_id = _stable_run_id(run_dir)
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert [r.name.rsplit("-", 1)[-1] for r in runs] == [run_id, run_id]  # `wandb sync` joins them
    steps = []
    for run in runs:
        records = read_records(next(run.glob("run-*.wandb")))
        assert {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"} == {run_id}
        steps.append(sorted(r.history.step.num for r in records if r.WhichOneof("record_type") == "history"))
    assert steps == [[1, 2], [3]]

    for proc in (first, second):
        assert secret not in proc.stdout + proc.stderr
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and len(files) > 10
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
