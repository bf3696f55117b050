"""Launchers: how a run gets its processes. conf/launcher/<name>.yaml <-> omni_train/launch/<name>.py.

`launcher=local` trains in the current process and is handled by omni_train/train.py itself. Every other
launcher starts processes that run the same command with `launcher=local` appended, so the recipe and
overrides mean the same thing under every launcher.
"""

from __future__ import annotations

import importlib
import os
from typing import List, Optional

from omni_train.config import ConfigError, TrainConfig

LAUNCHERS = {
    "torchrun": "omni_train.launch.torchrun",
    "slurm": "omni_train.launch.slurm",
}
NAMES = ("local", *LAUNCHERS)


def child_overrides(overrides: List[str]) -> List[str]:
    """The user's overrides for the launched processes: the same, with the launcher set to local."""
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("launcher", "launcher.dry_run")]
    return [*keep, "launcher=local"]


def nproc_per_node(cfg: TrainConfig) -> int:
    """Processes per node: launcher.nproc_per_node, else one per GPU, else 1."""
    if cfg.launcher.nproc_per_node is not None:
        return cfg.launcher.nproc_per_node
    if cfg.launcher.name == "slurm":
        return max(cfg.cluster.gpus_per_node, 1)
    import torch

    return max(torch.cuda.device_count(), 1)


def check_launcher(cfg: TrainConfig) -> None:
    """One-line errors, naming the key, for a launcher that cannot start; before anything is built."""
    launcher = cfg.launcher
    if launcher.name not in NAMES:
        raise ConfigError("launcher.name", f"{launcher.name!r} is not one of {', '.join(NAMES)}")
    if launcher.name != "local" and "LOCAL_RANK" in os.environ:
        raise ConfigError("launcher", f"launcher={launcher.name} inside a process that torchrun started would "
                                      "start processes again; its processes run launcher=local")
    if launcher.nproc_per_node is not None and launcher.nproc_per_node < 1:
        raise ConfigError("launcher.nproc_per_node", f"must be >= 1, got {launcher.nproc_per_node}")
    if launcher.name == "torchrun":
        if launcher.nnodes < 1:
            raise ConfigError("launcher.nnodes", f"must be >= 1, got {launcher.nnodes}")
        if launcher.nnodes > 1 and not launcher.rdzv_endpoint:
            raise ConfigError("launcher.rdzv_endpoint", "launcher.nnodes > 1 needs node 0's host:port")
    if launcher.name != "slurm":
        return
    cluster = cfg.cluster
    if cluster is None:
        raise ConfigError("cluster", "launcher=slurm needs cluster=<name> (one of conf/cluster/)")
    if cluster.nodes < 1:
        raise ConfigError("cluster.nodes", f"must be >= 1, got {cluster.nodes}")
    if cluster.gpus_per_node < 0:
        raise ConfigError("cluster.gpus_per_node", f"must be >= 0, got {cluster.gpus_per_node}")
    if launcher.signal_seconds < 0:
        raise ConfigError("launcher.signal_seconds", f"must be >= 0, got {launcher.signal_seconds}")


def launched_world(cfg: TrainConfig) -> Optional[int]:
    """The world size the launcher will start (None for launcher=local: the environment says)."""
    if cfg.launcher.name == "local":
        return None
    nodes = cfg.cluster.nodes if cfg.launcher.name == "slurm" else cfg.launcher.nnodes
    return nodes * nproc_per_node(cfg)


def launch(cfg: TrainConfig, overrides: List[str]) -> int:
    """Start the run with cfg.launcher; returns the exit status for this process."""
    module = importlib.import_module(LAUNCHERS[cfg.launcher.name])
    return module.launch(cfg, child_overrides(overrides))
