"""Launchers without a cluster: the rendered sbatch script, dry runs, submission, errors, exit codes."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from cli import REPO, _env
from omni_train.config import ConfigError, compose
from omni_train.launch import child_overrides
from omni_train.launch.slurm import render_sbatch
from omni_train.launch.torchrun import PREEMPTED_EXIT_CODE
from omni_train.train import preflight

GPU_CLUSTER = ["launcher=slurm", "cluster=h100_example", "cluster.nodes=2", "recipe=tiny/text_pretrain_gpu",
               "parallel.ep=8", "trainer.global_batch_size=64"]


def _render(overrides, tmp_path):
    cfg = OmegaConf.to_object(compose(overrides))
    return render_sbatch(cfg, child_overrides(overrides), 8, tmp_path / "run", REPO)


def test_sbatch_script_for_a_gpu_cluster(tmp_path):
    script = _render([*GPU_CLUSTER, "cluster.container_image=/img/omni.sqsh",
                      "cluster.container_mounts=[/data:/data]"], tmp_path)
    options = re.findall(r"^#SBATCH (\S+)$", script, flags=re.M)
    for option in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=96", "--mem=0",
                   "--partition=YOUR_PARTITION", "--account=YOUR_ACCOUNT", "--qos=YOUR_QOS",
                   "--time=24:00:00", "--requeue", "--signal=B:USR1@300", "--exclusive",
                   f"--output={tmp_path}/run/launch/slurm-%j.out", f"--chdir={REPO}"):
        assert option in options, option
    assert "module load cuda/12.8 nccl" in script  # the cluster's set-up lines run before srun
    assert 'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    srun = script[script.index("srun "):script.index(" &\n")]
    assert "--container-image=/img/omni.sqsh" in srun and "--container-mounts=/data:/data" in srun
    assert "python -m omni_train.launch.torchrun" in srun  # the container's interpreter
    for part in ('--nnodes "$SLURM_NNODES"', '--rdzv_backend c10d', '--rdzv_endpoint "$head:$port"',
                 '--rdzv_id "$SLURM_JOB_ID"', "--nproc_per_node 8",
                 "-m omni_train.train cluster=h100_example cluster.nodes=2"):
        assert part in srun, part
    assert srun.rstrip().endswith("launcher=local") and "launcher=slurm" not in srun
    assert "trap 'forward USR1' USR1" in script and "trap 'forward TERM' TERM" in script
    assert f'[ "$status" -eq {PREEMPTED_EXIT_CODE} ] && requeue=yes' in script
    assert '[ "$signal" = TERM ] && requeue=no' in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    syntax = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert syntax.returncode == 0, syntax.stderr


def test_cpu_cluster_uses_launcher_processes_and_this_interpreter(tmp_path):
    cfg = OmegaConf.to_object(compose(["launcher=slurm", "cluster=localhost", "launcher.rdzv_port=12345"]))
    script = render_sbatch(cfg, ["launcher=local"], 2, tmp_path / "run", REPO)
    assert "--gpus-per-node" not in script and "#SBATCH --partition=debug" in script
    assert f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 {sys.executable} -m omni_train.launch.torchrun" in script
    assert "--nproc_per_node 2" in script and "port=12345" in script


def test_children_run_locally_with_the_same_overrides():
    assert child_overrides(["recipe=tiny/text_pretrain", "launcher=torchrun", "launcher.nproc_per_node=2",
                            "launcher.dry_run=true", "trainer.max_steps=3"]) == [
        "recipe=tiny/text_pretrain", "launcher.nproc_per_node=2", "trainer.max_steps=3", "launcher=local"]


@pytest.mark.parametrize("overrides,key", [
    (["launcher=slurm"], "cluster"),
    (["launcher=slurm", "cluster=nope"], "cluster"),
    (["launcher=nope"], "launcher"),
    (["launcher=torchrun", "launcher.nnodes=2"], "launcher.rdzv_endpoint"),
    (["launcher=torchrun", "launcher.nproc_per_node=0"], "launcher.nproc_per_node"),
    # the launched world (3 processes) is checked before anything starts
    (["launcher=slurm", "cluster=localhost", "launcher.nproc_per_node=3", "parallel.ep=2"], "parallel.ep"),
    (["launcher=slurm", "cluster=localhost", "cluster.nodes=0"], "cluster.nodes"),
])
def test_launcher_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        preflight(overrides)
    assert info.value.key == key, str(info.value)


def test_no_launcher_inside_torchrun(monkeypatch):
    """`torchrun -m omni_train.train launcher=torchrun` would start torchrun in every process."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="launcher=torchrun inside a process that torchrun started"):
        preflight(["launcher=torchrun"])


