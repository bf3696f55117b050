"""`dry_run=true`: build the model on the meta device, print parameter counts and each rank's shards."""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, List, Tuple

import torch

from omni_train.config import ModelConfig, ParallelConfig
from omni_train.models.thinker_lm import build_thinker_lm, count_parameters, describe_shards


def build_on_meta(model_cfg: ModelConfig) -> int:
    """Build the unsharded megatron model on the meta device (nothing allocated); its parameter count."""
    from omni_train.parallel.setup import init_parallel, shutdown_parallel

    init_parallel(ParallelConfig(), torch.device("cpu"), seed=0)
    try:
        with torch.device("meta"):
            model = build_thinker_lm(model_cfg, ParallelConfig(), device=torch.device("meta"),
                                     params_dtype=torch.bfloat16)
        return sum(p.numel() for p in model.parameters())
    finally:
        shutdown_parallel()


def _collapse_experts(shards: List[Tuple[str, Tuple[int, ...]]]) -> List[Tuple[str, Tuple[int, ...], int]]:
    """Group `local_experts.{i}.x` entries into one line with a count."""
    grouped: "OrderedDict[Tuple[str, Tuple[int, ...]], int]" = OrderedDict()
    for name, shape in shards:
        key = (re.sub(r"local_experts\.\d+\.", "local_experts.{i}.", name), tuple(shape))
        grouped[key] = grouped.get(key, 0) + 1
    return [(name, shape, count) for (name, shape), count in grouped.items()]


def format_dry_run(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, built_params: int | None) -> str:
    total, active = count_parameters(model_cfg)
    lines = [f"model {model_cfg.flavor}: {total:,} parameters ({total / 1e9:.2f} B) total, "
             f"{active:,} ({active / 1e9:.2f} B) active per token"]
    if built_params is not None:
        lines.append(f"built on the meta device: {built_params:,} parameters "
                     f"({'matches' if built_params == total else 'DIFFERS FROM'} the analytic count)")
    p = parallel_cfg
    lines.append(f"layout tp={p.tp} pp={p.pp} ep={p.ep} cp={p.cp}: per-rank shards "
                 "(every data-parallel replica holds the same)")
    by_stage: Dict[int, List[dict]] = {}
    for entry in describe_shards(model_cfg, parallel_cfg):
        by_stage.setdefault(entry["stage"], []).append(entry)
    for stage, entries in by_stage.items():
        first = entries[0]
        lines.append(f"  pipeline stage {stage} ({first['layers']} layers; each of its tp x ep = "
                     f"{p.tp} x {p.ep} ranks): {first['num_params']:,} parameters per rank")
        for name, shape, count in _collapse_experts(first["layer"]):
            suffix = f" x{count}" if count > 1 else ""
            lines.append(f"    layers.*.{name} {tuple(shape)}{suffix}")
        for name, shape in first["other"]:
            lines.append(f"    {name} {tuple(shape)}")
    return "\n".join(lines)


def print_dry_run(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, build: bool = True) -> None:
    built = build_on_meta(model_cfg) if build else None
    print(format_dry_run(model_cfg, parallel_cfg, built), flush=True)
