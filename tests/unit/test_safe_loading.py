"""Nothing we load runs code: malicious pickles in a checkpoint or a data shard are refused, not executed."""

import io
import json
import os
import pickle
import tarfile

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from omni_train.checkpoint.manager import _rng_state
from omni_train.data.decode import decode_sample
from omni_train.data.errors import SampleError
from omni_train.data.stream import FailurePolicy, ShardStream


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _state(obj=None, common=None):
    state = {"weight": ShardedTensor.from_rank_offsets("weight", torch.arange(4.0), replica_id=0),
             "rng_state": ShardedObject("rng_state", obj, (1,), (0,), replica_id=0)}
    if common is not None:
        state["common"] = common
    return state


def _save(state, path):
    path.mkdir()
    dist_checkpointing.save(state, str(path))


def _load(path):
    template = _state()
    template["weight"] = ShardedTensor.from_rank_offsets("weight", torch.zeros(4), replica_id=0)
    return dist_checkpointing.load(template, str(path))


def test_real_training_objects_still_load(megatron_world1, tmp_path):
    rng = _rng_state()  # python, numpy and torch RNG states: what every checkpoint holds
    _save(_state(rng), tmp_path / "ckpt")
    loaded = _load(tmp_path / "ckpt")
    assert torch.equal(loaded["weight"], torch.arange(4.0))
    assert loaded["rng_state"]["python"] == rng["python"]
    assert (loaded["rng_state"]["numpy"][1] == rng["numpy"][1]).all()


def test_malicious_sharded_object_is_refused(megatron_world1, tmp_path):
    marker = tmp_path / "pwned"
    _save(_state(Payload(marker)), tmp_path / "ckpt")  # pickling runs nothing
    # torch.distributed.checkpoint wraps a rank's failure in CheckpointException, a BaseException
    with pytest.raises(BaseException, match="refusing to load checkpoint entry rng_state.*posix.system"):
        _load(tmp_path / "ckpt")
    assert not marker.exists()


def test_malicious_metadata_file_is_refused(megatron_world1, tmp_path):
    marker = tmp_path / "pwned"
    _save(_state(_rng_state()), tmp_path / "ckpt")
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(BaseException, match="refusing to load posix.system"):
        _load(tmp_path / "ckpt")
    with pytest.raises(Exception, match="refusing to load posix.system"):
        dist_checkpointing.load_tensors_metadata(str(tmp_path / "ckpt"))  # what export reads
    assert not marker.exists()


def test_malicious_common_state_is_refused(megatron_world1, tmp_path):
    marker = tmp_path / "pwned"
    _save(_state(_rng_state(), common=Payload(marker)), tmp_path / "ckpt")
    with pytest.raises(BaseException, match="Weights only load failed"):
        _load(tmp_path / "ckpt")
    assert not marker.exists()


def _tar_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_shard_member_holding_a_pickle_is_skipped_and_counted(tmp_path, caplog):
    marker = tmp_path / "pwned"
    root = tmp_path / "data"
    root.mkdir()
    conversation = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    with tarfile.open(root / "shard-000000.tar", "w") as tar:
        for n in range(4):
            _tar_member(tar, f"s{n:08d}.json", conversation)
            if n == 1:  # webdataset's default decoders would unpickle these
                _tar_member(tar, f"s{n:08d}.pyd", pickle.dumps(Payload(marker)))
                _tar_member(tar, f"s{n:08d}.pickle", pickle.dumps(Payload(marker)))
    (root / "index.json").write_text(json.dumps({"format": "omni-train-shards", "version": 1, "num_samples": 4,
                                                 "shards": [{"name": "shard-000000.tar", "num_samples": 4}]}))
    stream = ShardStream(root, transform=decode_sample, shuffle_buffer=1, seed=0,
                         policy=FailurePolicy(max_consecutive=10, max_skip_rate=0.5, min_samples=100))
    keys = [next(stream)["__key__"] for _ in range(3)]
    assert keys == ["s00000000", "s00000002", "s00000003"]
    assert stream.stats()["skipped"] == 1
    assert "skipped sample s00000001: ValueError: unsupported member extension 'p" in caplog.text
    stream.close()
    assert not marker.exists()
    with pytest.raises(SampleError, match="unsupported member extension 'pickle'"):
        decode_sample({"__key__": "k", "json": conversation, "x.pickle": pickle.dumps(Payload(marker))})
    assert not marker.exists()
