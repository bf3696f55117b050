"""`omni-data validate`: read every sample of every shard, check the JSON and decode every member.

Problems are named by shard file and sample key. Shard-level checks: listed in index.json but
missing, on disk but not listed, size or sha256 different from the index, a tar that cannot be read
to its end, a sample count different from the index, keys repeated across the dataset.
"""

import json
import os
from dataclasses import dataclass

import numpy as np

from data_pipelines import media, schema, shards
from data_pipelines.samples import add_stats, empty_stats, sample_stats


@dataclass
class Problem:
    shard: str
    key: str  # "" for a shard-level problem
    reason: str

    def __str__(self):
        return f"{self.shard}: {self.key}: {self.reason}" if self.key else f"{self.shard}: {self.reason}"


@dataclass
class Scan:
    problems: list
    num_samples: int
    num_shards: int
    stats: dict  # recounted per-modality stats of the readable, valid samples


def check_sample_members(key, members):
    """Check one sample ({suffix: bytes}). Returns (sample or None, {suffix: MediaInfo}, [reasons])."""
    reasons = [f"bad member name {key}.{s!r}" for s in members if not schema.MEMBER_NAME.match(f"{key}.{s}")]
    if "json" not in members:
        return None, {}, reasons + ["no .json member"]
    try:
        sample = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return None, {}, reasons + [f"bad JSON member {key}.json: {exc}"]
    reasons += schema.check_sample(sample, members=set(members))
    infos = {}
    referenced = schema.referenced_members(sample) if not reasons else []
    if referenced:
        reasons += _teacher_logprobs_problems(key, sample, members)
    for suffix in referenced:
        if suffix not in members or schema.LOGPROBS_SUFFIX.match(suffix):
            continue
        try:
            info = _decode_member(suffix, members[suffix])
        except media.MediaError as exc:
            reasons.append(f"undecodable member {key}.{suffix}: {exc}")
            continue
        if info is not None:
            infos[suffix] = info
    if infos:  # only a schema-valid sample gets here with decoded members
        reasons += _audio_in_video_problems(key, sample, infos)
    unused = [s for s in members if s != "json" and s not in referenced]
    if not reasons and unused:
        reasons.append(f"members not referenced by the JSON: {', '.join(f'{key}.{s}' for s in unused)}")
    return (None if reasons else sample), infos, reasons


def _audio_in_video_problems(key, sample, infos):
    problems = []
    for where, _, part in schema.iter_parts(sample):
        info = infos.get(part["video"]) if part["type"] == "video" else None
        if info is not None and part.get("use_audio_in_video") and not info.has_audio:
            problems.append(f"{where}: use_audio_in_video is set but {key}.{part['video']} has no audio track")
    return problems


def _teacher_logprobs_problems(key, sample, members):
    """Decode each teacher entry's log-probability members and check their shapes agree."""
    problems = []
    for i, entry in enumerate(sample.get("teacher") or []):
        refs = entry.get("logprobs")
        if refs:
            try:
                check_teacher_logprobs(*(media.load_npy(members[refs[f]], f"{key}.{refs[f]}")
                                         for f in schema.LOGPROBS_FIELDS))
            except media.MediaError as exc:
                problems.append(f"teacher[{i}].logprobs: {exc}")
    return problems


def check_teacher_logprobs(tokens, top_ids, top_logprobs):
    """tokens int [n], top_ids int [n, K], top_logprobs float [n, K] (log-probabilities, descending)."""
    if tokens.ndim != 1 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise media.MediaError(f"tokens must be a non-empty integer vector, got {tokens.dtype} {list(tokens.shape)}")
    n = tokens.shape[0]
    if top_ids.ndim != 2 or top_ids.shape[0] != n or top_ids.shape[1] == 0 \
            or not np.issubdtype(top_ids.dtype, np.integer):
        raise media.MediaError(f"top_ids must be an integer [{n}, K] array, got {top_ids.dtype} {list(top_ids.shape)}")
    if top_logprobs.shape != top_ids.shape or not np.issubdtype(top_logprobs.dtype, np.floating):
        raise media.MediaError(f"top_logprobs must be a float {list(top_ids.shape)} array like top_ids, got "
                               f"{top_logprobs.dtype} {list(top_logprobs.shape)}")
    if (tokens < 0).any() or (top_ids < 0).any():
        raise media.MediaError("negative token ids")
    if not np.isfinite(top_logprobs).all() or (top_logprobs > 1e-4).any():
        raise media.MediaError("top_logprobs must be finite log-probabilities (<= 0)")
    if (np.diff(top_logprobs, axis=1) > 0).any():
        raise media.MediaError("top_logprobs rows must be sorted in descending order")


def _decode_member(suffix, data):
    if suffix == schema.SPEAKER_SUFFIX:
        media.check_speaker_embedding(data)
        return None
    if schema.CODEC_SUFFIX.match(suffix):
        media.check_codec(data)
        return None
    kind, ext = schema.MEDIA_SUFFIX.match(suffix).groups()
    info = media.probe(kind, data)
    if info.ext != ext:
        raise media.MediaError(f"named .{ext} but the bytes are {info.ext}")
    return info


def scan_dataset(directory, check_files=True):
    """Read every listed shard (and flag unlisted/missing ones). Returns a Scan."""
    problems, listed = [], []
    try:
        listed = shards.read_index(directory)["shards"]
    except (OSError, ValueError) as exc:
        problems.append(Problem(shards.INDEX_NAME, "", f"unreadable index: {exc}"))
    listed_names = [s.get("name") for s in listed if isinstance(s, dict)]
    for name in shards.shards_on_disk(directory):
        if name not in listed_names:
            problems.append(Problem(name, "", "shard on disk is not listed in index.json"))
    seen, total, stats = {}, 0, empty_stats()
    for entry in listed:
        name = entry.get("name", "?") if isinstance(entry, dict) else "?"
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            problems.append(Problem(name, "", "listed in index.json but missing"))
            continue
        if check_files:
            problems += _check_file(name, path, entry)
        count = 0
        try:
            for key, members in shards.iter_tar_samples(path):
                count += 1
                if key in seen:
                    problems.append(Problem(name, key, f"key repeated (also in {seen[key]})"))
                seen[key] = name
                sample, infos, reasons = check_sample_members(key, members)
                problems += [Problem(name, key, r) for r in reasons]
                if sample is not None:
                    add_stats(stats, sample_stats(sample, infos))
        except shards.ShardReadError as exc:
            problems.append(Problem(name, "", f"truncated or damaged tar: {exc}"))
            continue
        if check_files and count != entry.get("num_samples"):
            problems.append(Problem(name, "", f"has {count} samples, index.json says {entry.get('num_samples')}"))
        total += count
    return Scan(problems, total, len(listed), stats)


def _check_file(name, path, entry):
    problems, size = [], os.path.getsize(path)
    if size != entry.get("bytes"):
        problems.append(Problem(name, "", f"size {size} bytes, index.json says {entry.get('bytes')}"))
    if shards.file_sha256(path) != entry.get("sha256"):
        problems.append(Problem(name, "", "sha256 differs from index.json"))
    return problems
