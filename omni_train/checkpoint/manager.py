"""Checkpoints with megatron-core dist_checkpointing: atomic saves, keep-last-K, resume, stage hand-off.

Layout of a stage's checkpoint root (<run_dir>/checkpoints):
    step_00000050/        a complete checkpoint (dist_checkpointing files + omni_train.json)
    step_00000100.tmp/    a save in progress (or one killed half way): never read, removed at start
    latest                text file naming the newest complete checkpoint, replaced atomically

A save writes into `step_N.tmp`, waits for every rank, then rank 0 writes omni_train.json, renames the
directory to `step_N` and only then points `latest` at it. A process killed at any moment leaves
`latest` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from omni_train.checkpoint import safe_load

MARKER = "omni_train.json"
# How megatron's distributed optimizer lays out its state in a checkpoint. "dp_reshardable" (each
# data-parallel rank's shard, reshardable to another dp size); megatron-core 0.16.1's default
# ("fully_sharded_model_space") fails with "ShardedTensor.flattened_range is not supported".
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
LATEST = "latest"


@dataclass
class TrainState:
    """What the loop needs besides model and optimizer to continue exactly where it stopped."""

    step: int = 0
    consumed_samples: int = 0
    nonfinite_skipped: int = 0  # steps whose update was skipped for a non-finite loss or gradient


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _per_rank(key: str, value: Any) -> ShardedObject:
    """An object every rank has its own copy of (RNG states, data loader position)."""
    return ShardedObject(key, value, (_world(),), (_rank(),), replica_id=0)


def resolve_init_from(init_from: str, run_dir: Path) -> Path:
    """`stage:<name>` -> the final checkpoint of that stage inside the same run root; else a path."""
    if init_from.startswith("stage:"):
        source = run_dir.parent / init_from.removeprefix("stage:") / "checkpoints"
    else:
        source = Path(init_from)
    found = latest_checkpoint(source) if not (source / MARKER).exists() else source
    if found is None:
        raise FileNotFoundError(f"init_from={init_from}: no complete checkpoint under {source}")
    return found


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under `root`, or None."""
    pointer = root / LATEST
    if pointer.exists():
        path = root / pointer.read_text().strip()
        if (path / MARKER).exists():
            return path
    complete = sorted(p for p in root.glob("step_*") if p.suffix != ".tmp" and (p / MARKER).exists())
    return complete[-1] if complete else None


def checkpoint_step(path: Path) -> int:
    """The number of optimizer steps a complete checkpoint was saved after."""
    return int(json.loads((Path(path) / MARKER).read_text())["step"])


# Files of the Hugging Face checkpoint a run started from, kept next to every checkpoint it writes.
HF_CONFIG_FILES = ("config.json", "generation_config.json")


def read_provenance(path: Path) -> Dict[str, Any]:
    """Where a checkpoint's weights came from, for export: the HF source kind (``hf_source``), the
    checkpoint holding the carried non-LM tensors (``carried_from``), and the HF config files."""
    marker = json.loads((Path(path) / MARKER).read_text())
    provenance = {k: marker[k] for k in ("hf_source", "carried_from") if marker.get(k)}
    if (Path(path) / "config.json").exists():
        provenance["config_dir"] = str(path)
    return provenance


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int):
        self.root = root
        self.keep_last = keep_last
        # Set when the run starts from an imported checkpoint; carried into every save (see export).
        self.provenance: Dict[str, Any] = {}
        if _rank() == 0:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob("step_*.tmp"):  # a save that was killed: never complete
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()

    def _sharded_state(self, model, optimizer, data, is_loading: bool, frozen=None) -> Dict[str, Any]:
        model_sd = _unwrap(model).sharded_state_dict()
        state = {"model": model_sd, "rng_state": _per_rank("rng_state", _rng_state()),
                 "data_state": _per_rank("data_state", data.state_dict())}
        if frozen:  # frozen models a stage keeps in its checkpoints (stage.frozen_models[].save)
            state["frozen"] = {name: module.sharded_state_dict(prefix=f"frozen.{name}.")
                               for name, module in frozen.items()}
        if optimizer is not None:
            state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                              metadata=OPTIMIZER_METADATA)
        return state

    def save(self, model, optimizer, scheduler, train_state: TrainState, data, frozen=None) -> Path:
        name = f"step_{train_state.step:08d}"
        final, tmp = self.root / name, self.root / f"{name}.tmp"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        state = self._sharded_state(model, optimizer, data, is_loading=False, frozen=frozen)
        state["scheduler"] = scheduler.state_dict()
        state["train_state"] = vars(train_state).copy()
        dist_checkpointing.save(state, str(tmp))
        _barrier()
        if _rank() == 0:
            self._write_provenance(tmp)
            marker = dict(vars(train_state), **{k: v for k, v in self.provenance.items() if k != "config_dir"})
            (tmp / MARKER).write_text(json.dumps(marker))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _write_atomic(self.root / LATEST, name)
            self._prune(keep=final)
        _barrier()
        return final

    def _write_provenance(self, directory: Path) -> None:
        config_dir = self.provenance.get("config_dir")
        for name in HF_CONFIG_FILES if config_dir else ():
            if (Path(config_dir) / name).exists():
                shutil.copy(Path(config_dir) / name, directory / name)

    def _prune(self, keep: Path) -> None:
        complete = sorted(p for p in self.root.glob("step_*") if p.suffix != ".tmp")
        for old in complete[: -self.keep_last]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model, optimizer, scheduler, data, frozen=None) -> TrainState:
        """Restore everything (resume), data loader position included. Returns the saved TrainState."""
        safe_load.apply()  # our data classes (in the data state) on the restricted readers' allowlist
        if optimizer is not None:
            _prime_distributed_optimizer(optimizer)
        state = self._sharded_state(model, optimizer, data, is_loading=True, frozen=frozen)
        loaded = dist_checkpointing.load(state, str(path))
        _unwrap(model).load_state_dict(loaded["model"])
        for name, module in (frozen or {}).items():
            prefix = f"frozen.{name}."
            module.load_state_dict({k.removeprefix(prefix): v for k, v in loaded["frozen"][name].items()})
        if optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["scheduler"])
        self.provenance = read_provenance(path)
        _set_rng_state(loaded["rng_state"])
        data.load_state_dict(loaded["data_state"])
        return TrainState(**loaded["train_state"])


def _prime_distributed_optimizer(optimizer) -> None:
    """Give a fresh DistributedOptimizer the per-parameter state its sharded_state_dict() reads.

    Without Apex/Transformer Engine, megatron-core 0.16.1's DistributedOptimizer.state_dict() asserts
    that every parameter state of its torch Adam holds the same 'step', which a never-stepped optimizer
    does not have. Allocate the state (megatron's own init_state_fn) with step 0; loading overwrites it.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer) or opt.init_state_fn is None:
            continue
        opt.init_state_fn(opt.optimizer, opt.config)
        for param_state in opt.optimizer.state.values():
            param_state.setdefault("step", torch.zeros((), dtype=torch.float32))


def load_model_weights(path: Path, model) -> None:
    """Stage hand-off: take only the model weights of another checkpoint."""
    safe_load.apply()
    module = _unwrap(model)
    loaded = dist_checkpointing.load({"model": module.sharded_state_dict()}, str(path))
    module.load_state_dict(loaded["model"])


def _unwrap(model):
    """The megatron model inside a data-parallel wrapper: checkpoints hold its names, unprefixed."""
    return getattr(model, "module", model)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
