"""Every run-time patch of megatron-core, torch and transformers, in one place (docs/compat.md lists them).

Each patch is a ``Patch`` record (registry.py) next to its code, one module per library and concern:

  megatron_without_te.py     megatron-core without Transformer Engine or Apex (CPU and GPU alike)
  megatron_cpu.py            megatron-core on a CPU-only torch (CPU runs only)
  megatron_rotary.py         megatron's attention rotates queries and keys with our compiled rotation
  transformers_attention.py  the towers' varlen attention as a transformers attention function
  torch_safe_load.py         torch.distributed.checkpoint reads checkpoints through restricted unpicklers

``apply_all(device_type)`` applies them once per process, after checking that the installed libraries are
the versions the patches were written for; ``parallel.setup.init_parallel`` calls it, so every training,
export and test path that builds a megatron model has them. Nothing here patches at import time, and
importing this package imports neither torch nor the libraries it patches.
"""

from __future__ import annotations

from typing import List, Set

from omni_train.compat.quiet import quiet_library_warnings
from omni_train.compat.registry import (ALLOW_UNTESTED, Patch, UntestedVersionError, UntestedVersionWarning,
                                        all_patches, check_versions)

__all__ = ["ALLOW_UNTESTED", "Patch", "UntestedVersionError", "UntestedVersionWarning", "all_patches",
           "apply_all", "check_versions", "quiet_library_warnings"]

_APPLIED: Set[str] = set()


def apply_all(device_type: str) -> List[str]:
    """Apply every patch a run on ``device_type`` ("cpu" or "cuda") needs and that is not applied yet;
    returns their names (empty on a second call). Fails before changing anything if an installed library
    is not the version a patch was written for."""
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    pending = [p for p in all_patches() if device_type in p.devices and p.name not in _APPLIED]
    if not pending:
        return []
    check_versions(pending)
    for patch in pending:
        patch.apply()
        _APPLIED.add(patch.name)
    return [p.name for p in pending]
