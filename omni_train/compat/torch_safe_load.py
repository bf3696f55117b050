"""Checkpoint loading that never runs code stored in a checkpoint.

megatron-core's dist_checkpointing reads checkpoints through torch.distributed.checkpoint (DCP), which
unpickles two things without any restriction: the ``.metadata`` file (``pickle.load``) and every
non-tensor entry, i.e. our ShardedObjects (RNG states, data loader position), with
``torch.load(weights_only=False)``. A crafted checkpoint would run its code on load. The patch below puts a
restricted reader in front of both:

- ``.metadata`` is first read by an Unpickler that resolves only DCP's metadata classes, ``torch.Size``,
  dtypes and layouts; anything else (``os.system``, ``builtins.eval``, ...) raises
  ``UnsafeCheckpointError`` before the unrestricted reader sees the file.
- a non-tensor entry is first read with ``torch.load(weights_only=True)``: torch's allowlist (tensors,
  containers, primitives) plus the classes registered with ``torch.serialization.add_safe_globals``
  (megatron-core's, NumPy arrays among them, and ours: checkpoint/safe_load.py).

``common.pt`` is already read with torch.load's default, ``weights_only=True`` (torch >= 2.6), and Hugging
Face weights come through safetensors (export/hf_io.py). Data shards are never unpickled
(data/decode.py: ``.npy`` with ``allow_pickle=False``, unknown members refused).
"""

from __future__ import annotations

import functools
import io
import pickle
from typing import Any

import torch

from omni_train.compat.registry import Patch

_APPLIED = False


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file asks to run or import something that checkpoints never contain."""


# Modules whose classes DCP's metadata consists of (dataclasses and enums, nothing callable beyond them).
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                     "torch.distributed.checkpoint.filesystem",
                     "megatron.core.dist_checkpointing.strategies.torch")
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                     ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        obj = None
        if module in _METADATA_MODULES and not name.startswith("__"):
            obj = getattr(__import__(module, fromlist=[name]), name, None)
            # classes defined there, never a function or anything the module merely imported
            obj = obj if isinstance(obj, type) and obj.__module__ == module else None
        elif (module, name) in _METADATA_GLOBALS:
            obj = super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            obj = getattr(torch, name)
        if obj is None:
            raise UnsafeCheckpointError(f"refusing to load {module}.{name}: checkpoint metadata holds only "
                                        f"torch.distributed.checkpoint metadata classes")
        return obj


def check_metadata(data: bytes, path: Any = "") -> None:
    """Raise UnsafeCheckpointError if a DCP ``.metadata`` pickle references anything outside the allowlist."""
    try:
        _MetadataUnpickler(io.BytesIO(data)).load()
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{path}: {exc}") from None


def check_object(value: io.BytesIO, what: str = "") -> None:
    """Raise UnsafeCheckpointError unless a pickled non-tensor entry loads with weights_only=True."""
    position = value.tell()
    try:
        torch.load(value, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        cause = next((line for line in lines if "unsupported global" in line.lower()), lines[0])
        raise UnsafeCheckpointError(f"refusing to load checkpoint entry {what}: it is not plain data "
                                    f"({cause})") from None
    finally:
        value.seek(position)


def use_restricted_readers() -> None:
    """Put the restricted readers in front of DCP's unrestricted ones (idempotent, process-wide)."""
    global _APPLIED
    if _APPLIED:
        return
    from torch.distributed.checkpoint import default_planner, filesystem

    read_metadata = filesystem.FileSystemReader.read_metadata

    @functools.wraps(read_metadata)
    def checked_read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            check_metadata(f.read(), path)
        return read_metadata(self, *args, **kwargs)

    load_bytes = default_planner.DefaultLoadPlanner.load_bytes

    @functools.wraps(load_bytes)
    def checked_load_bytes(self, read_item, value):
        check_object(value, read_item.dest_index.fqn)
        return load_bytes(self, read_item, value)

    filesystem.FileSystemReader.read_metadata = checked_read_metadata
    default_planner.DefaultLoadPlanner.load_bytes = checked_load_bytes
    _APPLIED = True


PATCHES = [
    Patch("checkpoint_restricted_unpickling", library="torch", written_for=("2.13", "2.11"),
          targets=("torch.distributed.checkpoint.filesystem.FileSystemReader.read_metadata",
                   "torch.distributed.checkpoint.default_planner.DefaultLoadPlanner.load_bytes"),
          why="DCP unpickles .metadata with pickle.load and non-tensor entries with torch.load(weights_only="
              "False): a crafted checkpoint runs code on load. Each is first read by an allowlisting unpickler",
          apply=use_restricted_readers),
]
