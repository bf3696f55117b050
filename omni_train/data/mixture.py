"""Weighted mixtures of shard streams, and `build_loader`, the data entry point for one data-parallel rank.

Scheduling is a deficit (credit) scheduler, not a random draw: with weights w normalised to sum to 1 and
R_i the amount realised so far from dataset i (samples, or tokens when weight_by="tokens"), the next sample
comes from the dataset with the largest w_i * sum(R) - R_i (ties: lowest index). Realised proportions then
stay within one sample's worth of the weights at every point of a run, and the choice needs no RNG: the
scheduler's state is just R. Each dataset is its own ShardStream (with its own DataLoader workers when
num_workers > 0), so a mixture of D datasets runs D * num_workers worker processes.

Token counts come from the transform's output (`sample_tokens`): a `num_tokens` attribute or key (an int or
a method), else `len(obj)`. A sample counts as at least one token, so a zero-token sample cannot starve
the other datasets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omni_train.data.stream import FailurePolicy, ShardStream

WEIGHT_BY = ("samples", "tokens")


def sample_tokens(obj: Any) -> int:
    """The token count of a transform output: `obj.num_tokens`, `obj["num_tokens"]`, or `len(obj)`."""
    if isinstance(obj, dict) and "num_tokens" in obj:
        n = obj["num_tokens"]
    elif hasattr(obj, "num_tokens"):
        n = obj.num_tokens
    else:
        try:
            return len(obj)
        except TypeError:
            raise TypeError(f"cannot count tokens of a {type(obj).__name__}: give it num_tokens or __len__") from None
    return int(n() if callable(n) else n)


class Mixture:
    """Endless iterator that interleaves streams so realised samples or tokens follow the weights."""

    def __init__(self, streams: Sequence[Any], weights: Sequence[float], weight_by: str = "samples",
                 names: Optional[Sequence[str]] = None):
        if weight_by not in WEIGHT_BY:
            raise ValueError(f"weight_by must be one of {WEIGHT_BY}, not {weight_by!r}")
        if len(streams) != len(weights) or not streams:
            raise ValueError(f"need one weight per stream: {len(streams)} streams, {len(weights)} weights")
        if any(w <= 0 for w in weights):
            raise ValueError(f"mixture weights must be positive: {list(weights)}")
        total = float(sum(weights))
        self.streams, self.weight_by = list(streams), weight_by
        self.weights = [w / total for w in weights]
        self.names = list(names) if names is not None else [f"dataset{i}" for i in range(len(streams))]
        self.realised = [0] * len(streams)  # in the unit of weight_by
        self.samples = [0] * len(streams)
        self.tokens = [0] * len(streams)

    def __iter__(self):
        return self

    def next_source(self) -> int:
        """Index of the stream the next sample comes from."""
        total = sum(self.realised)
        credit = [w * total - r for w, r in zip(self.weights, self.realised)]
        return max(range(len(credit)), key=lambda i: (credit[i], -i))

    def __next__(self) -> Any:
        i = self.next_source()
        obj = next(self.streams[i])
        tokens = sample_tokens(obj) if self.weight_by == "tokens" else 0
        self.samples[i] += 1
        self.tokens[i] += tokens
        self.realised[i] += max(1, tokens) if self.weight_by == "tokens" else 1
        return obj

    def proportions(self) -> list[float]:
        """Realised share of each dataset so far, in the unit of weight_by."""
        total = sum(self.realised)
        return [r / total if total else 0.0 for r in self.realised]

    def stats(self) -> dict:
        """Per dataset: weight, realised share, samples and tokens taken, and its stream's skip stats."""
        shares = self.proportions()
        datasets = {}
        for i, name in enumerate(self.names):
            stream_stats = self.streams[i].stats() if hasattr(self.streams[i], "stats") else {}
            datasets[name] = {"weight": self.weights[i], "share": shares[i], "samples": self.samples[i],
                              "tokens": self.tokens[i], **stream_stats}
        totals = {k: sum(d.get(k, 0) for d in datasets.values()) for k in ("seen", "skipped", "yielded")}
        return {"weight_by": self.weight_by, **totals, "datasets": datasets}

    def state_dict(self) -> dict:
        return {"weight_by": self.weight_by, "names": list(self.names), "realised": list(self.realised),
                "samples": list(self.samples), "tokens": list(self.tokens),
                "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict):
        if state["weight_by"] != self.weight_by or list(state["names"]) != self.names:
            raise ValueError(f"mixture state is for {state['names']} by {state['weight_by']}, "
                             f"this mixture is {self.names} by {self.weight_by}")
        self.realised = list(state["realised"])
        self.samples, self.tokens = list(state["samples"]), list(state["tokens"])
        for stream, stream_state in zip(self.streams, state["streams"]):
            stream.load_state_dict(stream_state)

    def close(self):
        for s in self.streams:
            if hasattr(s, "close"):
                s.close()


def build_loader(datasets: Sequence[tuple[str | Path, float]], *, weight_by: str = "samples", rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000,
                 seed: int = 0, transform: Optional[Callable[[dict], Any]] = None,
                 max_consecutive_failures: int = 100, max_skip_rate: float = 0.05,
                 min_samples_for_skip_rate: int = 1000) -> Mixture:
    """This rank's endless sample iterator over weighted datasets, with state_dict()/load_state_dict()/stats().

    datasets: (dataset directory, weight) pairs. Each gets its own ShardStream; dataset i's shuffling is
    seeded by (seed, i). Pass the same arguments on every rank except `rank`.
    """
    policy = FailurePolicy(max_consecutive_failures, max_skip_rate, min_samples_for_skip_rate)
    streams = [ShardStream(path, rank=rank, world_size=world_size, num_workers=num_workers, shuffle=shuffle,
                           shuffle_buffer=shuffle_buffer, seed=seed, stream_id=i, transform=transform,
                           policy=policy)
               for i, (path, _) in enumerate(datasets)]
    names = [f"{i}:{Path(path).name}" for i, (path, _) in enumerate(datasets)]
    return Mixture(streams, [w for _, w in datasets], weight_by=weight_by, names=names)
