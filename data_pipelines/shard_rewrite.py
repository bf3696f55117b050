"""Resumable shard-by-shard rewrites of a dataset, IN_DIR -> OUT_DIR (what `omni-data teacher-responses`
does; the pattern of `omni-data build`).

OUT_DIR gets the input's shard names. Each output shard is written to a temp file, its record is saved in
`OUT_DIR/<records_dir>/<shard>.json` (with the fingerprint of the input shard's bytes and the run's
settings, and the output's sha256), then the temp file is renamed. A rerun keeps a shard whose record
has the same fingerprint and whose file still has the recorded sha256. index.json is removed when a run
starts and written last: the input's index with each shard's new sample count, size and sha256. Every
record holds `failed` ({key: reason}); the report lists them all, `{"key", "shard", "reason"}` a line.
"""

import hashlib
import json
import os
import sys

from data_pipelines import shards


class ShardRewrite:
    def __init__(self, in_dir, out_dir, records_dir, settings):
        """Read IN_DIR's index and prepare OUT_DIR (no index; no temp files or shards of other runs)."""
        if os.path.abspath(in_dir) == os.path.abspath(out_dir):
            raise ValueError("OUT_DIR must be another directory than IN_DIR")
        self.in_dir, self.out_dir, self.records_dir, self.settings = in_dir, out_dir, records_dir, settings
        self.index = shards.read_index(in_dir)
        self.names = [entry["name"] for entry in self.index["shards"]]
        os.makedirs(os.path.join(out_dir, records_dir), exist_ok=True)
        if os.path.exists(os.path.join(out_dir, shards.INDEX_NAME)):
            os.remove(os.path.join(out_dir, shards.INDEX_NAME))
        self._remove_stale()

    def fingerprint(self, name):
        path = os.path.join(self.in_dir, name)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: listed in {shards.INDEX_NAME} but missing")
        identity = json.dumps({"input_sha256": shards.file_sha256(path), **self.settings}, sort_keys=True)
        return hashlib.sha256(identity.encode("utf-8")).hexdigest()

    def finished_record(self, name, fingerprint):
        """The record of an earlier run that wrote this shard with the same fingerprint, or None."""
        try:
            with open(self._record_path(name), encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            return None
        path = os.path.join(self.out_dir, name)
        if isinstance(record, dict) and record.get("fingerprint") == fingerprint \
                and isinstance(record.get("failed"), dict) and os.path.isfile(path) \
                and shards.file_sha256(path) == record.get("sha256"):
            return record
        return None

    def write(self, name, members, record):
        """Write the shard from (member name, bytes) pairs, then its record (with bytes, sha256); return it."""
        path = os.path.join(self.out_dir, name)
        tmp = f"{path}.tmp-{os.getpid()}"
        shards.write_tar(tmp, members)
        record = {**record, "name": name, "bytes": os.path.getsize(tmp), "sha256": shards.file_sha256(tmp)}
        shards.write_json_atomic(self._record_path(name), record)
        os.replace(tmp, path)
        return record

    def finish(self, records, report_name):
        """Write the report and index.json from every shard's record (in index order). Returns
        (the new index, the report lines)."""
        failures = [{"key": key, "shard": r["name"], "reason": why} for r in records
                    for key, why in r["failed"].items()]
        report = "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures)
        shards.write_atomic(os.path.join(self.out_dir, report_name), report.encode("utf-8"))
        index = {**self.index, "shards": [{k: r[k] for k in ("name", "num_samples", "bytes", "sha256")}
                                          for r in records]}
        shards.write_json_atomic(os.path.join(self.out_dir, shards.INDEX_NAME), index)
        return index, failures

    def _record_path(self, name):
        return os.path.join(self.out_dir, self.records_dir, name + ".json")

    def _remove_stale(self):
        for name in os.listdir(self.out_dir):
            if ".tar.tmp-" in name or (shards.SHARD_NAME.match(name) and name not in self.names):
                os.remove(os.path.join(self.out_dir, name))
                if os.path.exists(self._record_path(name)):
                    os.remove(self._record_path(name))


def progress(total, enabled, desc):
    """A tqdm bar of samples on stderr (disabled: a no-op with the same methods)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", file=sys.stderr, desc=desc, disable=not enabled or None,
                dynamic_ncols=True)
