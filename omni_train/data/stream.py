"""Streaming reader of one shard dataset (docs/data_format.md) for one data-parallel rank, with exact resume.

Splitting. A rank reads through W = max(1, num_workers) *slots*, one per DataLoader worker, so a job has
N = world_size * W slots; slot id = rank * W + worker. Each epoch the shard order is a seeded permutation,
the same on every slot. With at least N shards, slot i takes, whole, the shards at positions p of that
order with p % N == i. With fewer shards than slots, every slot reads every shard (in the epoch's order)
and keeps the samples whose index within the shard is congruent to (i + epoch) mod N. Either way each
sample belongs to exactly one slot per epoch. Epochs repeat forever.

Shuffling. A slot's epoch is a fixed sequence of sample identities (shard index, sample index within the
shard). They pass through a shuffle buffer: fill it to `shuffle_buffer` entries, emit one drawn uniformly
(numpy PCG64 seeded by seed, stream_id, epoch and slot), refill. The buffer drains at the end of the epoch,
so an epoch yields each of its samples once. The raw bytes of buffered samples are held alongside.

State. A slot's state is explicit and small: epoch, position in its shard list for the epoch, offset within
that shard (samples consumed from it), the buffer as identities, the RNG state and its stats. On restore the
buffered samples are re-read from their shards by identity and reading resumes at the offset, so the stream
continues exactly as an uninterrupted one. Bad data never changes the sequence of identities: a sample that
cannot be read or transformed is only counted and logged as a skip, so it is skipped again after a restore.

Workers. Nothing has to be collected from DataLoader worker processes: a worker's state is derived from
what the main process consumed. The main process hands items out in a fixed round-robin over workers
(0, 1, ..., W-1, 0, ...; an item that arrives early waits in its worker's queue). It keeps a *shadow* of
each worker's slot: the same plan, shuffle buffer and RNG, without reading or transforming. Each item comes
with the worker's counters after producing it (samples seen, skips, the item's identity); the shadow
advances its plan by the samples seen since the last item (a few RNG draws, no I/O) and checks it reaches
the same identity. So `state_dict()` describes exactly what the consumer has taken (prefetched items are not
counted), and a fresh stream starts each worker from its shadow's state and resumes the round-robin at the
saved turn. The output depends on W and world_size (the split), never on timing. num_workers=0 reads the
one slot in the main process (the same output as num_workers=1).

Failures. Per slot: `max_consecutive` failed samples in a row raise DataError (samples lost to an
unreadable shard do not count here: the shard is logged once). Per rank and dataset: a skip rate above
`max_skip_rate` once `min_samples` were seen raises DataError. A worker's DataError is raised in its turn.

Raw samples are webdataset's grouping of tar members by key, undecoded: {"__key__", "__url__", "json": b"..",
"audio0.flac": b"..", ...}, plus "__index__" (shard index, sample index) and "__epoch__". The stream checks
that the JSON member parses to an object, then calls `transform(raw)`, which may raise SampleError.
"""

from __future__ import annotations

import json
import logging
import tarfile
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from webdataset.tariterators import group_by_keys, tar_file_expander

from omni_train.data.errors import SampleError

log = logging.getLogger(__name__)

_READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error)
_MAX_REASONS = 32  # distinct per-reason counters kept; further reasons count under "other"
UNREADABLE = "unreadable shard"


class DataError(RuntimeError):
    """The training data fails beyond the configured tolerance; the message says where and why."""


@dataclass(frozen=True)
class FailurePolicy:
    """When skipping bad samples stops being acceptable. 0 turns a check off."""

    max_consecutive: int = 100  # samples failing in a row (read from a readable shard) -> DataError
    max_skip_rate: float = 0.05  # skipped / seen above this -> DataError ...
    min_samples: int = 1000  # ... once this rank has seen at least this many samples of the dataset


@dataclass(frozen=True)
class _Spec:
    """Everything a slot needs; picklable, so it can travel to a DataLoader worker."""

    name: str
    root: str
    shards: tuple  # ((file name, num_samples), ...) from index.json
    num_slots: int
    shuffle: bool
    buffer_size: int
    seed: int
    stream_id: int
    transform: Optional[Callable[[dict], Any]]
    policy: FailurePolicy


