"""ShardStream: splitting across ranks and workers, epochs, exact resume, and bad data handling."""

import io
import json
import logging
import re
import tarfile
from pathlib import Path

import pytest
import torch

from omni_train.data.errors import SampleError
from omni_train.data.stream import DataError, FailurePolicy, ShardStream


def _add(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_dataset(root: Path, num_shards: int, per_shard: int, *, bad_json=(), no_json=(), truncate=()):
    """Shards of samples {"id": n, "num_tokens": ..} with a fake audio member; ids 0.. in shard order.

    bad_json / no_json: sample ids whose JSON is broken / missing; truncate: shard indices cut to 60%.
    """
    root.mkdir(parents=True)
    shards = []
    for s in range(num_shards):
        name = f"shard-{s:06d}.tar"
        with tarfile.open(root / name, "w") as tar:
            for n in range(s * per_shard, (s + 1) * per_shard):
                key = f"s{n:08d}"
                if n not in no_json:
                    body = b'{"id": ' if n in bad_json else json.dumps({"id": n, "num_tokens": 1 + n % 7}).encode()
                    _add(tar, f"{key}.json", body)
                _add(tar, f"{key}.audio0.flac", bytes([n % 256]) * (700 + n))
        if s in truncate:
            path = root / name
            path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])
        shards.append({"name": name, "num_samples": per_shard})
    index = {"format": "omni-train-shards", "version": 1, "num_samples": num_shards * per_shard, "shards": shards}
    (root / "index.json").write_text(json.dumps(index))
    return root


def id_and_epoch(raw):
    meta = json.loads(raw["json"])
    if meta["id"] % 17 == 5:
        raise SampleError(raw["__key__"], "audio0.flac", "cannot decode audio: test failure")
    if "audio0.flac" not in raw:
        raise SampleError(raw["__key__"], "audio0.flac", "missing member")
    assert raw["audio0.flac"] == bytes([meta["id"] % 256]) * (700 + meta["id"])
    return meta["id"], raw["__epoch__"]


def take(stream, n):
    return [next(stream) for _ in range(n)]


@pytest.mark.parametrize("num_workers,k", [(0, 37), (0, 120), (2, 37), (2, 121)])
def test_resume_matches_uninterrupted_run(tmp_path, num_workers, k):
    root = write_dataset(tmp_path / "d", 6, 25, bad_json={11}, truncate={3})
    opts = dict(num_workers=num_workers, shuffle_buffer=16, seed=3, transform=id_and_epoch,
                policy=FailurePolicy(max_consecutive=10, max_skip_rate=0.5, min_samples=10))
    full = ShardStream(root, **opts)
    expected = take(full, k + 100)
    full.close()

    first = ShardStream(root, **opts)
    assert take(first, k) == expected[:k]
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    json.dumps(first.state_dict())  # plain data: fits any checkpoint format
    stats_at_k = first.stats()
    first.close()

    resumed = ShardStream(root, **opts)
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert resumed.stats() == stats_at_k
    assert take(resumed, 100) == expected[k:]
    if k > 100:
        assert {e for _, e in expected[k:]} == {0, 1}  # the compared window crosses an epoch boundary
    assert resumed.stats() == full.stats()
    resumed.close()


@pytest.mark.parametrize("num_shards,per_shard", [(8, 10), (2, 10)])  # more shards than slots, and fewer
def test_two_ranks_two_workers_cover_an_epoch_once(tmp_path, num_shards, per_shard):
    root = write_dataset(tmp_path / "d", num_shards, per_shard)
    total = num_shards * per_shard
    epoch0 = []
    for rank in range(2):
        stream = ShardStream(root, rank=rank, world_size=2, num_workers=2, shuffle_buffer=4, seed=1,
                             transform=id_and_epoch, policy=FailurePolicy(max_consecutive=0, max_skip_rate=0))
        items = take(stream, total)  # two epochs' worth for this rank
        stream.close()
        epoch0 += [i for i, e in items if e == 0]
    missing = set(range(total)) - {i for i in range(total) if i % 17 == 5}
    assert len(epoch0) == len(set(epoch0)), "a sample appeared twice in one epoch"
    assert set(epoch0) == missing


