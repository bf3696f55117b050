"""Loops that drive a stage's Session (omni_train/session.py), chosen by ``stage.loop``.

- ``supervised`` (loops/supervised.py): batches from data; pretraining, SFT, off-policy distillation, DPO.
- ``rollout`` (loops/rollout.py): batches sampled from the policy itself each step (sync -> generate ->
  score -> update), for on-policy distillation and GSPO, over the same Session.
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
    "rollout": "omni_train.loops.rollout",
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
    check_rollout(cfg)


# stages whose batches the rollout loop samples from the policy (and that only it can drive)
ROLLOUT_STAGES = ("distill_onpolicy", "gspo")


def check_rollout(cfg) -> None:
    """A stage driven by the rollout loop: its sampling, batch and teacher settings (ConfigError naming
    the key), before anything is built."""
    from omni_train.config.rollout import BACKENDS
    from omni_train.rollout import check_sampling
    from omni_train.rollout.teacher import check_teacher

    stage, rollout = cfg.stage, cfg.stage.rollout
    code = stage.base or stage.name
    if (stage.loop == "rollout") != (code in ROLLOUT_STAGES):
        raise ConfigError("stage.loop", f"stage {code!r} runs under loop "
                                        f"{'rollout' if code in ROLLOUT_STAGES else 'supervised'}, not {stage.loop!r}")
    if stage.loop != "rollout":
        return
    if rollout.backend not in BACKENDS:
        raise ConfigError("stage.rollout.backend", f"{rollout.backend!r}, expected one of {', '.join(BACKENDS)}")
    if rollout.backend == "megatron":
        # rollout/megatron.py: the trained model decodes itself (megatron-core's static KV cache), text only
        for name in ("tp", "pp", "cp", "ep"):
            if getattr(cfg.parallel, name) > 1:
                raise ConfigError(f"parallel.{name}", f"{getattr(cfg.parallel, name)}: stage.rollout.backend=megatron "
                                                      "decodes with the whole model on each rank (tp = pp = cp = ep "
                                                      "= 1; data parallel only); use backend=hf")
        if not stage.loss.text_prompts_only and cfg.model.thinker.towers:
            raise ConfigError("stage.loss.text_prompts_only", "stage.rollout.backend=megatron answers text prompts "
                                                              "only: set it true (prompts with media are skipped and "
                                                              "counted) or use backend=hf")
    for key in ("prompts_per_step", "max_prompt_tokens"):
        if getattr(rollout, key) < 1:
            raise ConfigError(f"stage.rollout.{key}", f"{getattr(rollout, key)}, must be >= 1")
    longest = rollout.max_prompt_tokens + rollout.sampling.max_new_tokens
    if longest > cfg.trainer.seq_length:
        raise ConfigError("trainer.seq_length", f"{cfg.trainer.seq_length} < stage.rollout.max_prompt_tokens + "
                                                f"sampling.max_new_tokens = {longest}: every sample is trained whole "
                                                "in one row of trainer.seq_length tokens")
    if rollout.generation_batch < 0:
        raise ConfigError("stage.rollout.generation_batch", f"{rollout.generation_batch} < 0 (0: all at once)")
    try:
        check_sampling(rollout.sampling)
    except ValueError as e:
        key, _, message = str(e).partition(": ")
        raise ConfigError(key, message) from None
    if cfg.data.name != "shards":
        raise ConfigError("data.name", f"{code} reads its prompts from shards (data=shards), not {cfg.data.name!r}")
    if code == "distill_onpolicy":
        check_teacher(cfg)
    if code == "gspo":
        check_gspo(cfg)


def check_gspo(cfg) -> None:
    """GSPO's update and reward settings (ConfigError naming the key), before anything is built."""
    from omni_train.config.rollout import ADVANTAGE_SCALES, GSPO_LEVELS, OLD_LOGPROBS
    from omni_train.rewards import Rewarder

    g, rollout = cfg.stage.gspo, cfg.stage.rollout
    for key, value, allowed in (("level", g.level, GSPO_LEVELS), ("old_logprobs", g.old_logprobs, OLD_LOGPROBS),
                                ("advantage_scale", g.advantage_scale, ADVANTAGE_SCALES)):
        if value not in allowed:
            raise ConfigError(f"stage.gspo.{key}", f"{value!r}, expected one of {', '.join(allowed)}")
    for key in ("epsilon_low", "epsilon_high", "beta", "advantage_eps"):
        if getattr(g, key) < 0:
            raise ConfigError(f"stage.gspo.{key}", f"{getattr(g, key)} < 0")
    if g.epsilon_low >= 1:
        raise ConfigError("stage.gspo.epsilon_low", f"{g.epsilon_low}: the clip range's lower end 1 - epsilon_low "
                                                    "must stay above 0")
    if rollout.sampling.n < 2:
        raise ConfigError("stage.rollout.sampling.n", f"{rollout.sampling.n}: a group needs at least 2 responses "
                                                      "to normalise rewards within it")
    per_rank = rollout.prompts_per_step * rollout.sampling.n
    if not 1 <= g.minibatches <= per_rank:
        raise ConfigError("stage.gspo.minibatches", f"{g.minibatches}: need 1 .. prompts_per_step x n = {per_rank}")
    if g.max_refills < 0:
        raise ConfigError("stage.gspo.max_refills", f"{g.max_refills} < 0")
    if cfg.parallel.cp > 1:
        raise ConfigError("parallel.cp", f"{cfg.parallel.cp}: GSPO's sequence-level ratio needs each response whole "
                                         "on one rank (context parallelism splits it)")
    names = [spec.name for spec in cfg.stage.frozen_models]
    if g.beta > 0 and "reference" not in names:
        raise ConfigError("stage.gspo.beta", f"{g.beta} > 0 needs a frozen model named 'reference' "
                                             "(stage.frozen_models), e.g. {name: reference, source: init}")
    try:
        Rewarder.check(cfg.stage.rewards)
    except ValueError as e:
        key, _, message = str(e).partition(": ")
        raise ConfigError(key, message) from None


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
