"""torch.compile for the few elementwise chains that dominate memory traffic, where it pays: on CUDA,
where inductor fuses each chain into one Triton kernel. Elsewhere (CPU CI, a GPU image without Triton)
the same Python functions run eagerly, so every device runs the same code."""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401  (inductor's GPU backend)
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable, dynamic: Optional[bool] = None) -> Callable:
    """``fn`` compiled once per process (inductor, whole graph); ``dynamic=True``: one kernel for all
    shapes (e.g. the flat views of every parameter) instead of one per shape."""
    return torch.compile(fn, fullgraph=True, dynamic=dynamic)


def fused(fn: Callable, device: torch.device, dynamic: Optional[bool] = None) -> Callable:
    """``fn`` compiled when on CUDA with Triton, else ``fn`` itself."""
    return compiled(fn, dynamic) if device.type == "cuda" and triton_available() else fn