@pytest.fixture
def fake_sbatch(tmp_path):
    """An `sbatch` first on PATH that records its arguments and answers with job id 4242."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch_calls"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho 4242\n')
    (bin_dir / "sbatch").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, calls


def _omni_train(overrides, env):
    return subprocess.run([sys.executable, "-m", "omni_train.train", *overrides], cwd=REPO, env=_env(env),
                          capture_output=True, text=True, timeout=120)


def test_dry_run_prints_the_script_and_submits_nothing(tmp_path, fake_sbatch):
    env, calls = fake_sbatch
    run_dir = tmp_path / "run"
    proc = _omni_train(["launcher=slurm", "cluster=localhost", "launcher.dry_run=true", f"run_dir={run_dir}"],
                       env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#!/bin/bash\n#SBATCH ") and "srun " in proc.stdout
    assert not calls.exists() and not run_dir.exists()


def test_submit_keeps_script_config_and_code_version_in_the_run_dir(tmp_path, fake_sbatch):
    env, calls = fake_sbatch
    run_dir = tmp_path / "run"
    proc = _omni_train(["launcher=slurm", "cluster=localhost", "trainer.max_steps=7", f"run_dir={run_dir}"],
                       env)
    assert proc.returncode == 0, proc.stderr
    launch_dir = run_dir / "launch"
    assert f"submitted job 4242; log: {launch_dir}/slurm-4242.out" in proc.stdout
    assert calls.read_text().split() == ["--parsable", str(launch_dir / "sbatch.sh")]
    assert f"trainer.max_steps=7 run_dir={run_dir} launcher=local" in (launch_dir / "sbatch.sh").read_text()
    config = OmegaConf.load(launch_dir / "config.yaml")
    assert config.trainer.max_steps == 7 and config.launcher.name == "slurm" and config.cluster.name == "localhost"
    version = json.loads((launch_dir / "code_version.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert version["commit"] == head and isinstance(version["dirty"], bool)
    assert not (run_dir / "checkpoints").exists()  # nothing trained here


@pytest.mark.parametrize("worker_status,expected", [(PREEMPTED_EXIT_CODE, PREEMPTED_EXIT_CODE), (3, 3), (0, 0)])
def test_torchrun_wrapper_keeps_the_preempted_status(worker_status, expected):
    """torchrun itself exits 1 when a worker fails; the wrapper keeps "stopped to be resumed" visible."""
    cmd = [sys.executable, "-m", "omni_train.launch.torchrun", "--standalone", "--nproc_per_node", "2",
           "--no-python", "sh", "-c", f"exit {worker_status}"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(threads=1), capture_output=True, text=True, timeout=120)
    assert proc.returncode == expected, proc.stderr[-2000:]


# A training process with a helper in its process group, as megatron's checkpoint writer is: on USR1 it
# exits PREEMPTED_EXIT_CODE if the helper is still alive (torchrun alone would have signalled the group).
WORKER = """
import signal, subprocess, sys, time
helper = subprocess.Popen(["sleep", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
def stop(*args):
    alive = helper.poll() is None
    helper.kill()
    sys.exit(75 if alive else 9)
signal.signal(signal.SIGUSR1, stop)
open(sys.argv[1], "w").close()
time.sleep(60)
"""


def test_torchrun_wrapper_passes_preemption_signals_to_the_workers_alone(tmp_path):
    ready = tmp_path / "ready"
    cmd = [sys.executable, "-m", "omni_train.launch.torchrun", "--standalone", "--nproc_per_node", "1",
           "--no-python", sys.executable, "-c", WORKER, str(ready)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(threads=1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-2000:]
    assert "SIGUSR1: passing it to 1 training processes" in stderr
