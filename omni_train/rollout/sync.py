"""The trained model's weights -> transformers' Qwen3-Omni Thinker, in memory, on every rank.

The rollout backend ``hf`` generates with transformers' ``Qwen3OmniMoeThinkerForConditionalGeneration``:
one full (unsharded) copy per rank, built once, refreshed before each rollout. A refresh copies tensor to
tensor on the device; nothing is written to a file and nothing goes through the host.

- Towers: ours are transformers' own encoder classes, so parameter names match one to one
  (``audio_tower.*`` -> ``model.audio_tower.*``, ``visual.*`` -> ``model.visual.*``). A model without
  towers (the LM alone, text prompts only) leaves transformers' towers unwritten and unused.
- LM: through the bridge table (models/thinker/bridge.py), from megatron's unsharded names to the
  on-disk HF names, then to transformers' in-memory layout (``thinker.model.`` -> ``model.language_model.``;
  the experts fused: ``gate_up_proj`` [E, 2F, H] = each expert's [gate; up], ``down_proj`` [E, H, F]).
  Our stacked experts (``linear_fc1_weight`` [E_local, 2F/tp, H]) already have the fused layout: the
  rank's block is copied whole.
- Layout: a tensor split over tensor-parallel ranks is all-gathered in the tensor group and re-joined
  (``bridge.tp_unslice``); experts are all-gathered over the expert-parallel group (and their own
  tensor group). Pipeline stages (pp > 1) are not joined: the multimodal Thinker trains at pp = 1.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from omni_train.models.thinker.bridge import Row, TABLE, to_hf, tp_unslice

_LM_PREFIX = "thinker.model."
_TOWERS = ("audio_tower", "visual")
_STACKED = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.(linear_fc[12])_weight$")
_PER_EXPERT = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(\d+)(\..+)$")


def _templates() -> List[Tuple[re.Pattern, Row]]:
    """Each non-expert table row as a regex over megatron names (layer number captured)."""
    out = []
    for row in TABLE:
        if "{expert}" in row.megatron:
            continue
        out.append((re.compile("^" + re.escape(row.megatron).replace(re.escape("{layer}"), r"(\d+)") + "$"), row))
    return out


_ROWS = _templates()
_FC1 = next(r for r in TABLE if r.megatron.endswith("linear_fc1.weight") and "{expert}" in r.megatron)


def _row_of(name: str) -> Tuple[Row, Optional[int]]:
    for pattern, row in _ROWS:
        match = pattern.match(name)
        if match:
            return row, int(match.group(1)) if match.groups() else None
    raise ValueError(f"megatron parameter {name!r} has no row in the bridge table")


def _gather(tensor: torch.Tensor, group, dim: int, row: Optional[Row] = None) -> torch.Tensor:
    """Every rank's ``tensor`` of ``group`` joined along ``dim`` (per SwiGLU half for a gated row)."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    if row is None:
        return torch.cat(pieces, dim=dim)
    return tp_unslice(row, pieces, dim)


@dataclass
class SyncReport:
    tensors: int
    bytes: int
    ms: float


