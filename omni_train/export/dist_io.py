"""Reading our dist checkpoints (megatron's torch_dist format) by global tensor, whatever layout wrote them.

A megatron module's checkpoint key stands for a global tensor: decoder layers share one key with a leading
layer axis, routed experts then an expert axis (megatron's prepended axes). ``key_templates`` maps each key
of a world-size-1 model to (unsharded parameter name template, global shape), ``read_layer`` reads one
layer's tensors (or the non-layer ones) back into unsharded names, reading only the stored chunks it needs.
``checkpoint_sources`` lists where a checkpoint's parts may live: the checkpoint, then the import its
marker names in ``carried_from`` (what training did not write comes from there).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from omni_train.checkpoint.manager import MARKER

EXPERT = re.compile(r"\.local_experts\.(\d+)\.")

Templates = Dict[str, Tuple[str, Tuple[int, ...]]]


def key_templates(sharded: dict, params: Dict[str, torch.Tensor], num_layers: int, num_experts: int,
                  layers: str = "decoder.layers.", strip: str = "") -> Templates:
    """Checkpoint key -> (unsharded name template with ``{layer}`` / ``{expert}``, global shape), from a
    world-size-1 model's ``sharded_state_dict`` (dict keys: ``strip`` + parameter names of ``params``) whose
    decoder layers are named ``layers`` + N."""
    layer = re.compile("^" + re.escape(layers) + r"(\d+)\.")
    out = {}
    for name, sh in sharded.items():
        if not isinstance(sh, (ShardedTensor, ShardedTensorFactory)):
            continue
        local = name[len(strip):]
        template = EXPERT.sub(".local_experts.{expert}.", layer.sub(layers + "{layer}.", local))
        shape = ((num_layers,) if "{layer}" in template else ()) + (
            (num_experts,) if "{expert}" in template else ()) + tuple(params[local].shape)
        out.setdefault(sh.key, (template, shape))
    return out


def check_against_metadata(keys: Templates, metadata: dict) -> None:
    for key, (template, shape) in keys.items():
        if key not in metadata:
            raise ValueError(f"checkpoint is missing tensor {key!r} (for {template!r})")
        if tuple(metadata[key].global_shape) != shape:
            raise ValueError(f"checkpoint tensor {key!r} has shape {list(metadata[key].global_shape)}, "
                             f"the config implies {list(shape)}")


class _BoxPlanner(DefaultLoadPlanner):
    """Reads, for each key, the box of the global tensor that starts at ``offsets[key]`` and has the
    shape of the destination tensor; only the stored chunks overlapping it are read."""

    def __init__(self, offsets: Dict[str, Tuple[int, ...]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.offsets = offsets

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, tensor in self.state_dict.items():
            box = ChunkStorageMetadata(offsets=torch.Size(self.offsets[key]), sizes=tensor.size())
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [box])
        return LoadPlan(items)

    def lookup_tensor(self, index) -> torch.Tensor:  # the destination is the box itself
        return self.state_dict[index.fqn]


def read_boxes(ckpt: Path, boxes: Dict[str, Tuple[Tuple[int, ...], torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """{key: (global offsets, destination)} -> {key: destination filled from the checkpoint}.

    Reads the torch_dist (DCP) files directly: megatron's loader cannot load a part of a tensor at world
    size 1 (it places the other parts on "another" rank, which is rank 0 again).
    """
    state = {key: dest for key, (_, dest) in boxes.items()}
    planner = _BoxPlanner({key: offsets for key, (offsets, _) in boxes.items()})
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(ckpt)), planner=planner, no_dist=True)
    return state


def read_layer(ckpt: Path, keys: Templates, metadata: dict, layer: Optional[int]) -> Dict[str, torch.Tensor]:
    """{unsharded name: tensor} of one layer (or of the non-layer keys for layer None)."""
    boxes = {}
    for key, (template, shape) in keys.items():
        if ("{layer}" in template) != (layer is not None):
            continue
        box = shape if layer is None else (1,) + shape[1:]
        offsets = (0,) * len(shape) if layer is None else (layer,) + (0,) * (len(shape) - 1)
        boxes[key] = (offsets, torch.empty(box, dtype=metadata[key].dtype))
    out = {}
    for key, tensor in read_boxes(ckpt, boxes).items():
        template = keys[key][0]
        if layer is None:
            out[template] = tensor
        elif "{expert}" in template:
            out.update({template.format(layer=layer, expert=e): t for e, t in enumerate(tensor[0])})
        else:
            out[template.format(layer=layer)] = tensor[0]
    return out


def read_whole(ckpt: Path, metadata: dict, keys: List[str]) -> Dict[str, torch.Tensor]:
    """{key: the whole global tensor} for ``keys``."""
    return read_boxes(ckpt, {k: ((0,) * len(metadata[k].global_shape),
                                 torch.empty(metadata[k].global_shape, dtype=metadata[k].dtype)) for k in keys})


def carried_from(ckpt: Path) -> Optional[Path]:
    """The import a checkpoint's marker names in ``carried_from`` (None: none, or the checkpoint itself);
    raises if it names something that is not a checkpoint."""
    source = json.loads((Path(ckpt) / MARKER).read_text()).get("carried_from")
    if not source or Path(source).resolve() == Path(ckpt).resolve():
        return None
    if not (Path(source) / MARKER).exists():
        raise FileNotFoundError(f"{Path(ckpt) / MARKER}: field 'carried_from' names {source}, which is not a checkpoint")
    return Path(source)


def checkpoint_sources(ckpt: Path, metadata: Optional[dict] = None) -> List[Tuple[Path, dict]]:
    """[(path, tensor metadata)]: the checkpoint, then the import it was trained from (if any). A part
    (the Thinker LM, the Talker, Code2Wav) is read from the first that holds it."""
    out = [(Path(ckpt), metadata if metadata is not None else dist_checkpointing.load_tensors_metadata(str(ckpt)))]
    origin = carried_from(ckpt)
    if origin is not None:
        out.append((origin, dist_checkpointing.load_tensors_metadata(str(origin))))
    return out
