"""`omni-data codec`: Talker codec targets for the assistant speech of a dataset (docs/codec.md).

IN_DIR -> OUT_DIR shard by shard, the same keys, members and shard layout. Every assistant `audio` part
(speech output) gets `codec: "codec<i>.npy"`, an int32 [frames, 16] member holding the first 16 codebooks
of a local `MimiModel` run on the audio at 24 kHz (12.5 frames/s: ceil(seconds * 12.5) frames). A part
that has a codec keeps it unless `overwrite`. A sample whose audio cannot be encoded (undecodable,
empty, longer than `max_seconds`) or whose JSON is invalid is copied unchanged, reported in
`codec_report.jsonl` (key and reason) and counted; that is never fatal.

Resumable like `omni-data build`: an output shard is written to a temp file and renamed, after its record
in `OUT_DIR/.codec/` (a fingerprint of the input shard's bytes, the codec model's files and the options;
the output's sha256; its failures). A rerun keeps every shard whose record and file match and redoes the
others. index.json is removed when a run starts and written last. Samples are read, decoded and encoded
a window of `8 * batch_size` samples (or speech parts) at a time, so memory does not grow with the shard.
"""

import hashlib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass

import numpy as np

from data_pipelines import media, schema, shards
from data_pipelines.codec_model import CODEC_SAMPLING_RATE

RECORDS_DIR = ".codec"
REPORT_NAME = "codec_report.jsonl"
FORMAT = "codec-targets-1"  # in the fingerprint: bump when what a shard gets changes


@dataclass
class CodecOptions:
    max_seconds: float = 60.0
    overwrite: bool = False


@dataclass
class CodecRun:
    index: dict
    failures: list  # report lines: {"key", "shard", "reason"}
    encoded: int  # audio members of OUT_DIR encoded by this tool (by this run or an earlier, resumed one)
    kept: int  # assistant audio parts that had a codec and kept it
    written: list  # shard names written by this run
    skipped: list  # shard names kept from an earlier run


class SampleFailed(ValueError):
    """This sample gets no codec; the message says why."""


def codec_targets(in_dir, out_dir, codec, options=CodecOptions(), progress=True):
    """Write OUT_DIR (or finish writing it). codec: a codec_model.MimiCodec. Returns a CodecRun."""
    if os.path.abspath(in_dir) == os.path.abspath(out_dir):
        raise ValueError("OUT_DIR must be another directory than IN_DIR")
    index = shards.read_index(in_dir)
    os.makedirs(os.path.join(out_dir, RECORDS_DIR), exist_ok=True)
    if os.path.exists(os.path.join(out_dir, shards.INDEX_NAME)):
        os.remove(os.path.join(out_dir, shards.INDEX_NAME))
    names = [entry["name"] for entry in index["shards"]]
    _remove_stale(out_dir, names)
    settings = {"format": FORMAT, "codec": codec.identity, **asdict(options)}
    plans = [_plan(in_dir, out_dir, name, settings) for name in names]
    todo = sum(e.get("num_samples", 0) for e, (record, _) in zip(index["shards"], plans) if record is None)
    records, written, skipped = [], [], []
    with _progress(todo, progress) as bar:
        for name, (record, fingerprint) in zip(names, plans):
            if record is None:
                record = _run_shard(in_dir, out_dir, name, fingerprint, codec, options, bar)
                written.append(name)
            else:
                skipped.append(name)
            records.append(record)
    failures = [{"key": key, "shard": r["name"], "reason": why} for r in records for key, why in r["failed"].items()]
    report = "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures)
    shards.write_atomic(os.path.join(out_dir, REPORT_NAME), report.encode("utf-8"))
    new_index = {**index, "shards": [{k: r[k] for k in ("name", "num_samples", "bytes", "sha256")} for r in records]}
    shards.write_json_atomic(os.path.join(out_dir, shards.INDEX_NAME), new_index)
    return CodecRun(new_index, failures, sum(r["encoded"] for r in records), sum(r["kept"] for r in records),
                    written, skipped)


