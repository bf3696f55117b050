"""Bad configs fail in seconds, before any model is built, with one line naming the key."""

import time

import pytest

from cli import omni_train

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


@pytest.mark.parametrize("overrides,env,key", CASES, ids=[c[2] + ":" + c[0][-1] for c in CASES])
def test_config_error_names_the_key(tmp_path, overrides, env, key):
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    proc = omni_train([*overrides, f"run_dir={run_dir}"], env=env, check=False, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("omni-train: config error: ") and key in lines[0], lines[0]
    assert elapsed < 20
    assert not run_dir.exists()  # nothing was started
