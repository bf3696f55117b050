"""Loops that drive a stage's Session (omni_train/session.py), chosen by ``stage.loop``.

- ``supervised`` (loops/supervised.py): batches from data; pretraining, SFT, off-policy distillation, DPO.
- a rollout loop (generate -> score -> advantages -> updates, for on-policy distillation and GSPO) is
  registered here as ``rollout`` by the issue that builds it, over the same Session.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from omni_train.config import ConfigError, TrainConfig

LOOPS = {
    "supervised": "omni_train.loops.supervised",
}


def check_stage(cfg) -> None:
    """Before anything is built: the stage's code, loop and frozen models exist and are named once each
    (ConfigError naming the key)."""
    from omni_train.stages import STAGES

    stage = cfg.stage
    code = stage.base or stage.name
    if code not in STAGES:
        raise ConfigError("stage.base" if stage.base else "stage.name",
                          f"no registered stage {code!r}; registered: {', '.join(STAGES)}")
    if stage.loop not in LOOPS:
        raise ConfigError("stage.loop", f"unknown loop {stage.loop!r}; known: {', '.join(LOOPS)}")
    names = [spec.name for spec in stage.frozen_models]
    for i, spec in enumerate(stage.frozen_models):
        key = f"stage.frozen_models[{i}]"
        if names.count(spec.name) > 1:
            raise ConfigError(f"{key}.name", f"{spec.name!r} names two frozen models")
        kind, _, rest = spec.source.partition(":")
        if spec.source != "init" and rest == "" and kind in ("stage", "hf"):
            raise ConfigError(f"{key}.source", f"{spec.source!r} names no {kind}")


def run_stage(cfg: TrainConfig, env) -> None:
    """Build the stage's session and run its loop (``env``: parallel.setup.ParallelEnv); collective
    failures name the rank and the step."""
    from omni_train.resilience import explain_collective_failures
    from omni_train.session import Session

    resolved = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    if env.is_main:
        OmegaConf.save(OmegaConf.create(resolved), Path(cfg.run_dir) / "config.yaml")
    start = time.perf_counter()
    session: Optional[Session] = None

    def where() -> str:
        return f"last completed step: {session.state.step}" if session else "while setting up"

    loop = importlib.import_module(LOOPS[cfg.stage.loop])
    with explain_collective_failures(env.rank, cfg.parallel.collective_timeout_s, where):
        session = Session(cfg, env, resolved)
        loop.run(session)
    if env.is_main:
        print(f"done in {time.perf_counter() - start:.1f}s; run directory: {cfg.run_dir}", flush=True)
