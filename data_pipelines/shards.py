"""Tar shards: deterministic writing, sample-wise reading, names, hashes, atomic file writes."""

import hashlib
import io
import json
import os
import re
import tarfile

SHARD_NAME = re.compile(r"^shard-(\d{6})\.tar$")
INDEX_NAME = "index.json"
REPORT_NAME = "build_report.jsonl"
FORMAT_NAME = "omni-train-shards"
FORMAT_VERSION = 1


class ShardReadError(ValueError):
    """The tar cannot be read to its end (truncated or damaged)."""


def shard_name(number):
    return f"shard-{number:06d}.tar"


def write_tar(path, members):
    """Write (name, bytes) members to a tar whose bytes depend only on the members (no times, owners)."""
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))


def iter_tar_samples(path):
    """Yield (key, {suffix: bytes}) per sample, members grouped by consecutive key.

    Raises ShardReadError naming the member being read when the tar ends early or is damaged.
    """
    from data_pipelines.schema import member_suffix, sample_key

    key, members, last = None, {}, "(start)"
    try:
        with tarfile.open(path, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                last = info.name
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise ShardReadError(f"member {info.name} is cut short")
                name = os.path.basename(info.name)
                if sample_key(name) != key:
                    if key is not None:
                        yield key, members
                    key, members = sample_key(name), {}
                members[member_suffix(name)] = data
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardReadError(f"unreadable tar (last member reached: {last}): {exc}") from exc
    if key is not None:
        yield key, members


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path, data):
    """Write bytes to a temp file beside `path`, then rename over it."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path, obj):
    write_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def read_index(directory):
    with open(os.path.join(directory, INDEX_NAME), encoding="utf-8") as f:
        index = json.load(f)
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME or not isinstance(index.get("shards"), list):
        raise ValueError(f"{INDEX_NAME} is not an {FORMAT_NAME} index")
    return index


def shards_on_disk(directory):
    return sorted(n for n in os.listdir(directory) if SHARD_NAME.match(n))