def test_epochs_differ_and_each_covers_everything(tmp_path):
    root = write_dataset(tmp_path / "d", 4, 15)
    stream = ShardStream(root, shuffle_buffer=8, seed=7, transform=lambda raw: json.loads(raw["json"])["id"])
    epochs = [take(stream, 60) for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(60))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert epochs[0] != list(range(60))  # shuffled at all
    unshuffled = ShardStream(root, shuffle=False, transform=lambda raw: json.loads(raw["json"])["id"])
    assert take(unshuffled, 120) == list(range(60)) * 2


def test_bad_samples_and_truncated_shard_are_skipped_counted_and_logged(tmp_path, caplog):
    root = write_dataset(tmp_path / "d", 4, 20, bad_json={3}, no_json={44}, truncate={2})
    stream = ShardStream(root, shuffle=False, transform=id_and_epoch,
                         policy=FailurePolicy(max_consecutive=5, max_skip_rate=0.5, min_samples=20))
    got = []
    with caplog.at_level(logging.WARNING, logger="omni_train.data.stream"):
        for i, epoch in stream:
            if epoch == 1:
                break
            got.append(i)
    first_lost = min(set(range(40, 60)) - set(got) - {44, 56})  # shard 2 (ids 40-59) is cut at 60%
    assert 44 < first_lost < 59
    decode_failed = [i for i in (5, 22, 39, 56, 73) if not first_lost <= i < 60]
    assert got == [i for i in range(80) if i not in {3, 44, *decode_failed} and not first_lost <= i < 60]
    stats = stream.stats()
    assert stats["seen"] == 81 and stats["yielded"] == len(got) + 1  # epoch 0, then sample 0 of epoch 1
    reasons = stats["reasons"]
    assert sum(reasons.values()) == stats["skipped"] == 80 - len(got)
    assert reasons["bad JSON"] == 1 and reasons["missing json member"] == 1
    assert reasons["cannot decode audio"] == len(decode_failed)
    # the last sample before the cut may come out whole or without its audio member
    assert reasons["unreadable shard"] + reasons.get("missing member", 0) == 60 - first_lost
    log = caplog.text
    assert "shard-000000.tar: skipped sample s00000003: bad JSON" in log
    assert "shard-000002.tar: skipped sample s00000044: missing json member" in log
    assert "shard-000001.tar: skipped sample s00000022: cannot decode audio" in log
    assert re.search(r"shard-000002.tar: (unreadable|ended) after \d+ .*skipping the rest of the shard", log)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_consecutive_failures_raise_data_error(tmp_path, num_workers):
    root = write_dataset(tmp_path / "d", 2, 10)

    def broken(raw):
        raise SampleError(raw["__key__"], "audio0.flac", "cannot decode audio: broken codec")

    stream = ShardStream(root, num_workers=num_workers, transform=broken,
                         policy=FailurePolicy(max_consecutive=5, max_skip_rate=0))
    with pytest.raises(DataError, match=r"5 samples in a row failed .*cannot decode audio.*max_consecutive_failures"):
        next(stream)
    stream.close()


def test_skip_rate_raises_data_error_after_min_samples(tmp_path):
    root = write_dataset(tmp_path / "d", 2, 50)

    def quarter_bad(raw):
        n = json.loads(raw["json"])["id"]
        if n % 4 == 0:
            raise SampleError(raw["__key__"], "json", "unsupported role: test")
        return n

    stream = ShardStream(root, shuffle=False, transform=quarter_bad,
                         policy=FailurePolicy(max_consecutive=0, max_skip_rate=0.2, min_samples=40))
    got = []
    with pytest.raises(DataError, match=r"skipped \(25.0% > max_skip_rate 20.0%\).*unsupported role"):
        while True:
            got.append(next(stream))
    assert len(got) == 29  # the check starts once 40 samples were seen: ids 0..39 minus 10 bad, then one more
    assert stream.stats()["seen"] == 40


def test_state_from_another_layout_is_refused(tmp_path):
    root = write_dataset(tmp_path / "d", 4, 5)
    state = ShardStream(root, rank=1, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size and num_workers must match"):
        ShardStream(root, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(DataError, match="too small"):
        ShardStream(root, rank=29, world_size=30)
