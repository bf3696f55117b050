"""One manifest entry -> one shard sample (members + JSON), and the statistics of a sample.

A media value in an entry is resolved by the source (a file path relative to the manifest, or bytes
from a dataset row). Media bytes are copied unchanged after a full decode check; the member
extension comes from what the bytes are.
"""

import copy
import json

import numpy as np

from data_pipelines import media, schema
from data_pipelines.tokens import estimate_tokens, video_frames_sampled


class BadEntry(ValueError):
    """This entry cannot become a sample; the message says why."""


def build_sample(entry, key, read_media, meta=None):
    """Turn a manifest entry into (members, stats).

    read_media(value) -> bytes, raising BadEntry (e.g. missing file). members is a list of
    (member name, bytes) with the JSON first; stats is `sample_stats` of the result.
    """
    errors = schema.check_sample(entry)
    if errors:
        raise BadEntry("; ".join(errors))
    sample = copy.deepcopy(entry)
    files, infos, named = [], {}, {}
    counters = {kind: 0 for kind in schema.MEDIA_KINDS}
    for where, role, part in schema.iter_parts(sample):
        kind = part["type"]
        if kind == "text":
            continue
        source = part[kind]
        if (kind, source) not in named:
            data = read_media(source)
            info = _probe(kind, data, where, source)
            name = f"{kind}{counters[kind]}.{info.ext}"
            counters[kind] += 1
            named[(kind, source)] = name
            files.append((name, data))
            infos[name] = info
        part[kind] = named[(kind, source)]
        if kind == "video" and part.get("use_audio_in_video") and not infos[part[kind]].has_audio:
            raise BadEntry(f"{where}: use_audio_in_video is set but {source} has no audio track")
        if part.get("codec"):
            part["codec"] = f"codec{sum(n.startswith('codec') for n, _ in files)}.npy"
            files.append((part["codec"], _codec_bytes(read_media(entry_value(entry, where, "codec")), where)))
    _add_speaker(sample, files, read_media)
    if meta:
        sample["meta"] = {**(sample.get("meta") or {}), **meta}
    body = json.dumps(sample, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    members = [(f"{key}.json", body)] + [(f"{key}.{name}", data) for name, data in files]
    return members, sample_stats(sample, infos)


def entry_value(entry, where, field):
    """The original (manifest) value of `field` of the part at `where` in the entry."""
    for at, _, part in schema.iter_parts(entry):
        if at == where:
            return part[field]
    raise KeyError(where)


def _probe(kind, data, where, source):
    try:
        return media.probe(kind, data)
    except media.MediaError as exc:
        raise BadEntry(f"{where}: {source}: {exc}") from exc


def _codec_bytes(data, where):
    array = _npy(data, f"{where}: codec")
    if array.ndim != 2 or array.shape[0] == 0 or not np.issubdtype(array.dtype, np.integer):
        raise BadEntry(f"{where}: codec must be an integer [frames, codebooks] array, got "
                       f"{array.dtype} {list(array.shape)}")
    if array.dtype in (np.int16, np.int32):
        return data
    if array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max:
        raise BadEntry(f"{where}: codec values do not fit int32")
    return media.npy_bytes(array.astype(np.int32))


def _add_speaker(sample, files, read_media):
    speaker = sample.get("speaker")
    if not isinstance(speaker, dict) or not speaker.get("embedding"):
        return
    array = _npy(read_media(speaker["embedding"]), "speaker.embedding")
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.floating):
        raise BadEntry(f"speaker.embedding: must be a float vector, got {array.dtype} {list(array.shape)}")
    files.append((schema.SPEAKER_SUFFIX, media.npy_bytes(array.astype(np.float32))))
    speaker["embedding"] = schema.SPEAKER_SUFFIX


def _npy(data, what):
    try:
        return media.load_npy(data, what)
    except media.MediaError as exc:
        raise BadEntry(str(exc)) from exc


def empty_stats():
    return {
        "text": {"samples": 0, "tokens": 0},
        "audio": {"items": 0, "seconds": 0.0, "tokens": 0},
        "image": {"items": 0, "tokens": 0},
        "video": {"items": 0, "seconds": 0.0, "tokens": 0},
    }


def sample_stats(sample, infos):
    """Per-modality counts of one shard sample; infos maps member suffix -> MediaInfo.

    Each media member counts once. Text tokens count the text of `messages`. A video used with
    `use_audio_in_video` adds its audio track's tokens to the video tokens.
    """
    stats = empty_stats()
    text = schema.sample_text(sample)
    if text:
        stats["text"]["samples"] = 1
        stats["text"]["tokens"] = sum(estimate_tokens("text", text=t) for t in text)
    with_audio = {p["video"] for _, _, p in schema.iter_parts(sample)
                  if p.get("type") == "video" and p.get("use_audio_in_video")}
    for name, info in infos.items():
        entry = stats[info.kind]
        entry["items"] += 1
        if info.kind == "audio":
            entry["seconds"] += info.seconds
            entry["tokens"] += estimate_tokens("audio", seconds=info.seconds)
        elif info.kind == "image":
            entry["tokens"] += estimate_tokens("image", height=info.height, width=info.width)
        else:
            frames = video_frames_sampled(info.seconds, info.frames)
            entry["seconds"] += info.seconds
            entry["tokens"] += estimate_tokens("video", height=info.height, width=info.width, frames=frames)
            if name in with_audio:
                entry["tokens"] += estimate_tokens("audio", seconds=info.audio_seconds)
    return stats


def add_stats(total, other):
    for kind, fields in other.items():
        for field, value in fields.items():
            total[kind][field] += value
    return total


def rounded_stats(stats):
    return {kind: {f: round(v, 3) if isinstance(v, float) else v for f, v in fields.items()}
            for kind, fields in stats.items()}
