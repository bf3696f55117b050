"""Our classes that checkpoints hold, on ``torch.load(weights_only=True)``'s allowlist.

The restricted readers that read every checkpoint's non-tensor entries with ``weights_only=True`` (and its
``.metadata`` through an allowlisting unpickler) are compat/torch_safe_load.py's. Beyond megatron-core's
classes, our ShardedObjects (RNG states, data loader state) hold NumPy dtypes and scalars, and the packed
sequences and media items a shard loader has in flight: those are registered here, where the data classes
may be imported.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def register_data_classes() -> None:
    """Put the exact classes our ShardedObjects hold beyond megatron-core's list on torch's allowlist."""
    from omni_train.data.chat import MediaItem
    from omni_train.data.packing import PackedSequence

    dtypes = {type(np.dtype(t)) for t in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16",
                                          "uint32", "uint64", "float16", "float32", "float64")}
    try:  # numpy >= 2
        from numpy._core.multiarray import scalar
    except ImportError:
        from numpy.core.multiarray import scalar
    torch.serialization.add_safe_globals([np.dtype, scalar, *dtypes, MediaItem, PackedSequence])


@functools.lru_cache(maxsize=None)
def apply() -> None:
    """Our data classes on the allowlist, once per process: checkpoint/manager.py calls it before it reads
    a checkpoint (never at import time)."""
    register_data_classes()
