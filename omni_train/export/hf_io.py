"""Streaming safetensors I/O for HF checkpoint directories: read one tensor at a time, write in shards.

``HFReader`` resolves names through ``model.safetensors.index.json`` (or a single ``model.safetensors``)
and opens the owning file with ``safetensors.safe_open`` for each read, so only that tensor is loaded.
``ShardedWriter`` buffers tensors up to ``max_shard_bytes``, writes each full shard, and at ``close()``
names the shards ``model-0000i-of-0000N.safetensors`` and writes the index transformers reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFReader:
    def __init__(self, root: Path):
        self.root = Path(root)
        index = self.root / INDEX
        if index.exists():
            self.weight_map: Dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.root / SINGLE).exists():
            with safe_open(str(self.root / SINGLE), "pt") as f:
                self.weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.root}: neither {INDEX} nor {SINGLE}")

    def names(self) -> List[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def check(self, expected, part: str, implied_by: str) -> Tuple[torch.dtype, List[str]]:
        """Every (name, shape) of ``expected`` present with that shape, all in one dtype; returns (dtype,
        names). ValueError naming the tensor (``implied_by``: what the shapes come from, ``part``: what the
        tensors are, for the messages)."""
        names, dtypes = [], {}
        for name, want in expected:
            if name not in self:
                raise ValueError(f"tensor {name!r} is missing from the HF checkpoint")
            shape, dtype = self.meta(name)
            if shape != want:
                raise ValueError(f"tensor {name!r} has shape {list(shape)}, {implied_by} implies {list(want)}")
            names.append(name)
            dtypes.setdefault(dtype, name)
        if len(dtypes) > 1:
            raise ValueError(f"{part} tensors mix dtypes: {dict((str(d), n) for d, n in dtypes.items())}")
        return next(iter(dtypes)), names

    def _file(self, name: str) -> str:
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} is missing from {self.root}")
        return str(self.root / self.weight_map[name])

    def meta(self, name: str) -> Tuple[Tuple[int, ...], torch.dtype]:
        """(shape, dtype) without reading the data."""
        with safe_open(self._file(name), "pt") as f:
            piece = f.get_slice(name)
            shape = tuple(piece.get_shape())
            dtype = _DTYPES[piece.get_dtype()]
        return shape, dtype

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self._file(name), "pt") as f:
            return f.get_tensor(name)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
           "F8_E5M2": torch.float8_e5m2}


class ShardedWriter:
    def __init__(self, root: Path, max_shard_bytes: int = 2 * 1024**3):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: Dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: List[List[str]] = []  # names per written shard, in order
        self._total = 0
        self._names: set = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.detach().contiguous()
        self._buffer_bytes += size
        self._total += size

    def names(self) -> set:
        """Every tensor name added so far (a copy)."""
        return set(self._names)

    def _flush(self) -> None:
        save_file(self._buffer, str(self.root / f".shard-{len(self._shards)}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> Dict[str, str]:
        """Write the last shard, name all shards, write the index; returns the weight map."""
        if self._buffer or not self._shards:
            self._flush()
        count = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.root / f".shard-{i}.tmp", self.root / final)
            weight_map.update({n: final for n in names})
        index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.root / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map
