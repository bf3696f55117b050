"""Pack variable-length documents into fixed-length sequences, keeping document boundaries.

Each packed sequence of ``max_length`` tokens holds whole documents (or pieces of a too-long one) end to
end, then padding. Per sequence:

- ``input_ids [L]``; ``labels [L]``: the next token of the same document (next-token targets are made
  per document before packing, so nothing predicts across a boundary); ``loss_mask [L]`` float: 1 where
  that next token is a training target (chat.py's mask of the target token), 0 on a document's last
  token and on padding. Ignored labels hold ``pad_id`` (valid indices for a vocab-parallel CE). This is
  the ``(input_ids, labels, loss_mask)`` contract of ``synthetic_text``.
- ``position_ids [3, L]``: the document's own ``[3, n]`` TM-RoPE ids when it has them, else text positions
  0..n-1 on all three rows; a piece of a split document keeps its slice of the document's positions;
  padding counts 0.. again.
- ``document_ids [L]`` (0.. in order, -1 on padding) and ``cu_seqlens`` (int32, starts of documents
  plus ``L``; padding, when any, is the last segment) for attention boundaries.
- ``media``: the documents' media items in order, ``media_spans`` their ``[start, end)`` in this sequence.
- with ``top_k`` > 0: ``top_ids [L, K]``, ``top_logprobs [L, K]`` and ``top_mask [L]``, a teacher's top-k
  distribution of each position's label (shifted like the labels; rows without one: mask False).

Too-long documents follow ``policy``: ``"split"`` cuts them into pieces of at most ``max_length``, moving a
cut that would fall inside a media span back to the span's start (a document whose single media span
is longer than ``max_length`` cannot be split and is dropped); ``"drop"`` drops them. Both are counted.

Placement is best fit over at most ``max_open`` open sequences: a piece goes to the open sequence with
the least room that still fits it; when none fits and all are open, the fullest one is emitted first.
Deterministic; ``state_dict()``/``load_state_dict()`` carry the open sequences, so a resumed packer emits
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

POLICIES = ("split", "drop")
TOP_KEYS = ("top_ids", "top_logprobs", "top_mask")  # a teacher's top-k per label (packer top_k > 0)
# What a document's target tokens count towards in the per-modality losses: its richest input medium.
MODALITIES = ("text", "audio", "image", "video")


def document_modality(kinds: Iterable[str]) -> int:
    """Index into MODALITIES: video if the document has a video, else image, else audio, else text."""
    kinds = set(kinds)
    return next((MODALITIES.index(k) for k in ("video", "image", "audio") if k in kinds), 0)


@dataclass
class Document:
    input_ids: np.ndarray                      # int [n]
    loss_mask: np.ndarray                      # bool [n]: token is a training target
    position_ids: Optional[np.ndarray] = None  # [3, n] TM-RoPE ids, if the encoder made them
    media_spans: List[Tuple[int, int]] = field(default_factory=list)
    media: List[Any] = field(default_factory=list)  # one item per span
    key: Optional[str] = None
    modality: int = 0  # index into MODALITIES
    top_logprobs: Optional[Dict[str, np.ndarray]] = None  # ids [n, K], logprobs [n, K], mask [n] (per token)

    @classmethod
    def from_encoded(cls, sample) -> "Document":
        """From ``chat.EncodedSample``."""
        pos = None if sample.position_ids is None else np.asarray(sample.position_ids)
        return cls(np.asarray(sample.input_ids, dtype=np.int64), np.asarray(sample.loss_mask, dtype=bool),
                   pos, [tuple(m.span) for m in sample.media], list(sample.media), sample.key,
                   document_modality(m.kind for m in sample.media), getattr(sample, "top_logprobs", None))


@dataclass
class PackedSequence:
    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    document_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    modality_ids: torch.Tensor  # [L] the document's MODALITIES index per token, -1 on padding
    media: List[Any]
    media_spans: List[Tuple[int, int]]
    keys: List[Optional[str]]
    num_pad: int
    top: Optional[Dict[str, torch.Tensor]] = None  # top_ids [L, K], top_logprobs [L, K], top_mask [L]

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def _shifted(x: np.ndarray, start: int, end: int) -> np.ndarray:
    """Rows [start, end) of x moved one token earlier (row t holds token t+1's; the last row zero)."""
    return np.concatenate([x[1:], np.zeros_like(x[:1])])[start:end]


def _top_piece(doc: Document, start: int, end: int, k: int) -> Dict[str, np.ndarray]:
    if doc.top_logprobs is None:
        n = end - start
        return {"top_ids": np.zeros((n, k), np.int64), "top_logprobs": np.zeros((n, k), np.float32),
                "top_mask": np.zeros(n, bool)}
    top = doc.top_logprobs
    if top["ids"].shape[1] != k:
        raise ValueError(f"document {doc.key}: top-{top['ids'].shape[1]} log-probabilities, the packer takes {k}")
    return {"top_ids": _shifted(top["ids"], start, end), "top_logprobs": _shifted(top["logprobs"], start, end),
            "top_mask": _shifted(top["mask"], start, end)}


def _piece(doc: Document, start: int, end: int, pad_id: int, top_k: int = 0) -> Dict[str, Any]:
    """Slice [start, end) of a document with its next-token labels (the document's last token: none)."""
    ids = np.asarray(doc.input_ids, dtype=np.int64)
    mask = np.asarray(doc.loss_mask, dtype=bool)
    labels = np.append(ids[1:], pad_id)[start:end]
    label_mask = np.append(mask[1:], False)[start:end]
    pos = (np.broadcast_to(np.arange(start, end), (3, end - start)) if doc.position_ids is None
           else np.asarray(doc.position_ids)[:, start:end])
    inside = [i for i, (s, e) in enumerate(doc.media_spans) if start <= s and e <= end]
    piece = {"input_ids": ids[start:end].copy(), "labels": labels, "loss_mask": label_mask,
             "position_ids": np.array(pos), "media": [doc.media[i] for i in inside],
             "media_spans": [(doc.media_spans[i][0] - start, doc.media_spans[i][1] - start) for i in inside],
             "key": doc.key, "modality": doc.modality}
    if top_k:
        piece.update(_top_piece(doc, start, end, top_k))
    return piece


def split_points(length: int, max_length: int, spans: Sequence[Tuple[int, int]]) -> Optional[List[int]]:
    """Cut positions so every piece has at most ``max_length`` tokens and no cut falls strictly inside a
    span; ``None`` when impossible (a span longer than ``max_length``)."""
    cuts, start = [], 0
    ordered = sorted(spans)
    while length - start > max_length:
        cut = start + max_length
        for s, e in ordered:
            if s < cut < e:
                cut = s
                break
        if cut <= start:
            return None
        cuts.append(cut)
        start = cut
    return cuts


class SequencePacker:
    """Streaming best-fit packer. ``add(doc)`` returns the sequences completed by it; ``flush()`` the rest."""

    def __init__(self, max_length: int, pad_id: int, policy: str = "split", max_open: int = 8, top_k: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if max_length < 2 or max_open < 1:
            raise ValueError("max_length must be >= 2 and max_open >= 1")
        self.max_length, self.pad_id, self.policy, self.max_open = max_length, pad_id, policy, max_open
        self.top_k = top_k
        self.open: List[List[Dict[str, Any]]] = []
        self.stats = {"documents": 0, "pieces": 0, "tokens": 0, "pad_tokens": 0, "sequences": 0,
                      "split_documents": 0, "dropped_documents": 0, "dropped_tokens": 0,
                      "dropped_unsplittable": 0}

    # ----------------------------------------------------------------------------------------- stats
    @property
    def pad_fraction(self) -> float:
        total = self.stats["sequences"] * self.max_length
        return self.stats["pad_tokens"] / total if total else 0.0

    def report(self) -> Dict[str, float]:
        return {**self.stats, "pad_fraction": self.pad_fraction}

    # ----------------------------------------------------------------------------------------- packing
    def _pieces(self, doc: Document) -> List[Dict[str, Any]]:
        n = len(doc.input_ids)
        self.stats["documents"] += 1
        if n == 0:
            return []
        if n <= self.max_length:
            return [_piece(doc, 0, n, self.pad_id, self.top_k)]
        cuts = split_points(n, self.max_length, doc.media_spans) if self.policy == "split" else None
        if cuts is None:
            self.stats["dropped_documents"] += 1
            self.stats["dropped_tokens"] += n
            self.stats["dropped_unsplittable"] += int(self.policy == "split")
            return []
        self.stats["split_documents"] += 1
        bounds = [0, *cuts, n]
        return [_piece(doc, a, b, self.pad_id, self.top_k) for a, b in zip(bounds[:-1], bounds[1:])]

    def _room(self, i: int) -> int:
        return self.max_length - sum(len(p["input_ids"]) for p in self.open[i])

    def _place(self, piece: Dict[str, Any]) -> List[PackedSequence]:
        out: List[PackedSequence] = []
        size = len(piece["input_ids"])
        rooms = [self._room(i) for i in range(len(self.open))]
        fits = [i for i, r in enumerate(rooms) if r >= size]
        if fits:
            target = min(fits, key=lambda i: (rooms[i], i))
        else:
            if len(self.open) >= self.max_open:
                fullest = min(range(len(self.open)), key=lambda i: (rooms[i], i))
                out.append(self._emit(self.open.pop(fullest)))
            self.open.append([])
            target = len(self.open) - 1
        self.open[target].append(piece)
        if self._room(target) == 0:
            out.append(self._emit(self.open.pop(target)))
        return out

    def add(self, doc: Document) -> List[PackedSequence]:
        out: List[PackedSequence] = []
        for piece in self._pieces(doc):
            self.stats["pieces"] += 1
            self.stats["tokens"] += len(piece["input_ids"])
            out.extend(self._place(piece))
        return out

    def flush(self) -> List[PackedSequence]:
        out = [self._emit(bin_) for bin_ in self.open]
        self.open = []
        return out

    def pack(self, docs: Iterable[Document]) -> Iterator[PackedSequence]:
        for doc in docs:
            yield from self.add(doc)
        yield from self.flush()

    def _emit(self, pieces: List[Dict[str, Any]]) -> PackedSequence:
        L = self.max_length
        used = sum(len(p["input_ids"]) for p in pieces)
        pad = L - used
        cat = lambda k: np.concatenate([p[k] for p in pieces]) if pieces else np.zeros(0)  # noqa: E731
        ids = np.concatenate([cat("input_ids").astype(np.int64), np.full(pad, self.pad_id, np.int64)])
        labels = np.concatenate([cat("labels").astype(np.int64), np.full(pad, self.pad_id, np.int64)])
        mask = np.concatenate([cat("loss_mask").astype(np.float32), np.zeros(pad, np.float32)])
        pos_parts = [p["position_ids"] for p in pieces] + [np.broadcast_to(np.arange(pad), (3, pad))]
        is_float = any(np.issubdtype(p.dtype, np.floating) for p in pos_parts)
        pos = np.concatenate(pos_parts, axis=1).astype(np.float32 if is_float else np.int64)
        lengths = [len(p["input_ids"]) for p in pieces] + ([pad] if pad else [])
        doc_ids = np.concatenate([np.full(n, i, np.int64) for i, n in enumerate(lengths)]) if lengths else \
            np.zeros(0, np.int64)
        if pad:
            doc_ids[used:] = -1
        modality = np.concatenate([np.full(len(p["input_ids"]), p.get("modality", 0), np.int64) for p in pieces]
                                  + [np.full(pad, -1, np.int64)])
        offsets = np.cumsum([0] + [len(p["input_ids"]) for p in pieces])
        spans = [(int(s + off), int(e + off)) for p, off in zip(pieces, offsets) for s, e in p["media_spans"]]
        self.stats["sequences"] += 1
        self.stats["pad_tokens"] += pad
        top = None
        if self.top_k:
            k = self.top_k
            top = {"top_ids": np.concatenate([*(p["top_ids"] for p in pieces), np.zeros((pad, k), np.int64)]),
                   "top_logprobs": np.concatenate([*(p["top_logprobs"] for p in pieces),
                                                   np.zeros((pad, k), np.float32)]),
                   "top_mask": np.concatenate([*(p["top_mask"] for p in pieces), np.zeros(pad, bool)])}
            top = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in top.items()}
        return PackedSequence(
            input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels), loss_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(np.ascontiguousarray(pos)), document_ids=torch.from_numpy(doc_ids),
            cu_seqlens=torch.tensor(np.cumsum([0] + lengths), dtype=torch.int32),
            modality_ids=torch.from_numpy(modality),
            media=[m for p in pieces for m in p["media"]], media_spans=spans,
            keys=[p["key"] for p in pieces], num_pad=int(pad), top=top)

    # ----------------------------------------------------------------------------------------- state
    def _config(self) -> Dict[str, Any]:
        config = {"max_length": self.max_length, "pad_id": self.pad_id, "policy": self.policy,
                  "max_open": self.max_open}
        if self.top_k:  # absent otherwise, so that checkpoints written before it load
            config["top_k"] = self.top_k
        return config

    def state_dict(self) -> Dict[str, Any]:
        """Open sequences (their pieces: numpy arrays and media payloads) and counters; torch.save-able."""
        return {"config": self._config(),
                "open": copy.deepcopy(self.open), "stats": dict(self.stats)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        mine = self._config()
        if state["config"] != mine:
            raise ValueError(f"packer state was saved with {state['config']}, this packer has {mine}")
        self.open = copy.deepcopy(state["open"])
        self.stats = dict(state["stats"])


def collate_packed(seqs: Sequence[PackedSequence]) -> Dict[str, Any]:
    """Stack packed sequences into a micro-batch: input_ids/labels/loss_mask [B, L], position_ids
    [3, B, L], document_ids [B, L]; cu_seqlens concatenated over the batch (offset by b*L) and the longest
    segment (``max_seqlen``, a number: attention kernels size their launch by it); media listed."""
    L = seqs[0].input_ids.shape[0]
    cu = [seqs[0].cu_seqlens] + [s.cu_seqlens[1:] + b * L for b, s in enumerate(seqs) if b > 0]
    return {
        "max_seqlen": max(int((s.cu_seqlens[1:] - s.cu_seqlens[:-1]).max()) for s in seqs),
        "input_ids": torch.stack([s.input_ids for s in seqs]),
        "labels": torch.stack([s.labels for s in seqs]),
        "loss_mask": torch.stack([s.loss_mask for s in seqs]),
        "position_ids": torch.stack([s.position_ids for s in seqs], dim=1),
        "document_ids": torch.stack([s.document_ids for s in seqs]),
        "modality_ids": torch.stack([s.modality_ids for s in seqs]),
        "cu_seqlens": torch.cat(cu).to(torch.int32),
        "media": [m for s in seqs for m in s.media],
        "keys": [k for s in seqs for k in s.keys],  # the documents' sample keys, in order
        **({name: torch.stack([s.top[name] for s in seqs]) for name in TOP_KEYS} if seqs[0].top is not None else {}),
    }
