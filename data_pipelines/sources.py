"""Where build entries come from: a JSONL manifest, or a Hugging Face `datasets` dataset on local disk.

A source lists its items (one per manifest line or dataset row) and turns one item into a manifest
entry plus a `read_media(value) -> bytes` function. Sources are picklable so worker processes can
reopen them.
"""

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field, replace

from data_pipelines.samples import BadEntry
from data_pipelines.schema import MEDIA_KINDS

FOLDER_EXTS = {
    "audio": (".flac", ".wav", ".mp3"),
    "image": (".jpg", ".jpeg", ".png", ".webp"),
    "video": (".mp4", ".webm"),
}


@dataclass
class Item:
    index: int  # position in the source; the sample key is derived from it
    label: dict  # how a report names it: {"line": 7} (1-based) or {"row": 6} (0-based)
    payload: object  # the manifest line, or the row index
    identity: str  # changes when the item's content changes (shard fingerprints)
    size: int  # estimated bytes in a shard, for planning


def _read_file(path, shown):
    if not os.path.isfile(path):
        raise BadEntry(f"missing file {shown}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise BadEntry(f"unreadable file {shown}: {exc}") from exc


class ManifestSource:
    """`{"messages": [...]}` per line; media paths relative to the manifest's folder, or absolute."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.base = os.path.dirname(self.path)
        self.name = os.path.basename(self.path)

    def describe(self):
        return {"manifest": self.name}

    def items(self):
        items = []
        with open(self.path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    identity = hashlib.sha256(line).hexdigest()
                    items.append(Item(line_no - 1, {"line": line_no}, line, identity, self._size(line)))
        return items

    def _size(self, line):
        total = len(line) + 1024
        try:
            entry = json.loads(line)
        except ValueError:
            return total
        for value in _string_values(entry):
            path = os.path.join(self.base, value)
            if len(value) < 4096 and os.path.isfile(path):
                total += os.path.getsize(path) + 512
        return total

    def load(self, item):
        try:
            entry = json.loads(item.payload.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise BadEntry(f"line is not UTF-8: {exc}") from exc
        except ValueError as exc:
            raise BadEntry(f"bad JSON: {exc}") from exc
        if not isinstance(entry, dict):
            raise BadEntry(f"bad JSON: expected an object, got {type(entry).__name__}")
        return entry, self.read_media

    def read_media(self, value):
        return _read_file(os.path.join(self.base, value), value)

    def meta(self, item):
        return {"source": self.name, "line": item.label["line"]}


def _string_values(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _string_values(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _string_values(value)


@dataclass
class TableSource:
    """Rows of a dataset: `load_from_disk` dir, parquet file(s) or an audiofolder/imagefolder layout.

    columns maps conversation fields to column names: audio/image/video (user media), text (the
    assistant's answer), prompt (user text; else the fixed `prompt`), speaker (speaker id).
    """

    path: str
    columns: dict
    prompt: str = ""
    system: str = ""
    fmt: str = "auto"
    split: str = ""
    _rows: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.path = os.path.abspath(self.path)
        if self.fmt == "auto":
            self.fmt = detect_format(self.path)
        if "text" not in self.columns:
            raise ValueError("a dataset source needs --column text=<column> (the assistant's answer)")
        unknown = set(self.columns) - {"audio", "image", "video", "text", "prompt", "speaker"}
        if unknown:
            raise ValueError(f"unknown conversation field(s) {sorted(unknown)}; use audio, image, video, "
                             "text, prompt, speaker")

    def __getstate__(self):
        return {**self.__dict__, "_rows": None}

    def describe(self):
        spec = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        return {**spec, "path": os.path.basename(self.path)}

    @property
    def rows(self):
        if self._rows is None:
            self._rows = open_rows(self.path, self.fmt, self.split)
        return self._rows

    def items(self):
        rows, tag = self.rows, _rows_tag(self.rows)
        items = []
        for i in range(len(rows)):
            row = rows[i]
            size = 1024 + sum(_value_size(row.get(self.columns[k]), self.path) for k in MEDIA_KINDS
                              if k in self.columns)
            identity = f"{tag}:{i}" if tag else json.dumps(row, sort_keys=True, default=str) + f":{size}"
            items.append(Item(i, {"row": i}, i, identity, size))
        return items

    def load(self, item):
        row = self.rows[item.payload]
        user, blobs = [], {}
        for kind in MEDIA_KINDS:
            if kind in self.columns:
                blobs[f"{kind}:{self.columns[kind]}"] = _column(row, self.columns[kind])
                user.append({"type": kind, kind: f"{kind}:{self.columns[kind]}"})
        prompt = _column(row, self.columns["prompt"]) if "prompt" in self.columns else self.prompt
        if prompt:
            user.append({"type": "text", "text": str(prompt)})
        answer = _column(row, self.columns["text"])
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": [{"type": "text", "text": str(answer)}]}]
        entry = {"messages": messages}
        if "speaker" in self.columns:
            entry["speaker"] = {"id": str(_column(row, self.columns["speaker"]))}
        return entry, lambda value: self._media_bytes(blobs[value])

    def _media_bytes(self, value):
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str) and value:
            return _read_file(os.path.join(self.path if os.path.isdir(self.path) else os.path.dirname(self.path),
                                           value), value)
        raise BadEntry(f"media value of type {type(value).__name__} is neither bytes nor a path "
                       "(decoded columns are not supported: keep the encoded file)")

    def meta(self, item):
        return {"source": os.path.basename(self.path), "row": item.label["row"]}


def _column(row, name):
    if name not in row:
        raise BadEntry(f"no column {name!r} (columns: {', '.join(sorted(row))})")
    if row[name] is None:
        raise BadEntry(f"column {name!r} is empty")
    return row[name]


def _value_size(value, base):
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return len(value) + 512
    if isinstance(value, str):
        path = os.path.join(base if os.path.isdir(base) else os.path.dirname(base), value)
        return os.path.getsize(path) + 512 if os.path.isfile(path) else 0
    return 0


def _rows_tag(rows):
    fingerprint = getattr(rows, "_fingerprint", None)  # a datasets.Dataset: content-derived
    return str(fingerprint) if fingerprint else ""


def detect_format(path):
    if os.path.isfile(path):
        if path.endswith(".parquet"):
            return "parquet"
        raise ValueError(f"{path}: a dataset file must be .parquet")
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such dataset")
    names = os.listdir(path)
    if "state.json" in names or "dataset_dict.json" in names:
        return "disk"
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    return "folder"


def open_rows(path, fmt, split=""):
    """Random-access rows (dicts) with media columns left encoded ({"bytes", "path"} or a path)."""
    if fmt == "folder":
        return folder_rows(path)
    import datasets

    if fmt == "disk":
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            split = split or ("train" if "train" in ds else sorted(ds)[0])
            ds = ds[split]
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(path, n) for n in os.listdir(path) if n.endswith(".parquet"))
        ds = datasets.concatenate_datasets([datasets.Dataset(pq.read_table(f, memory_map=True)) for f in files])
    else:
        raise ValueError(f"unknown dataset format {fmt!r} (auto, disk, parquet, folder)")
    for name, feature in ds.features.items():
        if getattr(feature, "decode", False) and hasattr(feature, "decode_example"):
            ds = ds.cast_column(name, replace(feature, decode=False))
    return ds


def folder_rows(root):
    """The audiofolder/imagefolder layout, read directly (datasets' own loader needs torchcodec for audio).

    With `metadata.csv` or `metadata.jsonl` at the root: one row per line, `file_name` relative to the
    root, other fields kept. Without: one row per media file, `label` = its sub-folder name. The file
    is put in the column named after its kind (`audio`, `image` or `video`) as an absolute path.
    """
    rows = []
    for meta_name in ("metadata.jsonl", "metadata.csv"):
        meta_path = os.path.join(root, meta_name)
        if os.path.isfile(meta_path):
            with open(meta_path, encoding="utf-8", newline="") as f:
                records = [json.loads(l) for l in f if l.strip()] if meta_name.endswith("jsonl") else list(
                    csv.DictReader(f))
            for record in records:
                path = os.path.join(root, record.get("file_name", ""))
                rows.append({**record, _kind_of(path) or "file": path})
            return rows
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            kind = _kind_of(path)
            if kind:
                label = os.path.relpath(folder, root)
                rows.append({kind: path, "file_name": os.path.relpath(path, root),
                             "label": "" if label == "." else label})
    return rows


def _kind_of(path):
    ext = os.path.splitext(path)[1].lower()
    return next((kind for kind, exts in FOLDER_EXTS.items() if ext in exts), None)


def fingerprint(source, items):
    digest = hashlib.sha256(json.dumps(source.describe(), sort_keys=True).encode())
    for item in items:
        digest.update(item.identity.encode("utf-8", "replace") + b"\0")
    return digest.hexdigest()
