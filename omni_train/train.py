"""Entry point: `omni-train [overrides]` or `torchrun ... -m omni_train.train [overrides]`.

Compose the config, check it (before torch.distributed or any model exists), then run the stage. With
launcher=torchrun or launcher=slurm, start those processes instead (omni_train/launch/); each of them runs
this entry point again with launcher=local.
"""

from __future__ import annotations

import os
import sys
from typing import List

from omni_train.compat import quiet_library_warnings

quiet_library_warnings()  # before megatron is imported: `python -m omni_train.train` (torchrun workers)

import hydra
from omegaconf import DictConfig, OmegaConf

from omni_train.config import CONF_DIR, ConfigError, TrainConfig, compose, register_schemas, validate_config
from omni_train.config.validate import smallest_world_size
from omni_train.launch import check_launcher, launch, launched_world
from omni_train.loops import check_stage


def _user_overrides(argv: List[str]) -> List[str]:
    """The config overrides among Hydra's arguments (its flags and hydra.* settings are Hydra's own)."""
    return [a for a in argv if not a.startswith("-") and not a.lstrip("+~").startswith("hydra.")]


def preflight(argv: List[str]) -> DictConfig:
    """Fail in seconds, with one line naming the key, on any config this job cannot run."""
    import torch

    cfg = compose(_user_overrides(argv))
    check_launcher(cfg)
    cuda_available = torch.cuda.is_available()
    if cfg.launcher.name == "slurm":  # the job runs on the cluster's nodes, not on this machine
        cuda_available = cfg.cluster.gpus_per_node > 0
    # A dry run describes a layout without launching it: check it against the world it describes.
    world_size = (dry_run_world_size(cfg) if cfg.dry_run
                  else launched_world(cfg) or int(os.environ.get("WORLD_SIZE", "1")))
    validate_config(cfg, world_size=world_size, cuda_available=cuda_available)
    if not cfg.pipeline.stages:
        check_stage(cfg)
    return cfg


def dry_run_world_size(cfg) -> int:
    """The world a dry run describes: dry_run_world_size, else the smallest the layout takes."""
    if cfg.dry_run_world_size is None:
        return smallest_world_size(cfg)
    if cfg.dry_run_world_size < 1:
        raise ConfigError("dry_run_world_size", f"must be >= 1, got {cfg.dry_run_world_size}")
    return cfg.dry_run_world_size


def run(cfg: DictConfig) -> None:
    train_cfg: TrainConfig = OmegaConf.to_object(cfg)
    if train_cfg.dry_run:
        from omni_train.planning.dry_run import print_dry_run

        if not print_dry_run(train_cfg, dry_run_world_size(train_cfg)):
            print(f"omni-train: dry run: the per-rank memory estimate exceeds dry_run_gpu_memory_gb="
                  f"{train_cfg.dry_run_gpu_memory_gb:g}", file=sys.stderr, flush=True)
            sys.exit(3)
        return
    from omni_train.loops import run_stage
    from omni_train.parallel.setup import choose_device, init_parallel, shutdown_parallel

    env = init_parallel(train_cfg.parallel, choose_device(train_cfg.trainer.device), train_cfg.trainer.seed)
    try:
        run_stage(train_cfg, env)
    finally:
        shutdown_parallel()


register_schemas()
hydra_main = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(run)


def main() -> None:
    quiet_library_warnings()
    try:
        cfg = preflight(sys.argv[1:])
    except ConfigError as exc:
        print(f"omni-train: config error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    if cfg.pipeline.stages:  # stage after stage, each its own omni-train process (omni_train/pipeline.py)
        from omni_train.pipeline import run_pipeline

        sys.exit(run_pipeline(cfg, sys.argv[1:]))
    if cfg.launcher.name != "local":  # start the processes, each of which runs this with launcher=local
        sys.exit(launch(OmegaConf.to_object(cfg), sys.argv[1:]))
    hydra_main()


if __name__ == "__main__":
    main()