def _plan(in_dir, out_dir, name, settings):
    """(the finished record to keep, or None to write the shard; the shard's fingerprint)."""
    in_path, out_path = os.path.join(in_dir, name), os.path.join(out_dir, name)
    if not os.path.isfile(in_path):
        raise ValueError(f"{in_path}: listed in {shards.INDEX_NAME} but missing")
    identity = json.dumps({"input_sha256": shards.file_sha256(in_path), **settings}, sort_keys=True)
    fingerprint = hashlib.sha256(identity.encode("utf-8")).hexdigest()
    try:
        with open(_record_path(out_dir, name), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None, fingerprint
    finished = isinstance(record, dict) and record.get("fingerprint") == fingerprint and os.path.isfile(out_path) \
        and shards.file_sha256(out_path) == record.get("sha256")
    return (record if finished else None), fingerprint


def _run_shard(in_dir, out_dir, name, fingerprint, codec, options, bar):
    record = {"name": name, "fingerprint": fingerprint, "num_samples": 0, "encoded": 0, "kept": 0, "failed": {}}
    path = os.path.join(out_dir, name)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        shards.write_tar(tmp, _members(os.path.join(in_dir, name), codec, options, record, bar))
    except shards.ShardReadError as exc:
        raise ValueError(f"{os.path.join(in_dir, name)}: {exc}") from None
    record["failed"] = dict(sorted(record["failed"].items()))
    record["bytes"], record["sha256"] = os.path.getsize(tmp), shards.file_sha256(tmp)
    shards.write_json_atomic(_record_path(out_dir, name), record)
    os.replace(tmp, path)
    return record


def _members(path, codec, options, record, bar):
    """Every sample of the input tar, in order, with codec members added where its speech was encoded."""
    window, pending = [], 0
    for key, members in shards.iter_tar_samples(path):
        record["num_samples"] += 1
        item = _speech_parts(key, members, options.overwrite, record)
        window.append(item)
        pending += len(item[3])
        if pending >= 8 * codec.batch_size or len(window) >= 8 * codec.batch_size:
            yield from _flush(window, codec, options, record, bar)
            window, pending = [], 0
    yield from _flush(window, codec, options, record, bar)


def _speech_parts(key, members, overwrite, record):
    """(key, members, sample JSON or None, [audio member suffixes to encode]) of one input sample."""
    try:
        sample = json.loads(members["json"].decode("utf-8"))
    except (KeyError, UnicodeDecodeError, ValueError) as exc:
        record["failed"][key] = f"no readable JSON member {key}.json ({type(exc).__name__})"
        return key, members, None, []
    errors = schema.check_sample(sample, members=set(members))
    if errors:
        record["failed"][key] = f"invalid sample: {errors[0]}"
        return key, members, None, []
    todo = []
    for _, role, part in schema.iter_parts(sample):
        if role != "assistant" or part["type"] != "audio" or part["audio"] in todo:
            continue
        if part.get("codec") and not overwrite:
            record["kept"] += 1
        else:
            todo.append(part["audio"])
    return key, members, sample, todo


def _flush(window, codec, options, record, bar):
    """Decode and encode the window's speech, then yield its samples' members in order."""
    waves = {}
    for key, members, _, todo in window:
        try:
            loaded = {(key, s): _load_audio(members[s], s, options.max_seconds) for s in todo}
        except SampleFailed as exc:
            record["failed"][key] = str(exc)
        else:
            waves.update(loaded)
    codes = dict(zip(waves, codec.encode(list(waves.values()))))
    for key, members, sample, todo in window:
        if todo and key not in record["failed"]:
            members = _with_codes(members, sample, {s: codes[(key, s)] for s in todo})
            record["encoded"] += len(todo)
        yield from ((f"{key}.{suffix}", data) for suffix, data in members.items())
        bar.update(1)


def _load_audio(data, suffix, max_seconds):
    """Mono float32 at the codec's 24 kHz (SampleFailed when it cannot or should not be encoded)."""
    from omni_train.data.decode import decode_audio

    try:
        wave = decode_audio(data, CODEC_SAMPLING_RATE)
    except Exception as exc:  # decoders raise many types; all mean "not decodable"
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the data", str(exc))  # stable reports
        raise SampleFailed(f"undecodable audio {suffix}: {type(exc).__name__}: {reason}") from None
    if wave.size == 0:
        raise SampleFailed(f"empty audio {suffix}")
    seconds = wave.size / CODEC_SAMPLING_RATE
    if seconds > max_seconds:
        raise SampleFailed(f"audio {suffix} is {seconds:.2f} s, longer than --max-seconds {max_seconds:g}")
    return wave


def _with_codes(members, sample, codes):
    """The members with `codec` set on every assistant audio part encoded (codes: {audio suffix: array})."""
    names, old, taken = {}, set(), set(members)
    for _, role, part in schema.iter_parts(sample):
        if role != "assistant" or part["type"] != "audio" or part["audio"] not in codes:
            continue
        old.add(part.get("codec"))
        if part["audio"] not in names:
            names[part["audio"]] = part.get("codec") or _free_codec_name(taken)
            taken.add(names[part["audio"]])
        part["codec"] = names[part["audio"]]
    body = json.dumps(sample, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    arrays = {names[s]: media.npy_bytes(codes[s]) for s in names}
    drop = set(arrays) | (old - set(schema.referenced_members(sample)))  # rewritten, or no longer referenced
    return {"json": body, **{s: d for s, d in members.items() if s != "json" and s not in drop}, **arrays}


def _free_codec_name(taken):
    i = 0
    while f"codec{i}.npy" in taken:
        i += 1
    return f"codec{i}.npy"


def _record_path(out_dir, name):
    return os.path.join(out_dir, RECORDS_DIR, name + ".json")


def _remove_stale(out_dir, names):
    """Drop temp files of interrupted runs, and shards (with their records) the input does not have."""
    for name in os.listdir(out_dir):
        if ".tar.tmp-" in name or (shards.SHARD_NAME.match(name) and name not in names):
            os.remove(os.path.join(out_dir, name))
            if os.path.exists(_record_path(out_dir, name)):
                os.remove(_record_path(out_dir, name))


def _progress(total, enabled):
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", file=sys.stderr, desc="codec", disable=not enabled or None,
                dynamic_ncols=True)