def load_index(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no index.json; is {dataset_dir} a dataset directory (docs/data_format.md)?")
    index = json.loads(path.read_text())
    if index.get("format") != "omni-train-shards" or index.get("version") != 1:
        raise ValueError(f"{path}: not an omni-train-shards version 1 index")
    return index


def _iter_shard(path: str):
    """Raw samples of one shard in tar order: webdataset's member iteration and key grouping, no decoding."""
    with open(path, "rb") as f:
        yield from group_by_keys(tar_file_expander([{"url": path, "stream": f}]))


class _ShardReader:
    """Fetches raw samples by identity, reading a shard forward and reopening it only to go back."""

    def __init__(self, spec: _Spec):
        self.spec = spec
        self._shard, self._it, self._next = None, None, 0
        self._broken: dict[int, int] = {}  # shard -> first sample index that could not be read

    def fetch(self, shard: int, idx: int) -> Optional[dict]:
        """The raw sample (shard, idx), or None when the shard cannot be read that far."""
        if idx >= self._broken.get(shard, idx + 1):
            return None
        if shard != self._shard or idx < self._next:
            self._open(shard)
        while True:
            try:
                raw = next(self._it)
            except StopIteration:
                return self._fail(shard, f"ended after {self._next} of {self.spec.shards[shard][1]} samples")
            except _READ_ERRORS as exc:
                detail = exc.args[0] if exc.args else ""
                return self._fail(shard, f"unreadable after {self._next} samples: {type(exc).__name__}: {detail}")
            self._next += 1
            if self._next - 1 == idx:
                return raw

    def _open(self, shard: int):
        self.close()
        self._shard, self._next = shard, 0
        self._it = _iter_shard(str(Path(self.spec.root) / self.spec.shards[shard][0]))

    def _fail(self, shard: int, reason: str) -> None:
        self._broken[shard] = self._next
        missing = self.spec.shards[shard][1] - self._next
        log.warning("%s/%s: %s; skipping the rest of the shard (%d samples)",
                    self.spec.name, self.spec.shards[shard][0], reason, missing)
        self.close()
        return None

    def close(self):
        if self._it is not None:
            self._it.close()
        self._shard, self._it, self._next = None, None, 0


def _epoch_units(spec: _Spec, slot: int, epoch: int) -> list[tuple[int, int, int]]:
    """The slot's reading plan for an epoch: (shard, first sample index, step) per shard, in order."""
    n, n_slots = len(spec.shards), spec.num_slots
    order = list(range(n))
    if spec.shuffle:
        order = np.random.default_rng([spec.seed, spec.stream_id, epoch]).permutation(n).tolist()
    if n >= n_slots:
        return [(s, 0, 1) for p, s in enumerate(order) if p % n_slots == slot]
    return [(s, (slot + epoch) % n_slots, n_slots) for s in order]


def _reason_key(reason: str, reasons: dict) -> str:
    key = str(reason).split(":", 1)[0].strip()[:60] or "unknown"
    return key if key in reasons or len(reasons) < _MAX_REASONS else "other"


class _Slot:
    """One slot's endless sequence of samples: plan, shuffle buffer, reading, checks, transform, stats."""

    def __init__(self, spec: _Spec, slot: int, read: bool = True):
        self.spec, self.slot = spec, slot
        self.reader = _ShardReader(spec) if read else None  # None: a shadow that only tracks the plan
        self.stats = {"seen": 0, "skipped": 0, "reasons": {}}
        self.consecutive = 0
        self.last_ident: Optional[tuple[int, int]] = None  # identity of the last sample next_item returned
        self._start_epoch(0)

    def _start_epoch(self, epoch: int):
        self.epoch, self.unit, self.offset, self.epoch_yielded = epoch, 0, 0, 0
        self.units = _epoch_units(self.spec, self.slot, epoch)
        self.buffer: list[tuple[int, int]] = []
        self.raw: dict[tuple[int, int], Optional[dict]] = {}
        self.rng = np.random.default_rng([self.spec.seed, self.spec.stream_id, epoch, self.slot])
        self._refetch = False
        if not any(self._unit_len(u) for u in self.units):
            raise DataError(f"{self.spec.name}: slot {self.slot} of {self.spec.num_slots} gets no samples in epoch "
                            f"{epoch}; the dataset is too small for world_size x num_workers")

    def _unit_len(self, unit) -> int:
        shard, start, step = unit
        return len(range(start, self.spec.shards[shard][1], step))

    def _read_identity(self) -> Optional[tuple[int, int]]:
        while self.unit < len(self.units):
            shard, start, step = self.units[self.unit]
            if self.offset < self._unit_len(self.units[self.unit]):
                self.offset += 1
                return shard, start + (self.offset - 1) * step
            self.unit, self.offset = self.unit + 1, 0
        return None

    def _advance(self) -> tuple[int, int]:
        """The next identity: refill the buffer (reading each new sample unless a shadow), draw one out."""
        if self._refetch and self.reader is not None:  # restored: re-read the buffered samples by identity
            self.raw = {ident: self.reader.fetch(*ident) for ident in sorted(self.buffer)}
        self._refetch = False
        capacity = max(1, self.spec.buffer_size) if self.spec.shuffle else 1
        while True:
            while len(self.buffer) < capacity:
                ident = self._read_identity()
                if ident is None:
                    break
                self.buffer.append(ident)
                if self.reader is not None:
                    self.raw[ident] = self.reader.fetch(*ident)
            if self.buffer:
                break
            if self.epoch_yielded == 0 and self.reader is not None:
                raise DataError(f"{self.spec.name}: slot {self.slot} read a whole epoch ({self.epoch}) "
                                f"without one usable sample; reasons so far: {self.stats['reasons']}")
            self._start_epoch(self.epoch + 1)
        if len(self.buffer) > 1:
            i = int(self.rng.integers(len(self.buffer)))
            self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return self.buffer.pop()

    def next_item(self) -> Any:
        """The next model-ready sample; bad samples are skipped, counted and logged."""
        while True:
            ident = self._advance()
            raw = self.raw.pop(ident)
            self.stats["seen"] += 1
            if raw is None:  # the reader already logged the shard once
                self._skip(ident, None, UNREADABLE, counts_in_a_row=False)
                continue
            try:
                obj = self._process(ident, raw)
            except SampleError as exc:
                self._skip(ident, raw.get("__key__"), exc.reason)
                continue
            self.consecutive = 0
            self.epoch_yielded += 1
            self.last_ident = ident
            return obj

    def _process(self, ident: tuple[int, int], raw: dict) -> Any:
        key = raw.get("__key__")
        if "json" not in raw:
            raise SampleError(key, "json", "missing json member")
        try:
            meta = json.loads(raw["json"])
        except (UnicodeDecodeError, ValueError) as exc:
            raise SampleError(key, "json", f"bad JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise SampleError(key, "json", "bad JSON: not an object")
        raw = dict(raw, __index__=ident, __epoch__=self.epoch)
        return self.spec.transform(raw) if self.spec.transform is not None else raw

    def _skip(self, ident, key, reason: str, counts_in_a_row: bool = True):
        reasons = self.stats["reasons"]
        rkey = _reason_key(reason, reasons)
        reasons[rkey] = reasons.get(rkey, 0) + 1
        self.stats["skipped"] += 1
        shard_name = self.spec.shards[ident[0]][0]
        if not counts_in_a_row:  # an unreadable shard: logged once by the reader
            return
        log.warning("%s/%s: skipped sample %s: %s", self.spec.name, shard_name, key, reason)
        self.consecutive += 1
        limit = self.spec.policy.max_consecutive
        if limit and self.consecutive >= limit:
            raise DataError(f"{self.spec.name}: {self.consecutive} samples in a row failed (last: {shard_name} "
                            f"sample {key}: {reason}); fix the data or raise max_consecutive_failures")

    def progress(self, ident: tuple[int, int]) -> dict:
        """What a shadow needs to follow this slot after it yielded sample `ident` (small, unlike the state)."""
        return {"stats": {**self.stats, "reasons": dict(self.stats["reasons"])}, "ident": ident,
                "consecutive": self.consecutive, "epoch_yielded": self.epoch_yielded}

    def follow(self, progress: dict):
        """Shadow: advance the plan past the samples the followed slot has seen, then take its counters."""
        ident = None
        for _ in range(progress["stats"]["seen"] - self.stats["seen"]):
            ident = self._advance()
        if ident != progress["ident"]:
            raise RuntimeError(f"{self.spec.name}: slot {self.slot} diverged from its worker "
                               f"(worker yielded {progress['ident']}, plan says {ident})")
        self.stats, self.consecutive = progress["stats"], progress["consecutive"]
        self.epoch_yielded = progress["epoch_yielded"]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shard_pos": self.unit, "offset": self.offset,
                "buffer": [list(i) for i in self.buffer], "rng": self.rng.bit_generator.state,
                "stats": {**self.stats, "reasons": dict(self.stats["reasons"])},
                "consecutive": self.consecutive, "epoch_yielded": self.epoch_yielded}

    def load_state_dict(self, state: dict):
        self._start_epoch(state["epoch"])
        self.unit, self.offset = state["shard_pos"], state["offset"]
        self.buffer = [tuple(i) for i in state["buffer"]]
        self.rng.bit_generator.state = state["rng"]
        self.stats = {**state["stats"], "reasons": dict(state["stats"]["reasons"])}
        self.consecutive, self.epoch_yielded = state["consecutive"], state["epoch_yielded"]
        self._refetch = True
        if self.reader is not None:
            self.reader.close()


def _identity(x):
    return x


class _WorkerSlots(torch.utils.data.IterableDataset):
    """In DataLoader worker w: run slot slot_ids[w] from states[w]; yield (w, progress after the item, item),
    or (w, None, message) forever once the slot raised DataError."""

    def __init__(self, spec: _Spec, slot_ids: list[int], states: list[dict]):
        self.spec, self.slot_ids, self.states = spec, slot_ids, states

    def __iter__(self):
        w = torch.utils.data.get_worker_info().id
        slot = _Slot(self.spec, self.slot_ids[w])
        slot.load_state_dict(self.states[w])
        while True:
            try:
                item = slot.next_item()
            except DataError as exc:  # hand it over as an item: raised in turn, and the worker stays joinable
                while True:
                    yield w, None, str(exc)
            yield w, slot.progress(slot.last_ident), item


class ShardStream:
    """Endless iterator over one dataset directory for one data-parallel rank (see the module docstring)."""

    def __init__(self, dataset_dir: str | Path, *, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 1000, seed: int = 0, stream_id: int = 0,
                 transform: Optional[Callable[[dict], Any]] = None, policy: FailurePolicy = FailurePolicy(),
                 prefetch_factor: int = 2):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        index = load_index(dataset_dir)
        shards = tuple((s["name"], int(s["num_samples"])) for s in index["shards"])
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        width = max(1, num_workers)
        self.spec = _Spec(Path(dataset_dir).name, str(dataset_dir), shards, world_size * width, shuffle,
                          shuffle_buffer, seed, stream_id, transform, policy)
        if len(shards) < self.spec.num_slots and max(n for _, n in shards) < self.spec.num_slots:
            raise DataError(f"{self.spec.name}: {len(shards)} shards of at most {max(n for _, n in shards)} samples "
                            f"are too small for {self.spec.num_slots} slots (world_size x num_workers)")
        self.slot_ids = [rank * width + w for w in range(width)]
        # num_workers=0: the one slot, read here. Otherwise shadows of the workers' slots: they follow the plan
        # (identities, RNG, buffer) without reading, as far as the items handed out, and hold the state.
        self._slots = [_Slot(self.spec, i, read=num_workers == 0) for i in self.slot_ids]
        self._turn, self._it, self._queues = 0, None, None

    def __iter__(self):
        return self

    def __next__(self) -> Any:
        if self.num_workers == 0:
            item = self._slots[0].next_item()
        else:
            item = self._next_from_workers()
        self._check_skip_rate()
        return item

    def _next_from_workers(self) -> Any:
        if self._it is None:
            loader = torch.utils.data.DataLoader(
                _WorkerSlots(self.spec, self.slot_ids, [s.state_dict() for s in self._slots]), batch_size=None,
                num_workers=self.num_workers, collate_fn=_identity, prefetch_factor=self.prefetch_factor)
            self._it, self._queues = iter(loader), [deque() for _ in self.slot_ids]
        w = self._turn
        while not self._queues[w]:
            worker, progress, item = next(self._it)
            self._queues[worker].append((progress, item))
        progress, item = self._queues[w].popleft()
        if progress is None:
            raise DataError(item)
        self._slots[w].follow(progress)
        self._turn = (w + 1) % self.num_workers
        return item

    def stats(self) -> dict:
        """Counts over what this rank has consumed: seen, skipped, yielded, and skips per reason."""
        seen = skipped = 0
        reasons: dict[str, int] = {}
        for slot in self._slots:
            seen += slot.stats["seen"]
            skipped += slot.stats["skipped"]
            for k, v in slot.stats["reasons"].items():
                reasons[k] = reasons.get(k, 0) + v
        return {"seen": seen, "skipped": skipped, "yielded": seen - skipped, "reasons": reasons}

    def _check_skip_rate(self):
        policy = self.spec.policy
        if not policy.max_skip_rate:
            return
        stats = self.stats()
        if stats["seen"] >= max(1, policy.min_samples) and stats["skipped"] > policy.max_skip_rate * stats["seen"]:
            raise DataError(f"{self.spec.name}: {stats['skipped']} of {stats['seen']} samples skipped "
                            f"({stats['skipped'] / stats['seen']:.1%} > max_skip_rate {policy.max_skip_rate:.1%}); "
                            f"reasons: {stats['reasons']}")

    def state_dict(self) -> dict:
        return {"dataset": self.spec.name, "num_slots": self.spec.num_slots, "slot_ids": list(self.slot_ids),
                "turn": self._turn, "slots": [s.state_dict() for s in self._slots]}

    def load_state_dict(self, state: dict):
        if state["num_slots"] != self.spec.num_slots or list(state["slot_ids"]) != self.slot_ids:
            raise ValueError(f"{self.spec.name}: state is for slots {state['slot_ids']} of {state['num_slots']}, "
                             f"this stream reads {self.slot_ids} of {self.spec.num_slots} "
                             "(world_size and num_workers must match the saved run)")
        self.close()
        self._turn = state["turn"]
        for slot, slot_state in zip(self._slots, state["slots"]):
            slot.load_state_dict(slot_state)

    def close(self):
        """Stop worker processes (a later next() starts them again from the current state)."""
        self._it, self._queues = None, None
        if self.num_workers == 0:
            self._slots[0].reader.close()
