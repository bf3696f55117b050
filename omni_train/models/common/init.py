"""Parameter initialisation that does not depend on the parallel layout.

megatron-core draws each rank's shard from that rank's RNG stream, so a model built with ep=2 or tp=2
starts from different weights than the same model on one process. Here every parameter is drawn from a
generator seeded by (seed, its global checkpoint key, its expert/layer index), as the full unsharded
tensor, and each rank keeps its slice: any layout starts from the same model, which is what lets a
multi-process run be checked against a single-process one.
"""

from __future__ import annotations

import hashlib
import math

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

NORM_KEYS = ("layernorm", "layer_norm", "norm.weight")
OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")


def _generator_seed(seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _full_value(key: str, shape, std: float, num_layers: int, generator: torch.Generator,
                device: torch.device) -> torch.Tensor:
    if any(k in key for k in NORM_KEYS):
        return torch.ones(shape, device=device)
    if key.endswith(OUTPUT_PROJECTIONS):  # megatron's scaled init for residual-branch outputs
        std = std / math.sqrt(2.0 * num_layers)
    return torch.randn(shape, generator=generator, device=device) * std


def _parameter_shards(model: torch.nn.Module):
    """Every ShardedTensor that views a parameter (factories, e.g. SwiGLU's fused fc1, expanded)."""
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for item in model.sharded_state_dict().values():
        items = nested_values(item.build()) if isinstance(item, ShardedTensorFactory) else [item]
        for sharded in items:
            if isinstance(sharded, ShardedTensor) and sharded.data.untyped_storage().data_ptr() in storages:
                yield sharded


@torch.no_grad()
def init_layout_independent(model: torch.nn.Module, std: float, num_layers: int, seed: int) -> None:
    for sharded in _parameter_shards(model):
        stacked = sharded.prepend_axis_num  # leading layer / expert axes
        sub_key = f"{sharded.key}{list(sharded.global_offset[:stacked])}"
        device = sharded.data.device
        generator = torch.Generator(device=device).manual_seed(_generator_seed(seed, sub_key))
        full = _full_value(sharded.key, sharded.global_shape[stacked:], std, num_layers, generator, device)
        index = tuple(slice(o, o + n) for o, n in zip(sharded.global_offset[stacked:], sharded.data.shape))
        sharded.data.copy_(full[index])
