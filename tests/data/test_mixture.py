"""Mixtures: realised proportions by samples and by tokens, exact resume, and the token-count protocol."""

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from omni_train.data.mixture import Mixture, build_loader, sample_tokens


def write_dataset(root: Path, name: str, num_shards: int, per_shard: int, tokens):
    """Shards of JSON-only samples {"ds": name, "id": n, "num_tokens": tokens(n)}."""
    root.mkdir(parents=True)
    shards = []
    for s in range(num_shards):
        shard = f"shard-{s:06d}.tar"
        with tarfile.open(root / shard, "w") as tar:
            for n in range(s * per_shard, (s + 1) * per_shard):
                body = json.dumps({"ds": name, "id": n, "num_tokens": tokens(n)}).encode()
                info = tarfile.TarInfo(f"{name}{n:06d}.json")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
        shards.append({"name": shard, "num_samples": per_shard})
    index = {"format": "omni-train-shards", "version": 1, "num_samples": num_shards * per_shard, "shards": shards}
    (root / "index.json").write_text(json.dumps(index))
    return root


def meta(raw):
    return json.loads(raw["json"])


@pytest.fixture
def three_datasets(tmp_path):
    return [write_dataset(tmp_path / "a", "a", 2, 40, lambda n: 1 + n % 10),
            write_dataset(tmp_path / "b", "b", 3, 30, lambda n: 50 + n % 51),
            write_dataset(tmp_path / "c", "c", 1, 25, lambda n: 5)]


def test_sample_weights_are_honoured(three_datasets):
    weights = [0.5, 0.3, 0.2]
    loader = build_loader(list(zip(three_datasets, weights)), shuffle_buffer=32, seed=1, transform=meta)
    counts = Counter(next(loader)["ds"] for _ in range(10_000))
    for name, w in zip("abc", weights):
        assert abs(counts[name] / 10_000 - w) < 0.02, (counts, weights)
    stats = loader.stats()
    assert stats["yielded"] == 10_000 and stats["skipped"] == 0
    assert [d["samples"] for d in stats["datasets"].values()] == [counts[n] for n in "abc"]


def test_token_weights_are_honoured(three_datasets):
    weights = [2, 5, 3]  # normalised to 0.2, 0.5, 0.3 of tokens
    loader = build_loader(list(zip(three_datasets, weights)), weight_by="tokens", shuffle_buffer=32, seed=2,
                          transform=meta)
    tokens = Counter()
    for _ in range(10_000):
        sample = next(loader)
        tokens[sample["ds"]] += sample["num_tokens"]
    total = sum(tokens.values())
    for name, w in zip("abc", weights):
        assert abs(tokens[name] / total - w / 10) < 0.02, (tokens, weights)
    # by samples the shares are far from the token weights: "b" samples carry ~20x the tokens of "a"
    assert loader.stats()["datasets"]["1:b"]["samples"] < 0.2 * 10_000


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mixture_resume_matches_uninterrupted_run(three_datasets, num_workers):
    args = dict(weight_by="tokens", num_workers=num_workers, shuffle_buffer=16, seed=5, transform=meta)
    datasets = list(zip(three_datasets, [0.5, 0.3, 0.2]))
    full = build_loader(datasets, **args)
    expected = [next(full) for _ in range(350)]
    first = build_loader(datasets, **args)
    assert [next(first) for _ in range(250)] == expected[:250]
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = build_loader(datasets, **args)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(100)] == expected[250:]
    assert resumed.state_dict() == full.state_dict()
    resumed.close()
    full.close()
    with pytest.raises(ValueError, match="mixture state is for"):
        build_loader(datasets, **{**args, "weight_by": "samples"}).load_state_dict(state)


class WithAttr:
    num_tokens = 7


class WithMethod:
    def num_tokens(self):
        return 9


def test_token_count_protocol():
    assert sample_tokens({"num_tokens": 3, "x": 1}) == 3
    assert sample_tokens(WithAttr()) == 7
    assert sample_tokens(WithMethod()) == 9
    assert sample_tokens([1, 2, 3, 4]) == 4
    with pytest.raises(TypeError, match="num_tokens or __len__"):
        sample_tokens(3.5)


def test_scheduler_tracks_weights_at_every_point():
    streams = [iter(lambda: {"num_tokens": 1}, None), iter(lambda: {"num_tokens": 1}, None)]
    mix = Mixture(streams, [1, 3])
    for step in range(1, 401):
        next(mix)
        assert abs(mix.samples[1] - 0.75 * step) <= 1
    with pytest.raises(ValueError, match="positive"):
        Mixture(streams, [1, 0])
