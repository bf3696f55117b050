"""Corrupt fixtures for loader and validator tests: a damaged copy of a good dataset.

`make_corrupt_copy(good_dir, bad_dir)` copies the dataset and then, in this order:
- shard 0, first sample with a .flac member: the flac bytes are replaced by garbage (undecodable flac);
- shard 0, another sample: its .json member becomes invalid JSON (bad JSON);
- shard 1, first sample with a media member: that member is removed (a message points to a missing member);
- the last shard: cut in the middle of a member's data (truncated tar).
index.json is updated (bytes, sha256) for the rewritten shards 0 and 1, so their only faults are the
sample-level ones; the truncated shard keeps its original index entry. What was done is returned and
written to `bad_dir/corruptions.json`.
"""

import os
import shutil

from data_pipelines import schema, shards


def make_corrupt_copy(good_dir, bad_dir):
    index = shards.read_index(good_dir)
    names = [s["name"] for s in index["shards"]]
    if len(names) < 3:
        raise ValueError("the good dataset needs at least 3 shards (e.g. 12 samples, 4 per shard)")
    os.makedirs(bad_dir, exist_ok=True)
    for name in names + [shards.INDEX_NAME]:
        shutil.copyfile(os.path.join(good_dir, name), os.path.join(bad_dir, name))
    samples0 = list(shards.iter_tar_samples(os.path.join(bad_dir, names[0])))
    flac_key, flac_suffix = next((k, s) for k, m in samples0 for s in m if s.endswith(".flac"))
    json_key = next(k for k, _ in samples0 if k != flac_key)
    samples1 = list(shards.iter_tar_samples(os.path.join(bad_dir, names[1])))
    missing_key, missing_suffix = next((k, s) for k, m in samples1 for s in m if schema.MEDIA_SUFFIX.match(s))

    def damage0(key, members):
        if key == flac_key:
            members[flac_suffix] = b"fLaC" + bytes(range(256)) * 4
        if key == json_key:
            members["json"] = b'{"messages": [{"role": "user", "content": '

    def damage1(key, members):
        if key == missing_key:
            del members[missing_suffix]

    _rewrite(bad_dir, index, 0, damage0)
    _rewrite(bad_dir, index, 1, damage1)
    truncated = os.path.join(bad_dir, names[-1])
    with open(truncated, "r+b") as f:
        f.truncate(_middle_of_last_member(truncated))
    shards.write_json_atomic(os.path.join(bad_dir, shards.INDEX_NAME), index)
    corruptions = {
        "undecodable_flac": {"shard": names[0], "key": flac_key, "member": f"{flac_key}.{flac_suffix}"},
        "bad_json": {"shard": names[0], "key": json_key, "member": f"{json_key}.json"},
        "missing_member": {"shard": names[1], "key": missing_key, "member": f"{missing_key}.{missing_suffix}"},
        "truncated_shard": {"shard": names[-1]},
    }
    shards.write_json_atomic(os.path.join(bad_dir, "corruptions.json"), corruptions)
    return corruptions


def _rewrite(directory, index, number, damage):
    entry = index["shards"][number]
    path = os.path.join(directory, entry["name"])
    samples = list(shards.iter_tar_samples(path))
    members = []
    for key, sample in samples:
        damage(key, sample)
        members += [(f"{key}.{suffix}", data) for suffix, data in sample.items()]
    shards.write_tar(path, members)
    entry["bytes"], entry["sha256"] = os.path.getsize(path), shards.file_sha256(path)


def _middle_of_last_member(path):
    import tarfile

    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + max(1, last.size // 2)
