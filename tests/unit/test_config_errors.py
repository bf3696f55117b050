"""Bad configs fail in seconds, before any model is built, with one line naming the key.

Each case runs the CLI's checks in this process (compose, validate_config for the world it would run on,
check_stage: what omni_train.train.preflight does); one real CLI call checks what the user sees: the
message on one line of stderr, exit status 2, nothing started."""

import time

import pytest
import torch

from cli import omni_train
from omni_train.config import ConfigError, compose, validate_config
from omni_train.loops import check_stage

CASES = [
    (["trainer.foo=1"], {}, "trainer.foo"),
    (["trainer.max_steps=abc"], {}, "trainer.max_steps"),
    (["optim.lr=fast"], {}, "optim.lr"),
    (["recipe=tiny/nope"], {}, "recipe"),
    (["parallel.tp=2", "parallel.sequence_parallel=true"], {"WORLD_SIZE": "3"}, "parallel.tp"),
    (["parallel.pp=2"], {"WORLD_SIZE": "3"}, "parallel.pp"),
    (["parallel.cp=2"], {"WORLD_SIZE": "3"}, "parallel.cp"),
    (["parallel.ep=3"], {"WORLD_SIZE": "3"}, "parallel.ep"),  # 8 experts
    (["parallel.tp=8", "parallel.sequence_parallel=true"], {"WORLD_SIZE": "8"}, "parallel.tp"),  # 4 heads
    (["parallel.tp=2"], {"WORLD_SIZE": "2"}, "parallel.sequence_parallel"),
    (["trainer.global_batch_size=6"], {"WORLD_SIZE": "1"}, "trainer.global_batch_size"),
    (["model.thinker.mrope_section=[4,4,4]"], {}, "model.thinker.mrope_section"),
    (["logger=nope"], {}, "logger"),
    (["trainer.stop_at_step=500"], {}, "trainer.stop_at_step"),
]


def config_error(overrides, env) -> ConfigError:
    """The ConfigError the CLI's checks raise for ``overrides`` in a world of env's WORLD_SIZE."""
    with pytest.raises(ConfigError) as raised:
        cfg = compose(overrides)
        validate_config(cfg, world_size=int(env.get("WORLD_SIZE", "1")), cuda_available=torch.cuda.is_available())
        check_stage(cfg)
    return raised.value


@pytest.mark.parametrize("overrides,env,key", CASES, ids=[c[2] + ":" + c[0][-1] for c in CASES])
def test_config_error_names_the_key(tmp_path, overrides, env, key):
    start = time.perf_counter()
    error = config_error([*overrides, f"run_dir={tmp_path / 'run'}"], env)
    message = f"omni-train: config error: {error}"  # what the CLI prints (test_cli_prints_one_line_...)
    assert "\n" not in message and key in message, message
    assert str(error).startswith(f"{error.key}: ") and key in error.key, (error.key, key)
    assert time.perf_counter() - start < 20
    assert not (tmp_path / "run").exists()  # nothing was started


def test_cli_prints_one_line_and_exits_2(tmp_path):
    overrides, env, key = CASES[7]  # parallel.ep=3: a layout error from validate_config
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    proc = omni_train([*overrides, f"run_dir={run_dir}"], env=env, check=False, timeout=60,
                      fresh_interpreter=True)  # how fast a new process fails, imports included
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("omni-train: config error: ") and key in lines[0], lines[0]
    assert lines[0] == f"omni-train: config error: {config_error([*overrides, f'run_dir={run_dir}'], env)}"
    assert elapsed < 20
    assert not run_dir.exists()  # nothing was started
