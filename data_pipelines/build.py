"""`omni-data build`: entries -> WebDataset shards + index.json, in parallel and resumable.

Items are cut into shards deterministically (in order, by count and estimated size), so a rerun makes
the same shards. Each shard is written to a temp file and renamed when complete, together with a
small record in `OUT_DIR/.build/` (its fingerprint, stats and bad entries). A rerun skips every shard
whose tar and record exist with a matching fingerprint. index.json is removed when a build starts
and written last.
"""

import json
import multiprocessing
import os
import sys
from dataclasses import dataclass

from data_pipelines import shards
from data_pipelines.samples import BadEntry, add_stats, build_sample, empty_stats, rounded_stats
from data_pipelines.sources import fingerprint

RECORDS_DIR = ".build"


@dataclass
class BuildOptions:
    samples_per_shard: int = 1000
    shard_size_mb: float = 512.0
    workers: int = 1
    progress: bool = True


@dataclass
class BuildResult:
    index: dict
    errors: list  # report entries: {"source", "line" or "row", "reason"}
    built: list  # shard names written by this run
    skipped: list  # shard names kept from an earlier run


def plan_shards(items, samples_per_shard, shard_bytes):
    """Consecutive groups of items: a new shard starts when the count or size limit would be passed."""
    plan, current, size = [], [], 0
    for item in items:
        if current and (len(current) >= samples_per_shard or size + item.size > shard_bytes):
            plan.append(current)
            current, size = [], 0
        current.append(item)
        size += item.size
    if current:
        plan.append(current)
    return plan


def build(source, out_dir, options=BuildOptions()):
    """Build (or finish building) the dataset in out_dir from source. Returns a BuildResult."""
    os.makedirs(os.path.join(out_dir, RECORDS_DIR), exist_ok=True)
    index_path = os.path.join(out_dir, shards.INDEX_NAME)
    if os.path.exists(index_path):
        os.remove(index_path)
    items = source.items()
    plan = plan_shards(items, options.samples_per_shard, int(options.shard_size_mb * 1024 * 1024))
    _remove_stale(out_dir, len(plan))
    tasks, records, skipped = [], {}, []
    for number, group in enumerate(plan):
        task = (source, out_dir, number, group, fingerprint(source, group))
        record = _finished_record(out_dir, number, task[4])
        if record:
            records[number] = record
            skipped.append(record["name"])
        else:
            tasks.append(task)
    done = sum(len(plan[n]) for n in records)
    with _progress(len(items), done, options.progress) as bar:
        for record in _run_tasks(tasks, options.workers, bar):
            records[record["number"]] = record
    ordered = [records[n] for n in range(len(plan))]
    errors = [e for r in ordered for e in r["errors"]]
    report = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors)
    shards.write_atomic(os.path.join(out_dir, shards.REPORT_NAME), report.encode("utf-8"))
    index = make_index(ordered)
    shards.write_json_atomic(index_path, index)
    built = [r["name"] for r in ordered if r["name"] not in skipped]
    return BuildResult(index, errors, built, skipped)


def make_index(records):
    stats = empty_stats()
    for record in records:
        add_stats(stats, record["stats"])
    return {
        "format": shards.FORMAT_NAME,
        "version": shards.FORMAT_VERSION,
        "num_samples": sum(r["num_samples"] for r in records),
        "modalities": rounded_stats(stats),
        "shards": [{k: r[k] for k in ("name", "num_samples", "bytes", "sha256")} for r in records],
    }


def _run_tasks(tasks, workers, bar):
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield build_shard(task, on_sample=lambda: bar.update(1))
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
        for record in pool.imap_unordered(build_shard, tasks):
            bar.update(len(record["errors"]) + record["num_samples"])
            yield record


def build_shard(task, on_sample=None):
    """Write one shard (temp file, then rename) and its record; return the record."""
    source, out_dir, number, items, shard_fingerprint = task
    name = shards.shard_name(number)
    record = {"number": number, "name": name, "fingerprint": shard_fingerprint, "num_samples": 0,
              "stats": empty_stats(), "errors": []}

    def members():
        for item in items:
            try:
                entry, read_media = source.load(item)
                sample_members, stats = build_sample(entry, f"s{item.index:08d}", read_media, source.meta(item))
            except BadEntry as exc:
                record["errors"].append({**source.meta(item), "reason": str(exc)})
            else:
                record["num_samples"] += 1
                add_stats(record["stats"], stats)
                yield from sample_members
            if on_sample:
                on_sample()

    path = os.path.join(out_dir, name)
    tmp = f"{path}.tmp-{os.getpid()}"
    shards.write_tar(tmp, members())
    record["bytes"], record["sha256"] = os.path.getsize(tmp), shards.file_sha256(tmp)
    shards.write_json_atomic(_record_path(out_dir, number), record)
    os.replace(tmp, path)
    return record


def _record_path(out_dir, number):
    return os.path.join(out_dir, RECORDS_DIR, shards.shard_name(number) + ".json")


def _finished_record(out_dir, number, shard_fingerprint):
    path, record_path = os.path.join(out_dir, shards.shard_name(number)), _record_path(out_dir, number)
    if not (os.path.isfile(path) and os.path.isfile(record_path)):
        return None
    try:
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
    except ValueError:
        return None
    if record.get("fingerprint") != shard_fingerprint or record.get("bytes") != os.path.getsize(path):
        return None
    return record


def _remove_stale(out_dir, num_shards):
    """Drop temp files of interrupted runs and shards past the end of the current plan."""
    for name in os.listdir(out_dir):
        match = shards.SHARD_NAME.match(name)
        if ".tar.tmp-" in name or (match and int(match.group(1)) >= num_shards):
            os.remove(os.path.join(out_dir, name))
            record = os.path.join(out_dir, RECORDS_DIR, name + ".json")
            if match and os.path.exists(record):
                os.remove(record)


def _progress(total, initial, enabled):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="sample", file=sys.stderr, desc="build",
                disable=not enabled or None, dynamic_ncols=True)


def format_error(entry):
    where = f"line {entry['line']}" if "line" in entry else f"row {entry.get('row')}"
    return f"{entry.get('source', '?')} {where}: {entry['reason']}"