class ThinkerWeightSync:
    """Copies an OmniThinker's weights (any tp / ep, pp = 1) into a transformers Thinker of the same sizes."""

    def __init__(self, hf_thinker: torch.nn.Module, cfg):
        self.hf = hf_thinker
        self.cfg = cfg  # ThinkerConfig
        self.targets: Dict[str, torch.Tensor] = dict(hf_thinker.named_parameters())
        # transformers' module paths moved between releases (5.17: audio_tower.*, model.layers.*; 5.23:
        # model.audio_tower.*, model.language_model.layers.*), and so may the experts' layout: read them here
        names = self.targets
        self.tower_prefix = "model." if any(n.startswith("model.audio_tower.") for n in names) else ""
        self.lm_prefix = "model.language_model." if any(n.startswith("model.language_model.") for n in names) \
            else "model."
        self.fused_experts = f"{self.lm_prefix}layers.0.mlp.experts.gate_up_proj" in names

    def _lm_name(self, disk_name: str) -> str:
        """An on-disk Thinker LM name (bridge table) -> its name in this transformers Thinker."""
        if disk_name == "thinker.lm_head.weight":
            return "lm_head.weight"
        if not disk_name.startswith(_LM_PREFIX):
            raise ValueError(f"{disk_name!r} is not a Thinker LM tensor")
        return self.lm_prefix + disk_name[len(_LM_PREFIX):]

    def _put_experts(self, put, layer: int, projection: str, full: torch.Tensor, first: int) -> None:
        """Experts [first, first + n) of one layer from our [n, out, in] block (fc1 rows: [gate; up])."""
        base = f"{self.lm_prefix}layers.{layer}.mlp.experts"
        if self.fused_experts:
            name = f"{base}.{'gate_up_proj' if projection == 'linear_fc1' else 'down_proj'}"
            if first == 0 and full.shape[0] == self.cfg.num_experts:
                put(name, full)
            else:
                for i, block in enumerate(full):
                    put(name, block, index=first + i)
            return
        for i, block in enumerate(full):  # one module per expert (older transformers)
            if projection == "linear_fc1":
                gate, up = block.chunk(2, dim=0)
                put(f"{base}.{first + i}.gate_proj.weight", gate)
                put(f"{base}.{first + i}.up_proj.weight", up)
            else:
                put(f"{base}.{first + i}.down_proj.weight", block)

    def _groups(self):
        if not parallel_state.model_parallel_is_initialized():
            return None, None, None
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise NotImplementedError("rollout.backend=hf: weight sync from pipeline stages (parallel.pp > 1) is "
                                      "not built; the multimodal Thinker trains at pp=1")
        return (parallel_state.get_tensor_model_parallel_group(),
                parallel_state.get_expert_tensor_parallel_group(),
                parallel_state.get_expert_model_parallel_group())

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> SyncReport:
        start = time.perf_counter()
        ours = unwrap_model(model)
        tp_group, expert_tp_group, ep_group = self._groups()
        written: Dict[str, int] = {}

        def put(hf_name: str, tensor: torch.Tensor, index=None) -> None:
            if hf_name not in self.targets:
                raise KeyError(f"rollout weight sync: transformers' Thinker has no parameter {hf_name!r}")
            target = self.targets[hf_name] if index is None else self.targets[hf_name][index]
            if target.shape != tensor.shape:
                raise ValueError(f"rollout weight sync: {hf_name}{'' if index is None else f'[{index}]'} is "
                                 f"{list(target.shape)} in transformers, {list(tensor.shape)} from ours")
            target.copy_(tensor)
            written[hf_name] = written.get(hf_name, 0) + tensor.numel()

        towers = [t for t in _TOWERS if hasattr(ours, t)]  # none: the LM alone, for text prompts
        for tower in towers:
            for name, param in getattr(ours, tower).named_parameters():
                put(f"{self.tower_prefix}{tower}.{name}", param)
        lm = getattr(ours, "language_model", ours)
        experts_per_rank = self.cfg.num_experts // max(1, _size(ep_group))
        for name, param in lm.named_parameters():
            stacked = _STACKED.match(name)
            if stacked:
                layer, projection = int(stacked.group(1)), stacked.group(2)
                full = _gather(param, expert_tp_group, param.partition_dim if _split(param) else 0,
                               _FC1 if projection == "linear_fc1" else None)
                self._put_experts(put, layer, projection, _gather(full, ep_group, 0), 0)
                continue
            per_expert = _PER_EXPERT.match(name)
            if per_expert:  # model.thinker.experts_impl=sequential
                local = int(per_expert.group(2))
                layer = int(name.split(".")[2])
                projection = "linear_fc1" if "linear_fc1" in per_expert.group(3) else "linear_fc2"
                full = _gather(param, expert_tp_group, param.partition_dim if _split(param) else 0,
                               _FC1 if projection == "linear_fc1" else None)
                for rank, block in enumerate(_gather(full.unsqueeze(0), ep_group, 0)):
                    self._put_experts(put, layer, projection, block.unsqueeze(0), rank * experts_per_rank + local)
                continue
            row, layer = _row_of(name)
            full = _gather(param, tp_group, param.partition_dim, row) if _split(param) else param
            fill = {} if layer is None else {"layer": layer}
            for disk, piece in zip(row.hf, to_hf(row, full, self.cfg)):
                put(self._lm_name(disk.format(**fill)), piece)
        skipped = tuple(f"{self.tower_prefix}{t}." for t in _TOWERS if t not in towers)
        missing = [n for n, p in self.targets.items()
                   if written.get(n, 0) != p.numel() and not n.startswith(skipped or ("\0",))]
        if missing:
            raise RuntimeError(f"rollout weight sync left {len(missing)} of transformers' parameters unwritten, "
                               f"e.g. {missing[:3]}")
        if any(p.device.type == "cuda" for p in self.targets.values()):
            torch.cuda.synchronize()
        total = sum(p.numel() * p.element_size() for p in self.targets.values())
        return SyncReport(len(self.targets), total, (time.perf_counter() - start) * 1e3)


def _split(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)
